"""How a task is shown on the History pages: its results, its state in words, and its timeline
as sentences a person understands."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from django.urls import reverse
from django.utils.text import capfirst

from rivya.money import credits_phrase, format_credits
from rivya.pages.common import fault
from tasks.models import AIModel, Category, Task, TaskEvent


def model_name(task: Task) -> str:
    """The name of the model a task ran on, as the pages show it (its slug if the catalog
    entry is gone)."""
    name = AIModel.objects.filter(pk=task.model_id).values_list("name", flat=True).first()
    return name or task.model_slug


@dataclass(frozen=True)
class Result:
    n: int
    url: str
    mime: str
    bytes: int | None
    width: int | None
    height: int | None
    duration_ms: int | None

    @property
    def kind(self) -> str:
        kind = self.mime.split("/", 1)[0]
        return kind if kind in ("image", "video", "audio") else "file"

    @property
    def describe(self) -> str:
        """'PNG image, 512 × 512, 34 KB' (what a download link says it gets)."""
        parts = [f"{self.mime.split('/', 1)[-1].upper()} {self.kind}"]
        if self.width and self.height:
            parts.append(f"{self.width} × {self.height}")
        if self.duration_ms:
            parts.append(f"{self.duration_ms / 1000:g} s")
        if self.bytes:
            parts.append(_size(self.bytes))
        return ", ".join(parts)


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    return ""  # pragma: no cover


@dataclass
class Shown:
    """A task as History shows it."""

    task: Task
    model_name: str
    now: datetime
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task.status == Task.Status.SUCCESS and not self.expired:
            self.results = [
                Result(
                    n=n,
                    url=reverse("api-task-result", args=[self.task.pk, n]),
                    mime=str(r.get("mime") or "application/octet-stream"),
                    bytes=r.get("bytes"),
                    width=r.get("width"),
                    height=r.get("height"),
                    duration_ms=r.get("duration_ms"),
                )
                for n, r in enumerate(self.task.results)
            ]

    @property
    def running(self) -> bool:
        return self.task.status in Task.UNFINISHED

    @property
    def expired(self) -> bool:
        """Its result files were purged (``Task.results_available``, the rule every page and
        the results API share)."""
        return self.task.status == Task.Status.SUCCESS and not self.task.results_available

    @property
    def expired_on(self) -> datetime | None:
        return self.task.results_expired_at or self.task.expires_at

    @property
    def keeps_results(self) -> bool:
        return self.task.results_available

    @property
    def images(self) -> list[Result]:
        return [r for r in self.results if r.kind == "image"]

    @property
    def players(self) -> list[Result]:
        return [r for r in self.results if r.kind in ("audio", "video")]

    @property
    def error_kind(self) -> str:
        """Whose fault the failure was, in plain words (a cancel is nobody's fault)."""
        task = self.task
        if task.status == Task.Status.CANCELLED or not task.error_code:
            return ""
        return capfirst(fault(task.error_kind))

    @property
    def when(self) -> str:
        return _when(self.task.created_at, self.now)

    @property
    def keeps_for(self) -> str:
        """How long results are kept once finished ('7 days', '12 hours')."""
        seconds = self.task.result_ttl_seconds or 0
        if seconds >= 86400:
            days = round(seconds / 86400, 1)
            return f"{days:g} day" + ("" if days == 1 else "s")
        hours = max(1, round(seconds / 3600))
        return f"{hours} hour" + ("" if hours == 1 else "s")

    @property
    def outcome(self) -> str:
        """One sentence saying where the task stands (announced when it changes)."""
        task = self.task
        match task.status:
            case Task.Status.WAITING:
                return "Waiting: being sent to the provider."
            case Task.Status.GENERATING:
                return "Generating: the provider is working on it."
            case Task.Status.SUCCESS:
                n = len(task.results)
                return "Finished: your result is ready." if n == 1 else f"Finished: {n} results."
            case Task.Status.CANCELLED:
                return "Cancelled." + (
                    f" {credits_phrase(task.refunded_micro)} returned."
                    if task.refunded_micro
                    else ""
                )
        refund = f" {credits_phrase(task.refunded_micro)} returned." if task.refunded_micro else ""
        return f"{task.get_status_display()}: {task.error_message}{refund}"

    @property
    def summary(self) -> str:
        """The short line next to the status badge (details are in the cards below)."""
        task = self.task
        if self.running:
            return self.outcome
        if task.status == Task.Status.SUCCESS:
            n = len(task.results)
            made = "1 result" if n == 1 else f"{n} results"
            return f"Finished: {made}" + (", since expired." if self.expired else ".")
        if task.charged_micro:
            charged, returned = (
                credits_phrase(task.charged_micro),
                format_credits(task.refunded_micro),
            )
            return f"{charged} charged, {returned} returned."
        if task.refunded_micro:
            return f"Nothing charged: {credits_phrase(task.refunded_micro)} returned."
        return "Nothing charged."

    @property
    def category_label(self) -> str:
        return Category(self.task.category).label if self.task.category in Category else ""


def _when(at: datetime, now: datetime) -> str:
    seconds = (now - at).total_seconds()
    if seconds < 45:
        return "just now"
    if seconds < 3600:
        minutes = round(seconds / 60)
        return f"{minutes} min ago"
    if seconds < 6 * 3600:
        hours = int(seconds // 3600)
        return f"{hours} h ago"
    if at.date() == now.date():
        return f"today {at:%H:%M}"
    if at.year == now.year:
        return f"{at:%b} {at.day}, {at:%H:%M}"
    return f"{at:%b} {at.day} {at.year}, {at:%H:%M}"


def _times(n: int) -> str:
    return "once" if n == 1 else "twice" if n == 2 else f"{n} times"


@dataclass(frozen=True)
class Step:
    """One line of the timeline: a sentence, when (a span for grouped events), and its tone."""

    text: str
    at: datetime
    until: datetime | None = None
    tone: str = ""  # ok, bad, warn, or neutral


# Events that repeat while a task runs: consecutive ones are told as one line.
GROUPED = frozenset(
    {
        "polled",
        "poll_failed",
        "callback",
        "submit_error",
        "upstream_not_found",
        "download_failed",
    }
)
# What a provider's job state means, as the end of "Checked with the provider: ...".
JOB_STATES = {
    "queued": "the job was waiting its turn",
    "running": "the job was running",
    "succeeded": "the job was done",
    "failed": "the job had failed",
    "rejected": "the job was refused",
    "cancelled": "the job was cancelled",
}
# Events that say nothing a person needs (workers coordinating among themselves).
SILENT = frozenset({"outputs_busy"})


def _sentence(kind: str, events: Sequence[TaskEvent]) -> tuple[str, str]:
    """The plain-words sentence (and tone) of a run of ``len(events)`` events of ``kind``."""
    last, n = events[-1], len(events)
    data = last.data if isinstance(last.data, dict) else {}
    amount = data.get("amount_micro") or 0
    match kind:
        case "created":
            price = data.get("price_micro") or 0
            return (
                f"You asked for this generation; its price is {credits_phrase(price)}."
                if price
                else "You asked for this generation (free of charge).",
                "",
            )
        case "credits_held":
            return f"{credits_phrase(amount)} set aside from your balance until it finishes.", ""
        case "free":
            return "This model is free: no credits were set aside.", ""
        case "submitted":
            return "Sent to the provider, which accepted the job.", ""
        case "polled":
            if n == 1:
                state = JOB_STATES.get(str(data.get("state") or ""), "")
                return "Checked with the provider" + (f": {state}." if state else "."), ""
            return f"Checked with the provider {_times(n)}.", ""
        case "callback":
            return (
                "The provider reported back."
                if n == 1
                else f"The provider reported back {_times(n)}."
            ), ""
        case "poll_failed":
            return (
                f"Could not reach the provider to check on the job ({_times(n)}); we kept trying.",
                "warn",
            )
        case "callback_failed":
            return (
                "A message from the provider could not be read; we checked by asking instead.",
                "",
            )
        case "submit_error":
            return (
                f"Sending the job to the provider failed ({_times(n)}); we tried again.",
                "warn",
            )
        case "submit_unconfirmed":
            return (
                "The provider could not say whether it received the job. We will ask again; "
                "your credits stay set aside until it is known.",
                "warn",
            )
        case "submit_stuck":
            return (
                "The provider never answered. Our support team will check it; your credits stay "
                "set aside until then.",
                "warn",
            )
        case "upstream_job_absent":
            return "The provider confirmed it never started the job.", ""
        case "upstream_not_found":
            return f"The provider did not recognise the job ({_times(n)}).", "warn"
        case "timeout_unconfirmed":
            return (
                "It ran past the model's time limit; we are waiting for the provider to confirm "
                "it stopped before refunding.",
                "warn",
            )
        case "download_failed":
            return f"Fetching the results from the provider failed ({_times(n)}); retrying.", "warn"
        case "succeeded":
            got, wanted = data.get("outputs"), data.get("requested")
            if got is not None and wanted and got < wanted:
                return f"Finished: {got} of {wanted} results were made.", "ok"
            return (
                "Finished: your result is ready."
                if got == 1
                else f"Finished: your {got} results are ready."
                if got
                else "Finished."
            ), "ok"
        case "credits_captured":
            released = data.get("released_micro") or 0
            text = f"{credits_phrase(amount)} charged."
            if released:
                text += f" {credits_phrase(released)} returned to you for what was not delivered."
            elif last.message and "policy" in last.message.lower():
                text = f"{credits_phrase(amount)} charged, as this model's billing policy says."
            return text, ""
        case "credits_released":
            return f"{credits_phrase(amount)} returned to your balance: you paid nothing.", "ok"
        case "failed":
            return f"It failed: {last.message}" if last.message else "It failed.", "bad"
        case "rejected":
            return (
                f"The request was rejected: {last.message}"
                if last.message
                else "The request was rejected.",
                "bad",
            )
        case "cancelled":
            return last.message or "Cancelled.", "bad"
        case "upstream_cancel_requested":
            return "The provider was told to stop the job.", ""
        case "upstream_cancel_gave_up":
            return "The provider could not be told to stop the job; it changes nothing here.", ""
        case "late_result":
            return "A result arrived after it had finished; it changed nothing.", ""
        case "late_upstream_acceptance":
            return (
                "The provider accepted the job after it had finished here; we told it to stop.",
                "",
            )
        case "results_expired":
            return "The result files were deleted: their keeping period ended.", ""
        case "deleted":
            return "Deleted from your history.", ""
    return (last.message or kind.replace("_", " ").capitalize() + "."), ""


def timeline_steps(events: Iterable[TaskEvent]) -> list[Step]:
    """The timeline in plain words: repeated checks told once with their count, noise left out."""
    runs: list[list[TaskEvent]] = []
    for event in events:
        if event.kind in SILENT:
            continue
        if runs and event.kind in GROUPED and runs[-1][0].kind == event.kind:
            runs[-1].append(event)
        else:
            runs.append([event])
    steps = []
    for run in runs:
        text, tone = _sentence(run[0].kind, run)
        until = run[-1].created_at if len(run) > 1 else None
        steps.append(Step(text=text, at=run[0].created_at, until=until, tone=tone))
    return steps
