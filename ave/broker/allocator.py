"""Who holds which equipment: allocation by profile, stacks and collateral.

Pure bookkeeping with no I/O, so every rule can be tested directly and the broker loop
stays fast. An item is known by its key, ``(type, identity value)``. Holders are opaque
ids chosen by the broker (one per client).

Rules (DESIGN.md, Broker): a request profile matches an item when each of its keys is
in the item's profile with an equal value; allocation is all or nothing; a group of
profiles (a tuple) must be satisfied from one stack; the other members of a stack
holding an allocated item are collateral that nobody else gets; NoSuch when nothing
matches, Busy when matches exist but are held.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Hashable, Iterable

from ave.broker.exceptions import Busy, NoSuch, NotAllocated, NotOwner
from ave.equipment import EquipmentType
from ave.profile import Profile

Key = tuple[str, str]
Holder = Hashable
SEARCH_LIMIT = 20000


@dataclass
class Item:
    """One piece of equipment and its allocation state."""

    profile: Profile
    settings: dict
    holder: Holder | None = None
    releasing: bool = False
    present: bool = True
    tainted: bool = True
    static: bool = False


@dataclass
class _Search:
    """State of one all-or-nothing allocation attempt."""

    holder: Holder
    ignore_holds: bool = False
    chosen: list[Key] = field(default_factory=list)
    created: list[Key] = field(default_factory=list)
    steps: int = 0


class Allocator:
    """The broker's equipment table."""

    def __init__(self, types: dict[str, EquipmentType],
                 stacks: Iterable[Iterable[dict]] = (),
                 type_settings: dict[str, dict] | None = None) -> None:
        self.types = types
        self.stacks = [[dict(member) for member in stack] for stack in stacks]
        self.type_settings = dict(type_settings or {})
        self.items: dict[Key, Item] = {}

    # -- equipment coming and going ----------------------------------------------------

    def key_of(self, profile: dict) -> Key:
        """The (type, identity) key of a full equipment profile."""
        equipment_type = self._type(profile.get('type'))
        try:
            return equipment_type.key_of(profile)
        except KeyError:
            raise NoSuch(f'{profile.get("type")} profile lacks its identity '
                         f'{equipment_type.identity!r}') from None

    def add(self, profile: dict, settings: dict | None = None, static: bool = False) -> Key:
        """Add or refresh an item; a held item keeps its holder.

        ``static`` items are declared in broker.json: no lister report removes them.
        """
        key = self.key_of(profile)
        cls = self._type(profile['type']).profile_class
        item = self.items.get(key)
        if item is None:
            self.items[key] = Item(cls(profile), dict(settings or {}), static=static)
        else:
            item.profile = cls(profile)
            item.settings = dict(settings or item.settings)
            item.present = True
        return key

    def remove(self, key: Key) -> None:
        """Equipment disappeared: forget it, unless held (then it shows as offline).

        Equipment declared in broker.json is never forgotten: it goes back to its
        declared profile, offline, so the lab owner still sees it listed.
        """
        item = self.items.get(key)
        if item is None:
            return
        if item.static:
            declared = self._type(key[0]).profile_of(item.settings)
            item.profile = type(item.profile)({**declared, 'power_state': 'offline'})
            return
        if item.holder is None:
            del self.items[key]
            return
        item.present = False
        item.profile = type(item.profile)({**item.profile, 'power_state': 'offline'})

    def sync(self, type_name: str, profiles: list[dict]) -> None:
        """A lister's full view of one type: add what it sees, remove what it does not,
        so a restarted lister corrects the events it missed."""
        self._type(type_name)
        seen = set()
        for profile in profiles:
            if profile.get('type') != type_name:
                raise NoSuch(f'sync of {type_name} got a {profile.get("type")!r} profile')
            seen.add(self.add(profile))
        for key, item in list(self.items.items()):
            if key[0] == type_name and key not in seen:
                self.remove(key)

    # -- allocation --------------------------------------------------------------------

    def allocate(self, holder: Holder, request: list[dict | list[dict]]) -> list[Item]:
        """Give ``holder`` one item per requested profile, in request order, or nothing.

        ``request`` holds profiles and groups (lists of profiles for one stack). Raises
        NoSuch if some profile matches nothing at all, Busy if all match something but
        the whole request cannot be satisfied now.
        """
        groups = [[self._with_defaults(wanted) for wanted in entry]
                  if isinstance(entry, list) else [self._with_defaults(entry)]
                  for entry in request]
        search = self._search(_Search(holder), groups)
        if search is None:
            if self._search(_Search(holder, ignore_holds=True), groups) is None:
                raise NoSuch(f'no such equipment: {_describe(request)}')
            raise Busy(f'equipment is busy: {_describe(request)}')
        allocated = []
        for key in search.chosen:
            item = self.items[key]
            item.holder = holder
            allocated.append(item)
        return allocated

    def _with_defaults(self, wanted: dict) -> dict:
        return {**self._type(wanted.get('type')).request_defaults, **wanted}

    def _search(self, search: _Search, groups: list[list[dict]]) -> _Search | None:
        """Run one search; on-demand items it made are kept only if a real one chose them."""
        found = self._assign(search, groups, 0)
        for key in search.created:
            if not found or search.ignore_holds or key not in search.chosen:
                del self.items[key]
        return search if found else None

    def _assign(self, search: _Search, groups: list[list[dict]], index: int) -> bool:
        """Backtracking search: groups[index:] satisfied on top of search.chosen."""
        if index == len(groups):
            return True
        search.steps += 1
        if search.steps > SEARCH_LIMIT:
            return False
        group = groups[index]
        if len(group) == 1:
            return self._assign_one(search, groups, index, group[0], None)
        return any(self._assign_group(search, groups, index, group, 0, stack)
                   for stack in self.stacks)

    def _assign_group(self, search: _Search, groups: list[list[dict]], index: int,
                      group: list[dict], member: int, stack: list[dict]) -> bool:
        if member == len(group):
            return self._assign(search, groups, index + 1)
        for key in self._candidates(search, group[member], stack):
            search.chosen.append(key)
            if self._assign_group(search, groups, index, group, member + 1, stack):
                return True
            search.chosen.pop()
        return False

    def _assign_one(self, search: _Search, groups: list[list[dict]], index: int,
                    wanted: dict, stack: list[dict] | None) -> bool:
        for key in self._candidates(search, wanted, stack):
            search.chosen.append(key)
            if self._assign(search, groups, index + 1):
                return True
            search.chosen.pop()
        return False

    def _candidates(self, search: _Search, wanted: dict,
                    stack: list[dict] | None) -> list[Key]:
        """Keys that could satisfy ``wanted`` now (an on-demand type makes a new item)."""
        equipment_type = self._type(wanted['type'])
        if equipment_type.on_demand:
            return self._create_on_demand(search, equipment_type, wanted)
        return [key for key, item in self.items.items()
                if key not in search.chosen
                and (stack is None or _in_stack(item.profile, stack))
                and item.profile.match(wanted)
                and (search.ignore_holds and item.present
                     or self._free_for(search.holder, key, item))]

    def _create_on_demand(self, search: _Search, equipment_type: EquipmentType,
                          wanted: dict) -> list[Key]:
        settings = self.type_settings.get(equipment_type.name, {})
        profile = equipment_type.create(settings)
        if not profile.match(wanted):
            return []
        key = self.add(profile, settings)
        search.created.append(key)
        return [key]

    def _free_for(self, holder: Holder, key: Key, item: Item) -> bool:
        if item.holder is not None or item.releasing or not item.present:
            return False
        return not self._collateral_of_other(holder, item)

    def _collateral_of_other(self, holder: Holder, item: Item) -> bool:
        """Is ``item`` in a stack where someone other than ``holder`` holds a member?"""
        for stack in self.stacks:
            if not _in_stack(item.profile, stack):
                continue
            for other in self.items.values():
                if (other.holder is not None and other.holder != holder
                        and _in_stack(other.profile, stack)):
                    return True
        return False

    # -- release -----------------------------------------------------------------------

    def check_holder(self, holder: Holder, profile: dict) -> Key:
        """The key of an item ``holder`` holds; NotOwner or NotAllocated otherwise."""
        key = self.key_of(profile)
        item = self.items.get(key)
        if item is None or item.holder is None:
            raise NotAllocated(f'not allocated: {_describe(profile)}')
        if item.holder != holder:
            raise NotOwner(f'allocated to another client: {_describe(profile)}')
        return key

    def begin_release(self, key: Key) -> None:
        """The holder let go, but the item stays unavailable until it has been reset."""
        item = self.items[key]
        item.holder = None
        item.releasing = True

    def finish_release(self, key: Key, clean: bool = False) -> None:
        """The holder's session ended or let go: available again (or forgotten, if it
        was on demand or gone). ``clean`` says its teardown was seen to finish, so the
        next holder need not reset it first."""
        item = self.items.get(key)
        if item is None:
            return
        item.holder = None
        item.releasing = False
        item.tainted = not clean
        if not item.present or self._type(key[0]).on_demand:
            del self.items[key]

    def held_by(self, holder: Holder) -> list[Key]:
        return [key for key, item in self.items.items() if item.holder == holder]

    # -- listings ----------------------------------------------------------------------

    def equipment(self) -> list[dict]:
        """Every known item that is not a per-client creation (workspaces)."""
        return [dict(item.profile) for key, item in self.items.items()
                if not self._type(key[0]).on_demand]

    def available(self) -> list[dict]:
        return [dict(item.profile) for key, item in self.items.items()
                if not self._type(key[0]).on_demand and self._free_for(None, key, item)]

    def allocations(self, holder: Holder | None = None) -> list[dict]:
        return [dict(item.profile) for item in self.items.values()
                if item.holder is not None and (holder is None or item.holder == holder)]

    def _type(self, name: object) -> EquipmentType:
        if not isinstance(name, str) or name not in self.types:
            raise NoSuch(f'no such equipment type: {name!r}')
        return self.types[name]


def _in_stack(profile: Profile, stack: list[dict]) -> bool:
    return any(profile.match(member) for member in stack)


def _describe(request: object) -> str:
    return json.dumps(request, sort_keys=True, default=str)
