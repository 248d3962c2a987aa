"""The Dashboard (credits, recent generations and ledger, spend per day), the spend selector,
the signed-out home page with the catalog, and the account page's way into History."""

from __future__ import annotations

import re
from datetime import UTC, timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from billing import selectors, services
from billing.models import LedgerTransaction
from rivya.pages.dashboard import CHART_HEIGHT

pytestmark = pytest.mark.django_db
C = 1_000_000
SUBJECT = "tasks.task"


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


def by_testid(html: str, name: str) -> str:
    match = re.search(rf'data-testid="{name}"[^>]*>([^<]*)<', html)
    assert match, f"no {name} in page"
    return match.group(1).strip()


def charge(user: Any, amount: int, subject: str) -> None:
    """A capture of ``amount`` micro-credits: what a finished generation costs."""
    hold = services.hold_create(user=user, amount=amount, subject_type=SUBJECT, subject_id=subject)
    services.hold_capture(hold=hold, reason=f"{subject} generation")


def bars(html: str) -> list[str]:
    return re.findall(r'<rect class="bar[^"]*"[^>]*>', html)


def bar_height(rect: str) -> float:
    return float(re.search(r'height="([0-9.]+)"', rect).group(1))


# --- the spend selector ---------------------------------------------------------------------


def test_spend_covers_the_last_30_days_ending_today_zero_filled(user: Any) -> None:
    now = timezone.now()

    days = selectors.spend_per_day(user=user, now=now)

    today = now.astimezone(UTC).date()
    assert [d.day for d in days] == [today - timedelta(days=29 - n) for n in range(30)]
    assert all(d.micro == 0 for d in days)


def test_spend_counts_todays_charges_on_today(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="funds")
    charge(user, 2 * C, "t1")
    charge(user, 500_000, "t2")

    days = selectors.spend_per_day(user=user)

    assert days[-1].micro == 2_500_000
    assert sum(d.micro for d in days) == 2_500_000


def test_spend_puts_a_charge_on_its_own_day_and_drops_it_after_30_days(user: Any) -> None:
    # given a charge made today
    services.grant(user=user, amount=10 * C, reason="funds")
    charge(user, 3 * C, "t1")
    now = timezone.now()

    # when seen from later days
    three_days_later = selectors.spend_per_day(user=user, now=now + timedelta(days=3))
    last_day_in = selectors.spend_per_day(user=user, now=now + timedelta(days=29))
    gone = selectors.spend_per_day(user=user, now=now + timedelta(days=30))

    # then it sits on its day, the 30th day back is still in, the 31st is out
    assert [d.micro for d in three_days_later][-4:] == [3 * C, 0, 0, 0]
    assert three_days_later[-4].day == now.astimezone(UTC).date()
    assert last_day_in[0].micro == 3 * C
    assert sum(d.micro for d in gone) == 0


def test_spend_counts_only_this_users_charges(make_user: Any, staff: Any) -> None:
    alice, bob = make_user(), make_user()
    for someone in (alice, bob):
        services.grant(user=someone, amount=10 * C, reason="funds")
    charge(bob, 4 * C, "bobs")
    charge(alice, 1 * C, "alices")
    # grants, adjustments and open holds are not spending
    services.adjust(user=alice, amount=-2 * C, actor=staff, reason="correction")
    services.hold_create(user=alice, amount=1 * C, subject_type=SUBJECT, subject_id="running")

    days = selectors.spend_per_day(user=alice)

    assert sum(d.micro for d in days) == 1 * C


def test_spend_is_net_of_reversed_charges_and_counts_partial_captures(
    user: Any, staff: Any
) -> None:
    services.grant(user=user, amount=10 * C, reason="funds")
    charge(user, 2 * C, "refunded")
    partial = services.hold_create(user=user, amount=3 * C, subject_type=SUBJECT, subject_id="p")
    services.hold_capture(hold=partial, amount=1 * C, reason="partial success")
    released = services.hold_create(user=user, amount=1, subject_type=SUBJECT, subject_id="r")
    services.hold_release(hold=released)
    refunded = LedgerTransaction.objects.get(kind="capture", subject_id="refunded")
    services.reverse(txn=refunded, actor=staff, reason="support refund")

    days = selectors.spend_per_day(user=user)

    assert days[-1].micro == 1 * C


