"""ave.equipment.relay: checking broker.json entries, profiles, switching circuits.

Circuit commands here are real programs: small ``sh -c`` lines that write the state
a circuit was switched to into a file under tmp_path, so a test reads what the relay
"did" instead of trusting a mock.
"""
import copy
import json
import os
import threading
import time
from importlib.metadata import entry_points

import pytest

from ave.config import ConfigError, load_broker_config
from ave.equipment import ENTRY_POINT_GROUP, EquipmentType, load_types
from ave.equipment.relay import RELAY, Relay, RelayError, RelayProfile
from ave.exceptions import details_of, exception_factory
from ave.sandbox import Killed, Sandbox
from sandboxes import installed, requires_bwrap
from support import wait_until

# Every test runs a handful of short commands; the hung-command case waits for a
# half-second timeout. Ten seconds is generous for all of them.
pytestmark = pytest.mark.timeout(10)

MISSING = object()


def writer(path, word):
    """A command that records ``word`` in ``path``; both are arguments, never shell text."""
    return ['sh', '-c', 'echo "$1" > "$2"', 'sh', word, str(path)]


def failing(text, status=1):
    return ['sh', '-c', 'echo "$1"; exit "$2"', 'sh', text, str(status)]


def script(directory, name, body):
    """An executable shell script standing in for a relay tool; returns its path."""
    path = directory / name
    path.write_text(f'#!/bin/sh\n{body}\n', encoding='utf-8')
    path.chmod(0o755)
    return str(path)


def circuit_of(state_file, default='open'):
    return {'open': writer(state_file, 'open'), 'close': writer(state_file, 'closed'),
            'default': default}


def state_of(state_file):
    """What the circuit's last command wrote, or None when nothing ran."""
    if not os.path.exists(state_file):
        return None
    with open(state_file, encoding='utf-8') as stream:
        return stream.read().strip()


@pytest.fixture
def states(tmp_path):
    """One state file per circuit name, under tmp_path."""
    return {name: tmp_path / f'{name}.state' for name in ('usb.pc.vcc', 'battery', 'reset')}


@pytest.fixture
def entry(states):
    """A valid broker.json entry with three circuits, one of them closed by default."""
    return {'type': 'relay', 'uid': 'r1', 'circuits': {
        'usb.pc.vcc': circuit_of(states['usb.pc.vcc'], 'closed'),
        'battery': circuit_of(states['battery']),
        'reset': circuit_of(states['reset'])}}


def make_relay(entry):
    return Relay(RELAY.profile_of(entry), entry)


def broken(entry, path, value):
    """A copy of ``entry`` with the field at ``path`` set to ``value`` (or removed)."""
    result = copy.deepcopy(entry)
    parent = result
    for key in path[:-1]:
        parent = parent[key]
    if value is MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return result


def rejection(entry):
    with pytest.raises(ValueError) as info:
        RELAY.validate_entry(entry)
    return str(info.value)


# --- validate_entry -------------------------------------------------------------

def test_a_valid_entry_passes(entry):
    RELAY.validate_entry(entry)


def test_a_valid_entry_with_every_optional_key_passes(entry):
    RELAY.validate_entry({**entry, 'pretty': 'bench 3', 'timeout': 2.5})


VCC = ('circuits', 'usb.pc.vcc')

