"""``Idempotency-Key`` for API POSTs that create or bill (``docs/api.md``).

Same key and same request → the first response again, nothing new happens; same key with a
different request → 422 ``idempotency_key_reused``; same key while the first is still running →
409 ``idempotency_in_progress``. The response is recorded in the transaction of the work itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from django.db import transaction
from rest_framework.request import Request
from rest_framework.response import Response

from billing import services as billing

HEADER = "Idempotency-Key"
# Responses worth replaying. Refusals that a retry may overcome (409, 429, 5xx) are not kept.
KEEP = {200, 201, 202, 204, 402}
KEPT_HEADERS = ("Location",)  # replayed with the body


def request_fingerprint(request: Request) -> str:
    """A hash of what the request asks for: method, path and body (files by content)."""
    data = request.data
    if not hasattr(data, "lists"):
        return json_fingerprint(request.method, request.path, data)
    # multipart / form: fields and files
    digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    fields = {k: v for k, v in data.lists() if k not in request.FILES}
    digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name in sorted(request.FILES):
        for file in request.FILES.getlist(name):
            digest.update(f"\n{name}:{file.size}:".encode())
            for chunk in file.chunks():
                digest.update(chunk)
            file.seek(0)
    return digest.hexdigest()


def json_fingerprint(method: str, path: str, data: Any) -> str:
    """``request_fingerprint`` of a request whose body is ``data``, parsed JSON."""
    digest = hashlib.sha256(f"{method} {path}\n".encode())
    digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def recorded_headers(headers: Any) -> dict[str, str]:
    """The headers of a response (or a mapping of them) that its record keeps for replays."""
    return {name: headers[name] for name in KEPT_HEADERS if name in headers}


def run_idempotent(request: Request, handler: Callable[[], Response]) -> Response:
    key = request.headers.get(HEADER)
    if key is None:
        return handler()
    claim = billing.idempotency_claim(
        user=request.user, key=key, fingerprint=request_fingerprint(request)
    )
    if claim.replay is not None:
        record = claim.replay
        response = Response(record.response_body, status=record.response_status)
        for name, value in (record.response_headers or {}).items():
            response[name] = value
        response["Idempotent-Replayed"] = "true"
        return response
    record = claim.record
    if record is None:  # pragma: no cover - a claim has a record or a replay
        raise RuntimeError("idempotency claim without a record")
    try:
        with transaction.atomic():
            response = handler()
            if response.status_code not in KEEP:
                raise _DoNotKeep(response)
            headers = recorded_headers(response)
            billing.idempotency_complete(
                record=record,
                status=response.status_code,
                body=_jsonable(response.data),
                headers=headers,
            )
    except _DoNotKeep as exc:
        billing.idempotency_abandon(record=record)
        return exc.response
    except BaseException:
        billing.idempotency_abandon(record=record)
        raise
    return response


class _DoNotKeep(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, response: Response) -> None:
        self.response = response


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))
