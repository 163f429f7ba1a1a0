"""The first process of every sandboxed command: runs it and says exactly how it ended.

``ave.sandbox`` starts this file's source as ``python -I -S -c SOURCE MARKER CWD ARGV...``
with descriptor 3 open on a status file that only the session can read. bubblewrap
passes nothing out of a sandbox but an exit status, and it folds the two cases that
``ave.cmd.run`` tells apart into ordinary statuses: a command killed by signal N comes
out as status 128+N, and one that could not be executed as status 1 with bwrap's
complaint on the terminal. So this process runs the command itself and writes one line
to descriptor 3: ``exit N``, ``signal N`` or ``error MESSAGE``.

Inside a sandbox it is also the pid namespace's init (bwrap ``--as-pid-1``): it reaps
whatever the command orphans while it runs, and its own exit ends the namespace, which
kills everything the command left behind (``setsid``, double forks, ``nohup``).

``MARKER`` is not used here: it is on the command line so that ``Sandbox.kill`` can
tell this call's processes from every other. Standard library only, nothing from
``ave``: the interpreter runs isolated (-I) without site-packages (-S).
"""
import os
import sys

# The C half of the signal module: ``signal`` itself imports enum, which would more
# than double this process's start-up time, paid on every command.
import _signal  # type: ignore[import-not-found]  # typeshed has no stub for it

STATUS_FD = 3

#: Exit status when the command could not be started, as shells use for "cannot run".
CANNOT_RUN = 127

# Ignored signals stay ignored across exec, and Python ignores SIGPIPE and SIGXFSZ;
# the rest are reset in case whoever started us left them ignored.
_DEFAULT_SIGNALS = (_signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGTERM,
                    _signal.SIGPIPE, _signal.SIGCHLD, _signal.SIGXFSZ)


def main(args: list[str]) -> None:
    """Run ``args[3:]`` in the directory ``args[2]`` ('' for here) and report; never returns.

    ``args[0]`` is '-c' and ``args[1]`` the marker.
    """
    cwd, command = args[2], args[3:]
    os.set_inheritable(STATUS_FD, False)  # the command must not be able to forge a status
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as err:
            finish('error', f'cannot change directory to {cwd!r}: {err.strerror}', CANNOT_RUN)
    try:
        # posix_spawn reports a failed exec here, in the parent, as the OSError.
        pid = os.posix_spawnp(command[0], command, os.environ,
                              setsigdef=_DEFAULT_SIGNALS, setsigmask=())
    except OSError as err:
        finish('error', f'cannot run {command[0]!r}: {err.strerror or err}', CANNOT_RUN)
    code = os.waitstatus_to_exitcode(wait_for(pid))
    if code < 0:
        finish('signal', str(-code), 128 - code)
    finish('exit', str(code), code)


def wait_for(pid: int) -> int:
    """The wait status of ``pid``, reaping any orphan handed to us meanwhile."""
    while True:
        reaped, status = os.wait()
        if reaped == pid:
            return status


def finish(kind: str, detail: str, code: int) -> None:
    try:
        os.write(STATUS_FD, f'{kind} {detail}\n'.encode('utf-8', 'replace'))
    except OSError:
        pass  # started without a status file: the exit status is all there is
    os._exit(code)


if __name__ == '__main__':
    main(sys.argv)
