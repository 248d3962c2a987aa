"""Accepting a validated task in one statement (PostgreSQL): the fast path of a submit.

``task_submit`` validates a request and prices it; accepting it means, in one database
transaction: take a capacity slot of each of the task's scopes, hold its price on the user's
account, and write the task, its hold, its outbox row (``tasks.services.dispatch``) and its
first timeline events. Done with the ORM that is
about fifteen round trips (``submit.accept_step_by_step``). Here it is one data-modifying
``WITH`` statement between BEGIN and COMMIT, whose steps are chained so that each runs only if
the one before succeeded, in the lock order every other writer uses (capacity rows, then the
account row):

1. ``model_ok``: the model row is still enabled and unchanged (``tasks.model_cache``);
2. ``cap_0`` … ``cap_n``: a slot of each capacity scope, ``running < limit`` (one upsert each:
   the row is created at its first use);
3. ``account``: the hold on the balance, ``balance >= held + price`` (skipped for a free model);
4. the task, the hold, the task's outbox row and its events (in order), inserted from the
   rows above, and ``pg_notify`` to wake the dispatcher (delivered at commit).

It runs as a prepared statement of the connection (PREPAREd at its first use there), so that
PostgreSQL parses and plans it once per connection. With PgBouncer in front of PostgreSQL, use
its session pooling mode (transaction pooling does not keep SQL-level prepared statements); a
lost prepared statement is prepared again.

The statement answers which steps passed. Anything short of all of them rolls the transaction
back, and the caller takes the step-by-step path, which gives the exact answer for a refusal
(429 naming the scope, 402 with a FAILED task and a notification) or accepts if things changed
in between. So the rules written here in SQL (a capacity slot, a hold) are the same conditions
as the ORM's, and ``tasks/tests/test_submit_paths.py`` runs both paths on the same requests and
compares what they store.
"""

# ruff: noqa: S608 - the statement is built from constants and model metadata; values are parameters
from __future__ import annotations

import enum
import hashlib
import re
from typing import Any

from django.db import DatabaseError, connection, transaction
from psycopg2.errors import DuplicatePreparedStatement, InvalidSqlStatementName

from billing.models import Hold
from rivya.sql import insert_columns, insert_values
from tasks.models import SubmitOutbox, Task, TaskEvent

NOTIFY_CHANNEL = "rivya_submits"  # the dispatcher LISTENs here (tasks.services.dispatch)


class Accept(enum.Enum):
    ACCEPTED = "accepted"
    MODEL_CHANGED = "model_changed"  # the model row changed since it was cached: validate again
    REFUSED = "refused"  # a capacity scope is full or the balance is short: nothing was written


def fast_path_available() -> bool:
    return connection.vendor == "postgresql"


class _Refused(Exception):  # noqa: N818 - control flow: roll the transaction back
    def __init__(self, outcome: Accept) -> None:
        self.outcome = outcome


def accept_in_one_statement(
    *,
    task: Task,
    model_fingerprint: str,
    scopes: list[tuple[str, int]],
    events: list[TaskEvent],
    hold: Hold | None,
) -> Accept:
    """Take ``scopes`` (name, limit), hold ``hold.amount`` (if ``hold``) and insert ``task``,
    ``hold`` and ``events``, all or nothing. ``task`` must already carry what the accepted row
    holds (``capacity_scopes``, ``reserved_micro``); its ``created_at`` is set here."""
    db = transaction.get_connection()
    sql, name = _statement(db, scopes=len(scopes), hold=hold is not None, events=len(events))
    params: list[Any] = [task.model_id, model_fingerprint]
    for scope, limit in scopes:
        params += [scope, limit, limit]
    if hold is not None:
        params += [hold.amount, task.user_id, hold.amount]
    params += insert_values(task, db)
    if hold is not None:
        params += insert_values(hold, db, skip=("account_id",))
    params += insert_values(SubmitOutbox(task_id=task.pk), db)
    for event in events:
        params += insert_values(event, db)
    params.append(NOTIFY_CHANNEL)
    for attempt in (1, 2):
        try:
            with transaction.atomic():
                model_ok, capacity_ok, funds_ok, notified = _execute_prepared(db, sql, name, params)
                if not model_ok:
                    raise _Refused(Accept.MODEL_CHANGED)
                if not (capacity_ok and funds_ok and notified):
                    raise _Refused(Accept.REFUSED)
        except _Refused as refused:
            return refused.outcome
        except DatabaseError as exc:
            # What this process knows of the server connection's prepared statements is wrong
            # (DISCARD ALL; a pooler handing it another server connection, or back one that
            # has the statement): correct it and try once more.
            if attempt == 2:
                raise
            if isinstance(exc.__cause__, InvalidSqlStatementName):
                prepared_on(db).clear()
            elif isinstance(exc.__cause__, DuplicatePreparedStatement):
                prepared_on(db).add(name)
            else:
                raise
            continue
        return Accept.ACCEPTED
    raise AssertionError("unreachable")  # pragma: no cover


