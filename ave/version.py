"""The installed version of AVE, as every command's ``--version`` shows it."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _distribution_version

DISTRIBUTION = 'ave'


def version() -> str:
    """The version of the installed ``ave`` distribution (setup.py's ``version``).

    Code run straight from a source tree that was never installed has no
    distribution metadata; it says so instead of inventing a number.
    """
    try:
        return _distribution_version(DISTRIBUTION)
    except PackageNotFoundError:
        return 'unknown (not installed)'
