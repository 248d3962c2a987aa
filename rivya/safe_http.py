"""POSTs to URLs a user chose (outbound webhooks), guarded against server-side request forgery.

- **The URL**: ``https`` only (``http`` too if allowed), a host, no user name or password in it.
- **The addresses**: the host is resolved and every address it resolves to must be a global
  one; a host with one private address among public ones is refused (that is how DNS
  rebinding is staged). Refused: loopback, private (RFC 1918, unique local), link-local (the
  cloud metadata address 169.254.169.254 among them), shared (100.64.0.0/10, where some clouds
  put theirs), multicast, unspecified, reserved and documentation ranges, and IPv4 written as
  IPv6.
- **At connect time** the host is resolved again and the connection is made to the address
  that was just checked, never to the name: a name that resolved to a public address when the
  URL was accepted and to 127.0.0.1 now is refused, not followed. TLS still verifies the
  certificate against the host name (SNI and hostname check as usual).
- **No redirects** (``http.client`` follows none; a 3xx is an answer like any other), a total
  time limit, and at most ``max_bytes`` of the answer read.

``allow_private`` (the setting ``WEBHOOK_ALLOW_PRIVATE``, on under DEBUG only) lifts the address
check, for a receiver on this machine during development and in tests.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# Cloud metadata services, named apart for a clearer refusal (each is refused as non-global
# anyway): AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
MAX_URL_LENGTH = 2000


class UnsafeDestination(Exception):
    """A URL or an address that must not be requested. ``code`` names the reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def address_refusal(address: str) -> str | None:
    """Why ``address`` must not be connected to (a short code), or None if it is global."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return "ipv4_mapped"
    if ip in METADATA_ADDRESSES:
        return "metadata"
    for code, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link_local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    ):
        if flag:
            return code
    if not ip.is_global:  # shared address space, documentation, benchmarking, 6to4 relays…
        return "not_global"
    return None


def check_url(url: Any, *, allow_http: bool) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable URL; raises UnsafeDestination otherwise. The host
    is not resolved here (``resolve`` does)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise UnsafeDestination(
            "invalid_url", f"Give a URL of at most {MAX_URL_LENGTH} characters."
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeDestination("invalid_url", "This is not a valid URL.") from None
    allowed = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in allowed:
        raise UnsafeDestination(
            "url_scheme",
            "The URL must start with https://."
            if not allow_http
            else "The URL must start with https:// or http://.",
        )
    if not parts.hostname:
        raise UnsafeDestination("invalid_url", "The URL has no host.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeDestination("invalid_url", "The URL must not contain a user name or password.")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UnsafeDestination(
            "invalid_url", "The URL must not contain spaces or control characters."
        )
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname, port or default


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (the system resolver)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeDestination(
            "unresolvable", f"The host {host!r} could not be resolved."
        ) from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_addresses(host: str, port: int, *, allow_private: bool) -> list[str]:
    """``host``'s addresses, all of them global (or ``allow_private``); raises UnsafeDestination
    if any is not."""
    addresses = resolve(host, port)
    if not addresses:
        raise UnsafeDestination("unresolvable", f"The host {host!r} has no address.")
    if not allow_private:
        for address in addresses:
            refusal = address_refusal(address)
            if refusal is not None:
                raise UnsafeDestination(
                    f"address_{refusal}",
                    f"The host {host!r} resolves to {address}, a {refusal.replace('_', '-')} "
                    "address: webhooks are only sent to public addresses.",
                )
    return addresses


def check_destination(url: Any, *, allow_http: bool, allow_private: bool) -> str:
    """The URL if it may be posted to now (scheme, form and addresses); raises UnsafeDestination."""
    _, host, port = check_url(url, allow_http=allow_http)
    checked_addresses(host, port, allow_private=allow_private)
    return str(url)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes  # at most max_bytes
    elapsed_ms: int


def guarded_connector(allow_private: bool) -> Any:
    """A replacement for ``socket.create_connection`` (http.client's ``_create_connection``)
    that resolves the host again, checks every address, and connects to a checked one."""

    def connect(
        address: tuple[str, int], timeout: Any = None, source_address: Any = None
    ) -> socket.socket:
        host, port = address
        error: OSError | None = None
        for ip in checked_addresses(host, port, allow_private=allow_private):
            try:
                return socket.create_connection((ip, port), timeout, source_address)
            except OSError as exc:
                error = exc
        raise error or OSError(f"could not connect to {host}")

    return connect


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    max_bytes: int,
    allow_http: bool,
    allow_private: bool,
) -> Answer:
    """POST ``body`` to ``url`` under the guard above. Raises UnsafeDestination (refused before
    connecting), or OSError / http.client.HTTPException (no answer: refused, reset, timed out);
    ``timeout`` bounds the whole exchange."""
    scheme, host, port = check_url(url, allow_http=allow_http)
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection_class = (
        http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(host, port, timeout=timeout)
    # http.client connects through this attribute (for HTTPS too, before wrapping the socket
    # in TLS for ``host``).
    connection._create_connection = guarded_connector(allow_private)  # type: ignore[attr-defined]
    started = time.monotonic()
    deadline = started + timeout
    try:
        connection.request("POST", target, body=body, headers=headers)
        _remaining(connection, deadline)
        response = connection.getresponse()
        chunks: list[bytes] = []
        size = 0
        while size < max_bytes:
            _remaining(connection, deadline)
            chunk = response.read1(max_bytes - size) if hasattr(response, "read1") else b""
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return Answer(
            status=response.status,
            headers={k.lower(): v for k, v in response.getheaders()},
            body=b"".join(chunks)[:max_bytes],
            elapsed_ms=int((time.monotonic() - started) * 1000),
        )
    finally:
        connection.close()


def _remaining(connection: http.client.HTTPConnection, deadline: float) -> None:
    """Give the socket only the time left of the whole exchange."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("The receiver did not answer in time.")
    if connection.sock is not None:
        connection.sock.settimeout(left)
