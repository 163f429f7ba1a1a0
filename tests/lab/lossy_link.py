"""A TCP forwarder on 127.0.0.1 in front of one etcd member, whose answers can be
lost on the way back: requests still reach etcd (a keep-alive renews its lease), and
the client hears nothing. What a host sees when etcd's replies to it are dropped."""
from __future__ import annotations

import socket
import threading

LIFETIME = 60.0   # every forwarded connection ends by then, whatever the peers do


class LossyLink:
    """``endpoint`` forwards to ``target_port``; ``lose()`` drops what etcd sends,
    ``heal()`` ends every connection (their framing is broken) and forwards again.
    ``close()`` ends it all and joins every thread."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.listener.settimeout(0.05)  # a closed listener does not wake accept()
        self.endpoint = f'http://127.0.0.1:{self.listener.getsockname()[1]}'
        self.losing = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []   # of connections still forwarded
        self._opened: list[socket.socket] = []    # every one, closed at the end
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def lose(self) -> None:
        self.losing.set()

    def heal(self) -> None:
        self.losing.clear()
        self._end_connections()

    def close(self) -> None:
        self._closing.set()
        self._end_connections()
        for thread in list(self._threads):
            thread.join(LIFETIME)
        self.listener.close()
        for sock in self._opened:
            sock.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            try:
                server = socket.create_connection(('127.0.0.1', self.target_port), 5)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.settimeout(LIFETIME)
            with self._lock:
                self._sockets += [client, server]
                self._opened += [client, server]
            self._pump(client, server, lossy=False)
            self._pump(server, client, lossy=True)

    def _pump(self, source: socket.socket, sink: socket.socket, lossy: bool) -> None:
        def forward() -> None:
            try:
                while data := source.recv(65536):
                    if not (lossy and self.losing.is_set()):
                        sink.sendall(data)
            except OSError:
                pass  # either side went away, or heal() ended the connection
            finally:
                for sock in (source, sink):
                    _shut(sock)
        thread = threading.Thread(target=forward, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _end_connections(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
