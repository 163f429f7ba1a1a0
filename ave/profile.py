"""Profiles: the dicts that describe equipment and the requests for it.

A profile is a plain dict of JSON values (``{'type': 'handset', 'serial': 'CB5A'}``)
that can also be a dict key or a set member, because the broker indexes equipment,
stacks and allocations by profile. A ``Profile`` is any dict with string keys, so a
partial description such as ``{'serial': 'CB5A'}`` is one too and can be matched
against. Equipment types subclass ``Profile`` and name the key that tells two items
of that type apart; their profiles must carry ``type`` and that key::

    class HandsetProfile(Profile):
        identity = 'serial'

A request for equipment must name its ``type``: the broker checks what clients send
with ``Profile.validate``, so a request without one never gets as far as the
allocator.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ave.exceptions import AveException


class ProfileError(AveException):
    """A value was offered as a profile but breaks the profile rules."""


class Profile(dict):
    """A hashable dict with string keys; for equipment, also a ``type`` and an identity.

    The hash is computed from the content on every call, so it always agrees with
    ``==``. A profile is still a mutable dict (it travels as JSON and callers build
    on it), but one that serves as a dict key must not be changed while it does:
    its hash would change under the container's feet.

    Subclasses must keep a constructor that takes the values as its one argument,
    because ``minimize`` builds its result with ``type(self)(values)``.
    """

    #: The key that identifies one item of an equipment type ('serial', 'uid').
    #: None on the base class, which also describes requests, where no item is named.
    identity: str | None = None

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__(values)
        if self.identity is None:
            _check_keys(self, 'profile')
        else:
            self.validate(self)

    @classmethod
    def mandatory_keys(cls) -> tuple[str, ...]:
        """The keys every profile of this class carries: ``type``, then the identity."""
        return ('type',) if cls.identity is None else ('type', cls.identity)

    @classmethod
    def validate(cls, values: Any) -> None:
        """Raise ProfileError unless ``values`` could be a request (on the base class)
        or an equipment profile (on a subclass): string keys, a ``type`` and, for a
        subclass, its identity.

        The broker calls ``Profile.validate(request)`` on what clients send, so the
        messages say what is wrong in terms a test author recognises.
        """
        label = 'profile' if cls is Profile else cls.__name__
        _check_keys(values, label)
        for key in cls.mandatory_keys():
            if key not in values:
                raise ProfileError(f'{label} {dict(values)!r} has no {key!r}')
        kind = values['type']
        if not isinstance(kind, str) or not kind:
            raise ProfileError(f"{label} 'type' must be a non-empty string, got {kind!r}")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(_frozen(self))

    def match(self, profile: Mapping[str, Any]) -> bool:
        """True when every key of ``profile`` is in self with an equal value.

        This is the allocation rule: a request matches equipment that has at least
        what was asked for. An empty request matches everything.
        """
        return all(key in self and self[key] == value for key, value in profile.items())

    def minimize(self, profile: Mapping[str, Any] | None = None) -> Profile:
        """A new profile of the same class keeping the mandatory keys and ``profile``'s keys.

        Values come from self; keys of ``profile`` that self lacks are left out, since
        there is no value to keep. Used to answer a request with just what it asked
        about plus what identifies the item.
        """
        wanted = list(self.mandatory_keys()) + list(profile or ())
        return type(self)({key: self[key] for key in wanted if key in self})


def _check_keys(values: Any, label: str) -> None:
    """Raise ProfileError unless ``values`` is a mapping whose keys are all strings."""
    if not isinstance(values, Mapping):
        raise ProfileError(f'a {label} must be a dict, got {type(values).__name__}')
    for key in values:
        if not isinstance(key, str):
            raise ProfileError(f'{label} keys must be strings, got {key!r} in {dict(values)!r}')


def _frozen(value: Any) -> Any:
    """A hashable stand-in for ``value`` that is equal whenever the values are equal.

    Containers become frozensets or tuples, recursively, and scalars stay themselves
    so ``1``, ``1.0`` and ``True`` hash alike exactly as they compare alike. Lists and
    tuples share a form; that only costs a hash collision, never a wrong answer.
    """
    if isinstance(value, Mapping):
        return frozenset((key, _frozen(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(_frozen(item) for item in value)
    return value