BAD_FIELDS = [
    ('type-wrong', ('type',), 'workspace', 'type: expected "relay", got "workspace"'),
    ('type-missing', ('type',), MISSING, 'type: required but missing'),
    ('uid-missing', ('uid',), MISSING, 'uid: required but missing'),
    ('uid-empty', ('uid',), '', 'uid: expected a non-empty string, got ""'),
    ('uid-number', ('uid',), 7, 'uid: expected a non-empty string, got 7'),
    ('unknown-key-close-to-a-known-one', ('circuts',), {},
     "circuts: unknown key (did you mean 'circuits'?)"),
    ('unknown-key', ('colour',), 'red',
     'colour: unknown key (expected one of: type, uid, circuits, pretty, timeout)'),
    ('circuits-missing', ('circuits',), MISSING, 'circuits: required but missing'),
    ('circuits-list', ('circuits',), ['usb.pc.vcc'],
     'circuits: expected a non-empty object of circuit name -> commands, got a list'),
    ('circuits-empty', ('circuits',), {},
     'circuits: expected a non-empty object of circuit name -> commands, got an empty object'),
    ('circuit-name-empty', ('circuits', ''), {},
     'circuits: expected circuit names to be non-empty strings, got ""'),
    ('circuit-not-object', VCC, ['usbrelay', 'R1_1=0'],
     'circuits.usb.pc.vcc: expected an object, got a list'),
    ('circuit-unknown-key', VCC + ('dflt',), 'open',
     "circuits.usb.pc.vcc.dflt: unknown key (did you mean 'default'?)"),
    ('open-missing', VCC + ('open',), MISSING, 'circuits.usb.pc.vcc.open: required but missing'),
    ('close-missing', VCC + ('close',), MISSING,
     'circuits.usb.pc.vcc.close: required but missing'),
    ('default-missing', VCC + ('default',), MISSING,
     'circuits.usb.pc.vcc.default: required but missing'),
    ('open-string', VCC + ('open',), 'usbrelay R1_1=0',
     'circuits.usb.pc.vcc.open: expected a non-empty list of strings, got "usbrelay R1_1=0"'),
    ('open-empty', VCC + ('open',), [],
     'circuits.usb.pc.vcc.open: expected a non-empty list of strings, got an empty list'),
    ('close-not-strings', VCC + ('close',), ['usbrelay', 1],
     'circuits.usb.pc.vcc.close[1]: expected a string, got 1'),
    ('close-no-program', VCC + ('close',), ['', 'R1_1=1'],
     'circuits.usb.pc.vcc.close[0]: expected the name or path of a program, got ""'),
    ('close-nul', VCC + ('close',), ['usbrelay', 'R1\0'],
     'circuits.usb.pc.vcc.close[1]: contains a NUL character, which no command line can carry'),
    ('default-unknown', VCC + ('default',), 'on',
     'circuits.usb.pc.vcc.default: expected "open" or "closed", got "on"'),
    ('default-boolean', VCC + ('default',), True,
     'circuits.usb.pc.vcc.default: expected "open" or "closed", got true'),
    ('pretty-null', ('pretty',), None, 'pretty: expected a non-empty string, got null'),
    ('pretty-empty', ('pretty',), '', 'pretty: expected a non-empty string, got ""'),
    ('timeout-string', ('timeout',), '30',
     'timeout: expected a number of seconds above 0, got "30"'),
    ('timeout-boolean', ('timeout',), True,
     'timeout: expected a number of seconds above 0, got true'),
    ('timeout-zero', ('timeout',), 0, 'timeout: expected a number of seconds above 0, got 0'),
    ('timeout-negative', ('timeout',), -1,
     'timeout: expected a number of seconds above 0, got -1'),
    ('timeout-infinite', ('timeout',), float('inf'),
     'timeout: expected a number of seconds above 0, got Infinity'),
]


@pytest.mark.parametrize('path, value, message', [case[1:] for case in BAD_FIELDS],
                         ids=[case[0] for case in BAD_FIELDS])
def test_a_bad_field_is_refused_by_name(entry, path, value, message):
    assert rejection(broken(entry, path, value)) == message


def test_an_entry_that_is_not_an_object_is_refused():
    assert rejection(['relay']) == 'expected an object, got a list'


# --- profile_of -----------------------------------------------------------------

def test_profile_lists_sorted_circuit_names(entry):
    assert RELAY.profile_of(entry) == {
        'type': 'relay', 'uid': 'r1', 'circuits': ['battery', 'reset', 'usb.pc.vcc'],
        'power_state': 'online'}


def test_profile_carries_pretty_when_given(entry):
    assert RELAY.profile_of({**entry, 'pretty': 'bench 3'})['pretty'] == 'bench 3'


def test_profile_is_a_relay_profile_identified_by_uid(entry):
    profile = RELAY.profile_of(entry)
    assert isinstance(profile, RelayProfile) and profile.minimize() == {
        'type': 'relay', 'uid': 'r1'}, profile


# --- the registry ---------------------------------------------------------------

def test_relay_entry_point_loads_the_relay_type():
    (point,) = entry_points(group=ENTRY_POINT_GROUP, name='relay')
    assert point.load() is RELAY and isinstance(RELAY, EquipmentType)


def test_load_types_finds_the_relay_type():
    # load_types() imports every registered type; until workspace.py exists that fails.
    pytest.importorskip('ave.equipment.workspace', reason='workspace type not written yet')
    assert load_types()['relay'] is RELAY


def test_relay_type_names_its_classes():
    assert (RELAY.name, RELAY.profile_class, RELAY.resource_class, RELAY.on_demand) == (
        'relay', RelayProfile, Relay, False)


# --- broker.json through ave.config ---------------------------------------------

def write_broker_json(home, content):
    path = os.path.join(home, '.ave', 'config', 'broker.json')
    os.makedirs(os.path.dirname(path))
    with open(path, 'w', encoding='utf-8') as stream:
        json.dump(content, stream)
    return path


def test_load_broker_config_reports_a_bad_relay_field_with_file_and_field(home, entry):
    bad = broken(entry, VCC + ('default',), 'on')
    path = write_broker_json(home, {'equipment': [bad]})
    with pytest.raises(ConfigError) as info:
        load_broker_config(home, check_equipment=RELAY.validate_entry)
    assert str(info.value) == (f"{path}: field 'equipment[0]': circuits.usb.pc.vcc.default: "
                               'expected "open" or "closed", got "on"')


