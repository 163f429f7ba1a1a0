"""What a sandboxed command sees of the file system, and the bwrap options that make it.

Pure decisions over plain data (``Layout`` and ``mount_arguments``), plus the few
looks at the host they start from (which hidden paths exist, where resolv.conf and
AVE itself live), so that the mount order can be tested without running bwrap.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import ave

#: Size of each command's private /tmp. It is memory, not disk: without a cap one
#: command could fill half the host's RAM. Big scratch files belong in a workspace.
DEFAULT_TMP_BYTES = 256 * 1024 * 1024

# Size of the other file systems made in memory (/run, hidden directories): they only
# hold mount points, but a command can write into them.
_SMALL_TMPFS = str(1024 * 1024)

_RESOLV_CONF = '/etc/resolv.conf'

# The trees where a command gets an empty file system of its own.
_PRIVATE_ROOTS = ('/tmp', '/run')


@dataclass(frozen=True)
class Layout:
    """What a command is to see, as plain data (existence already checked)."""

    hidden: tuple[tuple[str, bool], ...]  # (path, is a directory)
    writable: tuple[str, ...]
    devices: tuple[str, ...]
    resolv: str | None  # where /etc/resolv.conf really is, when that is under /run
    tmp_bytes: int = DEFAULT_TMP_BYTES
    readable: tuple[str, ...] = ()  # shown read-only through the private /tmp and /run

    @classmethod
    def seen_by_commands(cls, hidden: Iterable[str], writable: tuple[str, ...],
                         devices: tuple[str, ...], tmp_bytes: int) -> Layout:
        """The layout for a session's commands, as the host is now."""
        return cls(hidden=tuple(_present(hidden)), writable=writable, devices=devices,
                   resolv=_resolv_under_run(), tmp_bytes=tmp_bytes,
                   readable=_OWN_INSTALLATION)


def mount_arguments(layout: Layout) -> list[str]:
    """bwrap's file system options for ``layout``, in the order they must apply.

    Later mounts land on top of earlier ones: the private /tmp and /run (with what
    must show through them) and the empty hidden directories first, then the
    workspaces (whose mount points bwrap creates inside those empty directories),
    then /dev and /proc.
    """
    args = ['--ro-bind', '/', '/', '--size', str(layout.tmp_bytes), '--tmpfs', '/tmp',
            '--size', _SMALL_TMPFS, '--tmpfs', '/run']
    if layout.resolv is not None:  # name resolution keeps working
        args += ['--ro-bind-try', layout.resolv, layout.resolv]
    for path in layout.readable:
        args += ['--ro-bind-try', path, path]
    for path, is_directory in layout.hidden:
        # A file becomes /dev/null (a device, hence --dev-bind: a plain bind of it is
        # mounted nodev and cannot even be read).
        args += (['--size', _SMALL_TMPFS, '--tmpfs', path] if is_directory
                 else ['--dev-bind', '/dev/null', path])
    for path in layout.writable:
        args += ['--bind-try', path, path]
    args += ['--dev', '/dev']
    for node in layout.devices:
        args += ['--dev-bind-try', node, node]
    return args + ['--proc', '/proc']


def masked_installation(prefix: str, package_root: str) -> tuple[str, ...]:
    """Those of AVE's interpreter prefix and package root that the private /tmp or
    /run would mask (a virtualenv or checkout under /tmp): commands that run AVE's
    interpreter, or a program shipped beside it, must still find them. Only these
    trees come through, read-only; everything else under /tmp stays private."""
    return tuple(sorted({path for path in (prefix, package_root)
                         if any(path.startswith(root + os.sep) for root in _PRIVATE_ROOTS)}))


_OWN_INSTALLATION = masked_installation(
    sys.prefix, os.path.dirname(os.path.dirname(os.path.abspath(ave.__file__))))


def _present(paths: Iterable[str]) -> Iterable[tuple[str, bool]]:
    """The hidden paths that exist (bwrap cannot mount over nothing), with their kind."""
    for path in paths:
        if os.path.isdir(path):
            yield path, True
        elif os.path.lexists(path):
            yield path, False


def _resolv_under_run() -> str | None:
    real = os.path.realpath(_RESOLV_CONF)
    return real if real.startswith('/run/') else None
