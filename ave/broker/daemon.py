"""The broker as a system process: configuration checked up front, pid file, logs.

``BrokerServer`` knows how to allocate equipment; this module knows how a broker
lives on a host. Everything that can be wrong with the configuration is found by
``BrokerDaemon.from_home`` in the calling process, before anything forks, so the
lab owner reads the problem on their terminal instead of in a log file. The daemon
then writes its own pid file while it initializes (a foreground broker under a
supervisor gets one too) and removes it when it ends.

The pid file is only a hint: a broker that was killed leaves it behind, and its pid
may since belong to another program. ``find_broker`` therefore trusts the file only
when the live process is called ``ave-broker`` and is older than the file, and
nothing is ever signalled on the file's word alone.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Callable

import psutil

from ave import config
from ave.broker import logfile, systemd
from ave.broker.server import BrokerServer
from ave.equipment import EquipmentType, load_types
from ave.exceptions import AveException

log = logging.getLogger(__name__)

#: The process name BrokerServer gives itself (prctl); how a live broker is recognised.
PROC_NAME = 'ave-broker'


#: Slack when comparing a process's start time with the pid file's mtime: the two
#: clocks are read with different granularity (clock ticks versus nanoseconds).
_START_TIME_SLACK = 1.0


def pid_file_path(home: str) -> str:
    """Where the broker of ``home`` records its pid."""
    return os.path.join(home, '.ave', 'broker.pid')


def lock_file_path(home: str) -> str:
    """A file every broker of ``home`` keeps open: how its process is known to belong
    to this home and not to another whose pid file names the same pid."""
    return os.path.join(home, '.ave', 'broker.lock')


def log_dir(home: str) -> str:
    """Where a daemonized broker of ``home`` writes ``broker.log`` and its rotations."""
    return os.path.join(home, '.ave', 'logs')


class BrokerDaemon(BrokerServer):
    """A BrokerServer that keeps a pid file and logs to a file (or, in the foreground,
    to stderr for a supervisor to capture)."""

    def __init__(self, home: str, broker_config: dict, authkeys: dict,
                 types: dict[str, EquipmentType], type_settings: dict[str, dict],
                 foreground: bool = False, takeover_from: int | None = None) -> None:
        super().__init__(home, broker_config, authkeys, types, type_settings, logging=True,
                         takeover_from=takeover_from)
        self.foreground = foreground
        self._staged_pid: str | None = None
        self._lock_fd: int | None = None

    @classmethod
    def from_home(cls, home: str, foreground: bool = False,
                  takeover_from: int | None = None) -> BrokerDaemon:
        """Load and check every configuration file of ``home``, then bind the port
        (or, taking over from the running broker ``takeover_from``, adopt its socket).

        Raises ConfigError naming the file and field at fault, AveException when an
        equipment plug-in cannot be loaded or the port cannot be bound. Nothing has
        been started when this raises.
        """
        checked = check_home(home)
        try:
            return cls(home, checked.broker_config, checked.authkeys, checked.types,
                       checked.type_settings, foreground, takeover_from)
        except OSError as error:
            where = f'{checked.broker_config["host"]}:{checked.broker_config["port"]}'
            reason = error.strerror or str(error)
            raise AveException(f'cannot listen on {where}: {reason}') from None

    def serve_foreground(self) -> int:
        """Run the broker in the calling process until SIGTERM (or Ctrl-C); return 0.

        For supervisors that track the process they started: the same steps as a
        forked daemon, without the fork. Under systemd (Type=notify) it says READY=1
        once the pid file is written and clients can be served.
        """
        self.pid = os.getpid()
        self.redirect()
        self.initialize()
        systemd.notify('READY=1')
        self.run()
        return 0

    def log_path(self) -> str | None:
        """The log file a daemon writes; None in the foreground, where the log goes to
        stderr for the supervisor to keep."""
        return None if self.foreground else os.path.join(log_dir(self.home), logfile.LOG_FILE)

    def redirect(self) -> None:
        """Send the log (and, for a daemon, stray output and tracebacks) somewhere kept.

        A daemon must also let go of the caller's terminal and pipes: a shell or test
        harness reading ``ave-broker --start``'s output would otherwise wait for the
        daemon to exit before it saw end-of-file.
        """
        if self.foreground:
            logfile.log_to_stderr()
            return
        os.chdir('/')  # do not keep the caller's working directory busy
        _stdin_from_devnull()
        os.makedirs(log_dir(self.home), exist_ok=True)
        logfile.log_to_file(os.path.join(log_dir(self.home), logfile.LOG_FILE))

    def initialize(self) -> None:
        """Install signal handling, then announce the pid: the broker is ready.

        Everything that can fail for want of disk space (the pid file's content, the
        home lock) happens in ``prepare_to_serve``, before a predecessor lets go;
        after that, publishing the pid file is a rename, and even its failure is
        logged rather than fatal: the broker serves jobs, the file is a courtesy.
        """
        try:
            super().initialize()
        except BaseException:
            self._discard_staged_pid()
            raise
        if self.foreground:
            signal.signal(signal.SIGINT, self.handle_SIGTERM)  # Ctrl-C stops it cleanly
        self._publish_pid()
        log.info('broker started: pid %d, listening on %s:%d, home %s, isolation %s',
                 os.getpid(), self.config['host'], self.port, self.home,
                 self.isolation.describe())
        if self.isolation.mode == 'auto' and not self.isolation.enabled:
            log.warning('JOBS ARE NOT ISOLATED: their commands run unsandboxed and can '
                        'read this home and other jobs\' files (%s); install '
                        'bubblewrap, or set "isolation": "off" to silence this',
                        self.isolation.problem)
        for account in ('admin', 'share'):
            if not self.alt_keys.get(account):
                log.warning('authkeys.json has no %s key: every client may make %s calls',
                            account, account)

    def prepare_to_serve(self) -> None:
        """Stage the pid file and take the home's lock, which tells the CLI whose
        broker a pid is."""
        self._lock_fd = os.open(lock_file_path(self.home),
                                os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        self._staged_pid = stage_pid_file(pid_file_path(self.home), os.getpid())

    def _publish_pid(self) -> None:
        assert self._staged_pid is not None
        try:
            os.replace(self._staged_pid, pid_file_path(self.home))
        except OSError as error:
            log.error('cannot publish the pid file %s: %s; serving on',
                      pid_file_path(self.home), error)

    def _discard_staged_pid(self) -> None:
        if self._staged_pid is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._staged_pid)

    def run(self) -> None:
        """Serve until shut down; the pid file goes with the process, however it ends."""
        try:
            super().run()
        finally:
            remove_pid_file(pid_file_path(self.home), os.getpid())
            log.info('broker stopped: pid %d', os.getpid())


# -- checking the configuration ---------------------------------------------------------

@dataclass
class CheckedHome:
    """Every configuration file of a home, loaded and checked, and the plug-ins that
    judged the equipment entries: all a broker needs before it binds its port."""

    broker_config: dict
    authkeys: dict
    types: dict[str, EquipmentType]
    type_settings: dict[str, dict]


def check_home(home: str) -> CheckedHome:
    """Load and check broker.json (each entry by its equipment plug-in), the stacks,
    authkeys.json and every type's settings (workspace.json).

    Raises ConfigError naming the file and field at fault, AveException when a
    plug-in cannot be loaded. Binds nothing and starts nothing, so ``ave-config
    --check`` gives exactly the verdict ``ave-broker --start`` would.
    """
    types = load_equipment_types()
    broker_config = config.load_broker_config(home, _entry_checker(types))
    _check_stack_types(home, broker_config['stacks'], types)
    authkeys = config.load_authkeys(home)
    type_settings = {name: _load_settings(equipment_type, home)
                     for name, equipment_type in types.items()}
    return CheckedHome(broker_config, authkeys, types, type_settings)


def load_equipment_types() -> dict[str, EquipmentType]:
    """The installed equipment types. A plug-in is code we do not control: whatever it
    raises while loading means the broker cannot work, and is reported as such."""
    try:
        return load_types()
    except Exception as error:
        raise AveException(f'cannot load the equipment plug-ins: '
                           f'{type(error).__name__}: {error}') from None


def _entry_checker(types: dict[str, EquipmentType]) -> Callable[[dict], None]:
    """A check_equipment for load_broker_config: the entry's own type judges it."""
    def check(entry: dict) -> None:
        equipment_type = types.get(entry['type'])
        if equipment_type is None:
            raise ValueError(f'unknown equipment type {entry["type"]!r} '
                             f'(installed: {", ".join(sorted(types)) or "none"})')
        equipment_type.validate_entry(entry)
    return check


