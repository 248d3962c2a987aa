"""Reads of tasks, the catalog and uploads; every read of user data filters by the owner."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import (
    Aggregate,
    Avg,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    Q,
    QuerySet,
    Sum,
)
from django.utils import timezone

from rivya.errors import contains_nul
from rivya.money import credits_phrase, format_credits
from tasks.models import AIModel, CallbackDelivery, Category, Task, TaskEvent, Upload


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


def tasks_get_for_user(*, user_id: Any, task_ids: Iterable[Any]) -> dict[str, Task]:
    """The user's own, not deleted tasks among ``task_ids``, by id (the rule of
    ``task_get_for_user``, for many at once: others' and deleted ones are left out)."""
    pks = [pk for pk in (_uuid(t) for t in task_ids) if pk is not None]
    if not pks:
        return {}
    return {
        str(t.pk): t
        for t in Task.objects.filter(pk__in=pks, user_id=user_id, deleted_at__isnull=True)
    }


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


# --- support: one task's whole story and a diagnosis of it (issue 15) -------------------------

TASK_SUBJECT = "tasks.task"  # how billing and notifications refer to a task
RECENT_SUCCESSES = 50  # the successes a model's typical run time is taken from


@dataclass(frozen=True)
class TimelineItem:
    """One thing that happened to a task, from any source, for support's timeline.

    ``source``: "event" (a TaskEvent: transitions, submissions, errors), "poll" (a ``polled`` or
    ``poll_failed`` event), "support" (a ``support_*`` event written by a staff action),
    "callback" (a stored provider delivery), "hold" (credits held / resolved), "ledger" (an
    entry of a ledger transaction about the task) or "notification". ``ref`` is the primary key
    of the row it comes from (admin links are built from it); ``data`` its details."""

    at: datetime
    source: str
    kind: str
    title: str
    detail: str = ""
    data: dict[str, Any] | None = None
    ref: Any = None

    @property
    def sort_key(self) -> tuple[datetime, int, str]:
        return (self.at, _SOURCE_ORDER.get(self.source, 9), str(self.ref))


# Within one instant: what the task recorded first, the money after it, the user's notice last.
_SOURCE_ORDER = {
    "callback": 0,
    "event": 1,
    "poll": 1,
    "support": 1,
    "hold": 2,
    "ledger": 3,
    "notification": 4,
}


def _event_item(event: TaskEvent) -> TimelineItem:
    if event.kind in ("polled", "poll_failed"):
        source = "poll"
    elif event.kind.startswith("support_"):
        source = "support"
    else:
        source = "event"
    return TimelineItem(
        at=event.created_at,
        source=source,
        kind=event.kind,
        title=event.kind.replace("_", " "),
        detail=event.message,
        data=event.data or {},
        ref=event.pk,
    )


def _hold_items(hold: Any) -> list[TimelineItem]:
    data = {
        "amount_micro": hold.amount,
        "captured_micro": hold.captured,
        "status": hold.status,
        "created_at": hold.created_at,
        "resolved_at": hold.resolved_at,
        "account": hold.account_id,
    }
    items = [
        TimelineItem(
            at=hold.created_at,
            source="hold",
            kind="hold_opened",
            title="hold opened",
            detail=f"{credits_phrase(hold.amount)} held",
            data=data,
            ref=hold.pk,
        )
    ]
    if hold.resolved_at is not None:
        detail = (
            f"{credits_phrase(hold.captured)} captured, "
            f"{credits_phrase(hold.amount - hold.captured)} released"
            if hold.status == "captured"
            else "released in full"
        )
        items.append(
            TimelineItem(
                at=hold.resolved_at,
                source="hold",
                kind=f"hold_{hold.status}",
                title=f"hold {hold.status}",
                detail=detail,
                data=data,
                ref=hold.pk,
            )
        )
    return items


