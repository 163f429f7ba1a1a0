"""AVE: the control plane of device test labs."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version('ave')
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = 'unknown'
