"""Stand-in hardware for AVE's lister tests: an umockdev testbed other processes see.

Run it with Debian's python3, which has umockdev's GObject bindings, under
``umockdev-wrapper`` (so that this process sees its own testbed, which umockdev
needs to send events). It prints the testbed directory, then reads commands on
stdin and answers each with one line: ``ok``, ``ok JSON`` or ``error: ...``:

    add FILE        add the devices of an umockdev-record file, parents first, as
                    the kernel would announce them (each gets an "add" event)
    remove SYSPATH  announce the removal of the device and of every device below it,
                    deepest first, then delete them from the testbed
    write NODE JSON write the text (a JSON string) to the far end of the emulated tty
                    NODE, as the board on the other side of a console would
    read NODE       whatever arrived at the far end of NODE within READ_WAIT seconds
                    (a JSON string, '' if nothing did)

Another process sees the testbed, events included, when it runs with
``LD_PRELOAD=libumockdev-preload.so.0`` and ``UMOCKDEV_DIR`` set to the directory.
The testbed directory is deleted when stdin closes.
"""
import json
import os
import select
import sys

import gi

gi.require_version('UMockdev', '1.0')
from gi.repository import GLib, UMockdev  # noqa: E402 (needs the version set first)

READ_WAIT = 1.0


def blocks(text):
    """The device descriptions of an umockdev-record file, with their sysfs paths."""
    found = []
    for block in text.split('\n\n'):
        block = block.strip()
        if block:
            first = block.splitlines()[0]
            if not first.startswith('P: '):
                raise ValueError(f'a device description starts with "P: ", not {first!r}')
            found.append(('/sys' + first[3:].strip(), block + '\n'))
    return found


def add(testbed, present, path):
    with open(path, encoding='utf-8') as stream:
        described = blocks(stream.read())
    for sys_path, block in sorted(described, key=lambda item: item[0].count('/')):
        testbed.add_from_string(block)
        present.add(sys_path)


def remove(testbed, present, sys_path):
    doomed = {p for p in present if p == sys_path or p.startswith(sys_path + '/')}
    if sys_path not in doomed:
        raise ValueError(f'no such device: {sys_path}')
    for path in sorted(doomed, key=lambda p: p.count('/'), reverse=True):
        testbed.uevent(path, 'remove')
    testbed.remove_device(sys_path)
    present.difference_update(doomed)


def write(testbed, present, argument):
    node, _, text = argument.partition(' ')
    data = json.loads(text).encode('utf-8')
    fd = testbed.get_dev_fd(node)
    while data:
        data = data[os.write(fd, data):]


def read(testbed, present, node):
    fd = testbed.get_dev_fd(node)
    data = b''
    ready = select.select([fd], [], [], READ_WAIT)[0]
    while ready:
        data += os.read(fd, 65536)
        ready = select.select([fd], [], [], 0)[0]
    return data.decode('utf-8', 'replace')


def main():
    testbed = UMockdev.Testbed.new()
    present = set()
    commands = {'add': add, 'remove': remove, 'write': write, 'read': read}
    print(testbed.get_root_dir(), flush=True)
    for line in sys.stdin:
        name, _, argument = line.strip().partition(' ')
        try:
            result = commands[name](testbed, present, argument)
        except (KeyError, ValueError, OSError, GLib.Error) as error:
            print(f'error: {type(error).__name__}: {error}', flush=True)
        else:
            print('ok' if result is None else f'ok {json.dumps(result)}', flush=True)


if __name__ == '__main__':
    main()
