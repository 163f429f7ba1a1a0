"""Logging that a peer cannot inflate.

Anything a peer sends can end up in a log line: a method name, a profile, a reason a
request failed. A peer that sends a megabyte must not write a megabyte of log, and one
that repeats a mistake a million times must not write a million lines. ``clip`` cuts
peer-controlled text; ``Throttle`` lets a kind of warning through a few times per
interval and then counts what it held back, saying how many on the next line it lets
through.
"""
from __future__ import annotations

import logging
import time
from typing import Any

#: The most characters of peer-controlled text a log line carries.
CLIP = 200


def clip(value: Any, limit: int = CLIP) -> str:
    """``str(value)`` cut to ``limit`` characters, saying how much was left out."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f'{text[:limit]}... ({len(text) - limit} more characters)'


class Throttle:
    """Rate-limits log lines by kind: ``burst`` lines per ``interval`` seconds each.

    Memory is bounded by the number of kinds, which the caller chooses (a fixed set
    of strings, never peer-controlled text).
    """

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 60.0,
                 clock: Any = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> start, used, held

    def log(self, level: int, kind: str, message: str, *args: Any) -> bool:
        """Log ``message % args`` unless ``kind`` used up its burst; True if logged."""
        now = self.clock()
        start, used, held = self._windows.get(kind, (now, 0, 0))
        if now - start >= self.interval:
            start, used = now, 0
        if used >= self.burst:
            self._windows[kind] = (start, used, held + 1)
            return False
        if held:
            message = f'{message} (%d more like this were not logged)'
            args = (*args, held)
        self._windows[kind] = (start, used + 1, 0)
        self.logger.log(level, message, *args)
        return True

    def warning(self, kind: str, message: str, *args: Any) -> bool:
        return self.log(logging.WARNING, kind, message, *args)

    def info(self, kind: str, message: str, *args: Any) -> bool:
        return self.log(logging.INFO, kind, message, *args)