def _entry_item(entry: Any) -> TimelineItem:
    txn = entry.transaction
    account = entry.account
    owner = account.user.username if account.user_id else account.kind
    return TimelineItem(
        at=entry.created_at,
        source="ledger",
        kind=txn.kind,
        title=f"ledger {txn.get_kind_display().lower()}",
        detail=f"{format_credits(entry.amount)} credits on {owner}"
        + (f" — {txn.reason}" if txn.reason else ""),
        data={
            "amount_micro": entry.amount,
            "account": owner,
            "account_id": account.pk,
            "user_leg": account.user_id is not None,
            "transaction_id": txn.pk,
            "reason": txn.reason,
            "idempotency_key": txn.idempotency_key,
            "actor": txn.actor_id,
            "reversal_of": txn.reversal_of_id,
        },
        ref=entry.pk,
    )


def task_support_timeline(*, task: Task) -> list[TimelineItem]:
    """Everything that happened to ``task``, oldest first: its events (transitions, submissions,
    polls, support actions), provider callbacks (stored only once their signature verified),
    its credit hold, the ledger entries about it and the notifications about it.

    Five queries whatever the task's history (one per source), so support's page stays as fast
    for a task polled a thousand times."""
    from billing import selectors as billing_selectors
    from notifications import selectors as notification_selectors

    items = [_event_item(e) for e in TaskEvent.objects.filter(task=task).order_by("created_at")]
    items.extend(
        TimelineItem(
            at=delivery.received_at,
            source="callback",
            kind=f"callback_{delivery.status}",
            title=f"callback {delivery.event_id}",
            detail=(
                f"signature verified; {delivery.get_status_display().lower()}, "
                f"{delivery.attempts} attempt{'s' if delivery.attempts != 1 else ''}"
                + (f", processed {delivery.processed_at:%H:%M:%S}" if delivery.processed_at else "")
            ),
            data={
                "event_id": delivery.event_id,
                "status": delivery.status,
                "attempts": delivery.attempts,
                "processed_at": delivery.processed_at,
                "payload": delivery.payload,
            },
            ref=delivery.pk,
        )
        for delivery in CallbackDelivery.objects.filter(task=task).order_by("received_at")
    )
    hold = billing_selectors.hold_for_subject(subject_type=TASK_SUBJECT, subject_id=str(task.pk))
    if hold is not None:
        items.extend(_hold_items(hold))
    items.extend(
        _entry_item(entry)
        for entry in billing_selectors.entries_for_subject(
            subject_type=TASK_SUBJECT, subject_id=task.pk
        )
    )
    items.extend(
        TimelineItem(
            at=n.created_at,
            source="notification",
            kind=n.kind,
            title=f"notification: {n.title}",
            detail=n.body,
            data={"user": n.user_id, "read_at": n.read_at, "link": n.link},
            ref=n.pk,
        )
        for n in notification_selectors.notifications_for_subject(
            subject_type=TASK_SUBJECT, subject_id=task.pk
        )
    )
    items.sort(key=lambda item: item.sort_key)
    return items


class _Median(Aggregate):
    function = "PERCENTILE_CONT"
    template = "%(function)s(0.5) WITHIN GROUP (ORDER BY %(expressions)s)"


def model_typical_run(*, model_slug: str, exclude: Any = None) -> timedelta | None:
    """How long this model's last ``RECENT_SUCCESSES`` successes ran (sent to finished): the
    median on PostgreSQL, the mean elsewhere; None without any. One aggregate query."""
    recent = (
        Task.objects.filter(
            model_slug=model_slug,
            status=Task.Status.SUCCESS,
            submitted_at__isnull=False,
        )
        .exclude(pk=exclude)
        .order_by("-finished_at")
        .annotate(
            run=ExpressionWrapper(
                F("finished_at") - F("submitted_at"), output_field=DurationField()
            )
        )
        .values("run")[:RECENT_SUCCESSES]
    )
    if connection.vendor == "postgresql":
        typical: Any = _Median("run", output_field=DurationField())
    else:
        typical = Avg("run", output_field=DurationField())
    return recent.aggregate(typical=typical)["typical"]


