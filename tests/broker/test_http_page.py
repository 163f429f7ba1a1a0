"""The status page in a real browser: headless Chromium loads it from the real HTTP
process, runs its script, and we read the resulting DOM and look at screenshots."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from html.parser import HTMLParser

import pytest

from test_http_server import HttpProcess, http_process, snapshot  # noqa: F401 (fixture)
from ave.broker.http import history
from ave.broker.http.history import OVERALL, Utilisation

CHROMIUM = '/usr/bin/chromium'
BROWSER_TIMEOUT = 60

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f'{CHROMIUM} is not installed (Debian package chromium)'),
]


def chromium(tmp_path, url: str, *args: str) -> str:
    """Run headless Chromium on ``url`` until its script settled; its stdout.

    It runs in a session of its own so that the whole process tree (zygote,
    renderers) is killed if it hangs or the test fails.
    """
    profile = tmp_path / f'chromium-{time.monotonic_ns()}'
    command = [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
               '--disable-background-networking', '--disable-component-update',
               '--disable-sync', '--hide-scrollbars', f'--user-data-dir={profile}',
               '--virtual-time-budget=4000', *args, url]
    browser = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        output, _ = browser.communicate(timeout=BROWSER_TIMEOUT)
    finally:
        try:
            os.killpg(browser.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended with all its children
        browser.wait()
    assert browser.returncode == 0, f'chromium exited with {browser.returncode}'
    return output


RENDERED = 'data-rendered="yes"'
CHART_DRAWN = 'data-chart="yes"'


def rendered_dom(tmp_path, url: str, *marks: str) -> str:
    """The page's DOM once its script has drawn it (``marks``: the page's own markers
    of what it drew). Chromium's virtual time can run out before the page's fetches
    come back on a loaded machine, so the load is tried again, up to three times."""
    marks = marks or (RENDERED,)
    dom = ''
    for _ in range(3):
        dom = chromium(tmp_path, url, '--dump-dom')
        if all(mark in dom for mark in marks):
            break
    return dom


class Rows(HTMLParser):
    """The text of each table row, per section (``equipment``, ``queue``)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[str]] = {'equipment': [], 'queue': []}
        self.headings: list[str] = []
        self._section: str | None = None
        self._row: list[str] | None = None
        self._heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == 'div' and attributes.get('id') in self.rows:
            self._section = attributes['id']
        elif tag == 'tr' and self._section:
            self._row = []
        elif tag in ('h3', 'h4') and self._section == 'equipment':
            self._heading = []

    def handle_endtag(self, tag):
        if tag == 'tr' and self._row is not None:
            self.rows[self._section].append(' '.join(self._row))
            self._row = None
        elif tag in ('h3', 'h4') and self._heading is not None:
            self.headings.append(''.join(self._heading))
            self._heading = None
        elif tag == 'section':
            self._section = None

    def handle_data(self, data):
        if self._row is not None and data.strip():
            self._row.append(data.strip())
        if self._heading is not None:
            self._heading.append(data)


def rows_of(dom: str) -> Rows:
    parser = Rows()
    parser.feed(dom)
    return parser


def write_a_day_of_history(home: str) -> None:
    """A day of utilisation that rises and falls, as a lab's would."""
    use = Utilisation()
    now = time.time()
    for step in range(0, history.BUCKET_S * history.BUCKETS, 25):
        moment = now - history.BUCKET_S * history.BUCKETS + step
        wave = (math.sin(step / 9000) + 1) / 2
        use.record(moment, {OVERALL: wave * 0.8, 'relay': wave, 'handset': wave * 0.5})
    use.finish(now)
    history.save(history.path_in(home), use)


@pytest.fixture
def lab(http_process, home):
    write_a_day_of_history(home)
    process = http_process()
    process.publish(snapshot(items=6))
    return process


def url_of(process: HttpProcess) -> str:
    return f'http://127.0.0.1:{process.port}/'


def test_the_page_lists_equipment_holders_and_the_queue(lab, tmp_path):
    dom = rendered_dom(tmp_path, url_of(lab))
    aged = time.time() - lab.json('/api/equipment')['time']
    found = rows_of(dom)
    equipment = [row for row in found.rows['equipment'] if not row.startswith('Item ')]
    assert any(row.startswith('r1') and 'held' in row and 'alice@ws1' in row
               and 'flash.py' in row and '2 min' in row for row in equipment), equipment
    assert any(row.startswith('CB5A1') and 'available' in row for row in equipment)
    assert sum('offline' in row for row in equipment) == 4
    assert found.headings == ['host-a', 'handset (1)', 'relay (1)', 'host-b', 'relay (4)']
    queue = [row for row in found.rows['queue'] if not row.startswith('#')]
    # The page adds the snapshot's age to the 42 s it says the request had waited.
    [row] = queue
    start, waited = row.rsplit(' ', 2)[0], int(row.rsplit(' ', 2)[1])
    assert start == '1 bob@ws1 flash.py, pid 4242 ci.example/job/17 relay,uid=r1 0'
    assert 42 <= waited <= 42 + aged + 1 and row.endswith(' s'), row
    assert 'id="problem" class="problem" hidden' in dom, 'no warning for a fresh snapshot'


def test_the_page_draws_a_day_of_utilisation(lab, tmp_path):
    buckets = lab.json('/api/utilisation')['buckets']
    mean = sum(bucket['all'] for bucket in buckets) / len(buckets)
    dom = rendered_dom(tmp_path, url_of(lab), RENDERED, CHART_DRAWN)
    assert 'No utilisation recorded yet' not in dom
    assert dom.count('<path d="M') == 3, 'one line overall and one per type'
    assert f'all equipment: {round(mean * 100)}% on average' in dom


def test_declared_text_never_becomes_markup(http_process, tmp_path):
    process = http_process()
    hostile = {'user': '<img src=x onerror="document.title=1">', 'host': '<b>h</b>',
               'pid': 1, 'program': '<script>alert(1)</script>',
               'job': 'javascript:document.title=2'}
    process.publish(snapshot(holder=hostile))
    dom = rendered_dom(tmp_path, url_of(process))
    assert '&lt;img src=x onerror' in dom and '<img' not in dom
    assert '<script>alert' not in dom and '<b>h</b>' not in dom
    assert 'href="javascript:' not in dom, 'only http(s) jobs become links'
    assert '<title>AVE lab lab1</title>' in dom


def test_before_the_first_snapshot_the_page_says_it_waits(http_process, tmp_path):
    process = http_process()
    dom = rendered_dom(tmp_path, url_of(process))
    assert 'Waiting for the broker' in dom and 'No equipment reported.' in dom
    assert 'Nobody is waiting.' in dom


def test_the_page_warns_when_the_broker_went_quiet(http_process, tmp_path):
    process = http_process()
    process.publish(snapshot(now=time.time() - 120))
    dom = rendered_dom(tmp_path, url_of(process))
    assert 'No report from the broker for 2 min' in dom
    assert 'id="problem" class="problem" hidden' not in dom


@pytest.mark.parametrize('name, size', [('page.png', '1280,1400'),
                                        ('page-phone.png', '390,1800')])
def test_screenshots_wide_and_on_a_phone(lab, tmp_path, name, size):
    path = tmp_path / name
    chromium(tmp_path, url_of(lab), f'--screenshot={path}', f'--window-size={size}')
    width, height = (int(part) for part in size.split(','))
    with open(path, 'rb') as image:
        header = image.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n', 'a PNG screenshot'
    assert (int.from_bytes(header[16:20], 'big'), int.from_bytes(header[20:24], 'big')) \
        == (width, height)