def _check_stack_types(home: str, stacks: list[list[dict]],
                       types: dict[str, EquipmentType]) -> None:
    """A stack member of a type nobody installed could never be matched: a typo."""
    path = os.path.join(config.config_dir(home), 'broker.json')
    for i, stack in enumerate(stacks):
        for j, member in enumerate(stack):
            if member['type'] not in types:
                problem = f'unknown equipment type {member["type"]!r}'
                raise config.ConfigError.at(path, problem, f'stacks[{i}][{j}].type')


def _load_settings(equipment_type: EquipmentType, home: str) -> dict:
    """A type's settings (workspace.json, say). ConfigError already names the file."""
    try:
        return equipment_type.load_settings(home)
    except AveException:
        raise
    except Exception as error:
        raise AveException(f'equipment type {equipment_type.name!r} cannot load its '
                           f'settings: {type(error).__name__}: {error}') from None


# -- the pid file -----------------------------------------------------------------------

@dataclass
class BrokerStatus:
    """What the pid file of a home says, checked against the live process."""

    process: psutil.Process | None
    stale_removed: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


def find_broker(home: str) -> BrokerStatus:
    """The live broker of ``home``, if its pid file names one; a stale file is removed.

    A pid file is stale when its pid is gone, a zombie, a program not called
    ``ave-broker``, or a process that started after the file was written (the pid was
    reused). Only a process that passes these checks may be signalled.
    """
    path = pid_file_path(home)
    try:
        pid, written = _read_pid_file(path)
    except FileNotFoundError:
        return BrokerStatus(None)
    process = _live_broker(pid, written, home) if pid is not None else None
    if process is not None:
        return BrokerStatus(process)
    remove_pid_file(path, pid)
    return BrokerStatus(None, stale_removed=True)


