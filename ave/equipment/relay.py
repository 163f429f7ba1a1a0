"""Relays: named circuits a test job opens and closes, each switched by a command.

A lab wires relays into the paths it wants a job to control (a handset's USB power
line, a battery terminal, a reset button) and declares them in broker.json. AVE does
not talk to relay hardware itself: every circuit names the command that opens it, the
command that closes it, and the state it rests in between jobs. That keeps any relay
board a lab owns usable without a driver in AVE::

    {"type": "relay", "uid": "r1", "pretty": "bench 3", "timeout": 10,
     "circuits": {"usb.pc.vcc": {"open": ["usbrelay", "R1_1=0"],
                                 "close": ["usbrelay", "R1_1=1"],
                                 "default": "closed"}}}

``pretty`` and ``timeout`` (seconds a command may take, default 30) are optional.
The relay's profile lists its circuit names, so a job can ask for a relay that has
the circuit it needs.

The commands come from the lab owner; a job only picks which configured command runs,
never an argument of it. So they are not job code, and run outside the sandbox of
job commands (``isolate=False``): relay tools reach their boards through the host's
device nodes (USB HID, serial, GPIO, found through udev), may keep state files where
their owner put them, and a switch must cost what the tool costs, not the few
milliseconds a fresh set of namespaces does. They still belong to the session's
sandbox for ``kill()``: a session ending stops a job's hung switch at once, while the
reset of a relay the job already gave back runs to its end.
"""
from __future__ import annotations

import logging
import shlex
import shutil
from types import MappingProxyType
from typing import Any

from ave import sandbox
from ave.checks import Checker, shown
from ave.cmd.tail import shown as shown_output
from ave.equipment import EquipmentType, Resource
from ave.exceptions import AveException, RunError, Timeout
from ave.profile import Profile

_log = logging.getLogger(__name__)

#: How long one open or close command may run before it is killed. Relay tools
#: answer in well under a second; the limit exists so that one stuck on a dead USB
#: device cannot hold the session (and the job) forever.
DEFAULT_TIMEOUT = 30.0

_ENTRY_KEYS = ('type', 'uid', 'circuits', 'pretty', 'timeout')
_CIRCUIT_KEYS = ('open', 'close', 'default')
_STATES = ('open', 'closed')


class RelayError(AveException):
    """A circuit could not be switched: its command failed, could not start or hung.

    Details (also attributes): ``uid``, ``circuit``, ``cmd``, ``exit_code`` (None
    when the command did not run to an end) and ``out``. The error a failed
    ``reset`` raises has ``uid`` and ``failures`` instead: the details of each
    circuit's own error.
    """


class RelayProfile(Profile):
    """A relay's profile; ``uid`` tells two relays apart."""

    identity = 'uid'


class Relay(Resource):
    """One relay as its holder's session drives it.

    The public methods are exactly what a client may call over RPC. The state each
    circuit reports is the one AVE last switched it to, not a measurement: relay
    boards seldom tell, and a command that failed leaves the circuit 'unknown'.
    """

    def __init__(self, profile: Profile, settings: dict) -> None:
        # The entry normally comes checked from broker.json; checking again here
        # means a resource is never built on commands nobody validated.
        _check_entry(settings)
        super().__init__(profile, settings)
        self._uid: str = settings['uid']
        self._circuits: dict[str, dict] = settings['circuits']
        self._timeout: float = settings.get('timeout', DEFAULT_TIMEOUT)
        self._states: dict[str, str] = {name: 'unknown' for name in self._circuits}

    def set_circuit(self, name: str, closed: bool) -> None:
        """Close (``closed=True``) or open one circuit by running its command.

        ``closed`` must be a real boolean: a truthy string such as "false" switching
        a power line the wrong way is the kind of mistake this refuses outright.
        """
        self._known(name)
        if not isinstance(closed, bool):
            raise TypeError(f'closed must be true or false, got {type(closed).__name__} '
                            f'{closed!r}')
        self._switch(name, closed)

    def reset(self) -> None:
        """Put every circuit back in its default state.

        Every circuit is tried even when an earlier one fails, because leaving the
        rest as the last job set them would be worse; the one RelayError raised at
        the end names each failure.
        """
        failures = []
        for name in sorted(self._circuits):
            try:
                self._switch(name, self._circuits[name]['default'] == 'closed')
            except RelayError as err:
                failures.append(err)
        if failures:
            raise _reset_error(self._uid, failures, len(self._circuits))

    def get_circuits(self) -> dict[str, str]:
        """Each circuit's state as last switched: 'open', 'closed' or 'unknown'."""
        return dict(self._states)

    def _setup(self, tainted: bool = True) -> None:
        """Reset before the new holder starts, unless the last release already did.

        A session that crashed never reset its relay, and nothing resets a relay
        before its first allocation after the broker starts: those allocations come
        ``tainted`` and reset here, so a job always starts from the defaults and a
        relay that cannot be reset fails the allocation loudly. After a clean release
        the circuits are known to be at their defaults and the commands are not run
        a second time.
        """
        if tainted:
            self.reset()
            return
        self._states = {name: circuit['default'] for name, circuit in self._circuits.items()}

    def _teardown(self) -> None:
        """Reset on release so the next holder finds every circuit at its default."""
        self.reset()

    def _known(self, name: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f'a circuit name is a string, got {type(name).__name__} {name!r}')
        if name not in self._circuits:
            raise ValueError(f'relay {self._uid!r} has no circuit {name!r}; its circuits '
                             f'are: {", ".join(sorted(self._circuits))}')

    def _switch(self, name: str, closed: bool) -> None:
        """Run the circuit's command; the state is 'unknown' unless it succeeds.

        Not isolated, as the lab owner's command: see the module's docstring.
        """
        argv = self._circuits[name]['close' if closed else 'open']
        self._states[name] = 'unknown'
        try:
            code, out = sandbox.current().run(argv, timeout=self._timeout, owner=self,
                                              isolate=False)
        except RunError as err:
            raise self._error(name, argv, f'cannot run {_quoted(argv)}: {err}') from err
        except Timeout as err:
            raise self._error(name, argv, f'{_quoted(argv)} did not finish within '
                              f'{self._timeout:g} s and was killed', err.out) from err
        if code != 0:
            raise self._error(name, argv, f'{_quoted(argv)} exited with status {code}',
                              out, code)
        self._states[name] = 'closed' if closed else 'open'
        _log.info('relay %s: circuit %s %s', self._uid, name, self._states[name])

    def _error(self, name: str, argv: list[str], problem: str, out: str = '',
               exit_code: int | None = None) -> RelayError:
        message = f'relay {self._uid!r} circuit {name!r}: {problem}'
        if out:
            message += f' (output: {shown_output(out)})'
        return RelayError({'message': message, 'uid': self._uid, 'circuit': name,
                           'cmd': list(argv), 'exit_code': exit_code, 'out': out})


