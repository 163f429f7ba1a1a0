"""Helpers of the ave.cmd tests (pytest puts this directory on sys.path)."""
import errno
import os
import select
import time

import psutil


def gone(pid: int) -> bool:
    """True when ``pid`` is not running (a zombie waiting for its reaper counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def all_gone(pids: list[int], within: float = 2.0) -> bool:
    """SIGKILL is delivered at once but dying takes a moment: allow ``within`` s."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.02)
    return all(gone(pid) for pid in pids)


def pids_in(text: str) -> list[int]:
    return [int(word) for word in text.split() if word.isdigit()]


def in_forked_helper(action) -> list[str]:
    """Run ``action`` in a forked copy of this process; return what every copy wrote.

    The helper writes one line with the action's result and exits. If the code under
    test ever let a second copy of its caller run on, that copy would write a second
    line into the same pipe.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                line = f'done: {action()}'
            except Exception as exc:  # report whatever happened to the test
                line = f'raised: {exc!r}'
            os.write(write_end, (line + '\n').encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = b''
        while select.select([read_end], [], [], 20)[0]:
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return data.decode().splitlines()


def open_descriptors() -> list[str]:
    return [os.readlink(f'/proc/self/fd/{name}') for name in os.listdir('/proc/self/fd')
            if os.path.exists(f'/proc/self/fd/{name}')]


def pty_descriptors() -> int:
    return sum(1 for target in open_descriptors()
               if target == '/dev/ptmx' or target.startswith('/dev/pts/'))


def read_until_closed(fd: int, within: float = 5.0) -> bytes:
    """Read a pipe or pty master until every writer closed it, for ``within`` s at most.

    A pty reports that as EIO, a pipe as end of file.
    """
    data, end = b'', time.monotonic() + within
    while select.select([fd], [], [], max(0.0, end - time.monotonic()))[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        data += chunk
    return data