_statements: dict[tuple[str, int, bool, int], tuple[str, str]] = {}


def _statement(db: Any, *, scopes: int, hold: bool, events: int) -> tuple[str, str]:
    """The accept statement for ``scopes`` capacity scopes, a hold or not and ``events``
    events, with its prepared-statement name; built once (it depends on the model metadata
    only). Its parameters, in order, are built by ``accept_in_one_statement``."""
    key = (db.vendor, scopes, hold, events)
    if key not in _statements:
        _statements[key] = _build_statement(db, scopes=scopes, hold=hold, events=events)
    return _statements[key]


def _build_statement(db: Any, *, scopes: int, hold: bool, events: int) -> tuple[str, str]:
    ctes = [
        "model_ok AS (SELECT 1 AS ok FROM tasks_aimodel m "
        "WHERE m.id = %s AND m.enabled AND md5(m::text) = %s)"
    ]
    previous = "model_ok"
    for n in range(scopes):
        ctes.append(
            f"cap_{n} AS (INSERT INTO tasks_capacitycounter (scope, running) "
            f"SELECT %s, 1 FROM {previous} WHERE 0 < %s "
            "ON CONFLICT (scope) DO UPDATE SET running = tasks_capacitycounter.running + 1 "
            "WHERE tasks_capacitycounter.running < %s RETURNING 1 AS ok)"
        )
        previous = f"cap_{n}"
    capacity = previous
    if hold:
        ctes.append(
            "account AS (UPDATE billing_account SET held = held + %s "
            f"FROM {previous} WHERE billing_account.user_id = %s "
            "AND billing_account.balance >= billing_account.held + %s "
            "RETURNING billing_account.id)"
        )
        previous = "account"

    def values(model: type[Any], skip: tuple[str, ...] = ()) -> tuple[str, str]:
        columns = insert_columns(model, db, skip=skip)
        return ", ".join(columns), ", ".join(["%s"] * len(columns))

    columns, marks = values(Task)
    ctes.append(
        f"task_row AS (INSERT INTO ai_task ({columns}) "
        f"SELECT {marks} FROM {previous} RETURNING 1 AS ok)"
    )
    if hold:
        columns, marks = values(Hold, skip=("account_id",))
        ctes.append(
            f"hold_row AS (INSERT INTO billing_hold (account_id, {columns}) "
            f"SELECT account.id, {marks} FROM account)"
        )
    columns, marks = values(SubmitOutbox)
    ctes.append(
        f"outbox_row AS (INSERT INTO tasks_submitoutbox ({columns}) SELECT {marks} FROM task_row)"
    )
    after = "task_row"  # each event after the one before, so that their ids are in order
    for n in range(events):
        columns, marks = values(TaskEvent)
        ctes.append(
            f"event_{n} AS (INSERT INTO tasks_taskevent ({columns}) "
            f"SELECT {marks} FROM {after} RETURNING 1 AS ok)"
        )
        after = f"event_{n}"
    ctes.append("notify AS (SELECT pg_notify(%s, '') FROM task_row)")
    sql = (
        f"WITH {', '.join(ctes)} SELECT (SELECT count(*) FROM model_ok), "
        f"(SELECT count(*) FROM {capacity}), (SELECT count(*) FROM {previous}), "
        "(SELECT count(*) FROM notify)"
    )
    return sql, "rivya_accept_" + hashlib.sha256(sql.encode()).hexdigest()[:16]


def prepared_on(db: Any) -> set[str]:
    """The statements this process has prepared on ``db``'s current server connection (a new
    connection starts with none)."""
    state = getattr(db, "rivya_prepared", None)
    if state is None or state[0] is not db.connection:
        state = (db.connection, set())
        db.rivya_prepared = state
    return state[1]


def _execute_prepared(db: Any, sql: str, name: str, params: list[Any]) -> tuple[Any, ...]:
    """Run ``sql`` as the prepared statement ``name`` of the connection, PREPAREd at its first
    use there: PostgreSQL then parses and plans it once per connection instead of once per
    submit (about 40% of the database's CPU for a submit)."""
    prepared = prepared_on(db)
    with db.cursor() as cursor:
        if name not in prepared:
            numbered = iter(range(1, len(params) + 1))
            text = re.sub(r"%s", lambda _: f"${next(numbered)}", sql)
            cursor.execute(f"PREPARE {name} AS {text}")
            prepared.add(name)
        cursor.execute(f"EXECUTE {name}({', '.join(['%s'] * len(params))})", params)
        return cursor.fetchone()
