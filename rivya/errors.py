"""Domain errors shared by every app.

Each carries a stable ``code``, a human ``message``, a ``kind`` (``user``: the user can correct
it; ``provider``: an upstream failed; ``infra``: we failed) and the HTTP status the API answers
with. Services raise them; ``rivya.exceptions.api_exception_handler`` renders them.
"""

from __future__ import annotations

import re
from typing import Any


class DomainError(Exception):
    code = "error"
    message = "Something went wrong."
    kind = "user"
    status = 400

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        kind: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.message = message or self.message
        self.code = code or self.code
        self.status = status or self.status
        self.kind = kind or self.kind
        self.extra = extra or {}
        super().__init__(self.message)

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "kind": self.kind, **self.extra}


class InvalidAmount(DomainError):
    code = "invalid_amount"
    message = "The amount is not valid."


class InsufficientCredits(DomainError):
    code = "insufficient_credits"
    message = "Not enough credits available. Add credits or lower the cost of the request."
    status = 402


class IdempotencyKeyReused(DomainError):
    code = "idempotency_key_reused"
    message = "This idempotency key was already used with different arguments."
    status = 422


class IdempotencyInProgress(DomainError):
    code = "idempotency_in_progress"
    message = "A request with this idempotency key is still being processed; retry shortly."
    status = 409


class HoldAlreadyResolved(DomainError):
    code = "hold_already_resolved"
    message = "This hold was already captured or released."
    status = 409


class NotReversible(DomainError):
    code = "not_reversible"
    message = "This ledger transaction cannot be reversed."
    status = 409


class ReasonRequired(DomainError):
    code = "reason_required"
    message = "A reason is required."


class NotFound(DomainError):
    code = "not_found"
    message = "Not found."
    status = 404


class ValidationFailed(DomainError):
    """Input refused before anything is recorded: 400 with per-field messages."""

    code = "validation_error"
    message = "The request is not valid."

    def __init__(
        self, fields: dict[str, list[str]], message: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message, code=code, extra={"fields": fields})
        self.fields = fields


class CapacityExceeded(DomainError):
    code = "capacity_exceeded"
    message = "Too many generations are running. Wait for some to finish, then try again."
    status = 429

    def __init__(
        self, message: str | None = None, *, retry_after: int = 10, code: str | None = None
    ) -> None:
        super().__init__(message, code=code, extra={"retry_after": retry_after})
        self.retry_after = retry_after


class InvalidTransition(DomainError):
    code = "invalid_transition"
    message = "The task cannot change to that state."
    status = 409


class ResultsExpired(DomainError):
    code = "results_expired"
    message = "The results of this task have expired and were deleted."
    status = 410


class TaskFinished(DomainError):
    code = "task_finished"
    message = "This task has already finished."
    status = 409


# NUL, which PostgreSQL refuses in text and JSON, and unpaired UTF-16 surrogates (a JSON
# "\ud800" escape), which cannot be encoded as UTF-8 at all.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


# Deeper JSON than any of our payloads needs is refused: it is an attack on the recursion of
# whatever walks it (the parser, validators, the database's jsonb input), not data.
MAX_JSON_DEPTH = 64


def _strings(value: object) -> list[str]:
    """Every string in a JSON-like value, keys included (iterative: any depth)."""
    found, todo = [], [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list | tuple):
            todo.extend(item)
    return found


def json_depth(value: object) -> int:
    """How deeply a JSON-like value nests (a scalar is 0; iterative: any depth)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            todo.extend((v, depth + 1) for v in item)
    return deepest


def contains_nul(value: object) -> bool:
    """Whether a JSON-like value holds text the database cannot store anywhere (keys
    included): a NUL character or an unpaired surrogate. Such input must be refused up front,
    never reach SQL (where it would be a 500)."""
    return any(_UNSTORABLE.search(s) for s in _strings(value))


def contains_surrogate(value: object) -> bool:
    """Whether a JSON-like value holds an unpaired surrogate anywhere (keys included)."""
    return any(_SURROGATE.search(s) for s in _strings(value))


def without_nul(value: object) -> object:
    """The same JSON-like value made storable, for data we must keep as it came (such as a
    provider's callback body): NUL characters removed, unpaired surrogates replaced by U+FFFD.
    Recursive: callers refuse values deeper than ``MAX_JSON_DEPTH`` first."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value.replace("\x00", ""))
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [without_nul(v) for v in value]
    return value
