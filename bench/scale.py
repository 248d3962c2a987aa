"""Cost that must not grow with history: one poll cycle's claim, one history page and one task
detail, and the queries per request, at a small and a large number of stored tasks
(default 10k and 1M; ``--quick`` 10k and 100k).

Runs in a suite process whose Django points at the scratch database ``rivya_bench_scale`` (the
small one); the large one is ``rivya_bench_scale_large``. Both are migrated and filled with SQL
(``INSERT … SELECT … FROM generate_series``, every column of ``ai_task`` given a valid value):

- ``USERS`` users; one "heavy" user owns every 10th task (10% of all rows), the rest are spread
  over the others; task number g was created 3g seconds ago (a service with a steady rate and a
  longer past: 1M tasks reach back 35 days), so the newest page is the same at both sizes and
  only the history behind it grows;
- 90% ``SUCCESS``, 7% ``FAILED``, 2% ``CANCELLED``, 1% ``REJECTED``; about 1% soft-deleted;
  results of tasks older than the 7-day TTL marked expired;
- the same unfinished work in both: ``DUE`` ``GENERATING`` tasks due for a poll and ``NOT_DUE``
  more that are not. Only the history differs.

Timed in ``repeat`` interleaved rounds (small, large, then large, small, ...; each visit
reconnects, warms up once, untimed, then times ``PER_VISIT`` repetitions), median of each (warm
cache):

- ``tasks.services.poll_claim_due(limit=200)``, which must claim exactly the ``DUE`` tasks; they
  are made due again (not timed) before each claim;
- ``GET /api/v1/tasks/`` (the first history page of 50) and ``GET /api/v1/tasks/<id>/`` for the
  heavy user, through Django's test client with an API key (the whole view: authentication,
  query, serializer, JSON; no HTTP server);
- the pages ``GET /history/`` (its first page) and ``GET /dashboard/`` for the heavy user,
  logged in (the whole view and its template). The ledger is not scaled (tasks are inserted
  with SQL, without ledger entries), so the dashboard's spend chart reads an empty ledger at
  both sizes; what grows is the task history it lists from.

Queries per request (``CaptureQueriesContext``) for both requests must be equal at both sizes,
and EXPLAIN ANALYZE must show the partial indexes ``task_poll_due`` and ``task_history``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.common import Row, SuiteConfig, SuiteResult, median

USERS = 10_000
HEAVY_EVERY = 10  # the heavy user owns task number g when g % HEAVY_EVERY == 0
DUE = 200
NOT_DUE = 100
PAGE = 50
SQL_RUNS = 5  # EXPLAIN ANALYZE runs per query (median execution time)
PER_VISIT = 4  # timed repetitions per visit of a database (after one untimed)

# SQL expressions for the columns of ai_task, per kind of row. A column of the model not named
# here is filled with the field's default (or NULL where the field allows it), so that an added
# column does not break the bench; one with neither makes the bench fail with its name.
COMMON: dict[str, str] = {
    "id": "gen_random_uuid()",
    "model_id": "m.id",
    "model_slug": "m.slug",
    "category": "m.category",
    "provider": "m.provider",
    "upstream_model": "m.upstream_model",
    "price_micro": "m.price_micro",
    "billing_type": "m.billing_type",
    "billing_policy": (
        """'{"failure_charge_percent": 0, "cancel_charge_percent": 0, "partial_success": true}'"""
    ),
    "timeout_seconds": "m.timeout_seconds",
    "poll_interval_seconds": "m.poll_interval_seconds",
    "result_ttl_seconds": "604800",
    "reserved_micro": "m.price_micro",
    "upload_ids": "'[]'",
    "submit_attempts": "1",
    "error_code": "''",
    "error_message": "''",
    "error_kind": "''",
    "results": "'[]'",
}

# Finished task number g (in [start, stop]): status, owner and created time (3g seconds ago)
# derived from g.
FINISHED: dict[str, str] = {
    **COMMON,
    "user_id": f"""CASE WHEN s.g %% {HEAVY_EVERY} = 0 THEN %(heavy)s
                       ELSE %(first_user)s + (s.g * 7) %% %(users)s END""",
    "prompt": "'bench prompt number ' || s.g",
    "params": """'{"width": 512, "height": 512, "num_outputs": 1}'""",
    "status": "s.status",
    "charged_micro": "CASE WHEN s.status = 'SUCCESS' THEN m.price_micro ELSE 0 END",
    "refunded_micro": "CASE WHEN s.status = 'SUCCESS' THEN 0 ELSE m.price_micro END",
    "upstream_id": "'job_' || s.g",
    "results": """CASE WHEN s.status = 'SUCCESS'
        THEN '[{"name": "results/bench/0.png", "mime": "image/png", "bytes": 48213,
                "width": 512, "height": 512, "duration_ms": null}]'
        ELSE '[]' END::jsonb""",
    "error_code": """CASE s.status WHEN 'FAILED' THEN 'provider_failed'
        WHEN 'REJECTED' THEN 'content_policy' WHEN 'CANCELLED' THEN 'cancelled' ELSE '' END""",
    "error_message": "CASE WHEN s.status = 'SUCCESS' THEN '' ELSE 'The bench says so.' END",
    "error_kind": """CASE s.status WHEN 'FAILED' THEN 'provider' WHEN 'REJECTED' THEN 'user'
        WHEN 'CANCELLED' THEN 'user' ELSE '' END""",
    "created_at": "s.t",
    "last_submit_at": "s.t",
    "submitted_at": "s.t + interval '1 second'",
    "started_at": "s.t + interval '1 second'",
    "finished_at": "s.t + interval '9 seconds'",
    "expires_at": "s.t + interval '7 days'",
    "results_expired_at": (
        "CASE WHEN s.t + interval '7 days' < now() THEN s.t + interval '7 days' END"
    ),
    "deleted_at": "CASE WHEN s.g %% 101 = 0 THEN s.t + interval '1 hour' END",
    "next_poll_at": "NULL",
    "poll_count": "3",
}
FINISHED_FROM = """
FROM (
    SELECT g,
           CASE WHEN g %% 100 < 90 THEN 'SUCCESS' WHEN g %% 100 < 97 THEN 'FAILED'
                WHEN g %% 100 < 99 THEN 'CANCELLED' ELSE 'REJECTED' END AS status,
           now() - interval '1 second' * (g * 3) - interval '1 millisecond' * (g %% 997) AS t
    FROM generate_series(%(start)s::bigint, %(stop)s::bigint) AS g
) AS s
CROSS JOIN (SELECT * FROM tasks_aimodel WHERE slug = 'sandbox-image') AS m
"""

# Unfinished tasks: GENERATING, accepted upstream; due for a poll ``offset`` seconds from now.
UNFINISHED: dict[str, str] = {
    **COMMON,
    "user_id": "%(first_user)s + (g * 13) %% %(users)s",
    "prompt": "'running ' || g",
    "params": "'{}'",
    "status": "'GENERATING'",
    "charged_micro": "0",
    "refunded_micro": "0",
    "upstream_id": "%(prefix)s || g",
    "created_at": "now() - interval '1 minute'",
    "last_submit_at": "now() - interval '1 minute'",
    "submitted_at": "now() - interval '1 minute'",
    "finished_at": "NULL",
    "next_poll_at": "now() + %(offset)s * interval '1 second' - g * interval '1 millisecond'",
    "poll_count": "3",
}
UNFINISHED_FROM = """
FROM generate_series(1, %(count)s) AS g
CROSS JOIN (SELECT * FROM tasks_aimodel WHERE slug = 'sandbox-image') AS m
"""


def _insert(expressions: dict[str, str], source: str, params: dict[str, Any]) -> None:
    """``INSERT INTO ai_task (every column) SELECT … source``, with the columns the model has
    today: named ones from ``expressions``, the others from the field's default or NULL."""
    from django.db import connection

    from tasks.models import Task

    columns, values = [], []
    params = dict(params)
    for model_field in Task._meta.concrete_fields:
        column = model_field.column
        default = model_field.get_default()  # '' for text fields without one, None if nothing
        if column in expressions:
            values.append(expressions[column])
        elif default is not None:
            params[f"default_{column}"] = model_field.get_db_prep_save(default, connection)
            values.append(f"%(default_{column})s")
        elif model_field.null:
            values.append("NULL")
        else:
            raise RuntimeError(f"bench/scale.py: give the new column ai_task.{column} a value")
        columns.append(connection.ops.quote_name(column))
    sql = f"INSERT INTO ai_task ({', '.join(columns)}) SELECT {', '.join(values)} {source}"
    _execute(sql, params)


