"""The two ways a submit is accepted give the same answers and the same ledger.

On PostgreSQL a JSON submit is accepted by one statement (``tasks.services.accept``) that
repeats, in SQL, rules the ORM path (``submit.accept_step_by_step``) keeps in Python: a
capacity slot is taken while ``running < limit``, a hold while ``balance >= held + price``, and
the task, hold and events are written as ``create()`` writes them. Here both paths run the same
requests and their rows, refusals and ledger are compared; and a model changed after a process
cached it applies to the very next submit.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import pytest
from django.db import connection, transaction

from billing import selectors as billing_selectors
from billing import services as billing
from billing.models import Entry, Hold
from rivya.errors import CapacityExceeded, ValidationFailed
from rivya.sql import prepared_on
from tasks import model_cache
from tasks.capacity import capacity_acquire, capacity_counts
from tasks.models import AIModel, Task, TaskEvent
from tasks.services import accept, submit
from tasks.services.dispatch import dispatch_all
from tasks.tests.lifecycle import run_to_end

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("sandbox", "catalog", "queued", "ledger_ok"),
]
C = 1_000_000
PATHS = ("one-statement", "step-by-step")
# What differs between two equal submits: identity, time and the random global shard.
VOLATILE = {"id", "user_id", "created_at", "capacity_scopes", "next_poll_at"}
VOLATILE |= {"submitted_at", "started_at", "finished_at", "expires_at", "upstream_id"}
VOLATILE |= {"results", "last_submit_at", "output_lease_until"}


def use_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setattr(accept, "fast_path_available", lambda: path == "one-statement")


def accept_via(path: str, user: Any, **request: Any) -> submit.SubmitOutcome:
    """A submit on ``path``; with the one statement, checks it was that statement that
    accepted (the step-by-step path would give the same rows)."""
    request.setdefault("model_slug", "sandbox-image")
    request.setdefault("prompt", "a lighthouse at dusk")
    if path == "step-by-step":
        return submit.task_submit(user=user, **request)
    calls: list[accept.Accept] = []
    original = submit.accept_fast

    def spy(task: Task, fingerprint: str, **options: Any) -> accept.Accept:
        calls.append(original(task, fingerprint, **options))
        return calls[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(submit, "accept_fast", spy)
        outcome = submit.task_submit(user=user, **request)
    assert calls[-1] is accept.Accept.ACCEPTED, calls
    return outcome


def snapshot(user: Any) -> dict[str, Any]:
    """Everything a submit (and its settlement) stored for ``user``, identities left out."""
    tasks = []
    for task in Task.objects.filter(user=user).order_by("created_at"):
        row = {k: v for k, v in vars(task).items() if not k.startswith("_") and k not in VOLATILE}
        events = TaskEvent.objects.filter(task=task).order_by("id")
        row["events"] = [
            (e.kind, e.message, {k: v for k, v in e.data.items() if k != "upstream_id"})
            for e in events
        ]
        row["scopes"] = [
            s.split(":")[0] + (":*" if s.count(":") > 1 else "") for s in task.capacity_scopes
        ]
        hold = Hold.objects.filter(subject_id=str(task.pk)).first()
        row["hold"] = hold and (hold.amount, hold.captured, hold.status, hold.subject_type)
        tasks.append(row)
    balance = billing_selectors.balance_for_user(user=user)
    entries = list(
        Entry.objects.filter(account__user=user).order_by("id").values_list("amount", flat=True)
    )
    counters = {
        scope.replace(f"user:{user.pk}", "user"): running
        for scope, running in capacity_counts().items()
        if scope.startswith(f"user:{user.pk}")
    }
    return {
        "tasks": tasks,
        "balance": (balance.balance, balance.held),
        "entries": entries,
        "counters": counters,
    }


def test_both_paths_store_the_same_rows_and_the_same_ledger(
    funded: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.TASK_MAX_RUNNING_PER_CATEGORY = {"image": 5}
    free = AIModel.objects.get(slug="sandbox-image")
    free.pk, free.slug, free.price_micro = None, "free-image", 0
    free.save()
    seen = {}
    for path in PATHS:
        use_path(monkeypatch, path)
        user = funded(10)
        paid = accept_via(path, user, params={"num_outputs": 2, "width": 256}).task
        accept_via(path, user, model_slug="free-image")
        failing = accept_via(path, user, params={"sandbox_outcome": "fail"}).task
        # The answer is built from the task as accepted: the same as reading it back.
        assert vars(paid) | {"_state": None} == vars(Task.objects.get(pk=paid.pk)) | {
            "_state": None
        }
        dispatch_all()
        run_to_end(paid)
        run_to_end(failing)
        seen[path] = snapshot(user)
    one, steps = seen["one-statement"], seen["step-by-step"]
    for fast, slow in zip(one.pop("tasks"), steps.pop("tasks"), strict=True):
        diff = {k: (fast[k], slow.get(k)) for k in fast if fast[k] != slow.get(k)}
        assert diff == {}, "\n".join(f"{k}:\n  {a}\n  {b}" for k, (a, b) in diff.items())
    assert one == steps
    assert one["balance"] == (8 * C, 0)


def prepared_task(user: Any) -> Task:
    task, _ = submit.prepare_task(
        user=user,
        model=AIModel.objects.get(slug="sandbox-image"),
        prompt="x",
        params={},
        upload_ids=[],
    )
    return task


def fingerprint() -> str:
    """The fingerprint of the model row as it is now (an earlier test's copy may be cached)."""
    model_cache.forget_model("sandbox-image")
    cached = model_cache.cached_model("sandbox-image")
    assert cached is not None
    return cached.fingerprint


def take_slots_step_by_step(user: Any) -> None:
    """The ORM's capacity rule for a new task of ``user`` (rolled back afterwards)."""
    with transaction.atomic():
        task = prepared_task(user)
        task.save(force_insert=True)
        capacity_acquire(task=task)
        transaction.set_rollback(True)


@pytest.mark.parametrize("scope", ["user", "category", "global"])
def test_a_full_capacity_scope_is_refused_by_both_rules_at_the_same_count(
    funded: Any, settings: Any, monkeypatch: pytest.MonkeyPatch, scope: str
) -> None:
    # The SQL condition and the ORM's on the same counters: one below the limit the statement
    # takes the last slot; at the limit both refuse, with nothing written, and the API's
    # answer is the 429 of the scope.
    settings.TASK_MAX_RUNNING_PER_USER = 3 if scope == "user" else 100
    settings.TASK_MAX_RUNNING_PER_CATEGORY = {"image": 3} if scope == "category" else {}
    settings.TASK_MAX_RUNNING = 16 if scope == "global" else 10_000  # then 1 per shard
    user = funded(100)
    use_path(monkeypatch, "step-by-step")
    for _ in range(15 if scope == "global" else 2):
        accept_via("step-by-step", user)
    if scope == "global":  # the statement tries one random shard: make it the free one
        free = next(n for n in range(16) if capacity_counts().get(f"global:{n}", 0) == 0)
        monkeypatch.setattr(random, "randrange", lambda n: free)
    use_path(monkeypatch, "one-statement")
    accept_via("one-statement", user)
    before = Task.objects.count()

    assert submit.accept_fast(prepared_task(user), fingerprint()) is accept.Accept.REFUSED
    with pytest.raises(CapacityExceeded) as refused:
        take_slots_step_by_step(user)
    with pytest.raises(CapacityExceeded) as answered:
        submit.task_submit(user=user, model_slug="sandbox-image", prompt="x")

    expected = "system_busy" if scope == "global" else "too_many_running_tasks"
    assert refused.value.code == answered.value.code == expected
    assert Task.objects.count() == before


@pytest.mark.parametrize("short_by", [0, 1])
def test_the_hold_rule_is_the_same_in_both_paths(
    funded: Any, monkeypatch: pytest.MonkeyPatch, short_by: int
) -> None:
    # A balance of exactly the price is enough, one micro-credit less is not, on either path;
    # the answer to the refusal is the FAILED task (402) of the step-by-step path.
    answers = {}
    for path in PATHS:
        use_path(monkeypatch, path)
        user = funded(0)
        billing.grant(user=user, amount=C - short_by, reason="test")
        if short_by and path == "one-statement":
            refused = submit.accept_fast(prepared_task(user), fingerprint())
            assert refused is accept.Accept.REFUSED
            assert not Task.objects.filter(user=user).exists()
            outcome = submit.task_submit(user=user, model_slug="sandbox-image", prompt="x")
        else:
            outcome = accept_via(path, user, prompt="x")
        answers[path] = (outcome.accepted, outcome.task.status, outcome.task.error_code)
        assert billing_selectors.balance_for_user(user=user).held == (0 if short_by else C)
    assert answers["one-statement"] == answers["step-by-step"]
    expected = (False, "FAILED", "insufficient_credits") if short_by else (True, "WAITING", "")
    assert answers["one-statement"] == expected


def test_a_model_changed_after_it_was_cached_applies_to_the_next_submit(
    funded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_path(monkeypatch, "one-statement")
    user = funded(100)
    first = accept_via("one-statement", user).task  # the process now has the model cached
    assert model_cache.cached_model("sandbox-image") is not None

    # Repriced by a bare UPDATE (no save(), no signal): the next submit holds the new price.
    AIModel.objects.filter(slug="sandbox-image").update(price_micro=3 * C)
    second = submit.task_submit(user=user, model_slug="sandbox-image", prompt="x").task
    assert (first.price_micro, second.price_micro, second.reserved_micro) == (C, 3 * C, 3 * C)
    assert Task.objects.get(pk=second.pk).reserved_micro == 3 * C

    # Disabled: the next submit is refused, and nothing is written.
    AIModel.objects.filter(slug="sandbox-image").update(enabled=False)
    with pytest.raises(ValidationFailed) as refused:
        submit.task_submit(user=user, model_slug="sandbox-image", prompt="x")
    assert refused.value.code == "unknown_model"
    assert Task.objects.filter(user=user).count() == 2
    assert billing_selectors.balance_for_user(user=user).held == 4 * C


def test_a_rule_loosened_after_the_model_was_cached_applies_to_the_next_submit(
    funded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Validation runs against the process's copy before the statement compares fingerprints:
    # a refusal by an out-of-date copy must not reach the user.
    use_path(monkeypatch, "one-statement")
    user = funded(10)
    limit = AIModel.objects.get(slug="sandbox-image").max_prompt_length
    accept_via("one-statement", user)  # cached now
    AIModel.objects.filter(slug="sandbox-image").update(max_prompt_length=limit + 50)

    outcome = submit.task_submit(user=user, model_slug="sandbox-image", prompt="x" * (limit + 10))

    assert outcome.accepted
    assert len(outcome.task.prompt) == limit + 10
    with pytest.raises(ValidationFailed):  # and a prompt over the new limit is still refused
        submit.task_submit(user=user, model_slug="sandbox-image", prompt="x" * (limit + 51))


@pytest.mark.parametrize("lost", ["server", "process"])
@pytest.mark.parametrize("outer", [False, True], ids=["alone", "in-a-transaction"])
def test_prepared_statements_out_of_step_are_put_right(
    funded: Any, monkeypatch: pytest.MonkeyPatch, lost: str, outer: bool
) -> None:
    # What a pooler or DISCARD ALL does: the server connection lost the statement ("server"),
    # or has it while this process thinks not ("process"). The next submit still goes through
    # the one statement, also inside an outer transaction (the Idempotency-Key path: a
    # savepoint), with no error and no step-by-step fallback.
    use_path(monkeypatch, "one-statement")
    user = funded(10)
    accept_via("one-statement", user)
    if lost == "server":
        with connection.cursor() as cursor:
            cursor.execute("DEALLOCATE ALL")
    else:
        prepared_on(transaction.get_connection()).clear()

    with transaction.atomic() if outer else contextlib.nullcontext():
        task = accept_via("one-statement", user).task
        assert Task.objects.filter(pk=task.pk).exists()

    assert Task.objects.filter(user=user, status="WAITING").count() == 2
    assert Task.objects.get(pk=task.pk).reserved_micro == C


@pytest.mark.parametrize("path", PATHS)
def test_submits_racing_for_the_last_credits_hold_each_credit_once(
    funded: Any, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # Race on PostgreSQL: 12 submits of 1 credit at once against 5 credits. Exactly 5 are
    # accepted with their holds, 7 are FAILED for credits with none, on either path.
    from billing.tests.concurrency import run_concurrently

    use_path(monkeypatch, path)
    user = funded(5)

    results = run_concurrently(
        [lambda: submit.task_submit(user=user, model_slug="sandbox-image", prompt="x")] * 12
    )

    errors = [r for r in results if not isinstance(r, submit.SubmitOutcome)]
    assert errors == []
    accepted = [r.task for r in results if r.accepted]
    refused = [r.task for r in results if not r.accepted]
    assert (len(accepted), len(refused)) == (5, 7)
    assert {t.error_code for t in refused} == {"insufficient_credits"}
    assert Hold.objects.filter(account__user=user, status="open").count() == 5
    assert billing_selectors.balance_for_user(user=user).held == 5 * C
    assert Task.objects.filter(user=user, status="WAITING").count() == 5


def test_a_connection_per_request_sends_the_statement_unprepared(
    funded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DB_CONN_MAX_AGE=0: the connection goes with the request, so preparing the statement
    # would only add a round trip. It is sent as it is, and still accepts and refuses.
    use_path(monkeypatch, "one-statement")
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 0)
    connection.close()
    rich, poor = funded(10), funded(0)

    accepted = accept_via("one-statement", rich)
    refused = submit.task_submit(user=poor, model_slug="sandbox-image", prompt="x")

    assert accepted.accepted
    assert Task.objects.get(pk=accepted.task.pk).reserved_micro == C
    assert not refused.accepted
    assert refused.task.error_code == "insufficient_credits"
    assert prepared_on(transaction.get_connection()) == set()
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone() == (0,)


def test_a_new_connection_prepares_each_statement_once(
    funded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What this process has prepared is kept per server connection: a connection opened by the
    # statement's own call is the one its PREPARE is recorded for, so the next submit on it
    # sends EXECUTE alone (not a PREPARE that fails, then the EXECUTE).
    use_path(monkeypatch, "one-statement")
    user = funded(10)
    accept_via("one-statement", user)  # the process's copy of the model is current
    connection.close()
    sent: list[str] = []

    def record(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        sent.append(sql.split(" ", 1)[0])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        for _ in range(3):
            accept_via("one-statement", user)

    assert sent.count("PREPARE") == 1, sent
    assert sent.count("EXECUTE") == 3, sent


def test_the_accept_sent_twice_accepts_once(funded: Any) -> None:
    # The accept may be sent a second time when the connection died with the first on its way
    # back (rivya.sql.execute_checking_connection). The first was committed: the second fails on
    # the task's primary key, rolls back whole, and is taken for the first's success.
    user = funded(10)
    task = prepared_task(user)
    first = submit.accept_fast(task, fingerprint())
    counts = capacity_counts()

    second = submit.accept_fast(task, fingerprint())

    assert first is second is accept.Accept.ACCEPTED
    assert Task.objects.filter(user=user).count() == 1
    assert Hold.objects.filter(subject_id=str(task.pk)).count() == 1
    assert billing_selectors.balance_for_user(user=user).held == C
    assert capacity_counts() == counts
    assert TaskEvent.objects.filter(task=task).count() == 2


def test_a_submit_whose_first_statement_meets_a_dead_connection_goes_through(
    funded: Any, monkeypatch: pytest.MonkeyPatch, terminate_backend: Any
) -> None:
    # With the key and the model copied, the accept is a request's first statement and stands
    # in for Django's connection health check: a terminated backend is replaced, the statement
    # sent again, and the submit accepted once.
    from django.core.signals import request_finished, request_started

    use_path(monkeypatch, "one-statement")
    user = funded(10)
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 600)
    connection.close()
    accept_via("one-statement", user)
    before = connection.connection.get_backend_pid()
    request_finished.send(sender=None)  # as between two requests: the check is due again
    request_started.send(sender=None)
    assert terminate_backend() == before

    outcome = accept_via("one-statement", user)

    assert outcome.accepted
    assert connection.connection.get_backend_pid() != before
    assert Task.objects.filter(user=user).count() == 2
    assert billing_selectors.balance_for_user(user=user).held == 2 * C
