"""Accepting a validated task in one statement (PostgreSQL): the fast path of a submit.

``task_submit`` validates a request and prices it; accepting it means, in one database
transaction: take a capacity slot of each of the task's scopes, hold its price on the user's
account, and write the task, its hold, its outbox row (``tasks.services.dispatch``) and its
first timeline events. Done with the ORM that is about fifteen round trips
(``submit.accept_step_by_step``). Here it is one data-modifying ``WITH`` statement, a
transaction by itself (one round trip), whose steps are chained so that each runs only if the
one before succeeded, in the lock order every other writer uses (capacity rows, then the
account row):

1. ``model_ok``: the model row is still enabled and unchanged (``tasks.model_cache``);
2. ``cap_0`` … ``cap_n``: a slot of each capacity scope, ``running < limit`` (one upsert each:
   the row is created at its first use);
3. ``account``: the hold on the balance, ``balance >= held + price`` (skipped for a free model);
4. the task, the hold, the task's outbox row and its events (in order), inserted from the
   rows above, and ``pg_notify`` to wake the dispatcher (delivered at commit).

It runs as a prepared statement of the connection (``rivya.sql.execute_prepared``), so that
PostgreSQL parses and plans it once per connection.

If a step does not pass, the statement raises (``rivya_accept_refused``, a function created by
migration ``tasks 0012``, SQLSTATE ``RV001``, message ``key_changed``, ``key_taken``,
``model_changed`` or ``refused``), which
undoes all of it: nothing is written. Inside an outer transaction (the Idempotency-Key path)
it runs in a savepoint, with the same effect. On ``model_changed`` the submit is validated
again against the row as it is now; on ``refused`` the caller takes the step-by-step path,
which gives the exact answer for a refusal (429 naming the scope, 402 with a FAILED task and a
notification) or accepts if things changed in between. So the rules written here in SQL (a
capacity slot, a hold) are the same conditions as the ORM's, and
``tasks/tests/test_submit_paths.py`` runs both paths on the same requests and compares what
they store.
"""

# ruff: noqa: S608 - the statement is built from constants and model metadata; values are parameters
from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from django.db import DatabaseError, IntegrityError, connection, transaction

from billing.models import Hold, IdempotencyRecord
from rivya.key_cache import Credential
from rivya.models import ApiKey, User
from rivya.services import usable_key_condition
from rivya.sql import execute_checking_connection, insert_columns, insert_values
from tasks.models import SubmitOutbox, Task, TaskEvent

NOTIFY_CHANNEL = "rivya_submits"  # the dispatcher LISTENs here (tasks.services.dispatch)


class Accept(enum.Enum):
    ACCEPTED = "accepted"
    MODEL_CHANGED = "model_changed"  # the model row changed since it was cached: validate again
    REFUSED = "refused"  # a capacity scope is full or the balance is short: nothing was written
    KEY_TAKEN = "key_taken"  # the Idempotency-Key has a record already: nothing was written
    KEY_CHANGED = "key_changed"  # the API key was revoked or its user deactivated: ditto


def fast_path_available() -> bool:
    return connection.vendor == "postgresql"


REFUSED_SQLSTATE = "RV001"  # raised by rivya_accept_refused() (migration tasks 0012)


def accept_in_one_statement(
    *,
    task: Task,
    model_fingerprint: str,
    scopes: list[tuple[str, int]],
    events: list[TaskEvent],
    hold: Hold | None,
    record_for: Callable[[Task], IdempotencyRecord] | None = None,
    credential: Credential | None = None,
) -> Accept:
    """Take ``scopes`` (name, limit), hold ``hold.amount`` (if ``hold``) and insert ``task``,
    ``hold`` and ``events``, all or nothing. ``task`` must already carry what the accepted row
    holds (``capacity_scopes``, ``reserved_micro``); its ``created_at`` is set here.

    ``record_for``: the request's ``Idempotency-Key`` record, completed, built from the task as
    it is stored (its answer shows the task); it is inserted first, and if the key has a record
    already nothing is done (``KEY_TAKEN``).

    ``credential``: the request was authenticated by a copied API key (``rivya.key_cache``);
    nothing is done unless that key is still unrevoked and its user active (``KEY_CHANGED``)."""
    db = transaction.get_connection()
    sql = _statement(
        db,
        scopes=len(scopes),
        hold=hold is not None,
        events=len(events),
        keyed=record_for is not None,
        checked=credential is not None,
    )
    task_values = insert_values(task, db)  # sets created_at, which the record's answer shows
    params: list[Any] = []
    if credential is not None:
        params += [credential.key_id, credential.user_id]
    if record_for is not None:
        params += insert_values(record_for(task), db)
    params += [task.model_id, model_fingerprint]
    for scope, limit in scopes:
        params += [scope, limit, limit]
    if hold is not None:
        params += [hold.amount, task.user_id, hold.amount]
    params += task_values
    if hold is not None:
        params += insert_values(hold, db, skip=("account_id",))
    params += insert_values(SubmitOutbox(task_id=task.pk), db)
    for event in events:
        params += insert_values(event, db)
    params.append(NOTIFY_CHANNEL)
    try:
        # Often the request's first statement: it is the connection's health check too.
        execute_checking_connection(db, sql, params, label="rivya_accept")
    except IntegrityError:
        # Sent a second time, after the connection died with the first on its way back: the
        # first was committed (the task's id is taken), and with it everything else.
        if Task.objects.filter(pk=task.pk).exists():
            return Accept.ACCEPTED
        raise
    except DatabaseError as exc:
        cause = exc.__cause__
        if getattr(cause, "pgcode", None) != REFUSED_SQLSTATE:
            raise
        return Accept(cause.diag.message_primary)
    return Accept.ACCEPTED


