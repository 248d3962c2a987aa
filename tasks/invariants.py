"""Ledger invariant 4 (docs/ledger.md), registered with billing's ``ledger_check`` registry.

Every terminal task that has a hold has it resolved; SUCCESS charged its price once (or its
partial-success share); every other terminal status charged nothing unless its model's billing
policy says so; a task FAILED for insufficient credits has no hold. Unfinished tasks hold exactly
what they reserved.
"""

from __future__ import annotations

import json
from typing import Any

from django.db import connection

from billing.invariants import describe_rows, query_rows, register, register_report


def _join() -> str:
    # Holds refer to tasks by generic reference (the task id as text). PostgreSQL stores UUIDs
    # natively; SQLite stores them as 32 hex digits without dashes.
    if connection.vendor == "postgresql":
        return "h.subject_type = 'tasks.task' AND h.subject_id = CAST(t.id AS TEXT)"
    return "h.subject_type = 'tasks.task' AND REPLACE(h.subject_id, '-', '') = t.id"


TASK_BILLING_SQL = """
        SELECT t.id, t.status, t.error_code, t.price_micro, t.reserved_micro, t.charged_micro,
               h.id, h.status, h.amount, h.captured
        FROM ai_task t LEFT JOIN billing_hold h ON {join}
        WHERE
            -- free (price 0): no hold, nothing reserved or charged, whatever the status
            (t.price_micro = 0 AND (h.id IS NOT NULL OR t.reserved_micro <> 0
                OR t.charged_micro <> 0 OR t.refunded_micro <> 0))
            -- unfinished: an open hold of exactly the reserved amount, nothing charged
            OR (t.price_micro > 0 AND t.status IN ('WAITING', 'GENERATING') AND (h.id IS NULL
                OR h.status <> 'open' OR h.amount <> t.reserved_micro OR t.charged_micro <> 0))
            -- refused for credits: no hold, nothing reserved or charged
            OR (t.status = 'FAILED' AND t.error_code = 'insufficient_credits'
                AND (h.id IS NOT NULL OR t.reserved_micro <> 0 OR t.charged_micro <> 0))
            -- any other terminal task: its hold resolved, charged exactly what was captured
            OR (t.price_micro > 0 AND t.status IN ('SUCCESS', 'FAILED', 'REJECTED', 'CANCELLED')
                AND t.error_code <> 'insufficient_credits'
                AND (h.id IS NULL OR h.status = 'open' OR h.amount <> t.reserved_micro
                     OR h.captured <> t.charged_micro
                     OR t.charged_micro + t.refunded_micro <> t.reserved_micro))
            -- success charges at most the price; rejection never charges
            OR (t.status = 'SUCCESS' AND t.charged_micro > t.price_micro)
            OR (t.status = 'REJECTED' AND t.charged_micro <> 0)
        ORDER BY t.created_at"""


@register("4.task_billing", "every task's hold matches its status and billing policy")
def check_task_billing(cursor: Any) -> list[str]:
    # The only substitution is a fixed, vendor-specific join expression (no user input).
    rows = query_rows(cursor, TASK_BILLING_SQL.replace("{join}", _join()))
    return describe_rows(
        rows,
        lambda r: (
            f"task {r[0]} ({r[1]}{' ' + r[2] if r[2] else ''}): price {r[3]}, reserved {r[4]}, "
            f"charged {r[5]}; hold {r[6] or 'none'} {r[7] or ''} amount {r[8]} captured {r[9]}"
        ),
    )


