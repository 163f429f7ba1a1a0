"""Helpers shared by test modules (pytest puts this directory on sys.path)."""
import re
import time
from pathlib import Path

import psutil

DATA = Path(__file__).resolve().parent / 'data'
# The serial of the handset described by tests/data/handset.umockdev.
HANDSET_SERIAL = '2A111FDH200B7Q'


def wait_until(predicate, timeout: float = 5.0, step: float = 0.02):
    """Poll ``predicate`` until it returns something true or ``timeout`` seconds pass;
    return its last value.

    Things that happen in other processes (a broker freeing equipment, a child
    exiting) can only be waited for; a bounded poll keeps every test finite.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(step)


def reported_pid(output: str) -> int:
    """The pid on the first line of ``ave-broker --start``, ``--restart`` or
    ``--status`` output (``started, pid 1234``); further lines say where it is."""
    first = output.splitlines()[0] if output else ''
    match = re.match(r'\w+, pid (\d+)', first)
    assert match, f'no pid on the first line of {output!r}'
    return int(match.group(1))


def first_line(output: str) -> str:
    return output.splitlines()[0] if output else ''


def children_named(pid: int, name: str) -> list:
    """The live (not zombie) children of ``pid`` called ``name`` (as the kernel keeps
    it: 15 characters)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if child.name() == name and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found
