"""``ave hold``, ``ave run``, ``ave relay`` and ``ave kick`` against a real broker.

Relays r1 and r2 write their circuit states to ``lab.state``; whether an item is
held is read from the broker's own listing.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import sys

import pytest

from ave.broker import Broker
from support import wait_until

pytestmark = pytest.mark.timeout(60)


def states(ave) -> dict[str, str]:
    """uid -> state, as the broker lists its relays."""
    return {e['profile']['uid']: e['state'] for e in json.loads(ave('list', '--all',
                                                                   '--json').stdout)}


def free_again(ave, uid: str = 'r1') -> bool:
    return wait_until(lambda: states(ave)[uid] == 'available', timeout=10)


def circuit(lab, uid: str, name: str = 'c1') -> str:
    path = lab.state / f'{uid}.{name}'
    return path.read_text().strip() if path.exists() else ''


def one_line_failure(result, status: int = 1) -> str:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith('ave: ') and result.stderr.count('\n') == 1, \
        repr(result.stderr)
    return result.stderr


# -- ave hold -----------------------------------------------------------------------------

def test_hold_holds_until_ctrl_c_and_then_releases(ave):
    holder = ave.start('hold', '--job', 'bench work', 'relay,uid=r1')
    assert holder.line() == 'holding relay r1'
    (held,) = json.loads(ave('who', '--json').stdout)
    assert held['holder']['pid'] == holder.pid and held['holder']['job'] == 'bench work'
    holder.signal(signal.SIGINT)
    status, _, err = holder.finish()
    assert status == 0, err
    assert err == 'ave: holding until Ctrl-C\n'
    assert free_again(ave), 'the relay stayed held after Ctrl-C'


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGHUP])
def test_hold_ends_cleanly_on_sigterm_and_sighup(ave, signum):
    holder = ave.start('hold', 'relay,uid=r1')
    assert holder.line() == 'holding relay r1'
    holder.signal(signum)
    assert holder.finish()[0] == 0
    assert free_again(ave)


def test_hold_several_with_json_prints_the_granted_profiles(ave):
    holder = ave.start('hold', '--json', 'relay,uid=r2', '{"type": "relay", "uid": "r1"}')
    granted = json.loads(holder.line())
    assert [p['uid'] for p in granted] == ['r2', 'r1'], 'not in request order'
    assert granted[1] == {'type': 'relay', 'uid': 'r1', 'circuits': ['c1', 'c2'],
                          'power_state': 'online', 'pretty': 'bench 1'}


def test_hold_of_held_equipment_says_who_to_ask(ave):
    holder = ave.start('hold', 'relay,uid=r1')
    assert holder.line() == 'holding relay r1'
    error = one_line_failure(ave('hold', 'relay,uid=r1'))
    assert 'equipment is busy' in error and 'ave who shows the holders' in error
    assert '--wait S' in error


def test_hold_of_unknown_equipment_names_the_nearest(ave):
    error = one_line_failure(ave('hold', 'relay,uidd=r1'))
    assert error.startswith('ave: no such equipment'), error
    assert "no relay has key 'uidd' (did you mean 'uid'?)" in error
    error = one_line_failure(ave('hold', 'relay,uid=r9'))
    assert "no relay has uid 'r9' (known: r1, r2)" in error


def test_hold_waits_for_equipment_another_job_releases(lab, ave):
    first = ave.start('hold', 'relay,uid=r1')
    assert first.line() == 'holding relay r1'
    second = ave.start('hold', '--wait', '30', 'relay,uid=r1')
    assert second.line(timeout=1) == '', 'the second hold did not wait'
    first.signal(signal.SIGINT)
    assert second.line() == 'holding relay r1'


def test_hold_that_waits_too_long_fails_busy(ave):
    holder = ave.start('hold', 'relay,uid=r1')
    assert holder.line() == 'holding relay r1'
    error = one_line_failure(ave('hold', '--wait', '0.5', 'relay,uid=r1'))
    assert 'busy' in error and '--wait S' not in error, error


# -- ave run ------------------------------------------------------------------------------

def test_run_gives_the_command_its_profiles_and_its_exit_status(lab, ave, tmp_path):
    seen = tmp_path / 'seen'
    script = (f'import json, os, sys; open({str(seen)!r}, "w").write('
              'os.environ["AVE_RESOURCES"]); sys.exit(3)')
    result = ave('run', 'relay,uid=r1', '--', sys.executable, '-c', script)
    assert result.returncode == 3, result.stderr
    assert [p['uid'] for p in json.loads(seen.read_text())] == ['r1']
    assert free_again(ave)


def test_run_holds_while_the_command_runs(lab, ave, tmp_path):
    listing = tmp_path / 'listing'
    ave_list = f'{sys.executable} -m ave.cli list --all --json --home {lab.home}'
    result = ave('run', 'relay,uid=r2', '--', 'sh', '-c', f'{ave_list} > {listing}')
    assert result.returncode == 0, result.stderr
    by_uid = {e['profile']['uid']: e for e in json.loads(listing.read_text())}
    assert by_uid['r2']['state'] == 'held' and by_uid['r1']['state'] == 'available'
    assert by_uid['r2']['holder']['job'] == 'sh', \
        'the default job label is the program, without its arguments'


def test_run_returns_once_the_equipment_is_free_so_scripts_can_go_on(ave):
    for _ in range(3):
        result = ave('run', 'relay,uid=r1', '--', 'true')
        assert result.returncode == 0, result.stderr
        assert states(ave)['r1'] == 'available', 'ave run returned before the release'


def test_options_follow_the_subcommand_and_the_command_follows_double_dash(lab, ave):
    result = ave.plain('run', '--home', lab.home, '--wait', '5', 'relay,uid=r1', '--',
                       'sh', '-c', 'test -n "$AVE_RESOURCES"')
    assert result.returncode == 0, result.stderr


def test_run_reports_a_signal_as_a_shell_does(ave):
    result = ave('run', 'relay,uid=r1', '--', 'sh', '-c', 'kill -TERM $$')
    assert result.returncode == 128 + signal.SIGTERM, result.stderr


def test_run_of_a_missing_command_exits_127(ave):
    result = ave('run', 'relay,uid=r1', '--', '/nonexistent/flash.sh')
    error = one_line_failure(result, 127)
    assert error == 'ave: cannot run /nonexistent/flash.sh: No such file or directory\n'


def test_run_of_a_command_that_cannot_be_executed_exits_126(ave, tmp_path):
    script = tmp_path / 'flash.sh'
    script.write_text('#!/bin/sh\n')
    script.chmod(stat.S_IRUSR)
    if os.access(script, os.X_OK):
        pytest.skip('this user may execute anything (root without a restricted fs)')
    one_line_failure(ave('run', 'relay,uid=r1', '--', str(script)), 126)


def test_run_without_double_dash_is_a_usage_error(ave):
    error = one_line_failure(ave('run', 'relay,uid=r1', 'true'), 2)
    assert 'ave run needs the command after --' in error


def test_run_passes_sigterm_on_to_the_command(ave):
    runner = ave.start('run', 'relay,uid=r1', '--', sys.executable, '-c',
                       'import signal, sys, time\n'
                       'signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n'
                       'print("ready", flush=True)\n'
                       'time.sleep(60)')
    assert runner.line() == 'ready'
    runner.signal(signal.SIGTERM)
    assert runner.finish()[0] == 7, 'the command did not see the SIGTERM'
    assert free_again(ave)


def test_run_stops_the_command_when_the_hold_is_lost(ave):
    runner = ave.start('run', 'relay,uid=r1', '--', sys.executable, '-c',
                       'import time; print("ready", flush=True); time.sleep(60)')
    assert runner.line() == 'ready'
    assert ave('kick', 'relay,uid=r1').returncode == 0
    status, _, err = runner.finish()
    assert status == 1, err
    assert err.startswith('ave: lost the hold on relay r1') and 'stopped' in err, err


# -- ave relay ----------------------------------------------------------------------------

def test_relay_switches_a_circuit_and_resets_it_on_release(lab, ave):
    switcher = ave.start('relay', 'relay,uid=r1', 'c2', 'close')
    assert switcher.line() == 'relay r1: c2 closed'
    assert circuit(lab, 'r1', 'c2') == 'closed'
    assert states(ave)['r1'] == 'held', 'the relay is not held while switched'
    switcher.signal(signal.SIGINT)
    status, _, err = switcher.finish()
    assert status == 0, err
    assert 'releasing it puts every circuit back to its default' in err
    assert wait_until(lambda: circuit(lab, 'r1', 'c2') == 'open', timeout=10), \
        'the circuit was not reset to its default on release'


def test_relay_for_seconds_releases_by_itself(lab, ave):
    result = ave('relay', '--for', '0.5', 'relay,uid=r2', 'c1', 'close')
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'relay r2: c1 closed\n'
    assert free_again(ave, 'r2')


def test_relay_unknown_circuit_lists_the_circuits(ave):
    error = one_line_failure(ave('relay', 'relay,uid=r1', 'c9', 'open'))
    assert "relay 'r1' has no circuit 'c9'; its circuits are: c1, c2" in error


def test_relay_of_something_else_is_refused(ave):
    error = one_line_failure(ave('relay', 'serial,uid=x', 'c1', 'open'))
    assert error == 'ave: ave relay needs a relay profile, got serial,uid=x\n'


def test_relay_state_must_be_open_or_close(ave):
    one_line_failure(ave('relay', 'relay,uid=r1', 'c1', 'closed'), 2)


# -- ave kick -----------------------------------------------------------------------------

def test_kick_ends_the_holders_session(ave):
    holder = ave.start('hold', '--job', 'forgotten', 'relay,uid=r1')
    assert holder.line() == 'holding relay r1'
    result = ave('kick', 'relay,uid=r1')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('kicked ') and ' off relay r1' in result.stdout
    status, _, err = holder.finish()
    assert status == 1 and 'ave: lost the hold on relay r1' in err, err
    assert free_again(ave)


def test_kick_takes_a_partial_profile_naming_one_held_item(ave):
    holder = ave.start('hold', 'relay,uid=r1')
    assert holder.line() == 'holding relay r1'
    assert ave('kick', 'relay,pretty=bench 1').returncode == 0
    assert holder.finish()[0] == 1


def test_kick_of_a_free_item_says_nobody_holds_it(ave):
    error = one_line_failure(ave('kick', 'relay,uid=r2'))
    assert error == 'ave: nobody holds relay,uid=r2: relay r2 is available\n'


def test_kick_of_several_held_items_asks_for_one(lab, ave):
    holders = [ave.start('hold', f'relay,uid={uid}') for uid in ('r1', 'r2')]
    assert [h.line() for h in holders] == ['holding relay r1', 'holding relay r2']
    error = one_line_failure(ave('kick', 'relay'))
    assert 'matches 2 held items (relay r1, relay r2); name one' in error


def test_kick_with_a_wrong_admin_key_is_refused(lab, ave, tmp_path):
    other = tmp_path / 'other'
    from ave import config
    config.create_default(str(other))
    holder = ave.start('hold', 'relay,uid=r1')
    assert holder.line() == 'holding relay r1'
    error = one_line_failure(ave.plain('kick', '--home', str(other), '--broker',
                                       f'127.0.0.1:{lab.port}', 'relay,uid=r1'))
    assert 'admin' in error, error
    assert states(ave)['r1'] == 'held', 'a wrong key kicked'


def test_kick_from_a_home_without_keys_says_which_file(lab, ave, tmp_path):
    bare = tmp_path / 'bare'
    bare.mkdir()
    error = one_line_failure(ave.plain('kick', '--home', str(bare), '--broker',
                                       f'127.0.0.1:{lab.port}', 'relay,uid=r1'))
    assert error == f'ave: {bare}/.ave/config/authkeys.json: no such file\n'


def test_a_job_keeps_its_equipment_while_ave_lists(lab, ave):
    client = Broker(lab.address)
    lab._clients.append(client)
    client.get({'type': 'relay', 'uid': 'r1'})
    assert states(ave)['r1'] == 'held'


def test_hint_counts_the_request_defaults_of_the_type(start_broker, ave_for):
    lab = start_broker(equipment=[{'type': 'handset', 'serial': 'CB5A'}])
    error = one_line_failure(ave_for(lab.home)('hold', 'handset'))
    assert "no handset has power_state 'boot_completed' (known: offline)" in error, error