def test_load_broker_config_accepts_a_good_relay_entry(home, entry):
    write_broker_json(home, {'equipment': [entry]})
    config = load_broker_config(home, check_equipment=RELAY.validate_entry)
    assert config['equipment'] == [entry]


# --- the resource ---------------------------------------------------------------

def test_public_methods_are_exactly_the_relay_rpcs():
    public = sorted(name for name in dir(Relay) if not name.startswith('_'))
    assert public == ['get_circuits', 'get_profile', 'reset', 'set_circuit'], public


def test_relay_refuses_settings_that_do_not_validate(entry):
    bad = broken(entry, ('uid',), '')
    with pytest.raises(ValueError, match='uid: expected a non-empty string'):
        Relay(RELAY.profile_of(entry), bad)


def test_get_profile_returns_the_profile(entry):
    assert make_relay(entry).get_profile() == RELAY.profile_of(entry)


def test_set_circuit_closes_then_opens(entry, states):
    relay = make_relay(entry)
    relay.set_circuit('battery', True)
    closed = state_of(states['battery'])
    relay.set_circuit('battery', False)
    assert (closed, state_of(states['battery'])) == ('closed', 'open')


def test_get_circuits_reports_unknown_until_switched(entry):
    relay = make_relay(entry)
    before = relay.get_circuits()
    relay.set_circuit('reset', True)
    assert before == dict.fromkeys(entry['circuits'], 'unknown') and relay.get_circuits() == {
        'usb.pc.vcc': 'unknown', 'battery': 'unknown', 'reset': 'closed'}


def test_unknown_circuit_is_refused_with_the_known_names(entry):
    with pytest.raises(ValueError) as info:
        make_relay(entry).set_circuit('usb.pc', True)
    assert str(info.value) == ("relay 'r1' has no circuit 'usb.pc'; its circuits are: "
                               'battery, reset, usb.pc.vcc')


def test_a_circuit_name_that_is_not_a_string_is_refused(entry):
    with pytest.raises(TypeError, match='a circuit name is a string, got list'):
        make_relay(entry).set_circuit(['battery'], True)


@pytest.mark.parametrize('closed', [1, 0, 'true', 'false', None])
def test_closed_must_be_a_boolean_and_nothing_runs_otherwise(entry, states, closed):
    with pytest.raises(TypeError, match='closed must be true or false'):
        make_relay(entry).set_circuit('battery', closed)
    assert state_of(states['battery']) is None, 'a command ran for a non-boolean'


def test_a_failing_command_raises_relay_error_with_code_and_output(entry, tmp_path):
    tool = script(tmp_path, 'usbrelay', 'echo board not found; exit 1')
    entry['circuits']['battery']['close'] = [tool, 'R1_1=1']
    with pytest.raises(RelayError) as info:
        make_relay(entry).set_circuit('battery', True)
    err = info.value
    assert (err.circuit, err.exit_code, err.cmd, err.out.strip()) == (
        'battery', 1, [tool, 'R1_1=1'], 'board not found'), err.details
    assert str(err) == (f"relay 'r1' circuit 'battery': command \"{tool} R1_1=1\" exited "
                        'with status 1 (output: "board not found")')


def test_a_failed_switch_leaves_the_circuit_unknown(entry):
    entry['circuits']['battery']['open'] = failing('stuck')
    relay = make_relay(entry)
    relay.set_circuit('battery', True)
    with pytest.raises(RelayError):
        relay.set_circuit('battery', False)
    assert relay.get_circuits()['battery'] == 'unknown'


def test_a_command_that_cannot_run_raises_relay_error(entry, tmp_path):
    program = str(tmp_path / 'no-such-usbrelay')
    entry['circuits']['battery']['close'] = [program, 'R1_1=1']
    with pytest.raises(RelayError) as info:
        make_relay(entry).set_circuit('battery', True)
    err = info.value
    assert err.exit_code is None and program in str(err) and 'cannot run' in str(err), str(err)


def test_a_hung_command_is_killed_after_the_entry_timeout(entry):
    entry['timeout'] = 0.5
    entry['circuits']['battery']['close'] = ['sh', '-c', 'echo switching; sleep 30']
    relay = make_relay(entry)
    started = time.monotonic()
    with pytest.raises(RelayError) as info:
        relay.set_circuit('battery', True)
    elapsed = time.monotonic() - started
    assert elapsed < 5 and 'did not finish within 0.5 s' in str(info.value) \
        and info.value.out.strip() == 'switching', (elapsed, info.value.details)


