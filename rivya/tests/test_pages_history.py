"""History: the list (filters, search, keyset pages, thumbnails, expiry), a task's page (results,
credits, error, plain-words timeline, live updates), cancel and delete, old notification links,
another user's ids, and query counts that do not grow with the history."""

from __future__ import annotations

import base64
import html
import json
import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import selectors as billing
from notifications.models import Notification
from rivya.pages.task_display import timeline_steps
from tasks import selectors, services
from tasks.models import Task, TaskEvent

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("seeded_catalog")]
C = 1_000_000
HX = {"HX-Request": "true"}


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


def listed(response: Any) -> list[str]:
    """The task ids of a History page, in order."""
    assert response.status_code == 200, response.content[:500]
    return re.findall(r'<li class="task card" id="task-([0-9a-f-]{36})"', response.content.decode())


def text(response: Any) -> str:
    """The page's visible text, roughly (tags dropped, entities decoded, spaces squeezed)."""
    body = re.sub(r"<script.*?</script>", " ", response.content.decode(), flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def link(response: Any, rel: str) -> str | None:
    match = re.search(rf'rel="{rel}" href="([^"]+)"', response.content.decode())
    return html.unescape(match.group(1)) if match else None


def succeed_with(task: Task, *outputs: tuple[str, int | None]) -> Task:
    """Finish a GENERATING task with outputs of these (mime, duration_ms)."""
    assert services.task_succeed(
        task_id=task.pk,
        outputs=[
            services.StoredOutput(
                name=f"results/{task.pk}/{n}",
                mime=mime,
                bytes=2048,
                width=64 if mime.startswith(("image", "video")) else None,
                height=64 if mime.startswith(("image", "video")) else None,
                duration_ms=duration,
            )
            for n, (mime, duration) in enumerate(outputs)
        ],
    )
    task.refresh_from_db()
    return task


# --- the list -----------------------------------------------------------------------------


def test_history_lists_my_tasks_newest_first_and_never_someone_elses(
    history_user: Any, make_generation: Any
) -> None:
    me, someone = history_user(), history_user()
    mine = [make_generation(me, prompt=f"mine {n}") for n in range(3)]
    theirs = make_generation(someone, prompt="their secret fox")

    response = logged_in(me).get("/history/")

    assert listed(response) == [str(t.pk) for t in reversed(mine)]
    assert "their secret fox" not in response.content.decode()
    assert listed(logged_in(someone).get("/history/")) == [str(theirs.pk)]


def test_history_needs_a_login(history_user: Any) -> None:
    response = Client().get("/history/")

    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_each_task_shows_status_model_prompt_credits_error_and_actions(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    done = make_generation(user, prompt="a lighthouse at dusk", num_outputs=2)
    failed = make_generation(user, "failed", prompt="a storm")
    running = make_generation(user, "generating", prompt="a harbour")

    page = logged_in(user).get("/history/")
    body, words = page.content.decode(), text(page)

    assert listed(page) == [str(running.pk), str(failed.pk), str(done.pk)]
    assert 'class="status SUCCESS"' in body
    assert 'class="status FAILED"' in body
    assert "Sandbox Image" in words
    assert f'href="/history/{done.pk}/"' in body
    assert "Charged 2" in words  # two images at 1 credit
    assert "Refunded 1" in words  # the failure was refunded in full
    assert "The provider failed: It broke." in words
    assert "1 credits held" in words  # still running
    assert f'href="/studio/?rerun={done.pk}"' in body
    # Cancel only while it runs; delete for all, through a confirmation.
    assert f'action="/history/{running.pk}/cancel/"' in body
    assert f'action="/history/{done.pk}/cancel/"' not in body
    assert f'href="/history/{done.pk}/delete/?next=' in body
    # A running row keeps itself current; finished ones do not poll.
    assert f'hx-get="/history/{running.pk}/row/?seen=GENERATING"' in body
    assert f'hx-get="/history/{done.pk}/row/' not in body


def test_thumbnails_and_players_for_results_that_are_kept(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    image = make_generation(user, num_outputs=2)
    speech = succeed_with(
        make_generation(user, "generating", slug="sandbox-speech", duration_s=2),
        ("audio/wav", 2000),
    )
    clip = succeed_with(
        make_generation(user, "generating", slug="sandbox-video", duration_s=1),
        ("video/webm", 1000),
    )

    body = logged_in(user).get("/history/").content.decode()

    for n in (0, 1):
        assert f'<img class="thumb" src="/api/v1/tasks/{image.pk}/results/{n}/"' in body
    assert f'<audio controls preload="metadata" src="/api/v1/tasks/{speech.pk}/results/0/"' in body
    assert re.search(
        rf'<video class="thumb-video" controls preload="metadata" '
        rf'src="/api/v1/tasks/{clip.pk}/results/0/"',
        body,
    )
    assert body.count("Results kept until") == 3


def test_expired_results_are_marked_and_no_longer_shown(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    old = make_generation(user, prompt="an old fox")
    fresh = make_generation(user, prompt="a new fox")
    Task.objects.filter(pk=old.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    assert services.results_expire_due() == 1
    old.refresh_from_db()
    client = logged_in(user)

    page = client.get("/history/")
    task_page = client.get(f"/history/{old.pk}/")

    body = page.content.decode()
    assert f"/api/v1/tasks/{old.pk}/results/" not in body
    assert f"/api/v1/tasks/{fresh.pk}/results/0/" in body
    assert f"Results expired {old.results_expired_at:%b} {old.results_expired_at.day}" in text(page)
    fresh_until = f"{fresh.expires_at:%b} {fresh.expires_at.day}, {fresh.expires_at:%H:%M} UTC"
    assert f"Results kept until {fresh_until}" in text(page)
    assert "The result files were deleted on" in text(task_page)
    assert f"/api/v1/tasks/{old.pk}/results/" not in task_page.content.decode()


def test_expiry_passed_but_not_yet_purged_still_shows_its_results(
    history_user: Any, make_generation: Any
) -> None:
    # The purge runs every 20 s; until it has, the files are there and the results API serves
    # them: every page shows them alike (Task.results_available)
    user = history_user()
    task = make_generation(user)
    Task.objects.filter(pk=task.pk).update(expires_at=timezone.now() - timedelta(seconds=5))

    page = logged_in(user).get("/history/")

    assert "Results expired" not in text(page)
    assert f"/api/v1/tasks/{task.pk}/results/0/" in page.content.decode()
    task.refresh_from_db()
    assert task.results_available


# --- filters and search --------------------------------------------------------------------


def test_filters_by_category_status_model_and_prompt_search(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    fox = make_generation(user, prompt="A Red FOX in snow")
    storm = make_generation(user, "failed", prompt="a storm at sea")
    speech = make_generation(
        user, "waiting", slug="sandbox-speech", prompt="hello fox", duration_s=2
    )
    client = logged_in(user)

    def ids(**query: str) -> list[str]:
        return listed(client.get("/history/", query))

    assert ids(category="audio") == [str(speech.pk)]
    assert ids(status="FAILED") == [str(storm.pk)]
    assert ids(status="failed") == [str(storm.pk)]
    assert ids(model="sandbox-image") == [str(storm.pk), str(fox.pk)]
    assert ids(q="fox") == [str(speech.pk), str(fox.pk)]
    assert ids(q="red fox") == [str(fox.pk)]
    assert ids(q="fox", category="image", status="SUCCESS") == [str(fox.pk)]
    assert ids(q="unicorn") == []
    assert "No generations match these filters." in text(client.get("/history/", {"q": "nope"}))


def test_the_filter_form_has_labels_and_keeps_the_chosen_values(history_user: Any) -> None:
    response = logged_in(history_user()).get(
        "/history/", {"q": "fox", "category": "video", "status": "SUCCESS"}
    )
    body = response.content.decode()

    for field in ("q", "category", "status", "model"):
        assert f'<label for="f-{field}">' in body
    assert 'value="fox"' in body
    assert '<option value="video" selected>' in body
    assert '<option value="SUCCESS" selected>' in body
    assert 'method="get" action="/history/"' in body


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "DONE"}, "status"),
        ({"category": "music"}, "category"),
        ({"model": "x\x00y"}, "model"),
        ({"q": "fox\x00"}, "q"),
        ({"q": "x" * 201}, "q"),
    ],
)
def test_bad_filters_answer_400_naming_the_field(
    history_user: Any, query: dict[str, str], field: str
) -> None:
    response = logged_in(history_user()).get("/history/", query)

    assert response.status_code == 400
    body = response.content.decode()
    assert f'id="f-{field}-error"' in body
    assert 'aria-invalid="true"' in body


def test_htmx_filtering_answers_the_list_only(history_user: Any, make_generation: Any) -> None:
    user = history_user()
    fox = make_generation(user, prompt="a fox")
    make_generation(user, prompt="a cat")

    response = logged_in(user).get(
        "/history/", {"q": "fox"}, headers={**HX, "HX-Target": "history-results"}
    )

    assert listed(response) == [str(fox.pk)]
    body = response.content.decode()
    assert "<header" not in body
    assert '<form class="card filters"' not in body
    assert 'id="history-summary" hx-swap-oob="innerHTML"' in body
    assert "1 generation matching your filters" in text(response)
    assert "HX-Request" in response["Vary"]


# --- pages -------------------------------------------------------------------------------


def test_pages_walk_by_keyset_cursors_both_ways(
    history_user: Any, make_generation: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selectors, "HISTORY_PAGE_SIZE", 2)
    user = history_user()
    made = [str(make_generation(user, "waiting", prompt=f"t{n}").pk) for n in range(5)][::-1]
    client = logged_in(user)

    first = client.get("/history/")
    second = client.get(link(first, "next"))
    third = client.get(link(second, "next"))
    back = client.get(link(second, "prev"))

    assert [listed(p) for p in (first, second, third)] == [made[0:2], made[2:4], made[4:5]]
    assert link(first, "prev") is None
    assert link(third, "next") is None
    assert listed(back) == made[0:2]
    assert link(back, "prev") is None  # the newest page again: nothing newer
    assert listed(client.get(link(third, "prev"))) == made[2:4]


def test_a_page_keeps_its_place_when_new_tasks_arrive(
    history_user: Any, make_generation: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selectors, "HISTORY_PAGE_SIZE", 2)
    user = history_user()
    made = [str(make_generation(user, "waiting").pk) for _ in range(4)][::-1]
    client = logged_in(user)
    first = client.get("/history/")

    make_generation(user, "waiting")  # arrives while the user reads page one
    second = client.get(link(first, "next"))

    assert listed(second) == made[2:4]


def test_page_links_keep_the_filters(
    history_user: Any, make_generation: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selectors, "HISTORY_PAGE_SIZE", 1)
    user = history_user()
    foxes = [str(make_generation(user, "waiting", prompt="fox").pk) for _ in range(2)][::-1]
    make_generation(user, "waiting", prompt="cat")
    client = logged_in(user)

    first = client.get("/history/", {"q": "fox"})
    second = client.get(link(first, "next"))

    assert "q=fox" in link(first, "next")
    assert [listed(first), listed(second)] == [foxes[:1], foxes[1:]]
    assert link(second, "next") is None


def test_an_unreadable_cursor_gives_the_first_page(history_user: Any, make_generation: Any) -> None:
    user = history_user()
    task = make_generation(user, "waiting")

    crafted = [
        base64.urlsafe_b64encode(f"o|{at}|{uuid.uuid4()}".encode()).decode().rstrip("=")
        for at in (
            "0001-01-01T00:00:00+23:59",
            "0001-01-01T00:00:00-23:59",
            "9999-12-31T23:59:59-23:59",
        )
    ]
    for cursor in ("garbage", "bzp8eA", "é", "o|x|y", *crafted):
        assert listed(logged_in(user).get("/history/", {"cursor": cursor})) == [str(task.pk)]


def test_pages_are_read_by_keyset_without_offset_or_count(
    history_user: Any, make_generation: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selectors, "HISTORY_PAGE_SIZE", 2)
    user = history_user()
    for _ in range(5):
        make_generation(user, "waiting")
    client = logged_in(user)
    first = client.get("/history/")

    with CaptureQueriesContext(connection) as ctx:
        client.get(link(first, "next"))

    task_reads = [q["sql"] for q in ctx.captured_queries if '"ai_task"' in q["sql"]]
    assert len(task_reads) == 1
    sql = task_reads[0].upper()
    assert "OFFSET" not in sql
    assert "COUNT(" not in sql
    assert '"AI_TASK"."CREATED_AT" <=' in sql
    assert 'ORDER BY "AI_TASK"."CREATED_AT" DESC, "AI_TASK"."ID" DESC' in sql


def test_the_history_renders_in_a_constant_number_of_queries(
    history_user: Any,
    make_generation: Any,
    monkeypatch: pytest.MonkeyPatch,
    django_assert_num_queries: Any,
) -> None:
    monkeypatch.setattr(selectors, "HISTORY_PAGE_SIZE", 100)  # every task on the one page
    user = history_user()
    outcomes = ["success", "failed", "waiting", "generating"]

    def add(n: int) -> None:
        for i in range(n):
            make_generation(user, outcomes[i % 4], num_outputs=1 + i % 3)

    add(5)
    client = logged_in(user)
    client.get("/history/")  # sessions and the like settle
    with CaptureQueriesContext(connection) as ctx:
        assert len(listed(client.get("/history/"))) == 5
    with_five = len(ctx)
    add(55)

    with django_assert_num_queries(with_five):
        assert len(listed(client.get("/history/"))) == 60
    assert with_five <= 7  # session, user, header credits and unread, models, tasks


# --- one task ----------------------------------------------------------------------------


def test_the_task_page_shows_results_downloads_credits_expiry_and_timeline(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    task = make_generation(user, prompt="two foxes", num_outputs=2)

    response = logged_in(user).get(f"/history/{task.pk}/")

    assert response.status_code == 200
    body, words = response.content.decode(), text(response)
    for n in (0, 1):
        assert f'<img src="/api/v1/tasks/{task.pk}/results/{n}/"' in body
        assert f'<a href="/api/v1/tasks/{task.pk}/results/{n}/" download>' in body
    assert "PNG image, 64 × 64, 100 bytes" in words
    assert re.search(r"Price 2 Set aside 2 Charged 2 Refunded 0", words)
    assert "Results are kept until" in words
    assert "You asked for this generation; its price is 2 credits." in words
    assert "2 credits set aside from your balance until it finishes." in words
    assert "Sent to the provider, which accepted the job." in words
    assert "Finished: your 2 results are ready." in words
    assert "2 credits charged." in words
    assert "hx-trigger" not in body.split('id="task-live"')[1].split(">")[0]  # finished: no poll


def test_the_task_page_says_whose_side_a_failure_was_on(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    client = logged_in(user)
    cases = {
        "user": "A problem with the request",
        "provider": "The provider failed",
        "infra": "A problem on our side",
    }
    for kind, words in cases.items():
        task = make_generation(user, "waiting")
        services.task_fail(task_id=task.pk, code="bad", message=f"Broken ({kind}).", kind=kind)

        page = text(client.get(f"/history/{task.pk}/"))

        assert f"What went wrong Broken ({kind})." in page
        assert f"Whose side: {words} (bad)" in page
        assert f"It failed: Broken ({kind})." in page
        assert "1 credit returned to your balance: you paid nothing." in page
        assert "Price 1 Set aside 1 Charged 0 Refunded 1" in page


def test_repeated_checks_are_told_once_with_their_count(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    task = make_generation(user, "generating")
    for _ in range(12):
        TaskEvent.objects.create(task=task, kind="polled", data={"state": "running"})
    TaskEvent.objects.create(task=task, kind="outputs_busy")
    TaskEvent.objects.create(task=task, kind="callback", data={"state": "succeeded"})

    page = text(logged_in(user).get(f"/history/{task.pk}/"))

    assert "Checked with the provider 12 times." in page
    assert "The provider reported back." in page
    assert "Another worker" not in page
    assert "Upstream status" not in page


def test_timeline_sentences() -> None:
    at = timezone.now()

    def ev(kind: str, message: str = "", **data: Any) -> TaskEvent:
        return TaskEvent(kind=kind, message=message, data=data, created_at=at)

    steps = timeline_steps(
        [
            ev("created", price_micro=C // 2),
            ev("credits_held", amount_micro=C // 2),
            ev("submit_error", "boom"),
            ev("submit_error", "boom"),
            ev("submitted"),
            ev("polled", state="running"),
            ev("succeeded", outputs=1, requested=2),
            ev("credits_captured", amount_micro=C // 4, released_micro=C // 4),
            ev("results_expired"),
            ev("some_new_kind"),
            ev("some_other_kind", "Said by the service."),
        ]
    )

    assert [(s.text, s.tone) for s in steps] == [
        ("You asked for this generation; its price is 0.5 credits.", ""),
        ("0.5 credits set aside from your balance until it finishes.", ""),
        ("Sending the job to the provider failed (twice); we tried again.", "warn"),
        ("Sent to the provider, which accepted the job.", ""),
        ("Checked with the provider: the job was running.", ""),
        ("Finished: 1 of 2 results were made.", "ok"),
        ("0.25 credits charged. 0.25 credits returned to you for what was not delivered.", ""),
        ("The result files were deleted: their keeping period ended.", ""),
        ("Some new kind.", ""),
        ("Said by the service.", ""),
    ]
    assert steps[2].until == at


def test_a_running_task_page_polls_until_it_finishes(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    task = make_generation(user, "generating")
    client = logged_in(user)

    page = client.get(f"/history/{task.pk}/").content.decode()
    still = client.get(f"/history/{task.pk}/live/?seen=GENERATING", headers=HX)
    succeed_with(Task.objects.get(pk=task.pk), ("image/png", None))
    done = client.get(f"/history/{task.pk}/live/?seen=GENERATING", headers=HX)

    assert f'hx-get="/history/{task.pk}/live/?seen=GENERATING" hx-trigger="every 2s"' in page
    assert 'id="task-announce" class="visually-hidden" aria-live="polite"' in page
    assert 'hx-trigger="every 2s"' in still.content.decode()
    assert "HX-Trigger" not in still
    assert "hx-swap-oob" not in still.content.decode()
    done_body = done.content.decode()
    assert "hx-trigger" not in done_body
    assert '<span id="task-announce" hx-swap-oob="innerHTML">Finished: your result is ready.' in (
        done_body
    )
    assert "rivya:changed" in done["HX-Trigger"]
    assert f"/api/v1/tasks/{task.pk}/results/0/" in done_body


def test_a_running_row_reports_when_it_finished(history_user: Any, make_generation: Any) -> None:
    user = history_user()
    task = make_generation(user, "generating")
    client = logged_in(user)
    succeed_with(task, ("image/png", None))

    row = client.get(f"/history/{task.pk}/row/?seen=GENERATING", headers=HX)

    assert listed(row) == [str(task.pk)]
    assert 'class="status SUCCESS"' in row.content.decode()
    assert "rivya:changed" in row["HX-Trigger"]
    assert '<span id="history-live" hx-swap-oob="innerHTML">“a lighthouse at dusk” — Finished' in (
        row.content.decode()
    )
    still = client.get(f"/history/{task.pk}/row/?seen=SUCCESS", headers=HX)
    assert "HX-Trigger" not in still
    assert "history-live" not in still.content.decode()


# --- ownership and old links ----------------------------------------------------------------


def test_someone_elses_task_is_a_404_everywhere_and_left_alone(
    history_user: Any, make_generation: Any
) -> None:
    owner, other = history_user(), history_user()
    task = make_generation(owner, "generating")
    client = logged_in(other)

    for url in ("", "live/", "row/", "delete/"):
        response = client.get(f"/history/{task.pk}/{url}")
        assert response.status_code == 404, url
        assert "We could not find that page" in response.content.decode()
    assert client.post(f"/history/{task.pk}/cancel/").status_code == 404
    assert client.post(f"/history/{task.pk}/delete/").status_code == 404
    assert client.get("/history/00000000-0000-0000-0000-000000000000/").status_code == 404
    task.refresh_from_db()
    assert (task.status, task.deleted_at) == (Task.Status.GENERATING, None)
    assert str(task.pk) not in client.get("/history/").content.decode()


def test_notifications_link_to_the_task_page(history_user: Any, make_generation: Any) -> None:
    user = history_user()
    task = make_generation(user)

    note = Notification.objects.get(subject_id=str(task.pk), kind="generation_success")

    assert services.task_link(task.pk) == f"/history/{task.pk}/"
    assert note.link == f"/history/{task.pk}/"
    assert logged_in(user).get(note.link).status_code == 200


def test_old_notification_links_redirect_to_the_task_page(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    task = make_generation(user)
    client = logged_in(user)

    response = client.get(f"/history/?task={task.pk}")

    assert response.status_code == 302
    assert response["Location"] == f"/history/{task.pk}/"
    assert client.get("/history/?task=not-a-uuid").status_code == 404
    other = logged_in(history_user())
    assert other.get(f"/history/?task={task.pk}", follow=True).status_code == 404


# --- cancel and delete --------------------------------------------------------------------


def test_cancel_from_the_list_refunds_and_answers_the_row(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user(credits=10)
    task = make_generation(user, "generating")
    assert billing.balance_for_user(user=user).available == 9 * C

    response = logged_in(user).post(
        f"/history/{task.pk}/cancel/", {"from": "row", "next": "/history/"}, headers=HX
    )

    task.refresh_from_db()
    assert task.status == Task.Status.CANCELLED
    assert billing.balance_for_user(user=user).available == 10 * C
    assert listed(response) == [str(task.pk)]
    assert 'class="status CANCELLED"' in response.content.decode()
    assert "Cancelled. 1 credit returned to your balance." in text(response)
    assert "rivya:changed" in response["HX-Trigger"]


def test_cancel_on_the_task_page_answers_its_live_part(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    task = make_generation(user, "waiting")

    response = logged_in(user).post(f"/history/{task.pk}/cancel/", {"from": "page"}, headers=HX)

    body = response.content.decode()
    assert '<div id="task-live"' in body
    assert "hx-trigger" not in body
    assert "Cancelled by you." in text(response)
    assert 'id="task-announce" hx-swap-oob="innerHTML">Cancelled. 1 credit returned.' in body
    assert json.loads(response["HX-Trigger"]) == {"rivya:changed": True}


def test_cancel_without_javascript_goes_back_with_a_message(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    task = make_generation(user, "generating")
    client = logged_in(user)

    response = client.post(f"/history/{task.pk}/cancel/", {"next": "/history/?status=CANCELLED"})

    assert response.status_code == 302
    assert response["Location"] == "/history/?status=CANCELLED"
    page = client.get(response["Location"])
    assert listed(page) == [str(task.pk)]
    assert "Cancelled. 1 credit returned to your balance." in text(page)


def test_cancel_refuses_to_send_anyone_elsewhere(history_user: Any, make_generation: Any) -> None:
    user = history_user()
    task = make_generation(user, "generating")

    response = logged_in(user).post(
        f"/history/{task.pk}/cancel/", {"next": "https://evil.example/history/"}
    )

    assert response["Location"] == "/history/"


def test_cancelling_a_finished_task_says_it_had_finished(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    task = make_generation(user)
    client = logged_in(user)

    response = client.post(f"/history/{task.pk}/cancel/", follow=True)

    assert "It had already finished (success)." in text(response)
    task.refresh_from_db()
    assert task.status == Task.Status.SUCCESS


def test_cancel_needs_a_post(history_user: Any, make_generation: Any) -> None:
    user = history_user()
    task = make_generation(user, "generating")

    assert logged_in(user).get(f"/history/{task.pk}/cancel/").status_code == 405
    task.refresh_from_db()
    assert task.status == Task.Status.GENERATING


def test_delete_asks_for_confirmation_first(history_user: Any, make_generation: Any) -> None:
    user = history_user()
    task = make_generation(user, prompt="a fox to delete")
    client = logged_in(user)

    confirm = client.get(f"/history/{task.pk}/delete/?next=/history/%3Fq%3Dfox")

    assert confirm.status_code == 200
    assert "Delete this generation?" in text(confirm)
    assert f'<form method="post" action="/history/{task.pk}/delete/"' in confirm.content.decode()
    assert 'name="next" value="/history/?q=fox"' in confirm.content.decode()
    task.refresh_from_db()
    assert task.deleted_at is None  # asking deletes nothing
    listing = client.get("/history/").content.decode()
    assert '<dialog id="delete-dialog"' in listing
    assert f'data-delete="/history/{task.pk}/delete/"' in listing


def test_a_confirmed_delete_hides_the_task(history_user: Any, make_generation: Any) -> None:
    user = history_user()
    kept = make_generation(user)
    task = make_generation(user, prompt="a fox to delete")
    client = logged_in(user)

    response = client.post(f"/history/{task.pk}/delete/", {"next": "/history/?q=fox"})

    assert response.status_code == 302
    assert response["Location"] == "/history/?q=fox"
    page = client.get("/history/")
    assert listed(page) == [str(kept.pk)]
    assert "Deleted from your history." in text(page)
    assert client.get(f"/history/{task.pk}/").status_code == 404


def test_deleting_from_its_own_page_goes_back_to_history(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user()
    task = make_generation(user)

    response = logged_in(user).post(f"/history/{task.pk}/delete/", {"next": f"/history/{task.pk}/"})

    assert response["Location"] == "/history/"


def test_deleting_a_running_task_cancels_it_refunded(
    history_user: Any, make_generation: Any
) -> None:
    user = history_user(credits=10)
    task = make_generation(user, "generating")

    response = logged_in(user).post(f"/history/{task.pk}/delete/", headers=HX)

    task.refresh_from_db()
    assert (task.status, task.deleted_at is not None) == (Task.Status.CANCELLED, True)
    assert billing.balance_for_user(user=user).available == 10 * C
    assert response.status_code == 200
    assert '<span id="history-live" hx-swap-oob="innerHTML">Deleted from your history.' in (
        response.content.decode()
    )
    assert "rivya:changed" in response["HX-Trigger"]


def test_the_task_page_renders_in_a_bounded_number_of_queries(
    history_user: Any, make_generation: Any, django_assert_max_num_queries: Any
) -> None:
    user = history_user()
    task = make_generation(user, num_outputs=4)
    client = logged_in(user)
    client.get(f"/history/{task.pk}/")
    with CaptureQueriesContext(connection) as ctx:
        client.get(f"/history/{task.pk}/")
    few_events = len(ctx)
    TaskEvent.objects.bulk_create(
        TaskEvent(task=task, kind=kind, data={"state": "running"})
        for kind in ["polled", "callback", "poll_failed"] * 100
    )

    with django_assert_max_num_queries(few_events):
        assert client.get(f"/history/{task.pk}/").status_code == 200
    with django_assert_max_num_queries(few_events):
        assert client.get(f"/history/{task.pk}/live/?seen=SUCCESS", headers=HX).status_code == 200
    assert few_events <= 8
