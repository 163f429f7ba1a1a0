"""Command output: pty bytes in, text out, handed on to listeners as it arrives."""
from __future__ import annotations

import codecs
import errno
import os
from typing import TextIO

from ave.cmd.tail import Tail

# Large enough that a fast writer costs few system calls (a pty hands over at most a few
# KiB per read anyway), small enough to stay clear of per-read mmap in the allocator.
READ_SIZE = 65536


def read_chunk(master: int) -> bytes:
    """Read what the pty holds; b'' once every slave descriptor is closed.

    Linux reports a pty whose other side is gone as EIO rather than as end of file.
    """
    try:
        return os.read(master, READ_SIZE)
    except OSError as exc:
        if exc.errno == errno.EIO:
            return b''
        raise


class Output:
    """Decodes output incrementally, so a character split across reads stays whole.

    Listeners (``sinks``) get every character; what is kept for the caller is the last
    ``limit`` characters (None: everything).
    """

    def __init__(self, sinks: list[TextIO], limit: int | None = None) -> None:
        self._decode = codecs.getincrementaldecoder('utf-8')('replace').decode
        self._kept = Tail(limit)
        self._sinks = sinks

    def feed(self, data: bytes, final: bool = False) -> None:
        """Add bytes; ``final`` turns a trailing partial character into U+FFFD."""
        text = self._decode(data, final)
        if not text:
            return
        self._kept.add(text)
        for sink in self._sinks:
            sink.write(text)
            sink.flush()

    def finish(self) -> str:
        """What is kept of everything seen so far, including a dangling partial
        character."""
        self.feed(b'', final=True)
        return self._kept.text()
