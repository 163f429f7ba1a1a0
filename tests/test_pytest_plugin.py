"""The pytest plugin (ave.pytest_plugin) in pytester sessions against a real broker.

Each inner session runs in its own process (``runpytest_subprocess``), which loads
the plugin from its ``pytest11`` entry point exactly as a test engineer's run does,
and talks to a broker started with tests/broker/conftest.py's fixtures.
"""
from __future__ import annotations

import json

import pytest

from broker.conftest import BrokerHome, broker_home, start_broker  # noqa: F401 (fixtures)
from cli.conftest import relay
from support import wait_until

pytest_plugins = ['pytester']
pytestmark = pytest.mark.timeout(120)

INNER_TIMEOUT = 90


@pytest.fixture
def lab(start_broker, tmp_path) -> BrokerHome:
    state = tmp_path / 'state'
    state.mkdir()
    started = start_broker(equipment=[relay('r1', state), relay('r2', state)])
    started.state = state
    started.admin = started.client(started.admin_key)
    return started


def run_inner(pytester, lab, source: str, *args: str):
    """Run ``source`` as a test file in a pytest subprocess pointed at ``lab``."""
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_subprocess('-p', 'no:cacheprovider', '--ave-broker',
                                         f'127.0.0.1:{lab.port}', *args,
                                         timeout=INNER_TIMEOUT)


def available(lab) -> list[str]:
    return sorted(p['uid'] for p in lab.admin.list_available())


def test_marker_allocates_hands_over_in_order_and_releases(pytester, lab, tmp_path):
    seen = tmp_path / 'seen.json'
    result = run_inner(pytester, lab, f'''
        import json, pytest

        @pytest.mark.ave('relay,uid=r2', {{'type': 'relay', 'uid': 'r1'}})
        def test_power(ave_resources, ave_broker):
            second, first = ave_resources
            who = {{a['profile']['uid']: a['holder']['job'] for a in ave_broker.who()}}
            second.set_circuit('c1', True)
            with open({str(seen)!r}, 'w') as stream:
                json.dump({{'order': [second.profile['uid'], first.profile['uid']],
                           'who': who}}, stream)
    ''')
    result.assert_outcomes(passed=1)
    seen = json.loads(seen.read_text())
    assert seen['order'] == ['r2', 'r1']
    assert seen['who'] == {'r1': 'test_inner.py::test_power', 'r2': 'test_inner.py::test_power'}
    assert wait_until(lambda: available(lab) == ['r1', 'r2'], timeout=10), \
        'the equipment was not released after the test'
    assert (lab.state / 'r2.c1').read_text().strip() == 'open', 'not reset on release'


def test_marker_alone_holds_the_equipment_during_the_test(pytester, lab, tmp_path):
    seen = tmp_path / 'seen.json'
    result = run_inner(pytester, lab, f'''
        import json, pytest
        from ave.broker import Broker

        @pytest.mark.ave('relay,uid=r1')
        def test_only_holds():
            listing = Broker(('127.0.0.1', {lab.port})).equipment()
            with open({str(seen)!r}, 'w') as stream:
                json.dump({{e['profile']['uid']: e['state'] for e in listing}}, stream)
    ''')
    result.assert_outcomes(passed=1)
    assert json.loads(seen.read_text()) == {'r1': 'held', 'r2': 'available'}


def test_ci_job_label_comes_before_the_node_id(pytester, lab, tmp_path, monkeypatch):
    monkeypatch.setenv('AVE_JOB', 'nightly-7')
    seen = tmp_path / 'job'
    result = run_inner(pytester, lab, f'''
        import pytest

        @pytest.mark.ave('relay,uid=r1')
        def test_job(ave_broker):
            (held,) = ave_broker.who()
            open({str(seen)!r}, 'w').write(held['holder']['job'])
    ''')
    result.assert_outcomes(passed=1)
    assert seen.read_text() == 'nightly-7 test_inner.py::test_job'


