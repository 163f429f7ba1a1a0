"""ave.equipment.workspace_paths: resolving job paths through descriptors, and races.

The race tests pit a workspace method against a separate process that keeps swapping
what a name is (a link to something inside or outside the workspace, or a real
directory), as a job's own command could while the session serves one of its calls.
The method may answer with the inside file or refuse; it may never answer with the
outside one. (Checking ``realpath`` and then opening, as this module replaced, lets
about one ``cat`` in a few thousand through under the directory swap.)
"""
import errno
import hashlib
import os
import subprocess
import sys
import time

import pytest

from ave.equipment.workspace import WORKSPACE, PathError, Workspace
from ave.equipment.workspace_paths import MAX_LINKS, Tree, remove_tree

pytestmark = pytest.mark.timeout(120)

SECRET = 'outside: must never be read'

# Swaps LINK between TARGET_A and TARGET_B (rename over it: the link always exists)
# until killed or TIME_LIMIT seconds have passed.
SWAPPER = r'''
import os, sys, time
link, targets, limit = sys.argv[1], sys.argv[2:4], float(sys.argv[4])
spare = link + '.spare'
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    for target in targets:
        os.symlink(target, spare)
        os.replace(spare, link)
'''

# Makes NAME alternately the real directory kept at REAL and a link to TARGET, by
# renames, until killed or TIME_LIMIT seconds have passed.
EXCHANGER = r'''
import os, sys, time
name, real, target, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
link = name + '.link'
os.symlink(target, link)
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    os.rename(real, name)
    os.rename(name, real)
    os.rename(link, name)
    os.rename(name, link)
'''


@pytest.fixture
def top(tmp_path):
    """A tree to confine paths to, with a file, a directory and links; plus outside."""
    (tmp_path / 'outside').mkdir()
    (tmp_path / 'outside' / 'secret.txt').write_text(SECRET)
    root = tmp_path / 'top'
    (root / 'sub' / 'deeper').mkdir(parents=True)
    (root / 'sub' / 'file.txt').write_text('inside')
    os.symlink('sub/file.txt', root / 'relative-link')
    os.symlink(str(root / 'sub' / 'file.txt'), root / 'absolute-link')
    os.symlink(str(tmp_path / 'outside'), root / 'out')
    os.symlink('loop-b', root / 'loop-a')
    os.symlink('loop-a', root / 'loop-b')
    return root


@pytest.fixture
def tree(top):
    fd = os.open(top, os.O_PATH | os.O_DIRECTORY)
    yield Tree(str(top), fd, 'the workspace')
    os.close(fd)


@pytest.fixture
def ws(tmp_path):
    settings = {'root': str(tmp_path / 'ws'), 'tools': {}, 'pretty': None}
    workspace = Workspace(WORKSPACE.create(settings), settings)
    workspace._setup()
    yield workspace
    workspace._teardown()


@pytest.fixture
def swapping(tmp_path):
    """``start(link, a, b)`` keeps swapping ``link`` between ``a`` and ``b`` meanwhile;
    ``start(name, real, b, script=EXCHANGER)`` swaps ``name`` between the directory
    ``real`` and a link to ``b``."""
    swappers = []

    def start(link, first, second, script=SWAPPER):
        swapper = subprocess.Popen([sys.executable, '-c', script, str(link), str(first),
                                    str(second), '100'])
        swappers.append(swapper)
        deadline = time.monotonic() + 10
        while not os.path.lexists(link) and time.monotonic() < deadline:
            time.sleep(0.001)
        return swapper
    yield start
    for swapper in swappers:
        swapper.kill()
        swapper.wait()


# --- the rules ------------------------------------------------------------------------

@pytest.mark.parametrize('given, expected', [
    ('sub/file.txt', 'sub/file.txt'), ('./sub//deeper/../file.txt', 'sub/file.txt'),
    ('relative-link', 'sub/file.txt'), ('absolute-link', 'sub/file.txt'),
    ('', ''), ('.', ''), ('sub/..', ''),
    ('missing/../sub', 'sub'), ('new/dir/name', 'new/dir/name')])
def test_paths_resolve_like_realpath_inside(tree, top, given, expected):
    assert tree.canonical(given) == os.path.join(str(top), expected).rstrip('/')


def test_absolute_paths_inside_are_accepted(tree, top):
    assert tree.canonical(str(top / 'sub' / 'file.txt')) == str(top / 'sub' / 'file.txt')


@pytest.mark.parametrize('given', ['..', 'sub/../..', 'out', 'out/secret.txt',
                                   '/etc/passwd', 'missing/../../x'])
def test_paths_leading_outside_are_refused(tree, given):
    with pytest.raises(PathError, match='outside the workspace'):
        tree.canonical(given)


