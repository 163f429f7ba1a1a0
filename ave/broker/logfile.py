"""The broker's log file, shared by the broker and every session it forks, rotated
by whichever of them finds it full.

Everything is written through descriptor 2 (with descriptor 1 beside it), so stray
output and tracebacks land in the log too and the handler survives
``Process.close_fds()`` in forked sessions, which keep 0, 1 and 2. Any process may
rotate: it takes an exclusive ``flock`` on a lock file beside the log, checks that
the file is still the full one it has open (another process may have rotated it a
moment ago), and only then renames the chain. Before each record a process checks
that the file at the log's path is still the one it writes to, and reopens it if
someone else rotated; so no writer keeps growing a rotated file, and a session that
floods the log fills at most the configured number of files.
"""
from __future__ import annotations

import fcntl
import io
import logging
import os
import sys
from logging.handlers import RotatingFileHandler

LOG_FILE = 'broker.log'
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
LOG_FORMAT = '%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s'


class SharedRotatingHandler(RotatingFileHandler):
    """A size-rotated log that several processes write and any of them rotates."""

    def __init__(self, path: str, max_bytes: int = LOG_MAX_BYTES,
                 backups: int = LOG_BACKUPS) -> None:
        self._lock_path = f'{path}.lock'
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding='utf-8')

    def _open(self) -> io.TextIOWrapper:
        """Open the current file onto descriptors 1 and 2 and write through 2.

        The logging module calls this when the handler is made and after each
        rotation; the stream must not own descriptor 2, or rotating would close it.
        """
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags, 0o644)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        return open(2, 'a', encoding=self.encoding, errors=self.errors, closefd=False)

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if self.stream is None:
            return False
        if not self._writing_current_file():
            self._reopen()
        return os.fstat(2).st_size >= self.maxBytes

    def doRollover(self) -> None:
        """Rotate under the lock, unless another process already did."""
        fd = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._writing_current_file() and os.fstat(2).st_size >= self.maxBytes:
                super().doRollover()
            else:
                self._reopen()
        finally:
            os.close(fd)  # closing releases the lock

    def _writing_current_file(self) -> bool:
        try:
            current = os.stat(self.baseFilename)
        except FileNotFoundError:
            return False
        ours = os.fstat(2)
        return (current.st_dev, current.st_ino) == (ours.st_dev, ours.st_ino)

    def _reopen(self) -> None:
        if self.stream is not None:
            self.stream.flush()
        self.stream = self._open()


def log_to_file(path: str, max_bytes: int = LOG_MAX_BYTES,
                backups: int = LOG_BACKUPS) -> None:
    """Make ``path`` the process's log (and its descriptors 1 and 2)."""
    logging.basicConfig(handlers=[SharedRotatingHandler(path, max_bytes, backups)],
                        level=logging.INFO, format=LOG_FORMAT, force=True)


def log_to_stderr() -> None:
    logging.basicConfig(handlers=[logging.StreamHandler(sys.stderr)],
                        level=logging.INFO, format=LOG_FORMAT, force=True)