@pytest.mark.parametrize("zone", ["Etc/GMT+12", "Etc/GMT-14"])
def test_spend_days_are_utc_days_whatever_the_time_zone(
    user: Any, settings: Any, zone: str
) -> None:
    # 26 hours apart: at any moment one of these zones is on another date than UTC.
    settings.TIME_ZONE = zone
    services.grant(user=user, amount=10 * C, reason="funds")
    charge(user, 1 * C, "t1")
    now = timezone.now()

    days = selectors.spend_per_day(user=user, now=now)

    assert days[-1].day == now.astimezone(UTC).date()
    assert days[-1].micro == 1 * C


def test_spend_is_one_query(user: Any, django_assert_num_queries: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="funds")
    charge(user, 1 * C, "t1")

    with django_assert_num_queries(1):
        selectors.spend_per_day(user=user)


# --- the dashboard page ---------------------------------------------------------------------


def test_dashboard_needs_login() -> None:
    response = Client().get("/dashboard/")

    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_dashboard_shows_balance_held_and_available(user: Any) -> None:
    services.grant(user=user, amount=12_500_000, reason="welcome")
    services.hold_create(user=user, amount=2 * C, subject_type=SUBJECT, subject_id="t")

    html = logged_in(user).get("/dashboard/").content.decode()

    assert by_testid(html, "available") == "10.5"
    assert by_testid(html, "held") == "2"
    assert by_testid(html, "balance") == "12.5"
    assert by_testid(html, "header-credits") == "10.5 credits"


def test_dashboard_says_how_to_get_more_credits(user: Any) -> None:
    html = logged_in(user).get("/dashboard/").content.decode()

    assert "Ask support to add credits" in html
    assert f"<code>{user.username}</code>" in html


def test_dashboard_lists_the_six_newest_generations_linking_to_their_pages(
    user: Any, make_generation: Any
) -> None:
    # given eight generations of this user: the newest a failure, the one before a success
    services.grant(user=user, amount=100 * C, reason="funds")
    older = [make_generation(user, prompt=f"old {n}") for n in range(6)]
    success = make_generation(user, prompt="a red fox", num_outputs=2)
    failure = make_generation(user, outcome="failed", prompt="a broken kite")

    html = logged_in(user).get("/dashboard/").content.decode()

    shown = re.findall(r'<a class="gen" href="/history/([0-9a-f-]+)/"', html)
    assert shown == [str(t.pk) for t in [failure, success, *reversed(older)][:6]]
    assert "a broken kite" in html
    assert "old 0" not in html
    assert "old 1" not in html
    assert '<span class="status FAILED">Failed</span>' in html
    assert '<span class="status SUCCESS">Success</span>' in html
    # a thumbnail for each successful image still stored, none for the failure
    assert f'src="/api/v1/tasks/{success.pk}/results/0/"' in html
    assert f'src="/api/v1/tasks/{failure.pk}/results/0/"' not in html


def test_dashboard_shows_no_thumbnail_once_results_expired(user: Any, make_generation: Any) -> None:
    from tasks.services import results_expire_due

    services.grant(user=user, amount=10 * C, reason="funds")
    task = make_generation(user)
    type(task).objects.filter(pk=task.pk).update(expires_at=timezone.now())  # retention over
    assert results_expire_due() == 1

    html = logged_in(user).get("/dashboard/").content.decode()

    assert f"/history/{task.pk}/" in html
    assert f"/api/v1/tasks/{task.pk}/results/0/" not in html


def test_dashboard_lists_the_ten_newest_ledger_entries_and_what_they_were_for(
    user: Any, make_generation: Any
) -> None:
    services.grant(user=user, amount=25 * C, reason="Signup grant")
    tasks = [make_generation(user, prompt=f"p{n}") for n in range(10)]

    html = logged_in(user).get("/dashboard/").content.decode()

    table = html.split('data-testid="recent-entries"')[1].split("</table>")[0]
    rows = table.count("<tr>") - 1  # the header row
    assert rows == 10
    assert "Signup grant" not in table  # the 11th newest
    assert "sandbox-image generation" in table
    assert "-1</td>" in table
    assert f'href="/history/{tasks[-1].pk}/"' in table


