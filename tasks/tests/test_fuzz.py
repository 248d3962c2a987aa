"""Bad input never gets a 500 and never costs anything: arbitrary JSON (any Unicode, including
NUL and unpaired surrogates, any types, any nesting), arbitrary bytes, and arbitrary signed
callback bodies, thrown at the submit and callback endpoints.

Examples: ``FUZZ_EXAMPLES`` (default 100 per test), drawn the same way on every run unless
``FUZZ_RANDOM=1``."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from billing.models import Hold
from tasks.models import CallbackDelivery, Task

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    # The same examples on every run (CI must not turn red on a new draw); explore with
    # FUZZ_RANDOM=1 FUZZ_EXAMPLES=2000 make test PYTEST_ARGS=tasks/tests/test_fuzz.py
    derandomize=os.environ.get("FUZZ_RANDOM") != "1",
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("sandbox", "catalog", "queued")]

# Any text at all: every code point, NUL and lone surrogates included.
TEXT = st.text(alphabet=st.characters(), max_size=40)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
MODEL = st.sampled_from(["sandbox-image", "sandbox-audio-isolation", "sandbox-chat"]) | JSON
PARAMS = (
    st.fixed_dictionaries(
        {},
        optional={
            "width": JSON | st.integers(-10, 5000),
            "height": JSON | st.integers(-10, 5000),
            "num_outputs": JSON | st.integers(-2, 10),
            "sandbox_latency_ms": st.integers(-5, 10**7),
        },
    )
    | JSON
)
BODY = st.fixed_dictionaries(
    {},
    optional={"model": MODEL, "prompt": JSON | TEXT, "params": PARAMS, "upload_ids": JSON},
) | st.dictionaries(TEXT, JSON, max_size=4)


def _dumps(value: Any) -> str:
    # ensure_ascii (the default) writes lone surrogates as \\udXXX escapes: valid UTF-8 bytes
    # carrying text no database can store, exactly what a hostile client can send.
    return json.dumps(value, allow_nan=True)


@FUZZ
@given(body=BODY)
def test_any_json_submit_is_answered_without_a_500(funded: Any, api_for: Any, body: Any) -> None:
    user = funded(10)
    tasks_before, holds_before = Task.objects.count(), Hold.objects.count()

    response = api_for(user).post("/api/v1/tasks/", _dumps(body), content_type="application/json")

    assert response.status_code < 500, response.content
    error = response.json().get("error") if response.status_code >= 400 else None
    if response.status_code in (202, 402):  # a valid generation, accepted or refused for credits
        assert Task.objects.count() == tasks_before + 1
    else:
        assert error is not None
        assert error["code"]
        assert Task.objects.count() == tasks_before
        assert Hold.objects.count() == holds_before


@FUZZ
@given(raw=st.binary(max_size=200))
def test_any_bytes_submit_is_a_clear_400(funded: Any, api_for: Any, raw: bytes) -> None:
    response = api_for(funded(1)).post("/api/v1/tasks/", raw, content_type="application/json")

    assert response.status_code < 500, response.content
    if response.status_code >= 400:
        assert response.json()["error"]["code"]


@FUZZ
@given(
    payload=JSON
    | st.fixed_dictionaries(
        {
            "type": st.just("job.updated") | JSON,
            "data": st.fixed_dictionaries(
                {"id": TEXT | JSON},
                optional={
                    "status": st.sampled_from(["queued", "running", "succeeded", "failed"]) | JSON,
                    "outputs": JSON,
                    "error": JSON,
                },
            )
            | JSON,
        }
    ),
    msg_id=st.from_regex(r"[A-Za-z0-9_.\-]{1,250}", fullmatch=True),
)
def test_any_signed_callback_is_answered_without_a_500(payload: Any, msg_id: str) -> None:
    from tasks.tests.lifecycle import signed_callback

    before = CallbackDelivery.objects.count()

    response = signed_callback(_dumps(payload), msg_id=msg_id)

    event(f"status {response.status_code}")
    # Correctly signed: never 401; a body that is not a job event (or an unusable id) is 400.
    assert response.status_code in (200, 400), response.content
    if response.status_code != 200:
        assert response.json()["error"]["code"]
        assert CallbackDelivery.objects.count() == before