@dataclass
class Measured:
    rows: int
    poll: float  # median seconds
    poll_select: float
    poll_update: float
    history: float
    detail: float
    history_page: float
    dashboard: float
    queries_detail: int
    queries_history: int
    queries_history_page: int
    queries_dashboard: int
    plan_poll: list[str]
    plan_history: list[str]
    sql_poll: float  # median seconds of the SELECT alone (EXPLAIN ANALYZE's execution time)
    sql_history: float


def _execute(sql: str, params: dict[str, Any] | None = None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def _execution_time(plan: str) -> float:
    """Seconds from the 'Execution Time: 0.170 ms' line of EXPLAIN ANALYZE."""
    match = re.search(r"Execution Time: ([0-9.]+) ms", plan)
    if match is None:
        raise RuntimeError(f"no execution time in the plan:\n{plan}")
    return float(match.group(1)) / 1000


def _brief(plan: str) -> list[str]:
    """The plan's node lines (what is scanned, with which index), without the noise."""
    keep = ("Limit", "Index", "Seq Scan", "Bitmap", "Sort", "LockRows", "Execution Time")
    return [line.rstrip() for line in plan.splitlines() if any(k in line for k in keep)][:8]


def use_database(name: str) -> None:
    """Point Django's default connection at another scratch database (both are migrated the
    same way, so content types and the like agree); the next query reconnects."""
    from django.db import connections

    conn = connections["default"]
    conn.close()
    conn.settings_dict["NAME"] = name


class Fixture:
    """One scratch database filled to ``size`` tasks, and the heavy user's API client."""

    def __init__(self, database: str, size: int) -> None:
        from django.contrib.auth import get_user_model
        from django.contrib.auth.hashers import make_password
        from django.test import Client

        from rivya.services import api_key_create

        self.database = database
        self.size = size
        users = get_user_model().objects
        self.heavy = users.create_user(username="bench-scale-heavy")
        unusable = make_password(None)
        users.bulk_create(
            [users.model(username=f"bench-scale-{n}", password=unusable) for n in range(USERS)],
            batch_size=2_000,
        )
        self.first_user = (
            users.filter(username__startswith="bench-scale-")
            .exclude(pk=self.heavy.pk)
            .order_by("pk")
            .values_list("pk", flat=True)
            .first()
        )
        self.client = Client(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=self.heavy).raw}")
        self.pages = Client()  # the browser's way in: a session
        self.pages.force_login(self.heavy)
        self.due_ids: list[Any] = []
        self.detail_url = ""

    def fill(self) -> float:
        """The unfinished tasks, then finished ones up to ``size`` tasks in all, then VACUUM
        ANALYZE (as autovacuum eventually would); returns the seconds taken."""
        from tasks import selectors
        from tasks.models import Task

        started = time.perf_counter()
        base = {"first_user": self.first_user, "users": USERS}
        _insert(UNFINISHED, UNFINISHED_FROM, {**base, "prefix": "due-", "offset": -1, "count": DUE})
        _insert(
            UNFINISHED,
            UNFINISHED_FROM,
            {**base, "prefix": "later-", "offset": 3600, "count": NOT_DUE},
        )
        finished = self.size - DUE - NOT_DUE
        _insert(
            FINISHED,
            FINISHED_FROM,
            {**base, "start": 1, "stop": finished, "heavy": self.heavy.pk},
        )
        _execute("VACUUM ANALYZE ai_task")
        self.due_ids = list(
            Task.objects.filter(status="GENERATING", upstream_id__startswith="due-").values_list(
                "pk", flat=True
            )
        )
        newest = selectors.history_for_user(user=self.heavy).first()
        assert newest is not None
        self.detail_url = f"/api/v1/tasks/{newest.pk}/"
        return time.perf_counter() - started

    def make_due(self) -> None:
        _execute(
            "UPDATE ai_task SET next_poll_at = now() - interval '1 second', poll_count = 3 "
            "WHERE id = ANY(%(ids)s)",
            {"ids": self.due_ids},
        )


