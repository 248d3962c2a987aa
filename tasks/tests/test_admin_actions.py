"""Support's safe actions, through the admin views, as each role (issue 15): each action's
effect, its audit record (timeline; ledger where credits move), a clean ledger, 403 for the wrong
role, and one effect from a double-submitted form."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from billing import selectors as billing_selectors
from billing.models import LedgerTransaction
from notifications.models import Notification
from tasks import services
from tasks.admin_actions import action_links
from tasks.models import Task, TaskEvent
from tasks.tests.lifecycle import run_to_end, submit

pytestmark = pytest.mark.django_db
C = 1_000_000
S = Task.Status


@pytest.fixture
def roles(db: Any) -> None:
    call_command("setup_roles")


@pytest.fixture
def as_role(roles: None, make_user: Any) -> Any:
    """A logged-in admin client for a new staff member in ``group`` (``"super"``: a superuser;
    ``None``: staff with no group)."""

    def login(group: str | None) -> tuple[Client, Any]:
        if group == "super":
            user = make_user(is_staff=True, is_superuser=True)
        else:
            user = make_user(is_staff=True)
            if group:
                user.groups.add(Group.objects.get(name=group))
        client = Client()
        client.force_login(user)
        return client, user

    return login


@pytest.fixture
def on_commit(django_capture_on_commit_callbacks: Any) -> Any:
    """Runs what the views queue after commit (the test's transaction never commits)."""
    return django_capture_on_commit_callbacks


def url(action: str, task: Task) -> str:
    return reverse(f"admin:tasks_task_{action}", args=[task.pk])


def post(client: Client, action: str, task: Task, token: str | None = None, **data: Any) -> Any:
    return client.post(
        url(action, task),
        {"reason": "user wrote in", "token": token or str(uuid.uuid4()), **data},
    )


def support_events(task: Task, action: str) -> list[TaskEvent]:
    return list(TaskEvent.objects.filter(task=task, kind=f"support_{action}"))


def assert_audit(event: TaskEvent, actor: Any, reason: str = "user wrote in") -> None:
    assert event.data["actor_id"] == actor.pk
    assert event.data["actor"] == actor.get_username()
    assert event.data["reason"] == reason


def available(user: Any) -> int:
    return billing_selectors.balance_for_user(user=user).available


def generating(user: Any, **params: Any) -> Task:
    task = submit(user, **params)
    services.task_send_upstream(task_id=task.pk)
    task.refresh_from_db()
    assert task.status == S.GENERATING
    return task


# --- re-check -------------------------------------------------------------------------------


def test_support_rechecks_a_generating_task_once(
    sandbox: Any, catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None
) -> None:
    # Given a GENERATING task whose job is done upstream (the sandbox answers at once)
    task = generating(funded())
    client, staff = as_role("Support")
    token = str(uuid.uuid4())

    # When support re-checks it, twice with the same form
    first = post(client, "recheck", task, token)
    second = client.post(url("recheck", task), {"reason": "user wrote in", "token": token})

    # Then the task finished from the upstream answer, recorded once with actor and reason
    task.refresh_from_db()
    assert first.status_code == 302
    assert task.status == S.SUCCESS
    [event] = support_events(task, "recheck")
    assert_audit(event, staff)
    assert TaskEvent.objects.filter(task=task, kind="polled", data__reason="support").count() == 1
    assert second.status_code == 302
    msgs = [str(m) for m in second.wsgi_request._messages]
    assert any("Already done" in m for m in msgs)


def test_recheck_of_a_waiting_task_queues_it_again(
    catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None, on_commit: Any
) -> None:
    task = submit(funded())
    client, staff = as_role("Support")

    with on_commit(execute=True):
        response = post(client, "recheck", task)

    assert response.status_code == 302
    assert queued["submit"] == [str(task.pk)]
    assert_audit(support_events(task, "recheck")[0], staff)


def test_recheck_of_a_finished_task_is_refused_with_a_reason(
    sandbox: Any, catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None
) -> None:
    task = run_to_end(submit(funded()))
    client, _ = as_role("Support")

    response = post(client, "recheck", task)

    assert response.status_code == 409
    assert "the task is SUCCESS" in response.content.decode()
    assert support_events(task, "recheck") == []


# --- cancel ---------------------------------------------------------------------------------


def test_support_cancels_once_and_the_user_is_refunded_and_told(
    sandbox: Any,
    catalog: None,
    queued: Any,
    funded: Any,
    as_role: Any,
    ledger_ok: None,
    on_commit: Any,
) -> None:
    user = funded(10)
    task = generating(user)
    client, staff = as_role("Support")
    token = str(uuid.uuid4())

    with on_commit(execute=True):
        post(client, "cancel", task, token)
        again = post(client, "cancel", task, token)

    task.refresh_from_db()
    assert task.status == S.CANCELLED
    assert available(user) == 10 * C
    assert queued["cancel"] == [str(task.pk)]
    [event] = support_events(task, "cancel")
    assert_audit(event, staff)
    assert Notification.objects.filter(
        subject_id=str(task.pk), kind=Notification.Kind.GENERATION_CANCELLED
    ).exists()
    assert again.status_code == 302  # "already done", nothing more
    assert TaskEvent.objects.filter(task=task, kind="cancelled").count() == 1


def test_cancel_of_a_finished_task_is_refused(
    sandbox: Any, catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None
) -> None:
    task = run_to_end(submit(funded()))
    client, _ = as_role("Support")

    get = client.get(url("cancel", task))
    response = post(client, "cancel", task)

    task.refresh_from_db()
    assert get.status_code == 409
    assert response.status_code == 409
    assert "Cannot cancel: the task is SUCCESS" in response.content.decode()
    assert task.status == S.SUCCESS


def test_staff_without_a_role_gets_403_for_every_action(
    catalog: None, queued: Any, funded: Any, as_role: Any
) -> None:
    task = submit(funded())
    client, _ = as_role(None)

    for action in ("recheck", "cancel", "fail", "refund", "resubmit", "resubmit_free"):
        assert client.get(url(action, task)).status_code == 403, action
        assert post(client, action, task).status_code == 403, action
    task.refresh_from_db()
    assert task.status == S.WAITING


# --- mark failed with a refund --------------------------------------------------------------


def test_billing_marks_failed_with_a_full_refund_and_support_may_not(
    sandbox: Any,
    catalog: None,
    queued: Any,
    funded: Any,
    as_role: Any,
    ledger_ok: None,
    on_commit: Any,
) -> None:
    user = funded(10)
    task = generating(user)
    support, _ = as_role("Support")
    billing_client, staff = as_role("Billing")

    assert support.get(url("fail", task)).status_code == 403
    assert post(support, "fail", task, kind="provider").status_code == 403
    token = str(uuid.uuid4())
    assert billing_client.get(url("fail", task)).status_code == 200
    with on_commit(execute=True):
        post(billing_client, "fail", task, token, kind="infra")
        post(billing_client, "fail", task, token, kind="infra")

    task.refresh_from_db()
    assert (task.status, task.error_code, task.error_kind) == (S.FAILED, "support_failed", "infra")
    assert task.charged_micro == 0
    assert available(user) == 10 * C
    assert queued["cancel"] == [str(task.pk)]  # the provider is asked to stop
    [event] = support_events(task, "fail")
    assert_audit(event, staff)


# --- refund ---------------------------------------------------------------------------------


def test_billing_refunds_in_parts_never_beyond_the_charge(
    sandbox: Any, catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None
) -> None:
    user = funded(10)
    task = run_to_end(submit(user, num_outputs=2))
    assert task.charged_micro == 2 * C
    support, _ = as_role("Support")
    client, staff = as_role("Billing")
    assert post(support, "refund", task, amount="1").status_code == 403
    token = str(uuid.uuid4())

    post(client, "refund", task, token, amount="0.5")
    post(client, "refund", task, token, amount="0.5")  # double submit
    too_much = post(client, "refund", task, amount="2")
    post(client, "refund", task, amount="")  # the rest

    task.refresh_from_db()
    assert too_much.status_code == 409
    assert "At most 1.5 credits" in too_much.content.decode()
    assert available(user) == 10 * C
    assert task.charged_micro == 2 * C  # what the hold captured (invariant 4)
    events = support_events(task, "refund")
    assert [e.data["amount_micro"] for e in events] == [C // 2, 3 * C // 2]
    assert_audit(events[0], staff)
    txns = LedgerTransaction.objects.filter(subject_id=str(task.pk), actor=staff)
    assert txns.count() == 2
    assert all(t.reason.endswith("user wrote in") for t in txns)
    assert services.task_refundable(task) == 0
    assert post(client, "refund", task).status_code == 409


def test_a_whole_refund_is_the_reversal_of_the_charge(
    sandbox: Any, catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None
) -> None:
    user = funded(10)
    task = run_to_end(submit(user))
    client, staff = as_role("super")

    response = post(client, "refund", task)

    assert response.status_code == 302
    rev = LedgerTransaction.objects.get(kind=LedgerTransaction.Kind.REVERSAL)
    assert (rev.actor_id, rev.subject_id) == (staff.pk, str(task.pk))
    assert available(user) == 10 * C


def test_refund_of_an_uncharged_task_is_refused(
    catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None
) -> None:
    task = submit(funded())
    services.task_cancel(task_id=task.pk)
    client, _ = as_role("Billing")

    response = post(client, "refund", task)

    assert response.status_code == 409
    assert "not charged" in response.content.decode()


# --- resubmit -------------------------------------------------------------------------------


def failed(user: Any) -> Task:
    task = generating(user)
    services.task_fail(
        task_id=task.pk, code="upstream_error", message="boom", kind="provider", charge_policy=False
    )
    task.refresh_from_db()
    return task


def test_support_resubmits_a_failed_task_once_and_the_user_pays(
    sandbox: Any, catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None
) -> None:
    user = funded(10)
    old = failed(user)
    client, staff = as_role("Support")
    token = str(uuid.uuid4())

    post(client, "resubmit", old, token)
    post(client, "resubmit", old, token)

    new = Task.objects.exclude(pk=old.pk).get(user=user)
    assert (new.status, new.prompt, new.model_slug) == (S.WAITING, old.prompt, old.model_slug)
    assert available(user) == 10 * C - new.price_micro  # held for the new task
    [event] = support_events(old, "resubmit")
    assert_audit(event, staff)
    assert event.data["new_task_id"] == str(new.pk)
    back = TaskEvent.objects.get(task=new, kind="resubmitted_from")
    assert back.data["old_task_id"] == str(old.pk)
    assert not LedgerTransaction.objects.filter(actor=staff).exists()


def test_resubmit_is_refused_when_the_user_cannot_pay_and_nothing_is_written(
    sandbox: Any, catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None
) -> None:
    user = funded(1)
    old = failed(user)
    billing_selectors_before = available(user)
    services.task_submit(user=user, model_slug="sandbox-image", prompt="spend it")  # holds 1
    client, _ = as_role("Support")

    response = post(client, "resubmit", old)

    assert response.status_code == 409
    assert "too few credits" in response.content.decode()
    assert Task.objects.filter(user=user).count() == 2
    assert billing_selectors_before == C


def test_billing_resubmits_at_our_cost_with_a_recorded_grant(
    sandbox: Any, catalog: None, queued: Any, funded: Any, as_role: Any, ledger_ok: None
) -> None:
    user = funded(1)
    old = failed(user)
    services.task_submit(user=user, model_slug="sandbox-image", prompt="spend it")
    support, _ = as_role("Support")
    client, staff = as_role("Billing")
    assert support.get(url("resubmit_free", old)).status_code == 403
    assert post(support, "resubmit_free", old).status_code == 403
    token = str(uuid.uuid4())

    post(client, "resubmit_free", old, token)
    post(client, "resubmit_free", old, token)

    grant = LedgerTransaction.objects.get(kind=LedgerTransaction.Kind.GRANT, actor=staff)
    assert str(old.pk) in grant.reason
    new = Task.objects.get(pk=support_events(old, "resubmit_free")[0].data["new_task_id"])
    assert new.status == S.WAITING
    assert grant.entries.get(account__user=user).amount == new.price_micro
    assert available(user) == 0
    assert Task.objects.filter(user=user).count() == 3


# --- what the task page offers ---------------------------------------------------------------


def test_the_task_page_offers_each_role_what_it_may_do_now(
    catalog: None, queued: Any, funded: Any, as_role: Any, rf: Any
) -> None:
    task = submit(funded())
    labels = {}
    for role in ("Support", "Billing", "super"):
        _, staff = as_role(role)
        request = rf.get("/")
        request.user = staff
        labels[role] = [link.label for link in action_links(request, task)]

    assert labels["Support"] == ["Re-check upstream now", "Cancel"]
    assert labels["Billing"] == ["Re-check upstream now", "Cancel", "Mark failed with a refund"]
    assert labels["super"] == labels["Billing"]


def test_setup_roles_twice_is_safe(roles: None) -> None:
    before = {
        g.name: set(g.permissions.values_list("codename", flat=True)) for g in Group.objects.all()
    }

    call_command("setup_roles")

    after = {
        g.name: set(g.permissions.values_list("codename", flat=True)) for g in Group.objects.all()
    }
    assert after == before
    assert {"recheck_task", "cancel_task", "resubmit_task", "view_task"} <= after["Support"]
    assert "refund_task" not in after["Support"]
    assert {"refund_task", "resubmit_task_free", "add_ledgertransaction"} <= after["Billing"]