def test_an_absolute_path_must_start_with_the_top_itself(tree, top):
    with pytest.raises(PathError):
        tree.canonical(str(top) + '-sibling/file')


def test_an_absolute_link_elsewhere_is_refused_even_if_it_comes_back(tree, top, tmp_path):
    os.symlink(str(tmp_path / 'top' / '..' / 'top' / 'sub'), top / 'roundabout')
    with pytest.raises(PathError):
        tree.canonical('roundabout/file.txt')


def test_a_loop_of_links_stops_after_max_links(tree):
    with pytest.raises(OSError) as caught:
        tree.canonical('loop-a')
    assert caught.value.errno == errno.ELOOP


def test_a_long_chain_of_links_within_the_limit_is_followed(tree, top):
    previous = 'sub/file.txt'
    for index in range(MAX_LINKS):
        os.symlink(previous, top / f'chain{index}')
        previous = f'chain{index}'
    assert tree.canonical(previous) == str(top / 'sub' / 'file.txt')


def test_a_path_through_a_file_is_not_a_directory(tree):
    with pytest.raises(NotADirectoryError):
        tree.canonical('sub/file.txt/x')


def test_a_final_link_is_kept_when_not_followed(tree):
    with tree.resolve('out', follow=False) as found:
        assert found.name == 'out' and found.fd is not None


def test_open_file_refuses_a_directory(tree):
    with pytest.raises(Exception, match='not a regular file'):
        tree.open_file('sub')


def test_remove_tree_leaves_what_links_point_to(tmp_path, top):
    remove_tree(str(top))
    assert not top.exists() and (tmp_path / 'outside' / 'secret.txt').read_text() == SECRET


# --- races ------------------------------------------------------------------------

def race(attempts, call):
    """Run ``call`` ``attempts`` times; count its answers and refusals by kind."""
    seen = {}
    for _ in range(attempts):
        try:
            outcome = repr(call())
        except (PathError, FileNotFoundError, NotADirectoryError) as err:
            outcome = type(err).__name__
        seen[outcome] = seen.get(outcome, 0) + 1
    return seen


def test_cat_racing_a_link_swap_never_reads_outside(ws, tmp_path, swapping):
    (tmp_path / 'outside.txt').write_text(SECRET)
    inside = ws.write_tempfile('inside')
    swapping(os.path.join(ws.get_path(), 'link'), inside, tmp_path / 'outside.txt')
    seen = race(5000, lambda: ws.cat('link'))
    assert not any(SECRET in outcome for outcome in seen), seen
    assert seen.get("'inside'") and seen.get('PathError'), \
        f'the race was not exercised (both outcomes must occur): {seen}'


def test_cat_racing_a_directory_replaced_by_a_link_never_reads_outside(ws, tmp_path,
                                                                         swapping):
    outside = tmp_path / 'outside-dir'
    outside.mkdir()
    (outside / 'f').write_text(SECRET)
    real = ws.make_tempdir()
    with open(os.path.join(real, 'f'), 'w') as stream:
        stream.write('inside')
    swapping(os.path.join(ws.get_path(), 'd'), real, outside, script=EXCHANGER)
    seen = race(5000, lambda: ws.cat('d/f'))
    assert not any(SECRET in outcome for outcome in seen), seen
    assert seen.get("'inside'") and seen.get('PathError'), \
        f'the race was not exercised (both outcomes must occur): {seen}'


def test_reads_through_a_swapped_directory_never_reach_outside(ws, tmp_path, swapping):
    outside = tmp_path / 'outside-dir'
    outside.mkdir()
    (outside / 'f').write_text(SECRET)
    inside = ws.make_tempdir()
    with open(os.path.join(inside, 'f'), 'w') as stream:
        stream.write('inside')
    swapping(os.path.join(ws.get_path(), 'd'), inside, outside)
    seen = race(1000, lambda: ws.cat('d/f'))
    seen_sums = race(1000, lambda: ws.get_checksum('d/f') == _sha256(SECRET))
    seen_listing = race(1000, lambda: ws.ls('d'))
    assert not any(SECRET in outcome for outcome in seen), seen
    assert 'True' not in seen_sums, seen_sums
    assert seen.get("'inside'") and seen.get('PathError'), seen
    assert all('PathError' == outcome or outcome == "['f']" for outcome in seen_listing)


def test_make_tempfile_racing_a_swapped_directory_never_creates_outside(ws, tmp_path,
                                                                        swapping):
    outside = tmp_path / 'outside-dir'
    outside.mkdir()
    swapping(os.path.join(ws.get_path(), 'd'), ws.make_tempdir(), outside)
    race(1000, lambda: ws.make_tempfile('d'))
    assert os.listdir(outside) == [], 'a file was created outside the workspace'


def _sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()
