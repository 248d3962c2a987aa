"""POSTs to URLs a user chose (outbound webhooks), guarded against server-side request forgery.

- **The URL**: ``https`` only (``http`` too if allowed), printable ASCII (a client
  percent-encodes a path and writes an international host name in punycode), a host, a port
  between 1 and 65535, no user name or password.
- **The addresses**: the host is resolved (within a time limit) and every address it resolves
  to must be a global one; a host with one private address among public ones is refused (that
  is how DNS rebinding is staged). Refused: loopback, private (RFC 1918, unique local,
  site-local), link-local (the cloud metadata address 169.254.169.254 among them), shared
  (100.64.0.0/10, where some clouds put theirs), multicast, unspecified, reserved and
  documentation ranges, IPv4 written as IPv6, and 6to4 or Teredo addresses that carry a refused
  IPv4 address. The metadata addresses are refused even when private addresses are allowed.
- **The refusal says why, not where**: "does not resolve to a public address", the same for a
  name that does not resolve, so that the answer cannot be used to map internal names to
  internal addresses. The address and its class are logged.
- **At connect time** the host is resolved and checked again, and the connection is made to the
  address that was just checked, never to the name: a name that resolved to a public address
  when the URL was accepted and to 127.0.0.1 now is refused, not followed. TLS still verifies
  the certificate against the host name (SNI and hostname check as usual).
- **No redirects** (``http.client`` follows none; a 3xx is an answer like any other), at most
  ``max_bytes`` of the answer read, and **one deadline for the whole exchange**: resolving,
  connecting (at most ``MAX_ADDRESSES`` addresses), the TLS handshake, sending and reading. A
  watchdog shuts the socket down when the deadline passes, so a receiver that trickles its
  answer a byte at a time cannot hold the attempt longer.

``allow_private`` (the setting ``WEBHOOK_ALLOW_PRIVATE``, on under DEBUG only) lifts the address
check but for the metadata addresses, for a receiver on this machine during development and in
tests.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# Cloud metadata services: refused always. AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200")
)
# Ranges some Python versions count as global: the 6to4 relay anycast (deprecated), site-local.
EXTRA_REFUSED = (
    ipaddress.ip_network("192.88.99.0/24"),
    ipaddress.ip_network("fec0::/10"),
)
MAX_URL_LENGTH = 2000
MAX_ADDRESSES = 3  # tried in turn to connect, within the one deadline
RESOLVE_TIMEOUT_S = 2.0  # checking a URL a user gives (at creation), before any attempt
_resolver = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="resolve")
REFUSED_MESSAGE = (
    "The host {host!r} does not resolve to a public address; webhooks are only sent to public "
    "addresses."
)


class UnsafeDestination(Exception):
    """A URL or an address that must not be requested. ``code`` names the reason (for logs and
    tests); ``message`` is what the user may be told."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def address_refusal(address: str) -> str | None:
    """Why ``address`` must not be connected to (a short code), or None if it is global."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
    if ip in METADATA_ADDRESSES:
        return "metadata"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "ipv4_mapped"
        if ip.is_site_local:
            return "private"
        # 6to4 (2002::/16) and Teredo carry an IPv4 address: refused if that one is.
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and address_refusal(str(embedded)) is not None:
            return "embedded_ipv4"
    for code, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link_local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("reserved", any(ip in net for net in EXTRA_REFUSED if net.version == ip.version)),
    ):
        if flag:
            return code
    if not ip.is_global:  # shared address space, documentation, benchmarking, …
        return "not_global"
    return None


def check_url(url: Any, *, allow_http: bool) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable URL; raises UnsafeDestination otherwise. The host
    is not resolved here (``checked_addresses`` does)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise UnsafeDestination(
            "invalid_url", f"Give a URL of at most {MAX_URL_LENGTH} characters."
        )
    if any(not 0x21 <= ord(c) <= 0x7E for c in url):
        raise UnsafeDestination(
            "invalid_url",
            "The URL must be printable ASCII without spaces: percent-encode the path and "
            "query, and write an international host name in punycode.",
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
    if port == 0:
        raise UnsafeDestination("invalid_url", "The URL's port must be between 1 and 65535.")
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, parts.hostname, port or default


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses ``host`` resolves to (the system resolver), within ``timeout`` seconds."""
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(0.01, timeout))
    except (OSError, UnicodeError, concurrent.futures.TimeoutError) as exc:
        log.info("webhook host %r: not resolved (%s)", host, type(exc).__name__)
        raise UnsafeDestination("unresolvable", REFUSED_MESSAGE.format(host=host)) from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_addresses(host: str, port: int, *, allow_private: bool, timeout: float) -> list[str]:
    """``host``'s addresses, all of them global (or ``allow_private``, the metadata addresses
    still refused); raises UnsafeDestination if any is not."""
    addresses = resolve(host, port, timeout)
    if not addresses:
        raise UnsafeDestination("unresolvable", REFUSED_MESSAGE.format(host=host))
    for address in addresses:
        refusal = address_refusal(address)
        if refusal is not None and (refusal == "metadata" or not allow_private):
            log.info("webhook host %r refused: %s is %s", host, address, refusal)
            raise UnsafeDestination(f"address_{refusal}", REFUSED_MESSAGE.format(host=host))
    return addresses


