"""Equipment types for the pure allocator and queue tests: no devices, no processes,
just the identities and the on-demand behaviour the decisions depend on."""
from __future__ import annotations

from ave.equipment import EquipmentType
from ave.profile import Profile


class UidProfile(Profile):
    identity = 'uid'


class SerialProfile(Profile):
    identity = 'serial'


class RelayLike(EquipmentType):
    name = 'relay'
    profile_class = UidProfile


class HandsetLike(EquipmentType):
    name = 'handset'
    profile_class = SerialProfile


class OnDemand(EquipmentType):
    """Workspaces: made when asked for, numbered w1, w2, ..."""
    name = 'workspace'
    profile_class = UidProfile
    on_demand = True

    def __init__(self):
        self.count = 0

    def create(self, settings):
        self.count += 1
        return UidProfile({'type': 'workspace', 'uid': f'w{self.count}',
                           'root': settings.get('root')})


def fake_types() -> dict[str, EquipmentType]:
    return {'relay': RelayLike(), 'handset': HandsetLike(), 'workspace': OnDemand()}


def relay(uid, **extra):
    return {'type': 'relay', 'uid': uid, **extra}


def handset(serial, **extra):
    return {'type': 'handset', 'serial': serial, **extra}