def test_relay_error_survives_the_wire(entry):
    entry['circuits']['battery']['close'] = failing('board not found')
    with pytest.raises(RelayError) as info:
        make_relay(entry).set_circuit('battery', True)
    rebuilt = exception_factory(json.loads(json.dumps(details_of(info.value))))
    assert isinstance(rebuilt, RelayError) and rebuilt.exit_code == 1 \
        and str(rebuilt) == str(info.value), rebuilt.details


def test_reset_puts_every_circuit_at_its_default(entry, states):
    relay = make_relay(entry)
    relay.set_circuit('usb.pc.vcc', False)
    relay.set_circuit('battery', True)
    relay.reset()
    found = {name: state_of(path) for name, path in states.items()}
    assert found == {'usb.pc.vcc': 'closed', 'battery': 'open', 'reset': 'open'}, found
    assert relay.get_circuits() == found


def test_reset_tries_every_circuit_and_names_every_failure(entry, states, tmp_path):
    entry['circuits']['battery']['open'] = failing('battery relay jammed', 3)
    entry['circuits']['reset']['open'] = [str(tmp_path / 'missing-tool')]
    relay = make_relay(entry)
    with pytest.raises(RelayError) as info:
        relay.reset()
    err = info.value
    lines = str(err).splitlines()
    assert lines[0] == "relay 'r1': reset failed for 2 of 3 circuits:", lines
    assert "circuit 'battery'" in lines[1] and 'battery relay jammed' in lines[1], lines
    assert "circuit 'reset'" in lines[2] and 'missing-tool' in lines[2], lines
    assert [f['circuit'] for f in err.failures] == ['battery', 'reset'], err.failures
    assert state_of(states['usb.pc.vcc']) == 'closed', 'the working circuit was not reset'


def test_teardown_resets(entry, states):
    relay = make_relay(entry)
    relay.set_circuit('usb.pc.vcc', False)
    relay._teardown()
    assert state_of(states['usb.pc.vcc']) == 'closed'


def test_setup_resets_so_a_new_holder_starts_from_defaults(entry, states):
    relay = make_relay(entry)
    relay._setup()
    found = {name: state_of(path) for name, path in states.items()}
    assert found == {'usb.pc.vcc': 'closed', 'battery': 'open', 'reset': 'open'}, found


def test_setup_after_a_clean_release_runs_no_commands(entry, states):
    relay = make_relay(entry)
    relay._setup(tainted=False)
    assert not any(os.path.exists(path) for path in states.values()), \
        'a relay released cleanly is at its defaults: nothing may be switched again'
    assert relay.get_circuits() == {'usb.pc.vcc': 'closed', 'battery': 'open',
                                    'reset': 'open'}


# --- the sandbox ----------------------------------------------------------------------

HOST_ONLY_DEVICES = ('/dev/fuse', '/dev/kmsg', '/dev/loop-control', '/dev/net/tun')


@pytest.fixture
def isolated(tmp_path, states):
    """An enabled sandbox in which the state files' directory is writable."""
    box = Sandbox(True)
    box.allow_write(str(tmp_path))
    with installed(box):
        yield box


@requires_bwrap
def test_circuit_commands_run_as_configured_even_when_jobs_are_isolated(entry, states,
                                                                        isolated):
    node = next((path for path in HOST_ONLY_DEVICES if os.path.exists(path)), None)
    if node is None:
        pytest.skip(f'none of {HOST_ONLY_DEVICES} exists on this host')
    check = f'test -c {node} && echo host-dev || echo private-dev'
    entry['circuits']['battery']['close'] = ['sh', '-c', f'({check}) > "$0"',
                                             str(states['battery'])]
    make_relay(entry).set_circuit('battery', True)
    assert state_of(states['battery']).split() == ['host-dev'], \
        "the lab owner's relay tool did not see the host's devices"


@pytest.mark.parametrize('enabled', [False, pytest.param(True, marks=requires_bwrap)],
                         ids=['plain', 'sandboxed'])
def test_a_killed_switch_raises_killed_and_teardown_still_resets(entry, states, tmp_path,
                                                                 enabled):
    started = tmp_path / 'started'
    entry['circuits']['battery']['close'] = ['sh', '-c', 'touch "$0"; sleep 60', str(started)]
    relay = make_relay(entry)
    box = Sandbox(enabled)
    box.allow_write(str(tmp_path))
    outcome = {}

    def switch():
        try:
            relay.set_circuit('battery', True)
        except Exception as err:  # the test looks at what happened
            outcome['error'] = err
    with installed(box):
        thread = threading.Thread(target=switch, daemon=True)
        thread.start()
        assert wait_until(started.exists, 5)
        box.kill(relay)
        thread.join(5)
        relay._teardown()
    assert isinstance(outcome.get('error'), Killed), outcome
    assert state_of(states['battery']) == 'open', 'teardown after kill() must still reset'