def check_destination(url: Any, *, allow_http: bool, allow_private: bool) -> str:
    """The URL if it may be posted to now (scheme, form and addresses); raises UnsafeDestination."""
    _, host, port = check_url(url, allow_http=allow_http)
    checked_addresses(host, port, allow_private=allow_private, timeout=RESOLVE_TIMEOUT_S)
    return str(url)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes  # at most max_bytes
    elapsed_ms: int


def guarded_connector(allow_private: bool, deadline: float) -> Any:
    """A replacement for ``socket.create_connection`` (http.client's ``_create_connection``)
    that resolves the host again, checks every address, and connects to a checked one, all
    before ``deadline`` (``time.monotonic()``)."""

    def connect(
        address: tuple[str, int], timeout: Any = None, source_address: Any = None
    ) -> socket.socket:
        host, port = address
        error: OSError | None = None
        ips = checked_addresses(
            host, port, allow_private=allow_private, timeout=deadline - time.monotonic()
        )
        for ip in ips[:MAX_ADDRESSES]:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                return socket.create_connection((ip, port), left, source_address)
            except OSError as exc:
                error = exc
        raise error or TimeoutError(f"could not connect to {host} in time")

    return connect


class _Watchdog:
    """Shuts the connection's socket down at the deadline: a read or write blocked on it then
    fails at once, whatever each socket operation's own timeout."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float) -> None:
        self.connection = connection
        self.fired = False
        self.timer = threading.Timer(max(0.0, seconds), self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self) -> None:
        self.fired = True
        sock = self.connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self.timer.cancel()


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
    connecting), TimeoutError (the deadline passed), or OSError / http.client.HTTPException (no
    answer: refused, reset); ``timeout`` bounds the whole exchange."""
    scheme, host, port = check_url(url, allow_http=allow_http)
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    started = time.monotonic()
    deadline = started + timeout
    connection_class = (
        http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(host, port, timeout=timeout)
    # http.client connects through this attribute (for HTTPS too, before wrapping the socket
    # in TLS for ``host``).
    connection._create_connection = guarded_connector(allow_private, deadline)  # type: ignore[attr-defined]
    watchdog = _Watchdog(connection, timeout)
    try:
        connection.request("POST", target, body=body, headers=headers)
        response = connection.getresponse()
        chunks: list[bytes] = []
        size = 0
        while size < max_bytes:
            chunk = response.read1(max_bytes - size)
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
    except (OSError, http.client.HTTPException) as exc:
        if watchdog.fired or time.monotonic() >= deadline:
            raise TimeoutError(f"The receiver did not answer within {timeout:g} s.") from exc
        raise
    finally:
        watchdog.cancel()
        connection.close()
