"""Holds per second through ``billing.services``, on one hot account and on many accounts.

Run by ``bench/suite.py`` (a suite process of ``bench/run.py``) after ``django.setup()``,
against the scratch database ``rivya_bench_holds``. Every client is a thread with its own
database connection (closed at the end: nothing else closes a thread's), released together by a
barrier; each loops until the deadline, at most ``MAX_OPS_PER_CLIENT`` times.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection

from bench.common import Row, SuiteConfig, SuiteResult
from bench.scratch import Pgbench
from billing import services
from billing.models import Account, Hold

MAX_CLIENTS = 50  # PostgreSQL allows 100 connections here
MAX_OPS_PER_CLIENT = 1_000_000  # a bound on every loop, far above what 10 s can reach
HOLD_AMOUNT = 1_000  # micro-credits (0.001 credits)
SUBJECT_TYPE = "bench"
BARRIER_TIMEOUT = 60.0


@dataclass(frozen=True)
class Scenario:
    name: str
    one_account: bool  # True: every client holds on the same account; False: one account each
    capture: bool  # True: each operation is hold_create then hold_capture
    description: str


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("hot", True, False, "hold_create, every client on one account"),
        Scenario("many", False, False, "hold_create, one account per client"),
        Scenario("hot+capture", True, True, "hold_create + hold_capture, one account"),
        Scenario("many+capture", False, True, "hold_create + hold_capture, one account each"),
    )
}


@dataclass
class Result:
    scenario: Scenario
    clients: int
    ops: int
    seconds: float
    client_cpu_seconds: float  # this Python process (all client threads), user + system

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def client_cores(self) -> float:
        """Cores the Python clients kept busy on average (GIL: at most about 1)."""
        return self.client_cpu_seconds / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Run:
    """What the client threads of one scenario share."""

    seconds: float
    clients: int
    started: float = 0.0
    cpu_started: float = 0.0
    counts: list[int] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.counts = [0] * self.clients
        self.finished = [0.0] * self.clients

    def start(self) -> None:
        """Barrier action: runs once, after every client is connected, before any is released."""
        self.cpu_started = time.process_time()
        self.started = time.perf_counter()


def _funded_users(scenario: Scenario, clients: int) -> list[Any]:
    """One user per client (the same user repeated for a one-account scenario), each granted
    enough credits that no hold of the run can be refused."""
    users = get_user_model().objects
    accounts = 1 if scenario.one_account else clients
    per_account = MAX_OPS_PER_CLIENT * HOLD_AMOUNT * (clients // accounts)
    funded = []
    for index in range(accounts):
        user = users.create_user(username=f"bench-{scenario.name}-{index}")
        services.grant(user=user, amount=per_account, reason="bench funding")
        funded.append(user)
    return funded * clients if scenario.one_account else funded


def _client(
    run: _Run, barrier: threading.Barrier, scenario: Scenario, index: int, user: Any
) -> None:
    try:
        services.account_for_user(user=user)  # connect before the clock starts
        barrier.wait(timeout=BARRIER_TIMEOUT)
        deadline = run.started + run.seconds
        done = 0
        for op in range(MAX_OPS_PER_CLIENT):
            if time.perf_counter() >= deadline:
                break
            hold = services.hold_create(
                user=user,
                amount=HOLD_AMOUNT,
                subject_type=SUBJECT_TYPE,
                subject_id=f"{scenario.name}:{index}:{op}",
            )
            if scenario.capture:
                services.hold_capture(hold=hold, reason="bench")
            done += 1
        run.counts[index] = done
        run.finished[index] = time.perf_counter()
    except Exception as exc:
        with run.lock:
            run.errors.append(exc)
        barrier.abort()  # the others stop waiting; a failed run is never reported as a figure
    finally:
        connection.close()


def run_scenario(scenario: Scenario, *, clients: int, seconds: float) -> Result:
    """Run ``scenario`` with ``clients`` threads for ``seconds``; raise if any operation failed."""
    if not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(f"clients must be 1..{MAX_CLIENTS}, not {clients}")
    users = _funded_users(scenario, clients)
    run = _Run(seconds=seconds, clients=clients)
    barrier = threading.Barrier(clients, action=run.start)
    threads = [
        threading.Thread(
            target=_client,
            args=(run, barrier, scenario, index, users[index]),
            name=f"bench-{scenario.name}-{index}",
            daemon=True,  # a client stuck past the join timeout must not keep the process alive
        )
        for index in range(clients)
    ]
    for thread in threads:
        thread.start()
    give_up = time.monotonic() + BARRIER_TIMEOUT + seconds + 60
    for thread in threads:
        thread.join(timeout=max(0.0, give_up - time.monotonic()))
    cpu_seconds = time.process_time() - run.cpu_started
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"{scenario.name}: a client thread did not finish")
    if run.errors:
        failed = f"{scenario.name}: {len(run.errors)} client(s) failed"
        raise RuntimeError(failed) from run.errors[0]
    ops = sum(run.counts)
    _check_counted(scenario, ops)
    return Result(
        scenario=scenario,
        clients=clients,
        ops=ops,
        seconds=max(run.finished) - run.started,
        client_cpu_seconds=cpu_seconds,
    )


def _check_counted(scenario: Scenario, ops: int) -> None:
    """The database holds exactly the holds the clients counted (in the expected state)."""
    holds = Hold.objects.filter(
        subject_type=SUBJECT_TYPE, subject_id__startswith=f"{scenario.name}:"
    )
    status = Hold.Status.CAPTURED if scenario.capture else Hold.Status.OPEN
    stored = holds.filter(status=status).count()
    if stored != ops or holds.count() != ops:
        raise RuntimeError(f"{scenario.name}: counted {ops} operations, database has {stored}")
    if scenario.one_account and ops:
        accounts = holds.values("account").distinct().count()
        if accounts != 1:
            raise RuntimeError(f"{scenario.name}: holds on {accounts} accounts, expected 1")


def system_accounts() -> None:
    """Create the issuance and revenue accounts before the clients race to."""
    for kind in (Account.Kind.ISSUANCE, Account.Kind.REVENUE):
        services.system_account_id(kind)


def run(config: SuiteConfig) -> SuiteResult:
    """The holds suite: pgbench before, every scenario, pgbench after, then the ledger check."""
    from billing.invariants import run_checks

    pgbench = Pgbench(
        url=config.url, database=config.pgbench_database, executable=config.pgbench_executable
    )
    # pgbench runs before and after the holds and the ratios use the mean, so that a machine
    # whose speed drifts during the run (a shared VM) skews them less; both figures are shown.
    before = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
    print(f"  pgbench before: {before:.1f} tps", flush=True)
    system_accounts()
    results = []
    for name in config.scenarios:
        scenario = SCENARIOS[name]
        result = run_scenario(scenario, clients=config.clients, seconds=config.seconds)
        print(
            f"  {name}: {result.ops} ops in {result.seconds:.2f} s ({scenario.description}), "
            f"client {result.client_cores:.2f} cores",
            flush=True,
        )
        results.append(result)
    after = pgbench.tpcb_tps(clients=config.clients, seconds=config.seconds)
    tps = (before + after) / 2
    print(f"  pgbench after: {after:.1f} tps; mean {tps:.1f} tps", flush=True)
    breaches = run_checks()
    problems = [f"ledger_check: {b.check}: {b.detail}" for b in breaches]
    print(f"  ledger_check: {'ok' if not breaches else 'BREACH'}", flush=True)
    rows = [
        Row(
            suite="holds",
            measurement=f"{r.scenario.name}, {r.clients} clients",
            value=f"{r.ops_per_second:.0f} ops/s",
            reference=f"pgbench {tps:.0f} tps",
            ratio=r.ops_per_second / tps if tps else None,
            notes=f"client {r.client_cores:.2f} cores",
        )
        for r in results
    ]
    return SuiteResult(rows=rows, ok=not problems, problems=problems)