def test_dashboard_shows_the_grant_as_a_positive_movement(user: Any) -> None:
    services.grant(user=user, amount=12_500_000, reason="Signup grant")

    html = logged_in(user).get("/dashboard/").content.decode()

    assert "Signup grant" in html
    assert "+12.5</td>" in html


def test_dashboard_draws_30_bars_and_a_table_of_the_same_days(user: Any) -> None:
    services.grant(user=user, amount=10 * C, reason="funds")
    charge(user, 2 * C, "t1")

    html = logged_in(user).get("/dashboard/").content.decode()

    drawn = bars(html)
    assert len(drawn) == 30
    assert bar_height(drawn[-1]) == CHART_HEIGHT  # today is the busiest day: full height
    assert all(bar_height(b) == 0 for b in drawn[:-1])
    assert 'role="img"' in html
    assert 'aria-labelledby="spend-title"' in html
    assert by_testid(html, "spend-total") == "2"
    table = html.split('<details class="chart-table">')[1].split("</details>")[0]
    assert table.count("<tr>") == 31  # a header and 30 days


def test_dashboard_shows_only_the_users_own_work_and_money(
    make_user: Any, make_generation: Any
) -> None:
    alice, bob = make_user(), make_user()
    services.grant(user=alice, amount=5 * C, reason="alice funds")
    services.grant(user=bob, amount=7 * C, reason="bob funds")
    bobs = make_generation(bob, prompt="bob's secret")

    html = logged_in(alice).get("/dashboard/").content.decode()

    assert "bob's secret" not in html
    assert str(bobs.pk) not in html
    assert "bob funds" not in html
    assert by_testid(html, "spend-total") == "0"


@pytest.mark.parametrize("size", [5, 60])
def test_dashboard_queries_do_not_grow_with_history(
    user: Any, make_generation: Any, django_assert_num_queries: Any, size: int
) -> None:
    # given `size` finished generations, each with its hold and charge, and `size` grants
    for n in range(size):
        services.grant(user=user, amount=1 * C, reason=f"grant {n}")
        make_generation(user, prompt=f"p{n}")
    client = logged_in(user)

    # session, user, credits, tasks, ledger, spend, unread (header)
    with django_assert_num_queries(7):
        response = client.get("/dashboard/")

    assert response.status_code == 200
    assert len(bars(response.content.decode())) == 30


# --- home and account -----------------------------------------------------------------------


def test_home_shows_a_visitor_the_catalog_by_category_with_prices(
    seeded_catalog: None, django_assert_max_num_queries: Any
) -> None:
    with django_assert_max_num_queries(2):
        response = Client().get("/")

    html = response.content.decode()
    assert response.status_code == 200
    headings = re.findall(r'<h3 id="cat-(\w+)">', html)
    assert headings == ["image", "video", "audio", "chat", "text"]
    image = html.split('data-testid="model-sandbox-image"')[1].split("</li>")[0]
    assert "Sandbox Image" in image
    assert "PNG images drawn from your prompt" in image
    assert " ".join(re.sub(r"<[^>]+>", " ", image).split()).count("1 credit per image") == 1
    video = html.split('data-testid="model-sandbox-video"')[1].split("</li>")[0]
    assert "0.5 credits" in video
    assert "per second" in video
    chat = html.split('data-testid="model-sandbox-chat"')[1].split("</li>")[0]
    assert "10 credits per million input tokens, 30 per million output tokens" in chat
    assert 'href="/signup/"' in html
    assert 'href="/login/"' in html


def test_home_leaves_out_disabled_models(seeded_catalog: None) -> None:
    from tasks.models import AIModel

    AIModel.objects.filter(slug="sandbox-video").update(enabled=False)

    html = Client().get("/").content.decode()

    assert "model-sandbox-video" not in html
    assert 'id="cat-video"' not in html


def test_home_welcomes_a_signed_in_user_with_the_way_to_each_page(
    user: Any, seeded_catalog: None
) -> None:
    html = logged_in(user).get("/").content.decode()

    assert f"Welcome back, {user.username}" in html
    for url in ("/studio/", "/chat/", "/history/", "/dashboard/"):
        assert f'class="shortcut" href="{url}"' in html
    assert 'data-testid="cta-signup"' not in html


def test_account_links_to_history(user: Any) -> None:
    html = logged_in(user).get("/account/").content.decode()

    assert re.search(r'<a href="/history/" data-testid="history-link">', html)