@dataclass
class Timings:
    poll: list[float] = field(default_factory=list)
    poll_select: list[float] = field(default_factory=list)  # its SELECT … FOR UPDATE SKIP LOCKED
    poll_update: list[float] = field(default_factory=list)  # its bulk UPDATE of the 200 rows
    history: list[float] = field(default_factory=list)
    detail: list[float] = field(default_factory=list)
    history_page: list[float] = field(default_factory=list)
    dashboard: list[float] = field(default_factory=list)


class StatementTimer:
    """A database execute wrapper: seconds spent in statements, by their first word (the round
    trip as the application sees it; COMMIT is not a statement here)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            kind = sql.lstrip().split(None, 1)[0].upper()
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - started


def time_once(fixture: Fixture, into: Timings) -> None:
    """One timed poll claim (its tasks made due first, not timed), history page and detail."""
    from django.db import connection

    from tasks import services

    fixture.make_due()
    timer = StatementTimer()
    with connection.execute_wrapper(timer):
        started = time.perf_counter()
        claimed = services.poll_claim_due(limit=DUE)
        into.poll.append(time.perf_counter() - started)
    into.poll_select.append(timer.seconds.get("SELECT", 0.0))
    into.poll_update.append(timer.seconds.get("UPDATE", 0.0))
    if len(claimed) != DUE:
        raise RuntimeError(f"poll_claim_due claimed {len(claimed)} tasks, not {DUE}")

    started = time.perf_counter()
    response = fixture.client.get("/api/v1/tasks/")
    into.history.append(time.perf_counter() - started)
    if response.status_code != 200 or len(response.json()["results"]) != PAGE:
        raise RuntimeError(f"history page: {response.status_code}")

    started = time.perf_counter()
    response = fixture.client.get(fixture.detail_url)
    into.detail.append(time.perf_counter() - started)
    if response.status_code != 200:
        raise RuntimeError(f"task detail: {response.status_code}")

    for url, timed in (("/history/", into.history_page), ("/dashboard/", into.dashboard)):
        started = time.perf_counter()
        response = fixture.pages.get(url)
        timed.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code}")


def _count_queries(client: Any, url: str) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} answered {response.status_code}")
    return len(ctx)


def inspect(fixture: Fixture, timings: Timings) -> Measured:
    """Medians of the timings, queries per request, and the plans of the two queries."""
    from django.db import transaction
    from django.utils import timezone

    from tasks import selectors
    from tasks.models import Task

    queries_history = _count_queries(fixture.client, "/api/v1/tasks/")
    queries_detail = _count_queries(fixture.client, fixture.detail_url)
    queries_history_page = _count_queries(fixture.pages, "/history/")
    queries_dashboard = _count_queries(fixture.pages, "/dashboard/")
    fixture.make_due()

    def explain_poll() -> str:
        with transaction.atomic():  # FOR UPDATE needs a transaction; the locks end with it
            return str(
                Task.objects.select_for_update(skip_locked=True)
                .filter(status=Task.Status.GENERATING, next_poll_at__lte=timezone.now())
                .order_by("next_poll_at")
                .only("id", "poll_interval_seconds", "poll_count")[:DUE]
                .explain(analyze=True, buffers=True)
            )

    def explain_history() -> str:
        # The query of the first page: the cursor paginator reads one row more than a page.
        return str(
            selectors.history_for_user(user=fixture.heavy)[: PAGE + 1].explain(
                analyze=True, buffers=True
            )
        )

    plans_poll = [explain_poll() for _ in range(SQL_RUNS)]
    plans_history = [explain_history() for _ in range(SQL_RUNS)]
    return Measured(
        rows=Task.objects.count(),
        poll=median(timings.poll),
        poll_select=median(timings.poll_select),
        poll_update=median(timings.poll_update),
        history=median(timings.history),
        detail=median(timings.detail),
        history_page=median(timings.history_page),
        dashboard=median(timings.dashboard),
        queries_detail=queries_detail,
        queries_history=queries_history,
        queries_history_page=queries_history_page,
        queries_dashboard=queries_dashboard,
        plan_poll=_brief(plans_poll[-1]),
        plan_history=_brief(plans_history[-1]),
        sql_poll=median([_execution_time(plan) for plan in plans_poll]),
        sql_history=median([_execution_time(plan) for plan in plans_history]),
    )


def _label(rows: int) -> str:
    if rows >= 1_000_000 and rows % 1_000_000 == 0:
        return f"{rows // 1_000_000}M"
    if rows >= 1_000 and rows % 1_000 == 0:
        return f"{rows // 1_000}k"
    return str(rows)


def run(config: SuiteConfig) -> SuiteResult:
    from django.core.management import call_command

    from tasks.catalog import seed_catalog

    small, large = config.scale_rows
    fixtures = []
    for size, database in ((small, config.database), (large, config.large_database)):
        use_database(database)
        call_command("migrate", verbosity=0, interactive=False)
        seed_catalog()
        fixture = Fixture(database, size)
        seconds = fixture.fill()
        print(f"  {database}: {size:,} tasks stored in {seconds:.1f} s", flush=True)
        fixtures.append(fixture)

    # Interleaved rounds, in alternating order: a drift of the (shared) machine's speed hits
    # both sizes alike. Each visit reconnects, warms up once (untimed), then times PER_VISIT.
    timings = [Timings() for _ in fixtures]
    for round_ in range(config.repeat):
        order = [0, 1] if round_ % 2 == 0 else [1, 0]
        for index in order:
            use_database(fixtures[index].database)
            time_once(fixtures[index], Timings())
            for _ in range(PER_VISIT):
                time_once(fixtures[index], timings[index])
    results = []
    for fixture, timing in zip(fixtures, timings, strict=True):
        use_database(fixture.database)
        measured = inspect(fixture, timing)
        results.append(measured)
        print(
            f"  at {measured.rows:,}: poll_claim_due {measured.poll * 1000:.2f} ms, history "
            f"page {measured.history * 1000:.2f} ms, detail {measured.detail * 1000:.2f} ms; "
            f"poll SELECT {measured.poll_select * 1000:.2f} ms + UPDATE "
            f"{measured.poll_update * 1000:.2f} ms (EXPLAIN ANALYZE of the SELECT "
            f"{measured.sql_poll * 1000:.3f} ms), history SELECT "
            f"{measured.sql_history * 1000:.3f} ms (EXPLAIN ANALYZE); "
            f"queries: detail {measured.queries_detail}, history {measured.queries_history}; "
            f"pages: /history/ {measured.history_page * 1000:.2f} ms in "
            f"{measured.queries_history_page} queries, /dashboard/ "
            f"{measured.dashboard * 1000:.2f} ms in {measured.queries_dashboard} queries",
            flush=True,
        )
    low, high = results
    print(f"  EXPLAIN ANALYZE at {high.rows:,} tasks, poll claim:", flush=True)
    for line in high.plan_poll:
        print(f"    {line}")
    print(f"  EXPLAIN ANALYZE at {high.rows:,} tasks, history page:", flush=True)
    for line in high.plan_history:
        print(f"    {line}", flush=True)

    problems = []
    for m in results:
        if not any("task_poll_due" in line for line in m.plan_poll):
            problems.append(f"at {m.rows}: the poll claim does not use task_poll_due")
        if not any("task_history" in line for line in m.plan_history):
            problems.append(f"at {m.rows}: the history page does not use task_history")

    def counts(m: Measured) -> tuple[int, ...]:
        return (
            m.queries_detail,
            m.queries_history,
            m.queries_history_page,
            m.queries_dashboard,
        )

    if counts(low) != counts(high):
        problems.append("queries per request differ between the two sizes")

    at = f"at {_label(small)}"

    def timing(name: str, low_s: float, high_s: float, notes: str = "") -> Row:
        notes = f"median of {config.repeat * PER_VISIT}" + (f"; {notes}" if notes else "")
        return Row(
            suite="scale",
            measurement=name,
            value=f"{high_s * 1000:.2f} ms at {_label(large)}",
            reference=f"{low_s * 1000:.2f} ms {at}",
            ratio=high_s / low_s if low_s else None,
            notes=notes,
        )

    def queries(name: str, low_n: int, high_n: int) -> Row:
        return Row(
            suite="queries",
            measurement=name,
            value=f"{high_n} at {_label(large)}",
            reference=f"{low_n} {at}",
            ratio=high_n / low_n if low_n else None,
            notes="must be equal",
        )

    rows = [
        timing(
            f"poll_claim_due, {DUE} due",
            low.poll,
            high.poll,
            f"SELECT {low.poll_select * 1000:.1f} → {high.poll_select * 1000:.1f} ms, UPDATE "
            f"{low.poll_update * 1000:.1f} → {high.poll_update * 1000:.1f} ms",
        ),
        timing(
            f"GET /api/v1/tasks/ (history, {PAGE})",
            low.history,
            high.history,
            f"its SELECT {low.sql_history * 1000:.2f} → {high.sql_history * 1000:.2f} ms",
        ),
        timing("GET /api/v1/tasks/<id>/ (detail)", low.detail, high.detail),
        queries("task detail", low.queries_detail, high.queries_detail),
        queries(f"history page of {PAGE}", low.queries_history, high.queries_history),
        timing("GET /history/ (page, logged in)", low.history_page, high.history_page),
        timing("GET /dashboard/ (page, logged in)", low.dashboard, high.dashboard),
        queries("/history/ page", low.queries_history_page, high.queries_history_page),
        queries("/dashboard/ page", low.queries_dashboard, high.queries_dashboard),
    ]
    return SuiteResult(rows=rows, ok=not problems, problems=problems)
