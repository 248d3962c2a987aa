"""A PostgreSQL wire-protocol relay on loopback that records every round trip a client starts.

Put between a process and PostgreSQL (its ``DATABASE_URL`` pointing at ``port``, with
``sslmode=disable`` so that the traffic is readable), it forwards bytes both ways unchanged and
writes down each message of the client that waits for the server: a simple-protocol ``Query``
(how psycopg2 sends everything: BEGIN, COMMIT and the connection health check included) or an
extended-protocol ``Sync``. Used by ``bench/profile_submit.py`` and by
``tests/test_submit_round_trips.py``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102


@dataclass
class Recorder:
    """Statements sent through a proxy, in order: (connection number, text)."""

    statements: list[tuple[int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, conn: int, text: str) -> None:
        with self.lock:
            self.statements.append((conn, text))

    def mark(self) -> int:
        with self.lock:
            return len(self.statements)

    def since(self, mark: int) -> list[str]:
        with self.lock:
            return [text for _, text in self.statements[mark:]]


class PgProxy:
    """127.0.0.1:<port> → the PostgreSQL server, recording each round trip the client starts
    (``Q`` queries, extended-protocol ``Sync``) on the way through."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.recorder = Recorder()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self.count = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.count += 1
            server = socket.create_connection(self.upstream)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(
                target=self._client_side, args=(client, server, self.count), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def _client_side(self, client: socket.socket, server: socket.socket, number: int) -> None:
        buffer = b""
        started = False  # before the startup message, messages have no type byte
        try:
            while data := client.recv(65536):
                server.sendall(data)
                buffer += data
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        length, code = struct.unpack("!ii", buffer[:8])
                        if len(buffer) < length:
                            break
                        buffer = buffer[length:]
                        if code not in (SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST):
                            started = True
                        continue
                    if len(buffer) < 5:
                        break
                    kind = buffer[:1]
                    (length,) = struct.unpack("!i", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    payload, buffer = buffer[5 : 1 + length], buffer[1 + length :]
                    if kind == b"Q":
                        self.recorder.add(number, payload.rstrip(b"\0").decode(errors="replace"))
                    elif kind == b"S":
                        self.recorder.add(number, "(extended protocol Sync)")
        except OSError:
            pass
        finally:
            _shut(client, server)

    def close(self) -> None:
        self.listener.close()


def _shut(*sockets: socket.socket) -> None:
    """End both directions of each connection (the other side's pump then stops too)."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
