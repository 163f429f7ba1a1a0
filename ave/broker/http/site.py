"""What each path answers: the status page, its JSON and the metrics.

No sockets here: ``Site.reply(method, target)`` turns a request line into a
``Reply`` from the latest snapshot, the utilisation history and the page files, so
every route is tested without HTTP. Answers are made once per snapshot and kept
until the next one: a client polling ``/metrics`` in a loop costs one copy of bytes
per request, not one rendering.

Routes: ``/`` (the page; ``page.js`` and ``page.css`` beside it), ``/metrics``,
``/api/equipment``, ``/api/queue``, ``/api/utilisation``. Only GET and HEAD.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from ave.broker.http import metrics
from ave.broker.http.history import Utilisation

JSON = 'application/json'
TEXT = 'text/plain; charset=utf-8'
COMMON_HEADERS = (('Cache-Control', 'no-store'), ('X-Content-Type-Options', 'nosniff'))
# The page runs only its own script and talks only to this server: text a client
# declared about itself can never become script, wherever it ends up in the page.
PAGE_HEADERS = (
    ('Content-Security-Policy', "default-src 'none'; script-src 'self'; "
     "style-src 'self'; connect-src 'self'; img-src 'self' data:; "
     "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ('Referrer-Policy', 'no-referrer'),
)
PAGE_FILES = {
    '/': ('index.html', 'text/html; charset=utf-8'),
    '/index.html': ('index.html', 'text/html; charset=utf-8'),
    '/page.js': ('page.js', 'text/javascript; charset=utf-8'),
    '/page.css': ('page.css', 'text/css; charset=utf-8'),
}


@dataclass(frozen=True)
class Reply:
    """A whole response: status, content type, body and any further headers."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def error_reply(status: int, message: str,
                headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """One line saying what was wrong, as plain text."""
    return Reply(status, TEXT, f'{status} {message}\n'.encode('utf-8'), headers)


def load_page_files() -> dict[str, bytes]:
    """The page's files, read once from the installed package."""
    folder = resources.files('ave.broker.http') / 'page'
    return {name: (folder / name).read_bytes() for name, _ in set(PAGE_FILES.values())}


class Site:
    """The latest snapshot and history, served as pages, JSON and metrics."""

    def __init__(self, history: Utilisation, page_files: dict[str, bytes] | None = None) -> None:
        self.history = history
        self.snapshot: dict | None = None
        self.page_files = load_page_files() if page_files is None else page_files
        self.registry = metrics.make_registry(lambda: self.snapshot)
        self._cache: dict[str, Reply] = {}
        self._history_version = -1
        self._routes: dict[str, Callable[[], Reply]] = {
            '/metrics': self._metrics,
            '/api/equipment': self._equipment,
            '/api/queue': self._queue,
            '/api/utilisation': self._utilisation,
        }

    def update(self, snapshot: dict) -> None:
        """A checked snapshot replaces the previous one; cached answers are dropped."""
        self.snapshot = snapshot
        self._cache.clear()

    def reply(self, method: str, target: str) -> Reply:
        """The answer to ``method target``; HEAD gets GET's headers (the caller drops
        the body)."""
        if method not in ('GET', 'HEAD'):
            return error_reply(405, 'only GET and HEAD are served', (('Allow', 'GET, HEAD'),))
        path = target.split('?', 1)[0]
        if self._history_version != self.history.version:
            self._history_version = self.history.version
            self._cache.pop('/api/utilisation', None)
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        reply = self._make(path)
        if reply.status == 200:
            self._cache[path] = reply
        return reply

    def _make(self, path: str) -> Reply:
        page = PAGE_FILES.get(path)
        if page is not None:
            name, content_type = page
            return Reply(200, content_type, self.page_files[name],
                         PAGE_HEADERS if name == 'index.html' else ())
        route = self._routes.get(path)
        if route is None:
            return error_reply(404, 'no such page')
        return route()

    def _metrics(self) -> Reply:
        return Reply(200, metrics.CONTENT_TYPE, metrics.render(self.registry))

    def _about(self) -> dict:
        snapshot = self.snapshot or {}
        return {'time': snapshot.get('time'), 'lab': snapshot.get('lab'),
                'host': snapshot.get('host')}

    def _equipment(self) -> Reply:
        snapshot = self.snapshot or {}
        return _json({**self._about(), 'equipment': snapshot.get('equipment', [])})

    def _queue(self) -> Reply:
        snapshot = self.snapshot or {}
        return _json({**self._about(), 'queue': snapshot.get('queue', [])})

    def _utilisation(self) -> Reply:
        return _json({**self._about(), **self.history.export()})


def _json(value: dict) -> Reply:
    return Reply(200, JSON, json.dumps(value, separators=(',', ':')).encode('ascii'))