class RelayType(EquipmentType):
    """Relays are declared in broker.json; nothing lists or creates them."""

    name = 'relay'
    profile_class = RelayProfile
    resource_class = Relay
    # A request means a relay that works, unless it asks for another power_state.
    request_defaults = MappingProxyType({'power_state': 'online'})

    def validate_entry(self, entry: dict) -> None:
        """Raise ValueError naming the first wrong field of a broker.json relay entry.

        Fields are named the way the lab owner wrote them (``circuits.usb.pc.vcc.open``)
        and unknown keys are refused, so a typo never silently leaves a setting out.
        """
        _check_entry(entry)

    def profile_of(self, entry: dict) -> RelayProfile:
        """The relay's profile: identity, sorted circuit names, and ``pretty`` if set.

        A relay whose commands cannot run (a program not installed, a typo in its
        path) is ``offline``, with a ``problem`` saying which, instead of being
        handed to a job that would find out at its first switch.
        """
        values = {'type': self.name, 'uid': entry['uid'],
                  'circuits': sorted(entry['circuits']), 'power_state': 'online'}
        problem = _missing_program(entry['circuits'])
        if problem:
            values.update(power_state='offline', problem=problem)
        if 'pretty' in entry:
            values['pretty'] = entry['pretty']
        return RelayProfile(values)


RELAY = RelayType()


def _reset_error(uid: str, failures: list[RelayError], total: int) -> RelayError:
    """One error for a reset that failed on some circuits, one line per failure."""
    lines = [f'relay {uid!r}: reset failed for {len(failures)} of {total} circuits:']
    lines += [f'  {failure}' for failure in failures]
    return RelayError({'message': '\n'.join(lines), 'uid': uid,
                       'failures': [dict(failure.details) for failure in failures]})


def _missing_program(circuits: dict) -> str:
    """Why some circuit's command cannot run ('' if every program is there)."""
    for name, circuit in sorted(circuits.items()):
        for state in _STATES:
            program = circuit['close' if state == 'closed' else 'open'][0]
            if shutil.which(program) is None:
                return (f'circuit {name!r} cannot be {state}: {program!r} is not an '
                        'executable program here')
    return ''


def _quoted(argv: list[str]) -> str:
    return f'command "{shlex.join(argv)}"'




# --- checking a broker.json entry ---------------------------------------------------

def _check_entry(entry: Any) -> None:
    """Raise ValueError naming the first wrong field, as every config check does."""
    check = Checker(None)
    data = check.json_object(None, entry, _ENTRY_KEYS)
    if check.required(data, 'type') != RelayType.name:
        raise check.error('type', f'expected "relay", got {shown(data["type"])}')
    check.string('uid', check.required(data, 'uid'))
    _check_circuits(check, check.required(data, 'circuits'))
    if 'pretty' in data:
        check.string('pretty', data['pretty'])
    if 'timeout' in data:
        check.seconds('timeout', data['timeout'])


def _check_circuits(check: Checker, circuits: Any) -> None:
    if not isinstance(circuits, dict) or not circuits:
        raise check.error('circuits', 'expected a non-empty object of circuit name -> '
                                      f'commands, got {shown(circuits)}')
    for name, circuit in circuits.items():
        if not name:
            raise check.error('circuits', 'expected circuit names to be non-empty strings, '
                                          'got ""')
        field = f'circuits.{name}'
        data = check.json_object(field, circuit, _CIRCUIT_KEYS)
        _check_argv(check, f'{field}.open', check.required(data, 'open', field))
        _check_argv(check, f'{field}.close', check.required(data, 'close', field))
        check.choice(f'{field}.default', check.required(data, 'default', field), _STATES)


def _check_argv(check: Checker, field: str, argv: Any) -> None:
    """A command as ave.cmd.run takes it: a program followed by its arguments."""
    if not isinstance(argv, list) or not argv:
        raise check.error(field, f'expected a non-empty list of strings, got {shown(argv)}')
    for index, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise check.error(f'{field}[{index}]', f'expected a string, got {shown(arg)}')
        if '\0' in arg:
            raise check.error(f'{field}[{index}]', 'contains a NUL character, which no '
                                                  'command line can carry')
    if not argv[0]:
        raise check.error(f'{field}[0]', 'expected the name or path of a program, got ""')
