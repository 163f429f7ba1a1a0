"""A job's proxies of one session share its connections (ave.network.remote's pool)."""
from __future__ import annotations

import threading
import time

import psutil
import pytest

from support import wait_until

pytestmark = pytest.mark.timeout(60)

RELAY = {'type': 'relay', 'uid': 'r1',
         'circuits': {'c1': {'open': ['true'], 'close': ['true'], 'default': 'open'}}}
R1 = {'type': 'relay', 'uid': 'r1'}
WORKSPACE = {'type': 'workspace'}


def clients_of(session_port):
    """Connections this test process holds to a session's port (psutil 6 renamed
    ``connections``; Debian's 5.9 has only the old name)."""
    process = psutil.Process()
    listing = getattr(process, 'net_connections', None) or process.connections
    return [c for c in listing('tcp')
            if c.raddr and c.raddr.port == session_port and c.status == 'ESTABLISHED']


def test_proxies_of_one_session_share_one_connection(start_broker):
    lab = start_broker(equipment=[RELAY])
    client = lab.client()
    relay, workspace = client.get(R1, WORKSPACE)
    for _ in range(3):
        relay.get_profile()
        workspace.get_path()
    again = client.get({'type': 'workspace'})
    again.get_path()
    assert len(clients_of(relay._address[1])) == 1


def test_a_long_call_on_one_proxy_holds_up_no_other_thread(start_broker):
    lab = start_broker(equipment=[RELAY])
    relay, workspace = lab.client().get(R1, WORKSPACE)
    relay.get_profile()
    sleeper = threading.Thread(target=workspace.run, args=('sleep 2',))
    sleeper.start()
    try:
        time.sleep(0.3)  # the sleep is running in the session by now
        began = time.monotonic()
        assert relay.get_profile()['uid'] == 'r1'
        assert time.monotonic() - began < 1.0, 'a call waited for another thread\'s call'
    finally:
        sleeper.join(10)
    assert len(clients_of(relay._address[1])) == 2


def test_leaving_the_broker_closes_the_shared_connections(start_broker):
    lab = start_broker(equipment=[RELAY])
    client = lab.client()
    relay = client.get(R1)
    relay.get_profile()
    port = relay._address[1]
    client.__exit__(None, None, None)
    assert wait_until(lambda: clients_of(port) == []), 'a pooled connection stayed open'


TYPED_ERROR_JOB = '''
import sys
from ave.broker.client import Broker
with Broker(('127.0.0.1', int(sys.argv[1]))) as broker:
    relay = broker.get({'type': 'relay', 'uid': 'r1'})
    relay.get_profile()
    loaded_first = 'ave.equipment.relay' in sys.modules
    try:
        relay.set_circuit('c1', True)
    except Exception as error:
        print(loaded_first, type(error).__module__, type(error).__name__, flush=True)
'''


def test_a_plugins_error_arrives_typed_in_a_job_that_never_imported_it(start_broker, jobs):
    lab = start_broker(equipment=[{'type': 'relay', 'uid': 'r1', 'circuits': {'c1': {
        'open': ['true'], 'close': ['false'], 'default': 'open'}}}])
    job = jobs(TYPED_ERROR_JOB, lab.port)
    out, _ = job.communicate(timeout=30)
    assert out.split() == ['False', 'ave.equipment.relay', 'RelayError'], \
        'plug-ins were imported before an error needed them, or the error came untyped'
