"""Who holds which equipment: allocation by profile, stacks and collateral.

Pure bookkeeping with no I/O, so every rule can be tested directly and the broker loop
stays fast. An item is known by its key, ``(type, identity value)``. Holders are opaque
ids chosen by the broker (one per client).

Rules (DESIGN.md, Broker): a request profile matches an item when each of its keys is
in the item's profile with an equal value; allocation is all or nothing; a group of
profiles (a tuple) must be satisfied from one stack; the other members of a stack
holding an allocated item are collateral that nobody else gets; NoSuch when nothing
matches, Busy when matches exist but are held.

Waiting requests (``ave.broker.queue``) add two things. An item may be *reserved* for
the holder of a waiting request: nobody else gets it, and the other members of its
stacks become collateral exactly as if it were held, because handing one of them out
would make the reserved item collateral of someone else. And a search may be told to
*avoid* keys that an earlier waiter is waiting for, and with them the other members
of their stacks (taking one would make the awaited item collateral); a holder's own
reservations are never avoided. Holder ids must be JSON scalars (int or str) so that
the table can be written out for a restart.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Collection, Hashable, Iterable, Mapping

from ave.broker.exceptions import Busy, NoSuch, NotAllocated, NotOwner
from ave.equipment import EquipmentType
from ave.profile import Profile

Key = tuple[str, str]
Holder = Hashable
Request = list[dict | list[dict]]  # profiles and stack groups, in request order
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
    reserved_for: Holder | None = None  # a waiting request's holder; never also held
    since: float | None = None          # when the holder got it, on the caller's clock

    @property
    def state(self) -> str:
        """What people are shown: releasing, held, reserved (for the waiting request
        at the head of the queue), offline or available. Who has an item matters
        more than whether it is reachable right now (a held handset rebooting is
        still held), so those win over offline."""
        if self.releasing:
            return 'releasing'
        if self.holder is not None:
            return 'held'
        if self.reserved_for is not None:
            return 'reserved'
        if not self.present or self.profile.get('power_state') == 'offline':
            return 'offline'
        return 'available'

    def to_json(self) -> dict:
        """Everything about the item, as JSON values (see ``Allocator.restore_item``)."""
        return {'profile': dict(self.profile), 'settings': self.settings,
                'holder': self.holder, 'releasing': self.releasing,
                'present': self.present, 'tainted': self.tainted, 'static': self.static,
                'reserved_for': self.reserved_for, 'since': self.since}


@dataclass(frozen=True)
class Blocker:
    """One item of a request's best plan that the request cannot have now, and why.

    ``reason`` is ``held`` (``holder`` has it since ``since``), ``releasing`` (being
    reset), ``absent`` (unplugged), ``reserved`` (for the waiting ``holder``),
    ``collateral`` (``via`` is a member of one of its stacks that ``holder`` holds or
    has reserved) or ``claimed`` (the waiting ``holder`` ahead is waiting for it, or
    for ``via``, a member of one of its stacks).
    """

    key: Key
    reason: str
    holder: Holder | None = None
    since: float | None = None
    via: Key | None = None


@dataclass
class _Search:
    """State of one all-or-nothing search over a pool of candidate items.

    ``pool`` holds the keys the search may choose, in order of preference; on-demand
    items are made as needed and kept only by a search that allocates.
    """

    holder: Holder
    pool: list[Key]
    dry_run: bool = False
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
        self._membership: dict[Key, tuple[Profile, tuple[int, ...]]] = {}

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

    def restore_item(self, state: dict) -> Key:
        """Put back an item exactly as ``Item.to_json`` wrote it (a restart's handover)."""
        key = self.key_of(state['profile'])
        profile = self._type(key[0]).profile_class(state['profile'])
        self.items[key] = Item(profile, dict(state['settings']), state['holder'],
                               state['releasing'], state['present'], state['tainted'],
                               state['static'], state.get('reserved_for'),
                               state.get('since'))
        return key

    # -- allocation --------------------------------------------------------------------

    def allocate(self, holder: Holder, request: Request, now: float | None = None,
                 avoid: Collection[Key] = ()) -> list[Item]:
        """Give ``holder`` one item per requested profile, in request order, or nothing.

        ``request`` holds profiles and groups (lists of profiles for one stack). Items
        in ``avoid``, and the other members of their stacks, are not taken unless
        reserved for ``holder``. ``now``, if given, becomes each item's ``since``.
        Raises NoSuch if some profile matches nothing at all, Busy if all match
        something but the whole request cannot be had now.
        """
        allocated = self.try_allocate(holder, request, now, avoid)
        if allocated is not None:
            return allocated
        groups = self._groups(request)
        if self._search(_Search(holder, self._present_keys(), dry_run=True), groups) is None:
            raise NoSuch(f'no such equipment: {_describe(request)}')
        raise Busy(f'equipment is busy: {_describe(request)}')

    def try_allocate(self, holder: Holder, request: Request, now: float | None = None,
                     avoid: Collection[Key] = ()) -> list[Item] | None:
        """``allocate`` without telling why it failed: None, and nothing changed.

        The cheap half, for a scheduler that tries many waiting requests in turn.
        """
        groups = self._groups(request)
        search = self._search(_Search(holder, self.free_keys(holder, avoid)), groups)
        if search is None:
            return None
        allocated = []
        for key in search.chosen:
            item = self.items[key]
            item.holder, item.reserved_for, item.since = holder, None, now
            allocated.append(item)
        return allocated

    def plan(self, holder: Holder, request: Request,
             avoid: Collection[Key] = ()) -> list[Key] | None:
        """The items ``holder`` would wait for: an assignment of ``request`` that ignores
        holds, or None when nothing in the table could ever satisfy it.

        Each profile prefers, in turn: items reserved for ``holder``, items it could
        have now, items being reset, and last items held, reserved or collateral (and
        items in ``avoid``). The preference is greedy per profile, with backtracking
        only to make the assignment complete, so it is a good plan, not a minimal one.
        Absent items count (only a holder keeps an unplugged item in the table, and a
        rebooting handset comes back); on-demand items are left out of the result,
        since a new one is made at allocation.
        """
        groups = self._groups(request)
        occupants = self._stack_occupants()
        shadow = self._shadow(avoid)

        def preference(key: Key) -> int:
            item = self.items[key]
            if (self._available(holder, key, item, occupants)
                    and (key not in shadow or _reserved_for(holder, item))):
                return 0 if _reserved_for(holder, item) else 1
            return 2 if item.releasing and item.present else 3

        pool = sorted(self.items, key=preference)
        search = self._search(_Search(holder, pool, dry_run=True), groups)
        if search is None:
            return None
        return [key for key in search.chosen if key not in search.created]

    def blockers(self, holder: Holder, request: Request,
                 claims: Mapping[Key, Holder] | None = None) -> list[Blocker]:
        """What stands between ``holder`` and ``request``: one Blocker per item of its
        plan that it cannot have now. ``claims`` maps keys that earlier waiters wait for
        to their holders. Empty when nothing could ever match (that is NoSuch)."""
        claims = claims or {}
        planned = self.plan(holder, request, avoid=claims)
        if planned is None:
            return []
        occupants = self._stack_occupants()
        shadow = self._shadow(claims)
        found = (self._blocker(holder, key, claims, shadow, occupants) for key in planned)
        return [blocker for blocker in found if blocker is not None]

    def _blocker(self, holder: Holder, key: Key, claims: Mapping[Key, Holder],
                 shadow: dict[Key, Key],
                 occupants: list[dict[Holder, Key]]) -> Blocker | None:
        item = self.items[key]
        if item.holder is not None:
            return Blocker(key, 'held', item.holder, item.since)
        if item.releasing:
            return Blocker(key, 'releasing')
        if not item.present:
            return Blocker(key, 'absent')
        if item.reserved_for is not None and item.reserved_for != holder:
            return Blocker(key, 'reserved', item.reserved_for)
        mate = self._collateral(holder, key, occupants)
        if mate is not None:
            party, via = mate
            return Blocker(key, 'collateral', party, self.items[via].since, via)
        if key in shadow and not _reserved_for(holder, item):
            claimed = shadow[key]
            return Blocker(key, 'claimed', claims[claimed], via=None if claimed == key
                           else claimed)
        return None

    def available_to(self, holder: Holder, key: Key) -> bool:
        """Could ``holder`` be given this item now (free, not reserved for another, not
        collateral of another's holding or reservation)?"""
        return self._available(holder, key, self.items[key], self._stack_occupants())

    def held_equipment(self, holder: Holder) -> list[Key]:
        """What ``holder`` holds apart from on-demand items (workspaces)."""
        return [key for key in self.held_by(holder) if not self._type(key[0]).on_demand]

    # -- reservations ------------------------------------------------------------------

    def reserve(self, holder: Holder, keys: Iterable[Key]) -> None:
        """Make ``keys`` exactly the items reserved for ``holder`` (empty: none).

        Raises ValueError, changing nothing, if one of them is not free for ``holder``.
        """
        wanted = set(keys)
        occupants = self._stack_occupants()
        for key in wanted:
            if key not in self.items or not self._available(holder, key, self.items[key],
                                                            occupants):
                raise ValueError(f'{key[0]} {key[1]} is not free to reserve for {holder!r}')
        for key, item in self.items.items():
            if key in wanted:
                item.reserved_for = holder
            elif _reserved_for(holder, item):
                item.reserved_for = None

    def reserved_by(self, holder: Holder) -> list[Key]:
        return [key for key, item in self.items.items() if _reserved_for(holder, item)]

    # -- the search --------------------------------------------------------------------

    def _groups(self, request: Request) -> list[list[dict]]:
        return [[self._with_defaults(wanted) for wanted in entry]
                if isinstance(entry, list) else [self._with_defaults(entry)]
                for entry in request]

    def _with_defaults(self, wanted: dict) -> dict:
        return {**self._type(wanted.get('type')).request_defaults, **wanted}

    def _search(self, search: _Search, groups: list[list[dict]]) -> _Search | None:
        """Run one search; on-demand items it made are kept only if an allocating search
        chose them."""
        found = self._assign(search, groups, 0)
        for key in search.created:
            if not found or search.dry_run or key not in search.chosen:
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
                   for stack in range(len(self.stacks)))

    def _assign_group(self, search: _Search, groups: list[list[dict]], index: int,
                      group: list[dict], member: int, stack: int) -> bool:
        if member == len(group):
            return self._assign(search, groups, index + 1)
        for key in self._candidates(search, group[member], stack):
            search.chosen.append(key)
            if self._assign_group(search, groups, index, group, member + 1, stack):
                return True
            search.chosen.pop()
        return False

    def _assign_one(self, search: _Search, groups: list[list[dict]], index: int,
                    wanted: dict, stack: int | None) -> bool:
        for key in self._candidates(search, wanted, stack):
            search.chosen.append(key)
            if self._assign(search, groups, index + 1):
                return True
            search.chosen.pop()
        return False

    def _candidates(self, search: _Search, wanted: dict, stack: int | None) -> list[Key]:
        """Keys of the pool that could satisfy ``wanted``, within stack number ``stack``
        if given (on demand: a new item)."""
        equipment_type = self._type(wanted['type'])
        if equipment_type.on_demand:
            return self._create_on_demand(search, equipment_type, wanted)
        return [key for key in search.pool
                if key not in search.chosen
                and (stack is None or stack in self.stacks_of(key))
                and self.items[key].profile.match(wanted)]

    def _create_on_demand(self, search: _Search, equipment_type: EquipmentType,
                          wanted: dict) -> list[Key]:
        settings = self.type_settings.get(equipment_type.name, {})
        profile = equipment_type.create(settings)
        if not profile.match(wanted):
            return []
        key = self.add(profile, settings)
        search.created.append(key)
        return [key]

    # -- who may have what -------------------------------------------------------------

    def free_keys(self, holder: Holder, avoid: Collection[Key] = ()) -> list[Key]:
        """What ``holder`` may be given now, avoiding ``avoid`` as ``allocate`` does,
        its own reservations first (so a waiter that collected a set gets that set)."""
        occupants = self._stack_occupants()
        shadow = self._shadow(avoid)
        free = [key for key, item in self.items.items()
                if self._available(holder, key, item, occupants)
                and (key not in shadow or _reserved_for(holder, item))]
        return sorted(free, key=lambda key: not _reserved_for(holder, self.items[key]))

    def _shadow(self, avoid: Collection[Key]) -> dict[Key, Key]:
        """What a request told to avoid ``avoid`` may not take, each with the avoided
        key it protects: those keys, and the other members of their stacks, since
        taking one of those would make the avoided item collateral of the taker."""
        shadow = {key: key for key in avoid}
        if not self.stacks or not avoid:
            return shadow
        protected: dict[int, Key] = {}
        for key in avoid:
            if key in self.items:
                for index in self.stacks_of(key):
                    protected.setdefault(index, key)
        if protected:
            for key in self.items:
                for index in self.stacks_of(key):
                    if index in protected:
                        shadow.setdefault(key, protected[index])
                        break
        return shadow

    def _present_keys(self) -> list[Key]:
        return [key for key, item in self.items.items() if item.present]

    def _available(self, holder: Holder, key: Key, item: Item,
                   occupants: list[dict[Holder, Key]]) -> bool:
        if item.holder is not None or item.releasing or not item.present:
            return False
        if item.reserved_for is not None and item.reserved_for != holder:
            return False
        return self._collateral(holder, key, occupants) is None

    def _stack_occupants(self) -> list[dict[Holder, Key]]:
        """Per stack: each holder that holds or has reserved a member, with that member.

        Computed once per search, not once per candidate: O(items) with the membership
        cache of ``stacks_of``.
        """
        occupants: list[dict[Holder, Key]] = [{} for _ in self.stacks]
        if not self.stacks:
            return occupants
        for key, item in self.items.items():
            party = item.holder if item.holder is not None else item.reserved_for
            if party is None:
                continue
            for index in self.stacks_of(key):
                occupants[index].setdefault(party, key)
        return occupants

    def _collateral(self, holder: Holder, key: Key,
                    occupants: list[dict[Holder, Key]]) -> tuple[Holder, Key] | None:
        """Another holder with a member of one of ``key``'s stacks, and that member."""
        if not self.stacks:
            return None
        for index in self.stacks_of(key):
            for party, member in occupants[index].items():
                if party != holder and member != key:
                    return party, member
        return None

    def stacks_of(self, key: Key) -> tuple[int, ...]:
        """The stacks ``key`` is a member of.

        Matching every item against every stack member is most of a search's cost, so
        the answer is kept while the item's profile is the same object (profiles are
        replaced, never edited in place); the cache is pruned when it outgrows the table.
        """
        profile = self.items[key].profile
        cached = self._membership.get(key)
        if cached is not None and cached[0] is profile:
            return cached[1]
        if len(self._membership) > 2 * len(self.items) + 64:
            self._membership = {k: v for k, v in self._membership.items() if k in self.items}
        stacks = tuple(index for index, stack in enumerate(self.stacks)
                       if _in_stack(profile, stack))
        self._membership[key] = (profile, stacks)
        return stacks

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
        return [dict(self.items[key].profile) for key in self.free_keys(None, ())
                if not self._type(key[0]).on_demand]

    def allocations(self, holder: Holder | None = None) -> list[dict]:
        return [dict(item.profile) for item in self.items.values()
                if item.holder is not None and (holder is None or item.holder == holder)]

    def _type(self, name: object) -> EquipmentType:
        if not isinstance(name, str) or name not in self.types:
            raise NoSuch(f'no such equipment type: {name!r}')
        return self.types[name]


def _reserved_for(holder: Holder, item: Item) -> bool:
    return item.reserved_for is not None and item.reserved_for == holder


def _in_stack(profile: Profile, stack: list[dict]) -> bool:
    return any(profile.match(member) for member in stack)


def _describe(request: object) -> str:
    return json.dumps(request, sort_keys=True, default=str)
