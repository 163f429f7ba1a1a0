"""The shared broker log: any process rotates it, none keeps writing a rotated file."""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(60)

MAX_BYTES = 64 * 1024
BACKUPS = 3

# Run in a process of its own: the handler takes over descriptors 1 and 2.
FLOOD = textwrap.dedent('''
    import logging, os, sys
    from ave.broker.logfile import log_to_file
    log_to_file(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    children = []
    for n in range(3):
        pid = os.fork()
        if pid == 0:
            for i in range(3000):
                logging.warning('session %d line %d %s', n, i, 'x' * 150)
            os._exit(0)
        children.append(pid)
    for i in range(300):
        logging.warning('broker line %d', i)
    for pid in children:
        os.waitpid(pid, 0)
    logging.warning('the last line')
''')


def test_log_flooded_by_several_processes_stays_within_its_files(tmp_path):
    path = tmp_path / 'broker.log'
    subprocess.run([sys.executable, '-c', FLOOD, str(path), str(MAX_BYTES), str(BACKUPS)],
                   check=True, timeout=50)
    names = sorted(name for name in os.listdir(tmp_path) if name.startswith('broker.log')
                   and not name.endswith('.lock'))
    assert names == ['broker.log'] + [f'broker.log.{n}' for n in range(1, BACKUPS + 1)], \
        f'rotation left {names}'
    for name in names:
        size = (tmp_path / name).stat().st_size
        assert size < MAX_BYTES + 4096, f'{name} grew to {size} bytes: a writer kept ' \
                                        'writing a rotated file'
    assert path.read_text().rstrip().endswith('the last line'), \
        'the current file is not the one the last writer used'
