"""A get that does not wait still waits, briefly, for equipment that is being reset:
it is about to be free, and Busy would close the client's session for nothing."""
from __future__ import annotations

import time

import pytest

from ave.broker.exceptions import Busy
from ave.broker.requests import RESET_PATIENCE

pytestmark = pytest.mark.timeout(60)

R1, R2 = {'type': 'relay', 'uid': 'r1'}, {'type': 'relay', 'uid': 'r2'}


def relay(uid, reset_seconds):
    """A relay whose reset (its circuit's default, open) takes ``reset_seconds``."""
    return {'type': 'relay', 'uid': uid, 'circuits': {'c1': {
        'open': ['sleep', str(reset_seconds)], 'close': ['true'], 'default': 'open'}}}


def released(lab, profile):
    """A client took ``profile`` and gave it back: it is being reset now."""
    holder = lab.client()
    item = holder.get(profile)
    item.get_profile()  # the first set-up resets too: let it finish first
    holder.yield_resources(item)


def test_a_get_that_does_not_wait_waits_for_a_reset(start_broker):
    lab = start_broker(equipment=[relay('r1', 0.5)])
    released(lab, R1)
    began = time.monotonic()
    item = lab.client().get(R1)
    assert item.get_profile()['uid'] == 'r1'
    assert 0.2 < time.monotonic() - began < RESET_PATIENCE, 'it did not wait for the reset'


def test_held_equipment_is_busy_at_once(start_broker):
    lab = start_broker(equipment=[relay('r1', 0)])
    lab.client().get(R1).get_profile()
    began = time.monotonic()
    with pytest.raises(Busy):
        lab.client().get(R1)
    assert time.monotonic() - began < 1.0, 'a get that does not wait waited for a holder'


def test_a_reset_longer_than_the_patience_ends_in_busy(start_broker):
    lab = start_broker(equipment=[relay('r1', RESET_PATIENCE + 2)])
    holder = lab.client()
    holder.yield_resources(holder.get(R1))  # its set-up is still resetting: so be it
    began = time.monotonic()
    with pytest.raises(Busy, match='being reset'):
        lab.client().get(R1)
    assert RESET_PATIENCE - 0.5 < time.monotonic() - began < RESET_PATIENCE + 2


def test_a_client_holding_equipment_does_not_wait_for_a_reset(start_broker):
    lab = start_broker(equipment=[relay('r1', 1), relay('r2', 0)])
    released(lab, R1)
    client = lab.client()
    client.get(R2).get_profile()
    began = time.monotonic()
    with pytest.raises(Busy):
        client.get(R1)
    assert time.monotonic() - began < 0.8, 'a holder of equipment waited (it could deadlock)'