_statements: dict[tuple[str, int, bool, int, bool, bool], str] = {}


def _statement(db: Any, *, scopes: int, hold: bool, events: int, keyed: bool, checked: bool) -> str:
    """The accept statement for ``scopes`` capacity scopes, a hold or not, ``events`` events,
    an Idempotency-Key record or not and a copied API key to check or not; built once (it
    depends on the model metadata only). Its parameters, in order, are built by
    ``accept_in_one_statement``."""
    key = (db.vendor, scopes, hold, events, keyed, checked)
    if key not in _statements:
        _statements[key] = _build_statement(
            db, scopes=scopes, hold=hold, events=events, keyed=keyed, checked=checked
        )
    return _statements[key]


def _build_statement(
    db: Any, *, scopes: int, hold: bool, events: int, keyed: bool, checked: bool
) -> str:
    def values(model: type[Any], skip: tuple[str, ...] = ()) -> tuple[str, str]:
        columns = insert_columns(model, db, skip=skip)
        return ", ".join(columns), ", ".join(["%s"] * len(columns))

    ctes = []
    gates = []  # what must pass before anything is written
    if checked:
        ctes.append(
            f"key_ok AS (SELECT 1 AS ok FROM {ApiKey._meta.db_table} k "
            f"JOIN {User._meta.db_table} u ON u.id = k.user_id "
            f"WHERE k.id = %s AND k.user_id = %s AND {usable_key_condition('k', 'u')})"
        )
        gates.append("key_ok")
    if keyed:
        columns, marks = values(IdempotencyRecord)
        ctes.append(
            f"claim AS (INSERT INTO {IdempotencyRecord._meta.db_table} ({columns}) "
            f"SELECT {marks}{' FROM key_ok' if checked else ''} "
            "ON CONFLICT (user_id, key) DO NOTHING RETURNING 1 AS ok)"
        )
        gates.append("claim")
    ctes.append(
        f"model_ok AS (SELECT 1 AS ok FROM {', '.join(['tasks_aimodel m', *gates])} "
        "WHERE m.id = %s AND m.enabled AND md5(m::text) = %s)"
    )
    previous = "model_ok"
    for n in range(scopes):
        ctes.append(
            f"cap_{n} AS (INSERT INTO tasks_capacitycounter (scope, running) "
            f"SELECT %s, 1 FROM {previous} WHERE 0 < %s "
            "ON CONFLICT (scope) DO UPDATE SET running = tasks_capacitycounter.running + 1 "
            "WHERE tasks_capacitycounter.running < %s RETURNING 1 AS ok)"
        )
        previous = f"cap_{n}"
    if hold:
        ctes.append(
            "account AS (UPDATE billing_account SET held = held + %s "
            f"FROM {previous} WHERE billing_account.user_id = %s "
            "AND billing_account.balance >= billing_account.held + %s "
            "RETURNING billing_account.id)"
        )
        previous = "account"

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
    # The answer: true, or an error that undoes the whole statement: the API key changed; the
    # Idempotency-Key has a record already; the model changed since it was cached; a capacity
    # scope is full or the balance short (so nothing follows).
    checks = [("key_ok", Accept.KEY_CHANGED)] if checked else []
    checks += [("claim", Accept.KEY_TAKEN)] if keyed else []
    checks += [("model_ok", Accept.MODEL_CHANGED), ("notify", Accept.REFUSED)]
    cases = " ".join(
        f"WHEN NOT EXISTS (SELECT FROM {step}) THEN rivya_accept_refused('{outcome.value}')"
        for step, outcome in checks
    )
    return f"WITH {', '.join(ctes)} SELECT CASE {cases} ELSE true END"
