"""AVE: the control plane of device test labs."""


def __getattr__(name: str) -> str:
    """``ave.__version__``, looked up the first time it is asked for: finding it
    (``importlib.metadata``) takes longer than importing the rest of a client, and
    every test job, session and sandboxed command imports ``ave``."""
    if name != '__version__':
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    from importlib.metadata import PackageNotFoundError, version
    try:
        found = version('ave')
    except PackageNotFoundError:  # run from a source tree that was never installed
        found = 'unknown'
    globals()['__version__'] = found
    return found
