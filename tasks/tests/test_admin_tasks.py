"""Support's task list and task page in the admin (issue 15): the computed filters, search and
credit columns of the list; the read-only task page with its one timeline, result previews and
diagnosis; the staff-only result view; query counts that do not grow with a task's history."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.models import Account, Hold
from notifications.models import Notification
from tasks import selectors
from tasks.models import AIModel, CallbackDelivery, Task, TaskEvent
from tasks.tests.lifecycle import run_to_end, submit

C = 1_000_000
LIST = "/admin/tasks/task/"

pytestmark = pytest.mark.django_db


def change_url(task: Task) -> str:
    return reverse("admin:tasks_task_change", args=[task.pk])


@pytest.fixture
def admin_client(staff: Any) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def make_task(catalog: None, make_user: Any) -> Any:
    """A task row planted through the ORM (the filters read fields; how it got there is not
    their concern). ``created_ago`` backdates it."""

    def make(
        user: Any = None,
        slug: str = "sandbox-image",
        created_ago: timedelta | None = None,
        **fields: Any,
    ) -> Task:
        model = AIModel.objects.get(slug=slug)
        status = fields.setdefault("status", Task.Status.WAITING)
        fields.setdefault("timeout_seconds", model.timeout_seconds)
        if status in Task.TERMINAL:
            fields.setdefault("finished_at", timezone.now())
        task = Task.objects.create(
            user=user or make_user(),
            model=model,
            model_slug=model.slug,
            category=model.category,
            provider=model.provider,
            upstream_model=model.upstream_model,
            price_micro=model.price_micro,
            billing_type=model.billing_type,
            result_ttl_seconds=3600,
            prompt=fields.pop("prompt", "a lighthouse at dusk"),
            **fields,
        )
        if created_ago is not None:
            Task.objects.filter(pk=task.pk).update(created_at=timezone.now() - created_ago)
            task.refresh_from_db()
        return task

    return make


def listed(client: Client, query: str) -> set[str]:
    response = client.get(f"{LIST}?{query}")
    assert response.status_code == 200
    return {str(t.pk) for t in response.context["cl"].result_list}


# --- the list ---------------------------------------------------------------------------------


def test_stuck_filter_finds_unfinished_tasks_past_their_models_timeout(
    admin_client: Client, make_task: Any
) -> None:
    # given a task waiting for 20 minutes and one generating since 20 minutes (timeout 10)
    old_waiting = make_task(created_ago=timedelta(minutes=20), timeout_seconds=600)
    old_running = make_task(
        status=Task.Status.GENERATING,
        created_ago=timedelta(minutes=21),
        submitted_at=timezone.now() - timedelta(minutes=20),
        timeout_seconds=600,
    )
    # and ones that are not stuck: fresh, accepted recently, finished, or a long timeout
    fresh = make_task(created_ago=timedelta(minutes=1))
    accepted_late = make_task(
        status=Task.Status.GENERATING,
        created_ago=timedelta(minutes=30),
        submitted_at=timezone.now() - timedelta(minutes=2),
        timeout_seconds=600,
    )
    finished = make_task(status=Task.Status.SUCCESS, created_ago=timedelta(hours=2))
    patient = make_task(created_ago=timedelta(minutes=20), timeout_seconds=3600)

    # when support filters stuck tasks
    found = listed(admin_client, "stuck=yes")

    # then only the two past their timeout show
    assert found == {str(old_waiting.pk), str(old_running.pk)}
    assert not found & {str(t.pk) for t in (fresh, accepted_late, finished, patient)}


def test_flagged_filter_keeps_working(admin_client: Client, make_task: Any) -> None:
    flagged = make_task(status=Task.Status.GENERATING, submit_unconfirmed_at=timezone.now())
    plain = make_task(status=Task.Status.GENERATING)
    assert listed(admin_client, "flagged=any") == {str(flagged.pk)}
    assert str(plain.pk) not in listed(admin_client, "flagged=submit_unconfirmed")


def test_charged_without_output_filter(admin_client: Client, make_task: Any) -> None:
    # given failures and successes, charged or not
    failed_charged = make_task(status=Task.Status.FAILED, reserved_micro=C, charged_micro=C // 2)
    empty_success = make_task(
        status=Task.Status.SUCCESS, reserved_micro=C, charged_micro=C, results=[]
    )
    good_success = make_task(
        status=Task.Status.SUCCESS,
        reserved_micro=C,
        charged_micro=C,
        results=[{"name": "x.png", "mime": "image/png", "bytes": 1}],
    )
    refunded = make_task(status=Task.Status.FAILED, reserved_micro=C, refunded_micro=C)
    free_failure = make_task(status=Task.Status.FAILED)

    found = listed(admin_client, "charged_no_output=yes")

    assert found == {str(failed_charged.pk), str(empty_success.pk)}
    assert not found & {str(good_success.pk), str(refunded.pk), str(free_failure.pk)}


def plant_hold(task: Task, status: str = Hold.Status.OPEN) -> Hold:
    account, _ = Account.objects.get_or_create(kind=Account.Kind.USER, user=task.user)
    resolved = None if status == Hold.Status.OPEN else timezone.now()
    return Hold.objects.create(
        account=account,
        subject_type="tasks.task",
        subject_id=str(task.pk),
        amount=C,
        status=status,
        resolved_at=resolved,
    )


def test_open_hold_filter_finds_terminal_tasks_whose_hold_is_still_open(
    admin_client: Client, make_task: Any
) -> None:
    breach = make_task(status=Task.Status.FAILED, reserved_micro=C)
    plant_hold(breach)
    settled = make_task(status=Task.Status.FAILED, reserved_micro=C)
    plant_hold(settled, Hold.Status.RELEASED)
    running = make_task(status=Task.Status.GENERATING, reserved_micro=C)
    plant_hold(running)

    assert listed(admin_client, "open_hold=yes") == {str(breach.pk)}


def test_repeated_failure_filter_groups_by_user_model_and_prompt(
    admin_client: Client, make_task: Any, make_user: Any
) -> None:
    alice, bob = make_user(), make_user()
    first = make_task(user=alice, status=Task.Status.FAILED, prompt="a cat")
    second = make_task(user=alice, status=Task.Status.REJECTED, prompt="a cat")
    make_task(user=alice, status=Task.Status.SUCCESS, prompt="a cat")
    other_prompt = make_task(user=alice, status=Task.Status.FAILED, prompt="a dog")
    other_user = make_task(user=bob, status=Task.Status.FAILED, prompt="a cat")
    other_model = make_task(
        user=alice, slug="sandbox-video", status=Task.Status.FAILED, prompt="a cat"
    )

    found = listed(admin_client, "repeated_failure=yes")

    assert found == {str(first.pk), str(second.pk)}
    assert not found & {str(other_prompt.pk), str(other_user.pk), str(other_model.pk)}


def test_field_filters_narrow_the_list(admin_client: Client, make_task: Any) -> None:
    image = make_task(status=Task.Status.FAILED, error_kind="provider", error_code="x")
    video = make_task(slug="sandbox-video", status=Task.Status.SUCCESS)
    old = make_task(created_ago=timedelta(days=40))
    assert listed(admin_client, "status__exact=FAILED") == {str(image.pk)}
    assert listed(admin_client, "category__exact=video") == {str(video.pk)}
    assert listed(admin_client, "model_slug__exact=sandbox-video") == {str(video.pk)}
    assert listed(admin_client, "error_kind__exact=provider") == {str(image.pk)}
    assert str(video.pk) in listed(admin_client, "provider__exact=sandbox")
    # The date filter's own links carry an aware datetime ("Past 7 days").
    since = quote((timezone.now() - timedelta(days=7)).replace(microsecond=0).isoformat())
    recent = listed(admin_client, f"created_at__gte={since}")
    assert str(image.pk) in recent
    assert str(old.pk) not in recent


def test_search_by_email_prompt_upstream_id_and_task_id(
    admin_client: Client, make_task: Any, make_user: Any
) -> None:
    carol = make_user("carol", email="carol@example.org")
    mine = make_task(user=carol, prompt="a violet nebula", upstream_id="job_abc123")
    other = make_task(prompt="a green field")

    assert listed(admin_client, "q=carol@example.org") == {str(mine.pk)}
    assert listed(admin_client, "q=violet+nebula") == {str(mine.pk)}
    assert listed(admin_client, "q=job_abc123") == {str(mine.pk)}
    assert listed(admin_client, f"q={other.pk}") == {str(other.pk)}


def test_list_shows_amounts_in_credits_and_age(admin_client: Client, make_task: Any) -> None:
    make_task(
        status=Task.Status.FAILED,
        reserved_micro=2_500_000,
        charged_micro=1_250_000,
        refunded_micro=750_000,
        error_code="sandbox_failure",
        created_ago=timedelta(hours=3),
    )
    html = admin_client.get(LIST).content.decode()
    for shown in (">2.5<", ">1.25<", ">0.75<", "3\xa0hours ago", "sandbox_failure"):
        assert shown in html
    assert "2500000" not in html


def test_list_query_count_does_not_grow_with_rows(
    admin_client: Client, make_task: Any, make_user: Any
) -> None:
    for _ in range(3):
        make_task(user=make_user())
    with CaptureQueriesContext(connection) as few:
        admin_client.get(LIST)
    for _ in range(40):
        make_task(user=make_user())
    with CaptureQueriesContext(connection) as many:
        assert admin_client.get(LIST).status_code == 200
    assert len(many) == len(few)
    assert len(many) <= 12


# --- the task page ----------------------------------------------------------------------------


@pytest.fixture
def finished_task(catalog: None, funded: Any, queued: Any, sandbox: Any) -> Task:
    """A success run through the services against the sandbox, with a callback delivery stored
    between its submission and its poll."""
    task = run_to_end(submit(funded(), num_outputs=2))
    assert task.status == Task.Status.SUCCESS
    polled = TaskEvent.objects.get(task=task, kind="polled").created_at
    delivery = CallbackDelivery.objects.create(
        provider="sandbox",
        event_id="msg_support_1",
        upstream_id=task.upstream_id,
        task=task,
        payload={"type": "job.updated", "data": {"id": task.upstream_id, "status": "running"}},
        status=CallbackDelivery.Status.PROCESSED,
        attempts=1,
    )
    CallbackDelivery.objects.filter(pk=delivery.pk).update(
        received_at=polled - timedelta(milliseconds=1)
    )
    return task


@pytest.mark.usefixtures("ledger_ok")
def test_task_page_is_read_only_without_save_or_delete(
    admin_client: Client, finished_task: Task
) -> None:
    response = admin_client.get(change_url(finished_task))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="_save"' not in html
    assert 'name="_continue"' not in html
    assert "deletelink" not in html
    assert 'id="diagnosis"' in html


@pytest.mark.usefixtures("ledger_ok")
def test_post_to_the_task_page_changes_nothing(admin_client: Client, finished_task: Task) -> None:
    before = Task.objects.filter(pk=finished_task.pk).values().get()
    response = admin_client.post(
        change_url(finished_task), {"status": "FAILED", "charged_micro": "0", "_save": "Save"}
    )
    assert response.status_code == 403
    assert Task.objects.filter(pk=finished_task.pk).values().get() == before


@pytest.mark.usefixtures("ledger_ok")
def test_timeline_has_callback_poll_ledger_and_notification_in_time_order(
    admin_client: Client, finished_task: Task
) -> None:
    timeline = admin_client.get(change_url(finished_task)).context["timeline"]
    items = [item for item, _ in timeline]
    sources = [item.source for item in items]
    for source in ("callback", "poll", "ledger", "notification", "hold", "event"):
        assert source in sources, source
    assert [i.at for i in items] == sorted(i.at for i in items)
    first = {s: sources.index(s) for s in ("callback", "poll", "ledger", "notification")}
    assert first["callback"] < first["poll"] < first["ledger"] <= first["notification"]
    ledger = [(item, link) for item, link in timeline if item.source == "ledger"]
    assert {item.kind for item, _ in ledger} == {"capture"}
    assert sum(item.data["amount_micro"] for item, _ in ledger) == 0  # both legs
    assert all(link.startswith("/admin/billing/ledgertransaction/") for _, link in ledger)
    html = admin_client.get(change_url(finished_task)).content.decode()
    assert "msg_support_1" in html
    assert "signature verified" in html


def test_support_actions_recorded_as_events_are_on_the_timeline(
    admin_client: Client, make_task: Any
) -> None:
    task = make_task(status=Task.Status.FAILED)
    TaskEvent.objects.create(task=task, kind="support_refund", message="by ann: duplicate")
    items = selectors.task_support_timeline(task=task)
    assert [(i.source, i.kind) for i in items] == [("support", "support_refund")]


@pytest.mark.usefixtures("ledger_ok")
def test_diagnosis_of_a_success(admin_client: Client, finished_task: Task) -> None:
    task = finished_task
    diagnosis = admin_client.get(change_url(task)).context["diagnosis"]
    held_at = selectors.clock(
        Hold.objects.get(subject_type="tasks.task", subject_id=str(task.pk)).created_at
    )
    assert diagnosis.text("type").startswith("task type: image generation")
    assert diagnosis.text("credits") == f"credits held {held_at} (2 credits)"
    assert diagnosis.text("provider").startswith(
        f"provider accepted {selectors.clock(task.submitted_at)}"
    )
    assert diagnosis.text("callbacks").startswith("1 callback received, last")
    assert diagnosis.text("polling").startswith("last poll ")
    assert "SUCCEEDED" in diagnosis.text("polling")
    assert "of its 5m 0s timeout" in diagnosis.text("duration")
    assert diagnosis.text("outcome") == "outcome: success; captured 2 credits"
    assert diagnosis.text("correctable") == "user-correctable: not applicable (no failure)"
    assert diagnosis.text("refund") == "refund due before a re-run: no"
    assert diagnosis.text("user").startswith("in the user's history with its results; notified ")
    assert diagnosis.text("user").endswith(", unread)")
    assert not any(line.alarm for line in diagnosis.lines)


@pytest.mark.usefixtures("ledger_ok")
def test_diagnosis_of_a_refunded_failure(
    catalog: None, funded: Any, queued: Any, sandbox: Any
) -> None:
    task = run_to_end(submit(funded(), sandbox_outcome="fail"))
    assert task.status == Task.Status.FAILED

    diagnosis = selectors.task_diagnosis(task=task)

    assert diagnosis.text("outcome") == "outcome: failed (sandbox_failure); released in full"
    assert diagnosis.text("correctable") == f"user-correctable: no ({task.error_kind} failure)"
    assert diagnosis.text("refund") == "refund due before a re-run: no"
    assert diagnosis.text("callbacks") == "no callback received"


def test_diagnosis_of_a_stuck_waiting_task(make_task: Any) -> None:
    task = make_task(created_ago=timedelta(minutes=20), submit_attempts=3, reserved_micro=0)
    task.submit_stuck_at = timezone.now()

    diagnosis = selectors.task_diagnosis(task=task)

    assert diagnosis.text("provider") == "not accepted yet (3 attempts; flags: submit stuck)"
    assert diagnosis.text("duration").startswith("running 20m")
    assert "past its 5m 0s timeout" in diagnosis.text("duration")
    assert diagnosis.text("polling") == "no poll yet"
    assert "not finished (waiting)" in diagnosis.text("outcome")
    assert diagnosis.text("user") == (
        "in the user's history; no notification yet (sent when it finishes)"
    )
    alarms = {line.item for line in diagnosis.lines if line.alarm}
    assert alarms == {"provider", "duration"}


def test_diagnosis_says_what_the_user_sees(make_task: Any) -> None:
    now = timezone.now()
    deleted = make_task(status=Task.Status.FAILED, error_kind="provider")
    deleted.deleted_at = now - timedelta(minutes=3)
    expired = make_task(status=Task.Status.SUCCESS, results=[{"name": "r/x.png"}])
    expired.results_expired_at = now - timedelta(minutes=1)

    gone = selectors.task_diagnosis(task=deleted, now=now).line("user")
    assert gone.text.startswith("history item deleted by the user ")
    assert gone.text.endswith("; no notification sent")
    assert gone.alarm  # a finished task the user was never told about
    assert (
        selectors.task_diagnosis(task=expired, now=now)
        .text("user")
        .startswith("in the user's history, results expired ")
    )


def test_diagnosis_of_a_terminal_task_with_an_open_hold(make_task: Any) -> None:
    task = make_task(status=Task.Status.FAILED, reserved_micro=C, error_kind="provider")
    plant_hold(task)

    diagnosis = selectors.task_diagnosis(task=task)

    assert "hold still open on a terminal task: BREACH" in diagnosis.text("outcome")
    assert diagnosis.text("credits").startswith("credits held ")
    assert "BREACH" in diagnosis.summary


def test_diagnosis_says_a_refund_is_due_for_a_charged_failure(make_task: Any) -> None:
    task = make_task(
        status=Task.Status.FAILED,
        reserved_micro=C,
        charged_micro=C,
        error_kind="user",
        error_message="The prompt was refused.",
    )
    diagnosis = selectors.task_diagnosis(task=task)
    assert diagnosis.text("refund").startswith("refund due before a re-run: yes (1 credit")
    assert diagnosis.text("correctable") == "user-correctable: yes (The prompt was refused.)"


def test_diagnosis_compares_with_the_models_median_run(make_task: Any) -> None:
    now = timezone.now()
    for seconds in (10, 20, 30):
        make_task(
            status=Task.Status.SUCCESS,
            submitted_at=now - timedelta(seconds=seconds),
            finished_at=now,
        )
    task = make_task(
        status=Task.Status.GENERATING,
        submitted_at=now - timedelta(seconds=60),
        created_ago=timedelta(seconds=61),
    )
    text = selectors.task_diagnosis(task=task, now=now).text("duration")
    assert "3.0× this model's median (20s)" in text


# --- previews and the staff result view -------------------------------------------------------


@pytest.mark.usefixtures("ledger_ok")
def test_previews_stream_through_the_staff_result_view(
    admin_client: Client, finished_task: Task
) -> None:
    previews = admin_client.get(change_url(finished_task)).context["previews"]
    assert [p["kind"] for p in previews] == ["image", "image"]
    html = admin_client.get(change_url(finished_task)).content.decode()
    assert f'<img src="{previews[0]["url"]}"' in html

    response = admin_client.get(previews[1]["url"])

    assert response.status_code == 200
    assert response["Content-Type"] == finished_task.results[1]["mime"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Security-Policy"].startswith("sandbox")
    assert b"".join(response.streaming_content)[:8] == b"\x89PNG\r\n\x1a\n"
    assert admin_client.get(previews[1]["url"].replace("/1/", "/2/")).status_code == 404


@pytest.mark.usefixtures("ledger_ok")
def test_result_view_refuses_anyone_but_staff(finished_task: Task) -> None:
    url = reverse("admin:tasks_task_result", args=[finished_task.pk, 0])
    owner = Client()
    owner.force_login(finished_task.user)  # even the task's owner: not staff
    response = owner.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert Client().get(url).status_code == 302


def test_preview_kinds_follow_the_stored_type(admin_client: Client, make_task: Any) -> None:
    results = [
        {"name": "r/a.mp4", "mime": "video/mp4", "bytes": 10},
        {"name": "r/b.wav", "mime": "audio/wav", "bytes": 10},
    ]
    task = make_task(status=Task.Status.SUCCESS, results=results)
    html = admin_client.get(change_url(task)).content.decode()
    assert "<video controls" in html
    assert "<audio controls" in html


# --- query counts -----------------------------------------------------------------------------


_deliveries = itertools.count()


def grow_history(task: Task, n: int) -> None:
    """``n`` more polls, callbacks and notifications (of other kinds) for the task."""
    TaskEvent.objects.bulk_create(
        TaskEvent(
            task=task, kind="polled", message="Upstream status: running.", data={"state": "running"}
        )
        for _ in range(n)
    )
    CallbackDelivery.objects.bulk_create(
        CallbackDelivery(
            provider="sandbox", event_id=f"{task.pk}-{next(_deliveries)}", task=task, payload={}
        )
        for _ in range(n)
    )


@pytest.mark.usefixtures("ledger_ok")
def test_task_page_query_count_does_not_grow_with_the_timeline(
    admin_client: Client, finished_task: Task
) -> None:
    grow_history(finished_task, 5)
    with CaptureQueriesContext(connection) as short:
        assert admin_client.get(change_url(finished_task)).status_code == 200
    grow_history(finished_task, 200)
    with CaptureQueriesContext(connection) as long:
        response = admin_client.get(change_url(finished_task))
    assert len(response.context["timeline"]) > 400
    assert len(long) == len(short)
    assert len(long) <= 15


def test_timeline_selector_is_a_fixed_number_of_queries(
    make_task: Any, django_assert_num_queries: Any
) -> None:
    task = make_task(status=Task.Status.FAILED)
    grow_history(task, 50)
    Notification.objects.create(
        user=task.user,
        kind="generation_failed",
        title="Failed",
        subject_type="tasks.task",
        subject_id=str(task.pk),
    )
    with django_assert_num_queries(5):
        items = selectors.task_support_timeline(task=task)
    assert len(items) == 101


def test_result_view_needs_the_view_permission(make_task: Any, make_user: Any) -> None:
    from django.contrib.auth.models import Permission

    task = make_task(
        status=Task.Status.SUCCESS, results=[{"name": "r/x.png", "mime": "image/png", "bytes": 1}]
    )
    url = reverse("admin:tasks_task_result", args=[task.pk, 0])
    clerk = make_user(is_staff=True)
    client = Client()
    client.force_login(clerk)
    assert client.get(url).status_code == 403
    clerk.user_permissions.add(Permission.objects.get(codename="view_task"))
    assert client.get(url).status_code == 404  # allowed now; this planted file does not exist
    assert client.get(change_url(task)).status_code == 200  # the page, read-only
