"""Database connection care shared by the apps.

``reconnect_if_broken``: clean-up code that runs after a failure (give back a lease, drop an
idempotency claim) must not run on the connection that just failed. When PostgreSQL terminated
the backend (a restart, a failover, ``pg_terminate_backend``, a network cut), every statement
on that connection fails until it is closed, and Django reopens a connection only once the old
one is closed. Without this the clean-up fails too, quietly when it is wrapped in a
``suppress``, and what it was meant to give back stays taken until it times out
(``docs/reliability.md``: a task waited out its 300 s output lease this way).
"""

from __future__ import annotations

from django.db import DEFAULT_DB_ALIAS, connections


def reconnect_if_broken(using: str = DEFAULT_DB_ALIAS) -> None:
    """Close the connection ``using`` if an error made it unusable, so that the next statement
    opens a new one. Only outside a transaction: inside one, the transaction is lost with its
    connection and the caller's ``atomic`` must see that, so nothing is done there."""
    connection = connections[using]
    if connection.connection is None or connection.in_atomic_block:
        return
    if connection.errors_occurred and not connection.is_usable():
        connection.close()
