"""The Dashboard: credits, recent generations and ledger, spend per day."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import path
from django.utils import timezone

from billing import selectors as billing
from tasks import selectors as tasks
from tasks.services import SUBJECT

RECENT_TASKS = 6
RECENT_ENTRIES = 10
SPEND_DAYS = 30
# Younger than this reads "just now" rather than "0 minutes ago".
JUST_NOW = timedelta(minutes=1)

# The chart's drawing box, in SVG units: the SVG stretches to its container's width.
CHART_WIDTH = 600
CHART_HEIGHT = 150
BAR_GAP = 4


@dataclass(frozen=True)
class Bar:
    day: date
    micro: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class SpendChart:
    days: list[billing.DaySpend]
    bars: list[Bar]
    total: int
    peak: billing.DaySpend | None  # the busiest day, if anything was spent
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT

    @property
    def ticks(self) -> list[date]:
        """The dates written under the chart: first, middle and last day."""
        if not self.days:
            return []
        picks = sorted({0, len(self.days) // 2, len(self.days) - 1})
        return [self.days[n].day for n in picks]


def spend_chart(days: list[billing.DaySpend]) -> SpendChart:
    """Bar geometry: heights relative to the busiest day; a small charge stays visible."""
    peak = max(days, key=lambda d: d.micro, default=None)
    top = peak.micro if peak and peak.micro > 0 else 0
    slot = CHART_WIDTH / max(len(days), 1)
    bars = []
    for n, d in enumerate(days):
        height = max(round(CHART_HEIGHT * d.micro / top, 1), 2.0) if top and d.micro > 0 else 0
        bars.append(
            Bar(
                day=d.day,
                micro=d.micro,
                x=round(n * slot + BAR_GAP / 2, 1),
                y=round(CHART_HEIGHT - height, 1),
                width=round(slot - BAR_GAP, 1),
                height=height,
            )
        )
    return SpendChart(
        days=days, bars=bars, total=sum(d.micro for d in days), peak=peak if top else None
    )


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    credits = billing.balance_for_user(user=request.user)
    return render(
        request,
        "pages/dashboard.html",
        {
            "credits": credits,
            # The header shows the same figures: one read, not two.
            "header_credits": credits,
            "recent_tasks": list(tasks.history_for_user(user=request.user)[:RECENT_TASKS]),
            "entries": list(billing.ledger_for_user(user=request.user)[:RECENT_ENTRIES]),
            "chart": spend_chart(billing.spend_per_day(user=request.user, days=SPEND_DAYS)),
            "spend_days": SPEND_DAYS,
            "task_subject": SUBJECT,
            "just_now": timezone.now() - JUST_NOW,
        },
    )


urlpatterns = [
    path("dashboard/", dashboard, name="dashboard"),
]
