"""Fixtures of the pages tests (each page's engineer appends; nothing here is renamed)."""

from __future__ import annotations

from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import pytest

# --- Dashboard and Notifications pages ------------------------------------------------------


class _AcceptingProvider:
    """A provider that accepts every submit: tasks reach GENERATING without any HTTP."""

    def submit(self, request: Any) -> Any:
        from tasks.providers.base import SubmitResult

        return SubmitResult(upstream_id=f"job-{request.idempotency_key}")


@pytest.fixture
def seeded_catalog(db: Any) -> None:
    from tasks.catalog import seed_catalog

    seed_catalog()


@pytest.fixture
def make_generation(seeded_catalog: None, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """``make_generation(user, outcome="success", slug="sandbox-image", prompt=..., **params)``:
    a task submitted and settled through the services (nothing queued, no provider called).
    Outcomes: "waiting", "generating", "success" (image results stored by name only) or
    "failed" (refunded). The user needs the credits."""
    from tasks import services
    from tasks.services import enqueue, upstream

    monkeypatch.setattr(enqueue, "submit", lambda task_id: None)
    monkeypatch.setattr(upstream, "get_provider", lambda name: _AcceptingProvider())

    def make(
        user: Any,
        outcome: str = "success",
        slug: str = "sandbox-image",
        prompt: str = "a lighthouse at dusk",
        **params: Any,
    ) -> Any:
        submitted = services.task_submit(user=user, model_slug=slug, prompt=prompt, params=params)
        assert submitted.accepted, submitted
        task = submitted.task
        if outcome == "failed":
            services.task_fail(
                task_id=task.pk, code="upstream_error", message="It broke.", kind="provider"
            )
        elif outcome != "waiting":
            services.task_send_upstream(task_id=task.pk)
        if outcome == "success":
            outputs = [
                services.StoredOutput(
                    name=f"results/{task.pk}/{n}.png",
                    mime="image/png",
                    bytes=100,
                    width=64,
                    height=64,
                    duration_ms=None,
                )
                for n in range(task.params.get("num_outputs", 1))
            ]
            assert services.task_succeed(task_id=task.pk, outputs=outputs)
        task.refresh_from_db()
        return task

    return make


# --- History pages --------------------------------------------------------------------------


@pytest.fixture
def history_user(make_user: Any, settings: Any, tmp_path: Any) -> Callable[..., Any]:
    """``history_user(credits=1000)``: a user with credits, room for many unfinished tasks, and
    result files under a temporary MEDIA_ROOT."""
    from billing import services as billing

    settings.TASK_MAX_RUNNING_PER_USER = 1000
    settings.MEDIA_ROOT = str(tmp_path / "media")

    def make(credits: int = 1000) -> Any:
        some_user = make_user()
        if credits:
            billing.grant(user=some_user, amount=credits * 1_000_000, reason="history tests")
        return some_user

    return make


# --- Studio page ----------------------------------------------------------------------------


@pytest.fixture
def studio_queued(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """What the Studio's submits and cancels hand to Celery after commit, recorded instead of
    sent (task ids)."""
    from tasks.services import enqueue

    calls: dict[str, list[str]] = {"submit": [], "cancel": []}
    monkeypatch.setattr(enqueue, "submit", lambda task_id: calls["submit"].append(str(task_id)))
    monkeypatch.setattr(
        enqueue,
        "cancel_upstream",
        lambda task_id, upstream_id=None: calls["cancel"].append(str(task_id)),
    )
    return calls


@pytest.fixture
def studio_user(make_user: Any, seeded_catalog: None) -> Callable[..., Any]:
    """``studio_user(credits=10)``: a new user holding that many credits (catalog seeded)."""
    from billing import services as billing

    def make(credits: int = 10) -> Any:
        some_user = make_user()
        if credits:
            billing.grant(user=some_user, amount=credits * 1_000_000, reason="studio tests")
        return some_user

    return make


# --- Form controls (Studio and Chat pages) -----------------------------------------------------


class FormControls(HTMLParser):
    """The form controls of a page and the ``for`` of its labels."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict[str, str | None]] = []
        self.label_for: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("input", "select", "textarea") and a.get("type") != "hidden":
            self.controls.append({"tag": tag, **a})
        if tag == "label" and a.get("for"):
            self.label_for.add(a["for"] or "")


@pytest.fixture
def form_controls() -> Callable[[str | bytes], FormControls]:
    """``form_controls(html)``: the page's form controls and the ids its labels name."""

    def parse(html: str | bytes) -> FormControls:
        parser = FormControls()
        parser.feed(html.decode() if isinstance(html, bytes) else html)
        return parser

    return parse