@dataclass(frozen=True)
class DiagnosisLine:
    """One support-checklist item, in words. ``alarm``: something support must act on."""

    # type, credits, provider, callbacks, polling, duration, outcome, user, correctable, refund
    item: str
    text: str
    alarm: bool = False


@dataclass(frozen=True)
class Diagnosis:
    lines: list[DiagnosisLine]

    def line(self, item: str) -> DiagnosisLine:
        return next(line for line in self.lines if line.item == item)

    def text(self, item: str) -> str:
        return next((line.text for line in self.lines if line.item == item), "")

    @property
    def summary(self) -> str:
        return "; ".join(line.text for line in self.lines)


_FLAG_WORDS = (
    ("submit_ambiguous_at", "submit ambiguous"),
    ("submit_unconfirmed_at", "submit unconfirmed"),
    ("submit_stuck_at", "submit stuck"),
    ("timeout_unconfirmed_at", "past timeout, unconfirmed"),
    ("cancel_requested_at", "cancel requested"),
)
_TYPES = {
    Category.IMAGE: "image generation",
    Category.VIDEO: "video generation",
    Category.AUDIO: "audio generation",
    Category.CHAT: "chat turn",
}


def clock(at: datetime, *, now: datetime | None = None) -> str:
    """A time as support reads it: the hour today, the date too otherwise (current timezone)."""
    local = timezone.localtime(at)
    if local.date() == timezone.localtime(now or timezone.now()).date():
        return f"{local:%H:%M:%S}"
    return f"{local:%Y-%m-%d %H:%M:%S}"


