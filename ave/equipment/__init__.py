"""Equipment types: what the broker can hand out, found through a plug-in registry.

Each type lives in its own module and is published under the ``ave.equipment`` entry
point group, so a lab's own package adds a type exactly the way the built-in ones are
added. A type names its profile class (with the identity key), the resource class a
session instantiates for a client, and how its items come to exist: declared in
broker.json, created on demand (workspaces), or reported by a lister.
"""
from __future__ import annotations

import json
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any, Mapping

from ave.cmd.tail import tail
from ave.network.framing import DEFAULT_LIMIT
from ave.profile import Profile

ENTRY_POINT_GROUP = 'ave.equipment'

#: The most a resource method's reply may carry as encoded JSON text. A reply over
#: the frame limit would be refused by the session anyway, but only after it was all
#: in memory; checking first turns a 10 GB ``cat`` into a quick, clear error. The
#: margin leaves room for the reply's envelope.
REPLY_LIMIT = DEFAULT_LIMIT - 64 * 1024


def fitted_to_reply(output: str) -> str:
    """Command output cut to its end so that its JSON form fits in one reply.

    Characters that JSON escapes take up to six bytes, so output at the character
    limit may still be too large; it is cut further, in proportion, until it fits.
    """
    size = len(json.dumps(output))
    while size > REPLY_LIMIT:
        output = tail(output, max(0, len(output) * REPLY_LIMIT // size - 1024))
        size = len(json.dumps(output))
    return output


class Resource:
    """One allocated item as its session hosts it.

    Every public method is callable by the client that holds the item, so helpers
    that must not be called remotely start with an underscore.
    """

    def __init__(self, profile: Profile, settings: dict) -> None:
        self._profile = profile
        self._settings = settings

    def get_profile(self) -> dict:
        """The item's profile as the broker knows it."""
        return dict(self._profile)

    def _setup(self, tainted: bool = True) -> None:
        """Prepare the item for its new holder; runs in the session, off the broker loop.

        ``tainted`` is False only when the broker saw the previous holder's teardown
        finish, so the item is known to be in its resting state; after a broker start
        or a crashed session it is True. The default has nothing to prepare.
        """

    def _teardown(self) -> None:
        """Return the item to a state fit for the next holder (run in the session).

        The default has nothing to undo.
        """


class EquipmentType:
    """How one kind of equipment is described, created and driven.

    Subclass it in the type's module and publish an instance as an entry point.
    """

    name = ''
    profile_class: type[Profile] = Profile
    resource_class: type[Resource] = Resource
    on_demand = False
    # Types that leave things behind on the host (workspace directories) say so: the
    # broker then asks them at a fresh start to ``sweep`` what no session owns.
    sweeps = False
    # Types found by the broker's lister name the udev subsystems to watch; the
    # lister asks ``from_udev`` what each device there is (None: not this type).
    udev_subsystems: tuple[str, ...] = ()
    # Keys a request gets unless it names them itself (a handset request means a
    # booted handset unless it asks for another power_state).
    request_defaults: Mapping[str, Any] = MappingProxyType({})

    @property
    def identity(self) -> str:
        """The profile key that tells two items of this type apart."""
        return self.profile_class.identity or 'uid'

    def key_of(self, profile: dict) -> tuple[str, str]:
        """``(type, identity value)``: how broker and session name an item.

        Raises KeyError (naming the key) if the profile lacks its identity.
        """
        return self.name, str(profile[self.identity])

    def load_settings(self, home: str) -> dict:
        """Type-wide settings the broker reads at start (workspace.json, say)."""
        return {}

    def validate_entry(self, entry: dict) -> None:
        """Raise ValueError naming the field if a broker.json entry of this type is wrong."""
        identity = self.profile_class.identity
        if identity and not isinstance(entry.get(identity), str):
            raise ValueError(f'{identity!r} must be a string')

    def profile_of(self, entry: dict) -> Profile:
        """The profile of an item declared in broker.json (entry already validated)."""
        return self.profile_class({'type': self.name, **{
            key: value for key, value in entry.items() if _is_scalar(value)}})

    def from_udev(self, device: Any, settings: dict) -> Profile | None:
        """The profile of a udev device (a pyudev Device), or None if it is not ours.

        Runs in the lister process, never on the broker loop; ``settings`` are this
        type's settings (friendly names, say).
        """
        return None

    def sweep(self, settings: dict, keep: set[str]) -> None:
        """Remove what items of this type left behind, except for the identities in
        ``keep`` (still held by live sessions). Runs in a child of the broker."""

    def create(self, settings: dict) -> Profile:
        """A brand-new item of an on-demand type (each request gets its own)."""
        raise NotImplementedError(f'{self.name} equipment is not created on demand')


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def load_types() -> dict[str, EquipmentType]:
    """Every installed equipment type by name; a broken plug-in fails loudly here."""
    types: dict[str, EquipmentType] = {}
    origins: dict[str, str] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        equipment_type = point.load()
        if not isinstance(equipment_type, EquipmentType):
            raise TypeError(f'entry point {point.name} ({point.value}) is not an '
                            'EquipmentType instance')
        if equipment_type.name in types and types[equipment_type.name] is not equipment_type:
            raise TypeError(f'equipment type {equipment_type.name!r} is registered twice: '
                            f'by {origins[equipment_type.name]} and by {point.value}')
        types[equipment_type.name] = equipment_type
        origins[equipment_type.name] = point.value
    return types
