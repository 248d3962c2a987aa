"""What the benchmark suites share: their configuration, result rows, statistics, Django set-up
and CPU accounting from ``/proc``.

Nothing here imports Django at module level: ``bench/run.py`` (the orchestrator) uses it before
any suite process has set Django up.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DB_PREFIX = "rivya_bench_"  # every scratch database of the benchmarks starts with this
BENCH_REDIS_URL = "redis://127.0.0.1:6379/9"  # the broker (and cache) of every bench process
SECRET_KEY = "bench-secret-key"  # noqa: S105 - scratch databases only


@dataclass
class SuiteConfig:
    """What the orchestrator hands to one suite process (as JSON)."""

    suite: str
    url: str  # DATABASE_URL locating the server
    database: str  # this suite's scratch database (created empty by the orchestrator)
    pgbench_database: str
    pgbench_executable: str
    clients: int
    seconds: int
    quick: bool
    run_dir: str  # logs of the servers this suite starts, and the registry of their pids
    scenarios: list[str] = field(default_factory=list)  # holds
    submit_keepalive: bool = False  # load clients: one connection per client instead of per
    # request (chat, single, callbacks; the submit suite keeps connections unless submit_close)
    submit_close: bool = False  # submit: one connection per request instead of keep-alive
    submit_servers: list[str] = field(default_factory=list)  # submit: default sync,gthread
    latency_tasks: int = 100  # latency
    finalize_tasks: int = 1000  # callbacks
    latency_pool: str = "prefork"  # latency: the Celery worker's pool (prefork ×2 or threads ×8)
    scale_rows: list[int] = field(default_factory=lambda: [10_000, 1_000_000])  # scale
    large_database: str = ""  # scale: the database of the large count
    repeat: int = 30  # scale: timed repetitions per measurement
    server: str = "asgi"  # submit, callbacks, latency: gunicorn's "asgi" (make run) or "wsgi"
    chat_streams: int = 200  # chat: streams held open at once (and a round of a tenth of them)
    chat_stream_seconds: int = 30  # chat: how long each stream lasts
    chat_turns: int = 30  # chat: sequential turns timed against the sandbox's own stream
    chat_ramp: float = 5.0  # chat: seconds over which the streams are opened

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> SuiteConfig:
        return cls(**json.loads(path.read_text()))


@dataclass
class Row:
    """One line of the summary table: ``value`` against a ``reference`` measured in the same run
    on the same machine, and ``ratio`` = value ÷ reference (as a number, for the README)."""

    suite: str
    measurement: str
    value: str
    reference: str
    ratio: float | None
    notes: str = ""


@dataclass
class SuiteResult:
    rows: list[Row]
    ok: bool = True  # False: a check after the measurement failed (the rows are still shown)
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # printed under the table, not failures

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> SuiteResult:
        data = json.loads(path.read_text())
        return cls(
            rows=[Row(**row) for row in data["rows"]],
            ok=data["ok"],
            problems=list(data["problems"]),
            notices=list(data.get("notices", [])),
        )


# --- statistics -----------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0-100) of a non-empty list: a value that occurred."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


# --- Django ---------------------------------------------------------------------------------


# Inherited by the servers a suite starts; every other variable of the caller's environment is
# left out, so that a stray setting (CALLBACKS_ENABLED, TASK_POLL_EVERY, ...) cannot change them.
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")


def bench_env(database_url: str) -> dict[str, str]:
    """Environment of every process of a suite (itself, gunicorn, Celery): the scratch database,
    Redis db 9, DEBUG off (DEBUG keeps every query in memory), the project's defaults for all
    else."""
    return {
        **{name: os.environ[name] for name in INHERITED if name in os.environ},
        "DATABASE_URL": database_url,
        "DEBUG": "0",
        "SECRET_KEY": SECRET_KEY,
        "DJANGO_SETTINGS_MODULE": "rivya.settings",
        "CELERY_BROKER_URL": BENCH_REDIS_URL,
        "REDIS_URL": BENCH_REDIS_URL,
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


def lifecycle_env(config: SuiteConfig, *, secret: str, port: int) -> dict[str, str]:
    """Environment of the servers of a suite whose sandbox (webhook ``secret``) calls back to
    its gunicorn on ``port``; results stored under the run directory."""
    from bench.scratch import url_with_db

    return {
        **bench_env(url_with_db(config.url, config.database)),
        "SANDBOX_WEBHOOK_SECRET": secret,
        "CALLBACK_BASE_URL": f"http://127.0.0.1:{port}",
        "MEDIA_ROOT": str(Path(config.run_dir) / "media"),
    }


BENCH_CREDITS = 10**6 * 10**6  # a million credits per user, in micro-credits: nothing is refused


def funded_user(username: str) -> Any:
    """A user holding ``BENCH_CREDITS``."""
    from django.contrib.auth import get_user_model

    from billing import services as billing

    user = get_user_model().objects.create_user(username=username)
    billing.grant(user=user, amount=BENCH_CREDITS, reason="bench funding")
    return user


def api_key(user: Any) -> str:
    """A new raw API key of ``user``."""
    from rivya.services import api_key_create

    return str(api_key_create(user=user, name="bench").raw)


def setup_django(database_url: str, database: str) -> None:
    """Point Django at the scratch database, set it up and migrate it."""
    os.environ.update(bench_env(database_url))

    import django
    from django.conf import settings
    from django.core.management import call_command

    django.setup()
    name = settings.DATABASES["default"]["NAME"]
    if name != database or not name.startswith(DB_PREFIX):  # never into a real database
        raise SystemExit(f"Django points at {name!r}, not the scratch database {database!r}")
    call_command("migrate", verbosity=0, interactive=False)


def flush_bench_redis() -> None:
    import redis

    redis.Redis.from_url(BENCH_REDIS_URL).flushdb()


# --- CPU accounting from /proc --------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may contain spaces; split after the last ')'.
    head, _, tail = raw.rpartition(")")
    return [head.split(" (", 1)[-1], *tail.split()]


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one process (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[0] is comm, fields[1] state, fields[2] ppid ... utime is stat field 14, stime 15.
    return (int(fields[12]) + int(fields[13])) / CLOCK_TICKS


def reaped_children_cpu_seconds(pid: int) -> float:
    """CPU seconds of the children ``pid`` has waited for (cutime + cstime): for PostgreSQL's
    postmaster, the backends that have exited, which per-process sampling cannot see."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[14]) + int(fields[15])) / CLOCK_TICKS


