"""What the udev-found equipment types share: reading devices, and declared names.

Handsets and serial consoles are not declared by the lab owner; the broker's lister
finds them with pyudev. Two things are still worth configuring by hand, and both
live in ``broker.json`` next to the rest of the equipment, keyed by the identity the
lister reports (``--list`` shows it)::

    "equipment": [
        {"type": "handset", "serial": "2A111FDH200B7Q", "pretty": "bench 3"},
        {"type": "serial", "uid": "FTDI_FT232R_USB_UART_A50285BI-if00", "pretty": "bench 3 console"}
    ]

The friendly name (``pretty``) then appears in the item's profile, so a job may ask
for ``{'type': 'handset', 'pretty': 'bench 3'}``. An entry also declares the item,
so the broker lists it (offline) even before it was ever plugged in.
"""
from __future__ import annotations

from typing import Any, TypeVar

from ave.config import load_broker_config
from ave.profile import Profile

P = TypeVar('P', bound=Profile)

_DECLARED_KEYS = ('type', 'pretty')


def text_of(value: Any) -> str | None:
    """A udev property or sysfs attribute as text; pyudev hands attributes over as bytes."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode('utf-8', 'replace')
    value = str(value).strip()
    return value or None


def property_of(device: Any, name: str) -> str | None:
    """One udev property of ``device`` (from the udev database), or None."""
    return text_of(device.properties.get(name))


def attribute_of(device: Any, name: str) -> str | None:
    """One sysfs attribute of ``device``, or None when it has none (or it vanished)."""
    try:
        return text_of(device.attributes.get(name))
    except OSError:
        return None  # the device was unplugged while we looked: it has no attributes


def usb_device_of(device: Any) -> Any | None:
    """The USB device (not interface) ``device`` belongs to, or None if not on USB."""
    if device.subsystem == 'usb' and device.device_type == 'usb_device':
        return device
    return device.find_parent('usb', 'usb_device')


def usb_ids(usb_device: Any) -> tuple[str | None, str | None]:
    """Vendor and product id of a USB device as four lowercase hex digits.

    Numbers rather than names: udev's names come from a database that differs between
    hosts and cheap devices lie about them, while the ids are what the device says.
    """
    vendor = property_of(usb_device, 'ID_VENDOR_ID') or attribute_of(usb_device, 'idVendor')
    product = property_of(usb_device, 'ID_MODEL_ID') or attribute_of(usb_device, 'idProduct')
    return (vendor.lower() if vendor else None), (product.lower() if product else None)


def with_pretty(values: dict, settings: dict, identity: str) -> dict:
    """``values`` plus the friendly name broker.json gives its identity, if any."""
    pretty = settings.get('pretty', {}).get(values[identity])
    return {**values, 'pretty': pretty} if pretty else values


# --- entries in broker.json ----------------------------------------------------------

def declared_names(home: str, type_name: str, identity: str) -> dict[str, str]:
    """Identity -> friendly name for every broker.json entry of ``type_name``.

    The broker has checked the file before it asks for type settings; entries that
    do not carry a usable name are simply not names.
    """
    names = {}
    for entry in load_broker_config(home)['equipment']:
        key, pretty = entry.get(identity), entry.get('pretty')
        if entry['type'] == type_name and isinstance(key, str) and isinstance(pretty, str):
            names[key] = pretty
    return names


def check_declared(entry: dict, identity: str) -> None:
    """Raise ValueError naming the field if a declared udev item's entry is wrong.

    Only the identity and a friendly name may be given: everything else in the
    profile is what the device itself reports, and a value written by hand would
    silently disagree with it.
    """
    known = (*_DECLARED_KEYS, identity)
    for key in entry:
        if key not in known:
            raise ValueError(f'{key}: unknown key (a {entry["type"]} entry takes only '
                             f'{", ".join(known)})')
    for key in (identity, 'pretty'):
        value = entry.get(key)
        if (key == identity or key in entry) and (not isinstance(value, str) or not value):
            raise ValueError(f'{key}: expected a non-empty string, got {value!r}')


def declared_profile(profile_class: type[P], entry: dict, **values: Any) -> P:
    """The profile of a declared item nobody has seen yet: identity, name, ``values``."""
    identity = profile_class.identity
    assert identity is not None
    fields: dict[str, Any] = {'type': entry['type'], identity: entry[identity], **values}
    if 'pretty' in entry:
        fields['pretty'] = entry['pretty']
    return profile_class(fields)