def span(delta: timedelta) -> str:
    """A duration in words: "45s", "3m 2s", "2h 5m", "3d 4h"."""
    seconds = max(int(delta.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def task_diagnosis(
    *,
    task: Task,
    timeline: list[TimelineItem] | None = None,
    typical_run: timedelta | None | bool = False,
    now: datetime | None = None,
) -> Diagnosis:
    """Support's checklist for one task, answered in words from the task's fields and its
    timeline (``task_support_timeline``, loaded if not given); the model's typical run time is
    one aggregate query (``model_typical_run``) unless given. Money and flags come from the
    task's fields and its hold, never from counting events."""
    now = now or timezone.now()
    if timeline is None:
        timeline = task_support_timeline(task=task)
    if typical_run is False:
        typical_run = model_typical_run(model_slug=task.model_slug, exclude=task.pk)
    lines = [
        DiagnosisLine(
            "type",
            f"task type: {_TYPES.get(task.category, task.category)} "
            f"({task.model_slug} on {task.provider})",
        ),
        _credits_line(task, timeline, now),
        *(
            [_single_line(task, now)]
            if task.runtime == AIModel.Runtime.SYNC
            else [
                _provider_line(task, now),
                _callbacks_line(timeline, now),
                _polling_line(task, timeline, now),
            ]
        ),
        _duration_line(task, typical_run or None, now),
        _outcome_line(task, timeline),
        _user_sees_line(task, timeline, now),
        _correctable_line(task),
        _refund_line(task, timeline),
    ]
    return Diagnosis(lines=lines)


def _hold_data(timeline: list[TimelineItem]) -> dict[str, Any] | None:
    return next((i.data for i in timeline if i.source == "hold"), None)


def _credits_line(task: Task, timeline: list[TimelineItem], now: datetime) -> DiagnosisLine:
    hold = _hold_data(timeline)
    if hold is not None:
        return DiagnosisLine(
            "credits",
            f"credits held {clock(hold['created_at'], now=now)} "
            f"({credits_phrase(hold['amount_micro'])})",
        )
    if task.reserved_micro:
        return DiagnosisLine(
            "credits",
            f"no hold, yet {credits_phrase(task.reserved_micro)} reserved: BREACH",
            alarm=True,
        )
    if task.error_code == "insufficient_credits":
        return DiagnosisLine("credits", "no hold (refused for credits)")
    if task.price_micro == 0:
        return DiagnosisLine("credits", "no hold (free model)")
    return DiagnosisLine("credits", "no hold (free model / refused for credits)")


def _single_line(task: Task, now: datetime) -> DiagnosisLine:
    """A single task has no upstream job, callbacks or polls: it runs inside its request (or a
    worker's run, with Prefer: respond-async) and must end by its deadline."""
    # In a request the provider is called at the start; a worker calls it when it claims it.
    in_request = task.submitted_at is not None and task.submitted_at == task.started_at
    where = "its request" if in_request else "a worker (Prefer: respond-async)"
    text = f"single {task.get_single_type_display().lower()} task, run inside {where}"
    deadline = task.sync_deadline_at
    if deadline is None:
        return DiagnosisLine("single", text)
    if task.is_finished:
        return DiagnosisLine("single", f"{text}; finished {clock(task.finished_at, now=now)}")
    if deadline < now:
        return DiagnosisLine(
            "single",
            f"{text}; past its deadline ({clock(deadline, now=now)}): its process died, the "
            "reconciler refunds it within seconds",
            alarm=True,
        )
    return DiagnosisLine("single", f"{text}; deadline {clock(deadline, now=now)}")


def _provider_line(task: Task, now: datetime) -> DiagnosisLine:
    flags = [words for field, words in _FLAG_WORDS if getattr(task, field) is not None]
    flagged = f"; flags: {', '.join(flags)}" if flags else ""
    if task.submitted_at is not None:
        return DiagnosisLine(
            "provider",
            f"provider accepted {clock(task.submitted_at, now=now)} "
            f"(job {task.upstream_id or '?'}){flagged}",
            alarm=bool(flags),
        )
    attempts = f"{task.submit_attempts} attempt{'s' if task.submit_attempts != 1 else ''}"
    if task.is_finished:
        return DiagnosisLine("provider", f"never accepted by the provider ({attempts}{flagged})")
    return DiagnosisLine("provider", f"not accepted yet ({attempts}{flagged})", alarm=bool(flags))


def _callbacks_line(timeline: list[TimelineItem], now: datetime) -> DiagnosisLine:
    callbacks = [i for i in timeline if i.source == "callback"]
    if not callbacks:
        return DiagnosisLine("callbacks", "no callback received")
    last = callbacks[-1]
    many = "s" if len(callbacks) != 1 else ""
    return DiagnosisLine(
        "callbacks",
        f"{len(callbacks)} callback{many} received, last {clock(last.at, now=now)} "
        f"({(last.data or {}).get('status')})",
    )


def _polling_line(task: Task, timeline: list[TimelineItem], now: datetime) -> DiagnosisLine:
    polls = [i for i in timeline if i.source == "poll"]
    if not polls:
        return DiagnosisLine("polling", "no poll yet")
    last = polls[-1]
    data = last.data or {}
    answer = (
        str(data.get("state") or "?").upper()
        if last.kind == "polled"
        else f"failed ({data.get('code') or 'error'})"
    )
    many = "s" if task.poll_count != 1 else ""
    count = f" ({task.poll_count} scheduled poll{many})" if task.poll_count else ""
    return DiagnosisLine("polling", f"last poll {clock(last.at, now=now)} {answer}{count}")


def _duration_line(task: Task, typical: timedelta | None, now: datetime) -> DiagnosisLine:
    start = task.submitted_at or task.created_at
    ran = (task.finished_at or now) - start
    timeout = timedelta(seconds=task.timeout_seconds)
    verb = "ran" if task.is_finished else "running"
    past = ran > timeout
    text = (
        f"{verb} {span(ran)}, past its {span(timeout)} timeout"
        if past
        else f"{verb} {span(ran)} of its {span(timeout)} timeout"
    )
    what = "median" if connection.vendor == "postgresql" else "average"
    if typical and typical.total_seconds() > 0:
        ratio = ran / typical
        text += f"; {ratio:.1f}× this model's {what} ({span(typical)})"
    else:
        text += "; no recent success of this model to compare with"
    return DiagnosisLine("duration", text, alarm=past and not task.is_finished)


def _outcome_line(task: Task, timeline: list[TimelineItem]) -> DiagnosisLine:
    outcome = task.get_status_display().lower()
    if task.error_code:
        outcome += f" ({task.error_code})"
    if not task.is_finished:
        outcome = f"not finished ({outcome})"
    hold = _hold_data(timeline)
    alarm = False
    if hold is None:
        settlement = "nothing held, nothing to settle"
    elif hold["status"] == "open":
        if task.is_finished:
            settlement, alarm = "hold still open on a terminal task: BREACH", True
        else:
            settlement = f"{credits_phrase(hold['amount_micro'])} still held (settled at the end)"
    elif hold["status"] == "released":
        settlement = "released in full"
    else:
        rest = hold["amount_micro"] - hold["captured_micro"]
        settlement = f"captured {credits_phrase(hold['captured_micro'])}"
        if rest:
            settlement += f", released {credits_phrase(rest)}"
    reversed_micro = _reversed(timeline)
    if reversed_micro:
        settlement += f"; {credits_phrase(reversed_micro)} given back since (reversal)"
    return DiagnosisLine("outcome", f"outcome: {outcome}; {settlement}", alarm=alarm)


def _user_sees_line(task: Task, timeline: list[TimelineItem], now: datetime) -> DiagnosisLine:
    """What the user has in front of them: the history item (from the task's own
    ``deleted_at`` and ``results_expired_at``) and the notifications sent about the task."""
    if task.deleted_at is not None:
        history = f"history item deleted by the user {clock(task.deleted_at, now=now)}"
    elif task.results_expired_at is not None:
        history = (
            f"in the user's history, results expired {clock(task.results_expired_at, now=now)}"
        )
    elif task.results_available:
        history = "in the user's history with its results"
    else:
        history = "in the user's history"
    notes = [i for i in timeline if i.source == "notification"]
    if notes:
        last = notes[-1]
        read = "read" if (last.data or {}).get("read_at") else "unread"
        notified = f"notified {clock(last.at, now=now)} ({last.kind}, {read})"
    elif task.is_finished:
        notified = "no notification sent"
    else:
        notified = "no notification yet (sent when it finishes)"
    return DiagnosisLine("user", f"{history}; {notified}", alarm=task.is_finished and not notes)


def _correctable_line(task: Task) -> DiagnosisLine:
    if task.status not in (Task.Status.FAILED, Task.Status.REJECTED, Task.Status.CANCELLED):
        return DiagnosisLine("correctable", "user-correctable: not applicable (no failure)")
    if task.error_kind == "user":
        return DiagnosisLine(
            "correctable", f"user-correctable: yes ({task.error_message or task.error_code})"
        )
    side = task.error_kind or "unknown"
    return DiagnosisLine("correctable", f"user-correctable: no ({side} failure)")


def _reversed(timeline: list[TimelineItem]) -> int:
    """Credits given back to the user by reversals of the task's charge (its user legs)."""
    return sum(
        (i.data or {}).get("amount_micro", 0)
        for i in timeline
        if i.source == "ledger" and i.kind == "reversal" and (i.data or {}).get("user_leg")
    )


def _refund_line(task: Task, timeline: list[TimelineItem]) -> DiagnosisLine:
    # ``charged_micro`` stays what the hold captured (``refunded_micro`` is the released rest);
    # a refund after settlement is a reversal in the ledger.
    net = task.charged_micro - _reversed(timeline)
    if net > 0 and task.status in (Task.Status.FAILED, Task.Status.REJECTED):
        return DiagnosisLine(
            "refund",
            f"refund due before a re-run: yes ({credits_phrase(net)} charged for a "
            f"{task.get_status_display().lower()} task)",
            alarm=True,
        )
    if net > 0 and task.status == Task.Status.SUCCESS and not task.results:
        return DiagnosisLine(
            "refund",
            f"refund due before a re-run: yes ({credits_phrase(net)} charged, no output)",
            alarm=True,
        )
    return DiagnosisLine("refund", "refund due before a re-run: no")
