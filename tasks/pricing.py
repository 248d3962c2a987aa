"""What a task costs and how many outputs it asked for: the one place each rule lives.

The submit prices a request with ``task_price``; the outcome charges a partial success with
``partial_charge`` over ``output_count``; ``ledger_check`` recomputes the expected charge of every
SUCCESS with the same functions from the task's own params and policy (never from a value the
outcome code stored), so a mistake in what was stored is seen.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rivya.errors import ValidationFailed
from tasks.models import AIModel

# The most outputs any task can ask for. Catalog schemas bound num_outputs far lower; this keeps a
# malformed stored value (a hand-edited row) from making a charge absurd.
MAX_OUTPUTS = 1000


def output_count(params: Any) -> int:
    """How many outputs a task with these (normalized) params asks for: ``num_outputs``, or 1
    for models without it. An integral float (``3.0``, which JSON Schema accepts as an integer)
    counts as that integer; anything unreadable counts as 1."""
    count = params.get("num_outputs", 1) if isinstance(params, Mapping) else 1
    if isinstance(count, float) and count.is_integer():
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_OUTPUTS:
        return 1
    return count


def task_price(
    *,
    model: AIModel,
    params: Mapping[str, Any],
    durations_ms: Sequence[int],
    characters: int = 0,
) -> int:
    """The task's price in micro-credits, fixed at submit.

    Per-output prices count ``output_count(params)``; per-second prices use the requested
    duration (``duration_s``) or, for models that process an uploaded file (audio isolation),
    the measured duration of the files (``durations_ms``), rounded up to whole seconds.
    Per-character prices (translation, speech) count the ``characters`` of the input text.
    Raises ValidationFailed for per-token models (chat turns are not tasks).
    """
    price = model.price_micro
    kind = model.billing_type
    if kind == AIModel.BillingType.PER_TASK:
        return price
    if kind == AIModel.BillingType.PER_OUTPUT:
        return price * output_count(params)
    if kind == AIModel.BillingType.PER_OUTPUT_SECOND:
        if "duration_s" in params:
            seconds = math.ceil(float(params["duration_s"]))
        else:
            seconds = math.ceil(sum(durations_ms) / 1000) if durations_ms else 1
        return price * max(1, seconds)
    if kind == AIModel.BillingType.PER_CHARACTER:
        return price * max(1, characters)
    raise ValidationFailed(
        {"model": ["This model is billed per token and cannot run as a generation task."]},
        code="model_not_available",
    )


def success_charge(
    *, price_micro: int, params: Any, policy: Any, delivered: int
) -> tuple[int, int]:
    """What a SUCCESS with ``delivered`` outputs is charged, and the output count it is measured
    against: the full price, or floor(price × delivered / requested) when fewer outputs than
    requested were delivered and the policy allows partial success. Returns (charge, requested).
    """
    requested = max(output_count(params), delivered, 1)
    partial_allowed = (
        bool(policy.get("partial_success", True)) if isinstance(policy, Mapping) else True
    )
    if delivered < requested and partial_allowed:
        return price_micro * delivered // requested, requested
    return price_micro, requested