def postmaster_pid() -> int | None:
    """The PostgreSQL postmaster on this machine: the ``postgres`` process whose parent is not
    one (None if there is none, or several)."""
    found = []
    for pid in pids_named("postgres"):
        fields = _stat_fields(pid)
        parent = _stat_fields(int(fields[2])) if fields else None
        if fields and not (parent and parent[0].startswith("postgres")):
            found.append(pid)
    return found[0] if len(found) == 1 else None


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants."""
    parents: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None:
            parents.setdefault(int(fields[2]), []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def pids_named(prefix: str) -> list[int]:
    """Processes whose command name starts with ``prefix`` (e.g. every ``postgres`` process)."""
    found = []
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields is not None and fields[0].startswith(prefix):
            found.append(pid)
    return found


MACHINE_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_seconds() -> dict[str, float]:
    """CPU seconds of the whole machine since boot by kind, from the first line of /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return {
        name: int(value) / CLOCK_TICKS for name, value in zip(MACHINE_FIELDS, first, strict=False)
    }


@dataclass
class CpuSample:
    """CPU seconds consumed so far by each process of named groups, by every process, and by
    the machine (by kind)."""

    groups: dict[str, dict[int, float]]
    everything: dict[int, float]
    machine: dict[str, float]


def cpu_sample(groups: dict[str, Callable[[], list[int]]]) -> CpuSample:
    """Sample now; each group's processes are looked up again (new database backends count)."""
    return CpuSample(
        groups={name: {p: process_cpu_seconds(p) for p in find()} for name, find in groups.items()},
        everything={p: process_cpu_seconds(p) for p in _all_pids()},
        machine=machine_seconds(),
    )


def _delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def cpu_cores(before: CpuSample, after: CpuSample, wall: float) -> dict[str, float]:
    """Cores each group kept busy on average between the samples (a process that started in
    between counts in full; one that exited in between is lost), then ``other processes``,
    then the machine's own accounting: ``kernel softirq`` (loopback networking, mostly) and
    ``steal`` (a VM's time taken by its host), and ``machine busy`` (all but idle)."""
    cores = {
        name: _delta(before.groups[name], procs) / wall for name, procs in after.groups.items()
    }
    counted: set[int] = set()
    for procs in after.groups.values():
        counted.update(procs)
    rest = {pid: cpu for pid, cpu in after.everything.items() if pid not in counted}
    cores["other processes"] = _delta(before.everything, rest) / wall
    machine = {k: after.machine.get(k, 0.0) - before.machine.get(k, 0.0) for k in MACHINE_FIELDS}
    cores["kernel softirq"] = (machine["softirq"] + machine["irq"]) / wall
    cores["steal"] = machine["steal"] / wall
    cores["machine busy"] = (sum(machine.values()) - machine["idle"] - machine["iowait"]) / wall
    return cores


def top_others(before: CpuSample, after: CpuSample, wall: float, n: int = 3) -> str:
    """The ``n`` busiest processes outside the named groups: 'beam.smp 0.05, ...'."""
    counted: set[int] = set()
    for procs in after.groups.values():
        counted.update(procs)
    busy = sorted(
        (
            (cpu - before.everything.get(pid, 0.0), pid)
            for pid, cpu in after.everything.items()
            if pid not in counted
        ),
        reverse=True,
    )[:n]
    names = []
    for cpu, pid in busy:
        fields = _stat_fields(pid)
        names.append(f"{fields[0] if fields else pid} {cpu / wall:.2f}")
    return ", ".join(names)


def cpu_report(before: CpuSample, after: CpuSample, wall: float) -> str:
    """'cores used: gunicorn 1.21, postgres 0.55, ...; machine busy 1.93 of 2'."""
    cores = cpu_cores(before, after, wall)
    busy = cores.pop("machine busy")
    # A group named "(..." is a part of another one: shown in parentheses.
    parts = [
        f"{name} {value:.2f})" if name.startswith("(") else f"{name} {value:.2f}"
        for name, value in cores.items()
    ]
    return f"cores used: {', '.join(parts)}; machine busy {busy:.2f} of {os.cpu_count()}"