@register("4.task_success_charge", "a SUCCESS charged its price, or its partial-success share")
def check_task_success_charge(cursor: Any) -> list[str]:
    # Recomputed from the task's own inputs (its params, its policy, the outputs it holds) with
    # the functions that own the rule, never from the basis the outcome stored: a mistake in what
    # the outcome code wrote (a count read the wrong way) must show here. Only SUCCESS tasks not
    # charged exactly their price, or missing some of the outputs they asked for, need a look.
    from tasks.pricing import output_count, success_charge

    rows = query_rows(
        cursor,
        """
        SELECT id, price_micro, charged_micro, params, results, billing_policy
        FROM ai_task WHERE status = 'SUCCESS'
            AND (charged_micro <> price_micro OR CASE
                WHEN jsonb_typeof(params -> 'num_outputs') = 'number'
                    AND jsonb_typeof(results) = 'array'
                THEN jsonb_array_length(results) < (params ->> 'num_outputs')::numeric
                ELSE false END)
        """
        if connection.vendor == "postgresql"
        else """
        SELECT id, price_micro, charged_micro, params, results, billing_policy
        FROM ai_task WHERE status = 'SUCCESS'""",
    )
    out = []
    for task_id, price, charged, params, results, policy in rows:
        params = _json(params)
        results = _json(results) or []
        delivered = len(results)
        expected, requested = success_charge(
            price_micro=price, params=params, policy=_json(policy), delivered=delivered
        )
        if charged != expected:
            out.append(
                f"task {task_id} (SUCCESS, {delivered} of {requested} outputs, num_outputs "
                f"{output_count(params)}) charged {charged}; its price {price} and policy call "
                f"for {expected}"
            )
    return out


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@register("4.task_policy", "failed and cancelled tasks charged only what their policy allows")
def check_task_policy(cursor: Any) -> list[str]:
    # The percentages live in a JSON column; read only the few tasks that charged anything.
    rows = query_rows(
        cursor,
        """
        SELECT id, status, reserved_micro, charged_micro, billing_policy FROM ai_task
        WHERE status IN ('FAILED', 'CANCELLED') AND charged_micro > 0""",
    )
    out = []
    for task_id, status, reserved, charged, policy in rows:
        policy = json.loads(policy) if isinstance(policy, str) else (policy or {})
        key = "failure_charge_percent" if status == "FAILED" else "cancel_charge_percent"
        allowed = reserved * int(policy.get(key, 0) or 0) // 100
        if charged > allowed:
            out.append(
                f"task {task_id} ({status}) charged {charged} but its policy allows {allowed}"
            )
    return out


@register("4.task_capacity", "capacity counters equal the unfinished tasks holding each slot")
def check_task_capacity(cursor: Any) -> list[str]:
    from collections import Counter

    expected: Counter[str] = Counter()
    for (scopes,) in query_rows(
        cursor, "SELECT capacity_scopes FROM ai_task WHERE status IN ('WAITING', 'GENERATING')"
    ):
        expected.update(json.loads(scopes) if isinstance(scopes, str) else (scopes or []))
    actual = dict(query_rows(cursor, "SELECT scope, running FROM tasks_capacitycounter"))
    out = [
        f"capacity {scope}: counter {actual.get(scope, 0)}, unfinished tasks {count}"
        for scope, count in sorted(expected.items())
        if actual.get(scope, 0) != count
    ]
    out += [
        f"capacity {scope}: counter {running} but no unfinished task holds it"
        for scope, running in sorted(actual.items())
        if running and scope not in expected
    ]
    return out


@register_report("outbox_stale", "submitted tasks not handed to the worker after a minute")
def report_outbox_stale(cursor: Any) -> list[str]:
    # The dispatcher empties the outbox within moments of each commit; a task still there a
    # minute later waits for a dispatcher that does not run (the reconciler submits it after
    # TASK_RESUBMIT_AFTER, later than it should).
    from datetime import timedelta

    from django.utils import timezone

    cutoff = timezone.now() - timedelta(seconds=60)
    rows = query_rows(
        cursor,
        "SELECT task_id, created_at FROM tasks_submitoutbox WHERE created_at < %s "
        "ORDER BY created_at",
        (cutoff,),
    )
    return describe_rows(
        rows,
        lambda r: (
            f"task {r[0]} in the outbox since {str(r[1])[:19]}: "
            "is manage.py dispatch_submits running?"
        ),
    )


@register_report("single_overdue", "single tasks still running well past their deadline")
def report_single_overdue(cursor: Any) -> list[str]:
    # Past the deadline the reconciler refunds a single task within SINGLE_RECONCILE_EVERY; one
    # still running a minute after is waiting for a beat that does not run.
    from datetime import timedelta

    from django.utils import timezone

    cutoff = timezone.now() - timedelta(seconds=60)
    rows = query_rows(
        cursor,
        """
        SELECT id, single_type, sync_deadline_at, reserved_micro FROM ai_task
        WHERE status = 'GENERATING' AND runtime = 'sync' AND sync_deadline_at < %s
        ORDER BY sync_deadline_at""",
        (cutoff,),
    )
    return describe_rows(
        rows,
        lambda r: (
            f"single {r[1]} task {r[0]} past its deadline {r[2]:%Y-%m-%d %H:%M:%S}, {r[3]} held: "
            "is the beat running tasks.settle_interrupted_single?"
        ),
    )
