"""Reads of tasks, the catalog and uploads; every read of user data filters by the owner."""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Q, QuerySet, Sum
from django.utils import timezone

from rivya.errors import contains_nul
from tasks.models import AIModel, Category, Task, TaskEvent, Upload


def models_enabled() -> QuerySet[AIModel]:
    return AIModel.objects.filter(enabled=True).order_by("category", "name")


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        return None


def task_get_for_user(*, user: Any, task_id: Any) -> Task | None:
    """The user's own, not deleted task, or None (someone else's task is 'not found')."""
    pk = _uuid(task_id)
    if pk is None:
        return None
    return Task.objects.filter(pk=pk, user=user, deleted_at__isnull=True).first()


HISTORY_SEARCH_MAX = 200  # characters of a prompt search


def history_filter_errors(
    *,
    status: str | None = None,
    category: str | None = None,
    model: str | None = None,
    q: str | None = None,
) -> dict[str, list[str]]:
    """What is wrong with these history filters, by field (empty: usable as they are).

    The API (400) and the History page share these rules: a status or category outside its
    choices is an error rather than an empty page, and text the database cannot store (NUL,
    unpaired surrogates) never reaches SQL."""
    errors: dict[str, list[str]] = {}
    if status and status.upper() not in Task.Status.values:
        errors["status"] = [f"One of {', '.join(Task.Status.values)}."]
    if category and category not in Category.values:
        errors["category"] = [f"One of {', '.join(Category.values)}."]
    for name, value in (("model", model), ("q", q)):
        if value and contains_nul(value):
            errors[name] = ["Must not contain NUL characters or unpaired surrogates."]
    if q and len(q) > HISTORY_SEARCH_MAX:
        errors["q"] = [f"At most {HISTORY_SEARCH_MAX} characters."]
    return errors


def history_for_user(
    *,
    user: Any,
    status: str | None = None,
    category: str | None = None,
    model: str | None = None,
    q: str | None = None,
) -> QuerySet[Task]:
    """The user's visible tasks, newest first (served by the ``task_history`` index); ``q``
    searches the prompts, case-insensitively. Filters are checked by ``history_filter_errors``."""
    qs = Task.objects.filter(user=user, deleted_at__isnull=True)
    if status:
        qs = qs.filter(status=status.upper())
    if category:
        qs = qs.filter(category=category)
    if model:
        qs = qs.filter(model_slug=model)
    if q:
        qs = qs.filter(prompt__icontains=q)
    return qs.order_by("-created_at", "-id")


HISTORY_PAGE_SIZE = 20


@dataclass(frozen=True)
class HistoryPage:
    """One page of a history, newest first, with the cursors of its neighbours (None: none)."""

    tasks: list[Task]
    newer: str | None
    older: str | None


MIN_CURSOR_TIME = datetime(2000, 1, 1, tzinfo=UTC)
MAX_CURSOR_TIME = datetime(9000, 1, 1, tzinfo=UTC)


def _cursor(direction: str, task: Task) -> str:
    raw = f"{direction}|{task.created_at.isoformat()}|{task.pk}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _read_cursor(cursor: str) -> tuple[str, datetime, uuid.UUID] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        direction, at, pk = raw.split("|")
        when = datetime.fromisoformat(at)
        if direction not in ("o", "n") or when.tzinfo is None:
            return None
        # In UTC, and within what the database can compare (a crafted offset such as +23:59
        # on year 1 is out of PostgreSQL's range).
        when = when.astimezone(UTC)
        if not MIN_CURSOR_TIME <= when <= MAX_CURSOR_TIME:
            return None
        return direction, when, uuid.UUID(pk)
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError):
        return None


def history_page(
    *,
    user: Any,
    cursor: str | None = None,
    size: int | None = None,
    status: str | None = None,
    category: str | None = None,
    model: str | None = None,
    q: str | None = None,
) -> HistoryPage:
    """A page of ``history_for_user`` by keyset on (created_at, id): one query, no OFFSET and no
    COUNT(*), so the thousandth page costs what the first does. ``cursor`` is a neighbour's
    ``newer`` or ``older``; an unreadable one gives the first page. Tasks arriving meanwhile
    never shift a page (no duplicates, nothing skipped). ``size``: HISTORY_PAGE_SIZE."""
    size = size or HISTORY_PAGE_SIZE
    qs = history_for_user(user=user, status=status, category=category, model=model, q=q)
    position = _read_cursor(cursor) if cursor else None
    if position is None:
        rows = list(qs[: size + 1])
        return HistoryPage(
            tasks=rows[:size],
            newer=None,
            older=_cursor("o", rows[size - 1]) if len(rows) > size else None,
        )
    direction, at, pk = position
    if direction == "o":  # older than the cursor's task: the index read forwards from it
        rows = list(
            qs.filter(created_at__lte=at).filter(Q(created_at__lt=at) | Q(id__lt=pk))[: size + 1]
        )
        tasks = rows[:size]
        return HistoryPage(
            tasks=tasks,
            newer=_cursor("n", tasks[0]) if tasks else None,
            older=_cursor("o", tasks[-1]) if len(rows) > size else None,
        )
    # Newer than the cursor's task: the index read backwards, then put newest first again.
    rows = list(
        qs.filter(created_at__gte=at)
        .filter(Q(created_at__gt=at) | Q(id__gt=pk))
        .order_by("created_at", "id")[: size + 1]
    )
    tasks = rows[:size][::-1]
    return HistoryPage(
        tasks=tasks,
        newer=_cursor("n", tasks[0]) if len(rows) > size else None,
        older=_cursor("o", tasks[-1]) if tasks else None,
    )