def _read_pid_file(path: str) -> tuple[int | None, float]:
    """The pid (None if the content is not a pid) and the file's modification time."""
    with open(path, encoding='ascii', errors='replace') as stream:
        written = os.fstat(stream.fileno()).st_mtime
        text = stream.read(32).strip()
    return (int(text) if text.isdigit() else None), written


def _live_broker(pid: int, written: float, home: str) -> psutil.Process | None:
    try:
        process = psutil.Process(pid)
        if (process.status() == psutil.STATUS_ZOMBIE or process.name() != PROC_NAME
                or process.create_time() > written + _START_TIME_SLACK
                or not _holds_lock(process, home)):
            return None
    except psutil.Error:
        return None  # gone, or not ours to inspect: either way not our broker
    return process


def _holds_lock(process: psutil.Process, home: str) -> bool:
    """Whether ``process`` is the broker of ``home``: it keeps the home's lock open.

    A home without a lock file was last served by a broker from before the lock
    existed (a package upgrade restarts it); name and start time must do then.
    """
    lock = lock_file_path(home)
    try:
        inode = os.stat(lock).st_ino
    except FileNotFoundError:
        return True
    try:
        return any(f.path == lock for f in process.open_files())
    except psutil.AccessDenied:
        return process.pid in _flock_holders(inode)


def _flock_holders(inode: int) -> set[int]:
    """The pids holding a lock on the file numbered ``inode``, as /proc/locks says.

    The fallback for a broker whose open files we may not read: one that dropped
    root's privileges is not dumpable, so even its own account cannot list them,
    while /proc/locks is readable by everyone.
    """
    holders = set()
    try:
        with open('/proc/locks', encoding='ascii', errors='replace') as stream:
            for line in stream:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == 'FLOCK' and fields[4].isdigit() \
                        and fields[5].rpartition(':')[2] == str(inode):
                    holders.add(int(fields[4]))
    except OSError:
        pass  # no /proc/locks (no procfs mounted): no holder can be named
    return holders


def stage_pid_file(path: str, pid: int) -> str:
    """Write ``pid`` to a new file beside ``path`` and return its name; renaming it
    to ``path`` publishes it atomically (readers see the old file or the new one)."""
    temp = f'{path}.{secrets.token_hex(4)}.tmp'
    try:
        with open(temp, 'x', encoding='ascii') as stream:
            stream.write(f'{pid}\n')
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return temp


def remove_pid_file(path: str, pid: int | None) -> None:
    """Remove the pid file if it still holds ``pid`` (None: a file without a valid pid).

    A newer broker may have written its own pid meanwhile; that file must stay.
    """
    try:
        if _read_pid_file(path)[0] == pid:
            os.unlink(path)
    except FileNotFoundError:
        pass  # someone removed it already: the goal is reached


def wait_for_exit(process: psutil.Process, timeout: float) -> bool:
    """Wait until ``process`` is gone or a zombie; False if it still runs after ``timeout``.

    The daemon is not our child, so it cannot be reaped here, and whether its new
    parent reaps it promptly is not ours to know: a zombie has exited all the same.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _stdin_from_devnull() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
