"""The pages shell (signup, login, home, account) and the staff credit adjustment in the admin."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest
from django.contrib.auth import SESSION_KEY, get_user_model
from django.db import IntegrityError, transaction
from django.test import Client

from billing import selectors, services
from billing.models import Account, Entry, Hold, LedgerTransaction
from billing.tests.helpers import assert_ledger_ok
from rivya import services as rivya_services
from rivya.models import ApiKey, hash_api_key

pytestmark = pytest.mark.django_db
C = 1_000_000
PASSWORD = "pw-Secret-123"


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


def available(user: Any) -> int:
    return selectors.balance_for_user(user=user).available


def signup_data(username: str = "newbie") -> dict[str, str]:
    return {
        "username": username,
        "email": f"{username}@example.com",
        "password1": "a-Long-pass-phrase-9",
        "password2": "a-Long-pass-phrase-9",
    }


def by_testid(content: bytes, name: str) -> str:
    match = re.search(rf'data-testid="{name}">([^<]*)<', content.decode())
    assert match, f"no {name} in page"
    return match.group(1).strip()


# --- signup, login, logout ------------------------------------------------------------------


def test_signup_creates_the_user_logs_them_in_and_grants_credits() -> None:
    client = Client()

    response = client.post("/signup/", signup_data())

    assert response.status_code == 302
    assert response["Location"] == "/"
    created = get_user_model().objects.get(username="newbie")
    assert created.email == "newbie@example.com"
    assert created.check_password("a-Long-pass-phrase-9")
    assert client.session[SESSION_KEY] == str(created.pk)
    assert available(created) == 10 * C
    txn = LedgerTransaction.objects.get()
    assert (txn.kind, txn.reason) == ("grant", "Signup grant")
    home = client.get("/")
    assert by_testid(home.content, "available") == "10"
    assert b"Welcome to Rivya" in home.content
    assert_ledger_ok()


def test_signup_grant_follows_the_setting(settings: Any) -> None:
    settings.SIGNUP_GRANT_CREDITS = "3"

    Client().post("/signup/", signup_data())

    assert available(get_user_model().objects.get(username="newbie")) == 3 * C


def test_signup_grant_of_zero_grants_nothing(settings: Any) -> None:
    settings.SIGNUP_GRANT_CREDITS = "0"

    response = Client().post("/signup/", signup_data())

    assert response.status_code == 302
    assert available(get_user_model().objects.get(username="newbie")) == 0
    assert LedgerTransaction.objects.count() == 0


def test_invalid_signup_creates_nothing() -> None:
    client = Client()
    data = {**signup_data(), "password2": "something-else-entirely"}

    response = client.post("/signup/", data)

    assert response.status_code == 200
    assert response.context["form"].errors
    assert not get_user_model().objects.filter(username="newbie").exists()
    assert LedgerTransaction.objects.count() == 0
    assert SESSION_KEY not in client.session


def test_signup_with_an_email_another_account_uses_is_a_form_error() -> None:
    # given an account that signed up with an email
    assert Client().post("/signup/", signup_data("first")).status_code == 302
    client = Client()
    data = {**signup_data("second"), "email": "FIRST@Example.com"}

    # when someone signs up again with that email, in another case
    response = client.post("/signup/", data)

    # then the page says so on the email field: no second account, no second grant
    assert response.status_code == 200
    assert "already exists" in response.context["form"].errors["email"][0]
    assert b"already exists" in response.content
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["first"]
    assert LedgerTransaction.objects.count() == 1
    assert SESSION_KEY not in client.session
    assert_ledger_ok()


def test_signup_losing_a_race_for_the_email_is_a_form_error(monkeypatch: Any) -> None:
    # given a signup that passes validation, and another account taking its email before the
    # insert (the database's unique index decides)
    real = rivya_services.user_signup

    def raced(**kwargs: Any) -> Any:
        real(username="rival", email="NEWBIE@example.com", password=PASSWORD)
        return real(**kwargs)

    monkeypatch.setattr(rivya_services, "user_signup", raced)

    response = Client().post("/signup/", signup_data())

    assert response.status_code == 200
    assert "already exists" in response.context["form"].errors["email"][0]
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["rival"]
    assert LedgerTransaction.objects.count() == 1  # the rival's grant only


def test_accounts_without_an_email_are_not_limited() -> None:
    users = get_user_model().objects

    users.create_user(username="cli1")
    users.create_user(username="cli2", email="")

    assert users.filter(email="").count() == 2


def test_the_database_refuses_an_email_another_account_uses(make_user: Any) -> None:
    make_user("owner", email="owner@example.com")

    with pytest.raises(IntegrityError), transaction.atomic():
        get_user_model().objects.create_user(username="other", email="Owner@EXAMPLE.com")

    assert get_user_model().objects.count() == 1


def test_signup_page_renders() -> None:
    response = Client().get("/signup/")

    assert response.status_code == 200
    assert b'name="password1"' in response.content


def test_login_and_logout(user: Any) -> None:
    client = Client()
    assert client.get("/login/").status_code == 200

    response = client.post("/login/", {"username": user.username, "password": PASSWORD})

    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.session[SESSION_KEY] == str(user.pk)

    response = client.post("/logout/")

    assert response.status_code == 302
    assert SESSION_KEY not in client.session
    assert b"Log in" in client.get("/").content


def test_login_with_a_wrong_password_is_refused(user: Any) -> None:
    client = Client()

    response = client.post("/login/", {"username": user.username, "password": "wrong"})

    assert response.status_code == 200
    assert SESSION_KEY not in client.session


def test_home_shows_the_balance_of_a_logged_in_user(user: Any) -> None:
    services.grant(user=user, amount=12_500_000, reason="x")
    services.hold_create(user=user, amount=2 * C, subject_type="tasks.task", subject_id="t")

    response = logged_in(user).get("/")

    assert response.status_code == 200
    assert by_testid(response.content, "available") == "10.5"
    assert by_testid(response.content, "held") == "2"
    assert by_testid(response.content, "balance") == "12.5"


def test_home_for_visitors_invites_to_sign_up() -> None:
    response = Client().get("/")

    assert response.status_code == 200
    assert b'href="/signup/"' in response.content
    assert b'data-testid="available"' not in response.content


# --- account: API keys ----------------------------------------------------------------------


def test_account_page_needs_login() -> None:
    response = Client().get("/account/")

    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_account_page_creates_a_key_shown_once(user: Any) -> None:
    client = logged_in(user)

    response = client.post("/account/", {"action": "create_key", "name": "laptop"})

    assert response.status_code == 200
    raw = html.unescape(by_testid(response.content, "new-key"))
    key = ApiKey.objects.get(user=user)
    assert key.name == "laptop"
    assert key.key_hash == hash_api_key(raw)
    assert raw not in {key.prefix, key.key_hash, key.name}
    assert rivya_services.api_key_authenticate(raw=raw) == key
    again = client.get("/account/")
    assert raw.encode() not in again.content
    assert f"rv_{key.prefix}_".encode() in again.content


def test_account_page_revokes_a_key(user: Any) -> None:
    new = rivya_services.api_key_create(user=user, name="old")
    client = logged_in(user)

    response = client.post("/account/", {"action": "revoke_key", "prefix": new.api_key.prefix})

    assert response.status_code == 302
    new.api_key.refresh_from_db()
    assert new.api_key.revoked_at is not None
    assert rivya_services.api_key_authenticate(raw=new.raw) is None
    page = client.get("/account/")
    assert b"The key was revoked." in page.content
    assert b"revoked" in page.content


def test_nobody_can_revoke_another_users_key(make_user: Any) -> None:
    alice, mallory = make_user(), make_user()
    alices = rivya_services.api_key_create(user=alice)
    client = logged_in(mallory)

    response = client.post("/account/", {"action": "revoke_key", "prefix": alices.api_key.prefix})

    assert response.status_code == 302
    alices.api_key.refresh_from_db()
    assert alices.api_key.revoked_at is None
    assert rivya_services.api_key_authenticate(raw=alices.raw) == alices.api_key
    assert b"No such API key." in client.get("/account/").content


def test_account_page_lists_only_own_keys_and_history(make_user: Any) -> None:
    alice, bob = make_user(), make_user()
    alices = rivya_services.api_key_create(user=alice)
    bobs = rivya_services.api_key_create(user=bob)
    services.grant(user=alice, amount=C, reason="alice-only-reason")

    content = logged_in(bob).get("/account/").content

    assert bobs.api_key.prefix.encode() in content
    assert alices.api_key.prefix.encode() not in content
    assert b"alice-only-reason" not in content


# --- admin: read-only ledger, staff adjustments ---------------------------------------------


def adjust_url(account: Account) -> str:
    return f"/admin/billing/account/{account.pk}/adjust/"


def form_key(content: bytes) -> str:
    match = re.search(r'name="idempotency_key" value="([^"]+)"', content.decode())
    assert match, "no idempotency key in the form"
    return html.unescape(match.group(1))


@pytest.fixture
def funded(user: Any) -> Account:
    services.grant(user=user, amount=10 * C, reason="x")
    return Account.objects.get(user=user)


def test_staff_opens_the_account_list_and_the_adjust_form(staff: Any, funded: Account) -> None:
    client = logged_in(staff)

    listing = client.get("/admin/billing/account/")
    form = client.get(adjust_url(funded))

    assert listing.status_code == 200
    assert adjust_url(funded).encode() in listing.content
    assert form.status_code == 200
    assert form_key(form.content).startswith("admin-adjust:")
    assert form_key(client.get(adjust_url(funded)).content) != form_key(form.content)


def test_staff_adjustment_goes_through_the_ledger(staff: Any, user: Any, funded: Account) -> None:
    client = logged_in(staff)
    key = form_key(client.get(adjust_url(funded)).content)

    response = client.post(
        adjust_url(funded), {"amount": "-2.5", "reason": "chargeback", "idempotency_key": key}
    )

    assert response.status_code == 302
    assert response["Location"] == "/admin/billing/account/"
    assert available(user) == 7_500_000
    txn = LedgerTransaction.objects.get(kind="adjustment")
    assert (txn.actor_id, txn.reason, txn.idempotency_key) == (staff.pk, "chargeback", key)
    assert sorted(txn.entries.values_list("amount", flat=True)) == [-2_500_000, 2_500_000]
    assert b"Adjusted" in client.get("/admin/billing/account/").content
    assert_ledger_ok()


def test_double_submitted_adjustment_adjusts_once(staff: Any, user: Any, funded: Account) -> None:
    client = logged_in(staff)
    data = {
        "amount": "-2.5",
        "reason": "chargeback",
        "idempotency_key": form_key(client.get(adjust_url(funded)).content),
    }

    first = client.post(adjust_url(funded), data)
    second = client.post(adjust_url(funded), data)

    assert (first.status_code, second.status_code) == (302, 302)
    assert available(user) == 7_500_000
    assert LedgerTransaction.objects.filter(kind="adjustment").count() == 1


def test_two_forms_are_two_adjustments(staff: Any, user: Any, funded: Account) -> None:
    client = logged_in(staff)

    for _ in range(2):
        key = form_key(client.get(adjust_url(funded)).content)
        client.post(adjust_url(funded), {"amount": "1", "reason": "r", "idempotency_key": key})

    assert available(user) == 12 * C


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"amount": "-2.5", "reason": ""}, b"This field is required"),
        ({"amount": "0", "reason": "why"}, b"must not be zero"),
        ({"amount": "1.1234567", "reason": "why"}, b"at most 6 decimal places"),
        ({"amount": "-11", "reason": "why"}, b"Not enough credits"),
    ],
)
def test_refused_adjustment_changes_nothing(
    staff: Any, user: Any, funded: Account, data: dict[str, str], message: bytes
) -> None:
    client = logged_in(staff)
    data = {**data, "idempotency_key": form_key(client.get(adjust_url(funded)).content)}

    response = client.post(adjust_url(funded), data)

    assert response.status_code == 200
    assert message in response.content
    assert available(user) == 10 * C
    assert not LedgerTransaction.objects.filter(kind="adjustment").exists()


def test_non_staff_cannot_reach_the_adjust_view(make_user: Any, user: Any, funded: Account) -> None:
    client = logged_in(make_user())

    got = client.get(adjust_url(funded))
    posted = client.post(
        adjust_url(funded), {"amount": "5", "reason": "me", "idempotency_key": "admin-adjust:x"}
    )

    for response in (got, posted):
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    assert available(user) == 10 * C
    assert not LedgerTransaction.objects.filter(kind="adjustment").exists()


def test_staff_without_the_permission_cannot_adjust(
    make_user: Any, user: Any, funded: Account
) -> None:
    client = logged_in(make_user(is_staff=True))

    response = client.post(
        adjust_url(funded), {"amount": "5", "reason": "me", "idempotency_key": "admin-adjust:y"}
    )

    assert response.status_code == 403
    assert available(user) == 10 * C


def test_system_accounts_cannot_be_adjusted(staff: Any, funded: Account) -> None:
    issuance = Account.objects.get(kind=Account.Kind.ISSUANCE)

    response = logged_in(staff).get(adjust_url(issuance))

    assert response.status_code == 404


@pytest.mark.parametrize("model", ["account", "ledgertransaction", "entry", "hold"])
def test_ledger_admin_has_no_add_change_or_delete(staff: Any, user: Any, model: str) -> None:
    services.grant(user=user, amount=10 * C, reason="x")
    hold = services.hold_create(user=user, amount=C, subject_type="t", subject_id="a")
    pk = {
        "account": Account.objects.get(user=user).pk,
        "ledgertransaction": LedgerTransaction.objects.get().pk,
        "entry": Entry.objects.first().pk,
        "hold": hold.pk,
    }[model]
    client = logged_in(staff)
    base = f"/admin/billing/{model}/"

    listing = client.get(base)

    assert listing.status_code == 200
    assert f'href="{base}add/"'.encode() not in listing.content
    assert client.get(f"{base}add/").status_code == 403
    assert client.get(f"{base}{pk}/delete/").status_code == 403
    assert client.post(f"{base}{pk}/delete/", {"post": "yes"}).status_code == 403
    assert client.post(f"{base}{pk}/change/", {}).status_code == 403
    assert client.get(f"{base}{pk}/change/").status_code == 200  # read-only view
    assert Account.objects.get(user=user).balance == 10 * C
    assert Hold.objects.get(pk=hold.pk).status == Hold.Status.OPEN


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["name", "prefix"])
def test_account_posts_with_nul_characters_are_refused_not_500(
    client: Any, user: Any, field: str
) -> None:
    client.force_login(user)
    action = "create_key" if field == "name" else "revoke_key"

    response = client.post("/account/", {"action": action, field: "bad\x00name"})

    assert response.status_code == 302
    assert not user.api_keys.exists()


@pytest.mark.django_db
def test_a_form_without_its_csrf_token_gets_the_styled_page(user: Any) -> None:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)

    response = client.post("/account/", {"action": "create_key", "name": "x"})

    assert response.status_code == 403
    assert "Please try that again" in response.content.decode()
    assert not user.api_keys.exists()