def history_filter_models() -> QuerySet[AIModel]:
    """The models a history can be filtered by: every direct-generation model, disabled ones too
    (their tasks stay in people's histories)."""
    return AIModel.objects.filter(direct_generation=True).order_by("category", "name")


def task_timeline(*, task: Task) -> QuerySet[TaskEvent]:
    return TaskEvent.objects.filter(task=task).order_by("created_at", "id")


def upload_get_for_user(*, user: Any, upload_id: Any) -> Upload | None:
    pk = _uuid(upload_id)
    return Upload.objects.filter(pk=pk, user=user).first() if pk else None


# --- the Studio's duplicate-run warning ------------------------------------------------------

# A failed request counts towards "failed again and again" for this long, and from this many.
DUPLICATE_FAILURE_WINDOW = timedelta(hours=6)
DUPLICATE_FAILURES = 2
# How much earlier than the window a failure may have been created (it finished in the window).
DUPLICATE_CREATED_SLACK = timedelta(days=2)


@dataclass(frozen=True)
class DuplicateRuns:
    """The same model and prompt, already running or recently failing, for one user."""

    running: int = 0  # WAITING or GENERATING now
    failed: int = 0  # FAILED or REJECTED within DUPLICATE_FAILURE_WINDOW
    failed_reserved_micro: int = 0  # held for those failures
    failed_refunded_micro: int = 0  # given back for them
    failed_charged_micro: int = 0  # kept for them (a failure policy that charges)

    @property
    def is_running(self) -> bool:
        return self.running > 0

    @property
    def keeps_failing(self) -> bool:
        return self.failed >= DUPLICATE_FAILURES

    @property
    def is_duplicate(self) -> bool:
        return self.is_running or self.keeps_failing

    @property
    def failures_refunded(self) -> bool:
        """Whether those failures cost nothing (refunded in full, or never held)."""
        return self.failed_charged_micro == 0


def duplicate_runs_for_user(*, user: Any, model_slug: str, prompt: str) -> DuplicateRuns:
    """The user's runs of exactly this model and prompt that make another one look like a
    mistake: unfinished ones, and failures (FAILED/REJECTED) finished within the last
    ``DUPLICATE_FAILURE_WINDOW``. The prompt is compared as the submit stores it (stripped).
    Tasks the user deleted from History are not counted.

    Two queries, each on an index, so the cost does not grow with the user's history: the
    unfinished tasks (``task_unfinished_by_user``), and the failures among the tasks created in
    the window widened by ``DUPLICATE_CREATED_SLACK`` (``task_history``; a task finishes at the
    latest a day after its timeout, see TASK_UNCONFIRMED_GRACE)."""
    prompt = (prompt or "").strip()
    if contains_nul(prompt):
        return DuplicateRuns(running=0, failed=0)  # no stored prompt has one; submit refuses it
    since = timezone.now() - DUPLICATE_FAILURE_WINDOW
    same = Task.objects.filter(
        user=user, deleted_at__isnull=True, model_slug=model_slug, prompt=prompt
    )
    running = same.filter(status__in=Task.UNFINISHED).count()
    failed = same.filter(
        status__in=(Task.Status.FAILED, Task.Status.REJECTED),
        created_at__gte=since - DUPLICATE_CREATED_SLACK,
        finished_at__gte=since,
    ).aggregate(
        failed=Count("pk"),
        reserved=Sum("reserved_micro", default=0),
        refunded=Sum("refunded_micro", default=0),
        charged=Sum("charged_micro", default=0),
    )
    return DuplicateRuns(
        running=running,
        failed=failed["failed"],
        failed_reserved_micro=failed["reserved"],
        failed_refunded_micro=failed["refunded"],
        failed_charged_micro=failed["charged"],
    )


def run_is_heavy(*, model: AIModel, price_micro: int) -> bool:
    """A run worth a second thought before repeating it: a video or audio model, or any
    request priced over ``STUDIO_HEAVY_PRICE_MICRO``."""
    return (
        model.category in (Category.VIDEO, Category.AUDIO)
        or price_micro > settings.STUDIO_HEAVY_PRICE_MICRO
    )
