"""A PostgreSQL wire-protocol relay on loopback that records every statement a client sends.

Put between a Rivya server process and PostgreSQL (``DATABASE_URL`` pointing at its port, with
``sslmode=disable`` so that the traffic is readable), it forwards bytes both ways unchanged and
writes down each query message the client sends: a simple-protocol ``Query`` (which is how
psycopg2 sends everything, BEGIN, COMMIT and the connection health check included) or an
extended-protocol ``Parse``. Each is one round trip the request waits for. Not a test module:
fixtures in conftest.py use it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

SSL_REQUEST = 80877103
GSS_REQUEST = 80877104


@dataclass
class Recorder:
    statements: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, statement: str) -> None:
        with self.lock:
            self.statements.append(statement)

    def take(self) -> list[str]:
        """What was recorded since the last take."""
        with self.lock:
            taken, self.statements = self.statements, []
        return taken


class PgProxy:
    """``with PgProxy(upstream_port) as proxy:`` listens on ``proxy.port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.recorder = Recorder()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> PgProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._from_client, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _from_client(self, client: socket.socket, server: socket.socket) -> None:
        buffer = b""
        started = False  # the startup packets carry no type byte
        try:
            while chunk := client.recv(65536):
                server.sendall(chunk)
                buffer += chunk
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        length, code = struct.unpack("!ii", buffer[:8])
                        if len(buffer) < length:
                            break
                        buffer = buffer[length:]
                        started = code not in (SSL_REQUEST, GSS_REQUEST)
                        continue
                    if len(buffer) < 5:
                        break
                    kind = buffer[:1]
                    (length,) = struct.unpack("!i", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    payload, buffer = buffer[5 : 1 + length], buffer[1 + length :]
                    if kind == b"Q":
                        self.recorder.add(payload.rstrip(b"\0").decode(errors="replace"))
                    elif kind == b"P":  # statement name, then the query text
                        query = payload.split(b"\0", 2)[1]
                        self.recorder.add(query.decode(errors="replace"))
        except OSError:
            pass
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
