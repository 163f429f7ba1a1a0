"""The end of a long text, kept in bounded memory, with one line saying what was cut.

Command output is read in pieces of at most a few dozen KiB and can run to gigabytes;
what a caller wants from the middle of that is usually nothing, and errors are printed
last. ``Tail`` keeps whole pieces and drops the oldest once the ones after it hold the
limit, so it never holds more than the limit plus one piece. ``tail`` does the same for
a text already in memory, for messages that quote a command's output. The notice is one
line ending in ``\n`` (a terminal's own lines end in ``\r\n``).
"""
from __future__ import annotations

import json
from collections import deque

__all__ = ['SHOWN', 'Tail', 'cut_notice', 'shown', 'tail']

#: How much of a command's output an error message quotes.
SHOWN = 400


def cut_notice(cut: int, kept: int) -> str:
    """The line that stands in for ``cut`` characters left out before ``kept`` more."""
    return f'[ave.cmd: {cut:,} characters of output cut; the last {kept:,} follow]\n'


def tail(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else a cut notice and its end."""
    _check_limit(limit)
    if len(text) <= limit:
        return text
    kept = text[len(text) - limit:]
    return cut_notice(len(text) - limit, limit) + kept


def shown(output: str) -> str:
    """The end of a command's output, quoted for an error message: tools print their
    errors last, and a message must stay one readable line of bounded length."""
    return json.dumps(tail(output.strip(), SHOWN))


class Tail:
    """The last ``limit`` characters of a text given piece by piece (None: all of it).

    Memory: the limit plus the largest single piece, whatever the total.
    """

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None:
            _check_limit(limit)
        self._limit = limit
        self._pieces: deque[str] = deque()
        self._held = 0      # characters in _pieces
        self._dropped = 0   # characters in pieces already let go

    def add(self, piece: str) -> None:
        """Append ``piece``; let go of the oldest pieces the limit no longer reaches."""
        if not piece:
            return
        self._pieces.append(piece)
        self._held += len(piece)
        if self._limit is None:
            return
        while self._pieces and self._held - len(self._pieces[0]) >= self._limit:
            oldest = self._pieces.popleft()
            self._held -= len(oldest)
            self._dropped += len(oldest)

    @property
    def total(self) -> int:
        """Characters added so far, kept or not."""
        return self._dropped + self._held

    def text(self) -> str:
        """What is kept, after a cut notice if anything was left out."""
        held = ''.join(self._pieces)
        if self._limit is None or self.total <= self._limit:
            return held
        kept = held[len(held) - self._limit:]
        return cut_notice(self.total - self._limit, self._limit) + kept


def _check_limit(limit: object) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise TypeError(f'the limit must be a number of characters, not '
                        f'{type(limit).__name__}')
    if limit < 0:
        raise ValueError(f'the limit must be >= 0, not {limit}')
