"""Invariant 4 (tasks ↔ ledger) catches what it claims to: each check is shown firing on a
planted breach, and staying quiet on the legitimate state next to it. Without these, a check
that can never fire would make every "ledger_check after each test" meaningless."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection

from billing.invariants import run_checks
from tasks.models import AIModel, CapacityCounter, Task
from tasks.tests.lifecycle import C, run_to_end, submit

S = Task.Status
pytestmark = [pytest.mark.usefixtures("sandbox", "catalog", "queued"), pytest.mark.django_db]


def breached() -> set[str]:
    return {b.check for b in run_checks()}


def plant(sql: str, *params: Any) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def test_success_whose_hold_was_released_instead_of_captured_is_a_breach(funded: Any) -> None:
    # What a bug that refunds a success would leave: hold released, nothing charged, every
    # amount consistent with the hold, so only the success-charge check can see it.
    task = run_to_end(submit(funded(10), sandbox_outcome="fail"))
    assert task.status == S.FAILED
    assert breached() == set()

    plant(
        "UPDATE ai_task SET status = 'SUCCESS', outputs_requested = 1, results = %s::jsonb, "
        "error_code = '', error_kind = '' WHERE id = %s",
        '[{"name": "x.png", "mime": "image/png", "bytes": 1}]',
        task.pk,
    )

    assert breached() == {"4.task_success_charge"}
    out = StringIO()
    with pytest.raises(SystemExit) as exit_info:
        call_command("ledger_check", stdout=out, stderr=out)
    assert exit_info.value.code == 1
    assert "4.task_success_charge" in out.getvalue()
    assert str(task.pk) in out.getvalue()


def test_partial_success_share_passes_and_a_wrong_share_does_not(funded: Any) -> None:
    task = run_to_end(submit(funded(10), num_outputs=3, sandbox_outcome="partial"))
    assert (task.status, len(task.results), task.outputs_requested) == (S.SUCCESS, 2, 3)
    assert task.charged_micro == 3 * C * 2 // 3
    assert breached() == set()

    # The same charge for a model whose policy forbids partial success is wrong.
    plant(
        "UPDATE ai_task SET billing_policy = %s::jsonb WHERE id = %s",
        '{"partial_success": false, "failure_charge_percent": 0, "cancel_charge_percent": 0}',
        task.pk,
    )
    assert breached() == {"4.task_success_charge"}


def test_failure_charged_beyond_its_policy_is_a_breach(funded: Any) -> None:
    AIModel.objects.filter(slug="sandbox-image").update(
        billing_policy={"failure_charge_percent": 25}
    )
    task = run_to_end(submit(funded(10), sandbox_outcome="fail"))
    assert task.charged_micro == C // 4
    assert breached() == set()

    AIModel.objects.filter(slug="sandbox-image").update(billing_policy={})
    plant(
        "UPDATE ai_task SET billing_policy = %s::jsonb WHERE id = %s",
        '{"failure_charge_percent": 10}',
        task.pk,
    )
    assert breached() == {"4.task_policy"}


def test_running_task_whose_reservation_differs_from_its_hold_is_a_breach(funded: Any) -> None:
    task = submit(funded(10))
    assert breached() == set()

    plant("UPDATE ai_task SET reserved_micro = reserved_micro + 1 WHERE id = %s", task.pk)

    assert breached() == {"4.task_billing"}


def test_capacity_counter_out_of_step_with_running_tasks_is_a_breach(funded: Any) -> None:
    user = funded(10)
    submit(user)
    assert breached() == set()

    CapacityCounter.objects.filter(scope=f"user:{user.pk}").update(running=2)

    assert breached() == {"4.task_capacity"}