def test_class_marker_applies_to_each_test_in_turn(pytester, lab):
    result = run_inner(pytester, lab, '''
        import pytest

        @pytest.mark.ave('relay,uid=r1')
        class TestBench:
            def test_one(self, ave_resources):
                assert ave_resources[0].profile['uid'] == 'r1'

            def test_two(self, ave_resources):
                assert ave_resources[0].profile['uid'] == 'r1'
    ''')
    result.assert_outcomes(passed=2)


def test_busy_equipment_is_a_set_up_error_in_one_line(pytester, lab):
    holder = lab.client()
    holder.get({'type': 'relay', 'uid': 'r1'})
    result = run_inner(pytester, lab, '''
        import pytest

        @pytest.mark.ave('relay,uid=r1', wait=0.5)
        def test_never_runs():
            raise AssertionError('ran without its equipment')
    ''')
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(['*ave: Busy: *equipment is busy*relay r1 held by*'])
    result.stdout.no_fnmatch_line('*ran without its equipment*')


def test_unknown_equipment_says_what_is_known(pytester, lab):
    result = run_inner(pytester, lab, '''
        import pytest

        @pytest.mark.ave({'type': 'relay', 'uid': 'r9'})
        def test_never_runs():
            pass
    ''')
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(['*ave: NoSuch: no such equipment*'])


def test_wrong_marker_arguments_are_set_up_errors(pytester, lab):
    result = run_inner(pytester, lab, '''
        import pytest

        @pytest.mark.ave('relay,uid')
        def test_bad_profile():
            pass

        @pytest.mark.ave('relay,uid=r1', timeout=5)
        def test_bad_keyword():
            pass

        def test_fixture_without_marker(ave_resources):
            pass
    ''')
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines([
        "*@pytest.mark.ave: PROFILE 'relay,uid': 'uid' is not KEY=VALUE*",
        "*takes profiles and the keywords wait and priority*",
        '*ave_resources needs @pytest.mark.ave(PROFILE, ...) on the test*',
    ])


def test_home_option_finds_the_broker(pytester, lab):
    pytester.makepyfile(test_inner='''
        import pytest

        @pytest.mark.ave('relay,uid=r2')
        def test_home(ave_resources):
            assert ave_resources[0].profile['uid'] == 'r2'
    ''')
    result = pytester.runpytest_subprocess('-p', 'no:cacheprovider', '--ave-home', lab.home,
                                           timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=1)


def test_missing_home_option_is_a_clear_error(pytester, lab, tmp_path):
    pytester.makepyfile(test_inner='''
        def test_home(ave_broker):
            pass
    ''')
    result = pytester.runpytest_subprocess('-p', 'no:cacheprovider', '--ave-home',
                                           str(tmp_path / 'typo'), timeout=INNER_TIMEOUT)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(['*ave: --home *typo: no such directory*'])


def test_plugin_does_nothing_for_tests_that_do_not_use_it(pytester, tmp_path, monkeypatch):
    """No broker, no home: a plain test suite runs as if AVE were not installed."""
    monkeypatch.setenv('HOME', str(tmp_path / 'nowhere'))
    pytester.makepyfile(test_plain='''
        import sys

        def test_plain():
            assert 'ave.broker' not in sys.modules, 'the plugin imported the broker client'
    ''')
    result = pytester.runpytest_subprocess('-p', 'no:cacheprovider', '--strict-markers',
                                           timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=1)


def test_plugin_registers_its_options_and_marker(pytester):
    help_text = pytester.runpytest_subprocess('--help', timeout=INNER_TIMEOUT).stdout.str()
    assert '--ave-broker=HOST:PORT' in help_text and '--ave-home=DIR' in help_text
    markers = pytester.runpytest_subprocess('--markers', timeout=INNER_TIMEOUT).stdout.str()
    assert '@pytest.mark.ave(*profiles, wait=0, priority=0)' in markers
