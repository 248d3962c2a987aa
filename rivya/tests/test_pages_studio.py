"""The Studio page: the form generated from a model's schema, the price, submitting, the live
run, the duplicate-run warning, and the schema→form module (``rivya.pages.forms``)."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import timezone
from PIL import Image

from billing import selectors as billing
from rivya.pages import forms
from tasks import selectors, services
from tasks.catalog import SEED
from tasks.models import Task
from tasks.services.dispatch import dispatch_all

pytestmark = pytest.mark.django_db
C = 1_000_000
HX = {"HTTP_HX_REQUEST": "true"}


def logged_in(some_user: Any) -> Client:
    client = Client()
    client.force_login(some_user)
    return client


def schema_of(slug: str) -> dict[str, Any]:
    return next(spec for spec in SEED if spec["slug"] == slug)["params_schema"]


def submit_data(model: str = "sandbox-image", prompt: str = "a red fox", **params: Any) -> dict:
    return {"model": model, "prompt": prompt, **{f"param_{k}": v for k, v in params.items()}}


def png(size: int = 8) -> SimpleUploadedFile:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buffer, "PNG")
    return SimpleUploadedFile("ref.png", buffer.getvalue(), content_type="image/png")


def oob_slot(content: bytes, slot: str) -> str:
    match = re.search(
        rf'<div id="{slot}" class="errors" hx-swap-oob="true">(.*?)</div>', content.decode()
    )
    assert match, f"no out-of-band slot {slot}"
    return match.group(1)


# --- the schema → form module -------------------------------------------------------------


def test_param_fields_follow_the_schema_defaults_ranges_enums_and_help() -> None:
    fields = {f.name: f for f in forms.param_fields(schema_of("sandbox-image"))}

    width = fields["width"]
    assert (width.widget, width.kind, width.value, width.minimum, width.maximum) == (
        "number",
        "integer",
        512,
        64,
        2048,
    )
    assert (width.label, width.html_id, width.input_name) == (
        "Width",
        "id_param_width",
        "param_width",
    )
    assert width.help == "Range 64–2048, default 512."
    assert fields["num_outputs"].label == "Number of outputs"
    outcome = fields["sandbox_outcome"]
    assert (outcome.widget, outcome.choices, outcome.value) == (
        "select",
        ["success", "fail", "reject", "partial"],
        "success",
    )
    assert outcome.testing
    assert not width.testing
    latency = fields["sandbox_latency_ms"]
    assert latency.label == "Latency (ms)"
    assert latency.help == "Time until the upstream job finishes. Range 0–600000, default 0."


def test_param_fields_render_booleans_as_checkboxes_and_numbers_with_any_step() -> None:
    schema = {
        "properties": {
            "hd": {"type": "boolean", "default": True, "description": "sharper"},
            "strength": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "style": {"type": "string", "maxLength": 20},
            "seed": {"enum": [1, 2, 3], "default": 2},
        },
        "required": ["style"],
    }

    fields = {f.name: f for f in forms.param_fields(schema, values={"hd": False})}

    assert (fields["hd"].widget, fields["hd"].checked, fields["hd"].help) == (
        "checkbox",
        False,
        "Sharper.",
    )
    assert (fields["strength"].widget, fields["strength"].step) == ("number", "any")
    assert (fields["style"].widget, fields["style"].required) == ("text", True)
    assert (fields["seed"].choices, fields["seed"].display_value) == (["1", "2", "3"], "2")


def test_params_from_form_types_values_and_reports_what_is_not_a_number() -> None:
    schema = {
        "properties": {
            "n": {"type": "integer"},
            "x": {"type": "number"},
            "hd": {"type": "boolean"},
            "seed": {"enum": [1, 2]},
            "empty": {"type": "integer", "default": 4},
        }
    }

    params, errors = forms.params_from_form(
        schema, {"param_n": "3", "param_x": "0.5", "param_seed": "2", "param_empty": " "}
    )
    assert (params, errors) == ({"n": 3, "x": 0.5, "hd": False, "seed": 2}, {})

    params, errors = forms.params_from_form(
        schema, {"param_n": "2.5", "param_x": "abc", "param_hd": "on", "param_seed": "9"}
    )
    assert params == {"hd": True}
    assert errors == {
        "params.n": ["Enter a whole number."],
        "params.x": ["Enter a number."],
        "params.seed": ["Choose one of the options."],
    }


def test_file_rules_read_as_plain_words() -> None:
    image = next(spec for spec in SEED if spec["slug"] == "sandbox-image")["file_rules"]
    isolation = next(s for s in SEED if s["slug"] == "sandbox-audio-isolation")["file_rules"]

    assert forms.file_rules_text(image) == [
        "Optional: up to 1 file",
        "Types: PNG, JPEG, WebP",
        "At most 10.0\xa0MB",
    ]
    assert forms.file_rules_text(isolation)[0] == "Required: 1 file"
    assert forms.file_rules_text(isolation)[-1] == "Length: 1 s to 10 min"
    assert forms.file_rules_text({"max": 0}) == []


# --- the page -----------------------------------------------------------------------------


def test_the_studio_opens_on_the_image_model_with_every_input_labelled(
    studio_user: Any, form_controls: Any
) -> None:
    client = logged_in(studio_user())

    response = client.get("/studio/")

    assert response.status_code == 200
    page = response.content.decode()
    assert 'data-model="sandbox-image"' in page
    found = form_controls(response.content)
    ids = {c["id"] for c in found.controls}
    assert {"id_prompt", "id_param_width", "id_param_num_outputs", "id_files"} <= ids
    assert all(c.get("id") in found.label_for for c in found.controls), found.controls
    assert 'name="csrfmiddlewaretoken"' in page
    width = next(c for c in found.controls if c["id"] == "id_param_width")
    assert (width["value"], width["min"], width["max"], width["step"]) == ("512", "64", "2048", "1")
    assert '<option value="success" selected>' in page
    # The knobs sit in the collapsed testing section, and only there.
    before, testing = page.split('<details class="testing"', 1)
    assert '<details class="testing" open' not in page
    assert "id_param_sandbox_" not in before
    assert 'id="id_param_sandbox_outcome"' in testing
    assert "Testing (sandbox)" in testing
    assert "Types: PNG, JPEG, WebP" in page
    # Each model of the category with its price and what it makes; the other categories.
    assert "1 credit per image" in page
    assert "PNG images drawn from your prompt" in page
    assert 'id="cat-video"' in page
    assert 'id="cat-audio"' in page
    assert "Sandbox Chat" not in page  # chat turns are not generations


def test_picking_another_model_swaps_the_form_in_place_and_keeps_the_prompt(
    studio_user: Any,
) -> None:
    client = logged_in(studio_user())

    response = client.get("/studio/form/", {"model": "sandbox-video", "prompt": "waves"}, **HX)

    assert response.status_code == 200
    page = response.content.decode()
    assert "<html" not in page  # a partial
    assert 'data-model="sandbox-video"' in page
    assert 'id="id_param_duration_s"' in page
    assert "id_param_width" not in page
    assert ">waves</textarea>" in page
    assert "0.5 credits per second" in page
    assert response["HX-Push-Url"] == "/studio/?model=sandbox-video"


def test_picking_a_category_opens_its_first_model(studio_user: Any) -> None:
    client = logged_in(studio_user())

    response = client.get("/studio/form/", {"category": "audio"}, **HX)

    page = response.content.decode()
    assert 'data-model="sandbox-audio-isolation"' in page
    assert 'id="pick-sandbox-speech"' in page
    assert "Required: 1 file" in page


def test_the_price_is_the_catalog_price_of_this_request(studio_user: Any) -> None:
    client = logged_in(studio_user(10))

    response = client.get(
        "/studio/price/", {"model": "sandbox-image", "param_num_outputs": "3"}, **HX
    )

    page = response.content.decode()
    assert re.search(r'data-testid="price">3 credits<', page)
    assert "3 images × 1" in page
    assert re.search(r'data-testid="price-available">10 credits<', page)
    assert "Not enough credits" not in page
    assert "data-short" not in page


def test_the_price_says_when_credits_are_short_and_disables_the_submit(studio_user: Any) -> None:
    client = logged_in(studio_user(2))

    response = client.get(
        "/studio/price/", {"model": "sandbox-image", "param_num_outputs": "3"}, **HX
    )

    page = response.content.decode()
    assert "Not enough credits: this request costs 3 credits and 2 credits are available" in page
    assert "data-short" in page  # the page disables its submit button on this mark


def test_the_price_of_values_out_of_range_asks_to_check_them(studio_user: Any) -> None:
    client = logged_in(studio_user())

    response = client.get(
        "/studio/price/", {"model": "sandbox-image", "param_num_outputs": "9"}, **HX
    )

    assert "Check the values above to see the price" in response.content.decode()


def test_the_page_prices_the_default_request_on_first_render(studio_user: Any) -> None:
    client = logged_in(studio_user(0))

    page = client.get("/studio/?model=sandbox-video").content.decode()

    assert re.search(r'data-testid="price">1 credit<', page)  # 2 s × 0.5
    assert "Not enough credits" in page
    assert re.search(r'data-testid="submit" aria-describedby="quote-short" disabled>', page)


# --- submitting ---------------------------------------------------------------------------


def test_a_submit_creates_the_task_and_shows_it_running(
    studio_user: Any, studio_queued: dict[str, list[str]], django_capture_on_commit_callbacks: Any
) -> None:
    some_user = studio_user(10)
    client = logged_in(some_user)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/studio/submit/",
            submit_data(num_outputs=2, width=256, sandbox_latency_ms=5000, sandbox_outcome="fail"),
            **HX,
        )

    assert response.status_code == 200
    task = Task.objects.get(user=some_user)
    assert task.status == Task.Status.WAITING
    assert (task.prompt, task.price_micro) == ("a red fox", 2 * C)
    assert task.params["num_outputs"] == 2
    assert task.params["width"] == 256
    assert task.params["sandbox_latency_ms"] == 5000
    assert task.params["sandbox_outcome"] == "fail"
    assert (dispatch_all(), studio_queued["submit"]) == (1, [str(task.pk)])
    assert json.loads(response["HX-Trigger"]) == {"rivya:changed": True}
    page = response.content.decode()
    assert 'hx-swap-oob="afterbegin:#studio-runs"' in page
    assert f'id="task-{task.pk}"' in page
    assert f'hx-get="/studio/tasks/{task.pk}/?seen=WAITING" hx-trigger="every 1s"' in page
    assert oob_slot(response.content, "err-prompt") == ""  # earlier errors are cleared
    assert billing.balance_for_user(user=some_user).available == 8 * C


def test_a_submit_with_a_reference_file_uploads_it(
    studio_user: Any, studio_queued: dict[str, list[str]], settings: Any, tmp_path: Any
) -> None:
    settings.MEDIA_ROOT = str(tmp_path)
    some_user = studio_user(10)

    logged_in(some_user).post("/studio/submit/", {**submit_data(), "files": png()}, **HX)

    task = Task.objects.get(user=some_user)
    assert len(task.upload_ids) == 1


def test_validation_errors_appear_next_to_their_fields(
    studio_user: Any, studio_queued: dict[str, list[str]]
) -> None:
    some_user = studio_user(10)
    client = logged_in(some_user)

    empty_prompt = client.post("/studio/submit/", submit_data(prompt="  "), **HX)
    out_of_range = client.post("/studio/submit/", submit_data(num_outputs=9), **HX)
    not_a_number = client.post("/studio/submit/", submit_data(width="wide"), **HX)
    bad_file = client.post(
        "/studio/submit/",
        {**submit_data(), "files": SimpleUploadedFile("x.png", b"not an image")},
        **HX,
    )

    assert "This model needs a prompt." in oob_slot(empty_prompt.content, "err-prompt")
    assert "Please fix the highlighted fields." in empty_prompt.content.decode()
    assert "greater than the maximum of 4" in oob_slot(
        out_of_range.content, "err-params-num_outputs"
    )
    assert oob_slot(out_of_range.content, "err-prompt") == ""
    assert "Enter a whole number." in oob_slot(not_a_number.content, "err-params-width")
    assert "x.png" in oob_slot(bad_file.content, "err-files")
    assert not Task.objects.filter(user=some_user).exists()
    assert (dispatch_all(), studio_queued["submit"]) == (0, [])


def test_without_htmx_a_refused_submit_renders_the_page_with_its_errors(
    studio_user: Any, studio_queued: dict[str, list[str]]
) -> None:
    client = logged_in(studio_user(10))

    response = client.post("/studio/submit/", submit_data(prompt="a cat", num_outputs=9))

    assert response.status_code == 400
    page = response.content.decode()
    assert "<html" in page
    assert ">a cat</textarea>" in page
    assert "greater than the maximum of 4" in page


def test_a_submit_short_of_credits_says_so_and_records_the_refusal(
    studio_user: Any, studio_queued: dict[str, list[str]]
) -> None:
    some_user = studio_user(1)

    response = logged_in(some_user).post("/studio/submit/", submit_data(num_outputs=3), **HX)

    assert "Not enough credits available" in response.content.decode()
    assert "Get more credits" in response.content.decode()
    task = Task.objects.get(user=some_user)
    assert (task.status, task.error_code) == (Task.Status.FAILED, "insufficient_credits")
    # the bell has a new notification
    assert json.loads(response["HX-Trigger"]) == {"rivya:changed": True}
    assert (dispatch_all(), studio_queued["submit"]) == (0, [])


def test_a_submit_over_capacity_asks_to_wait(
    studio_user: Any, studio_queued: dict[str, list[str]], settings: Any
) -> None:
    settings.TASK_MAX_RUNNING_PER_USER = 1
    client = logged_in(studio_user(10))
    client.post("/studio/submit/", submit_data(prompt="one"), **HX)

    response = client.post("/studio/submit/", submit_data(prompt="two"), **HX)

    assert re.search(
        r'class="msg warning" data-testid="notice">[^<]*generations running',
        response.content.decode(),
    )
    assert Task.objects.count() == 1


# --- the duplicate-run rule (tasks.selectors) ---------------------------------------------


def test_a_run_of_the_same_model_and_prompt_still_going_is_a_duplicate(
    studio_user: Any, make_generation: Any
) -> None:
    some_user = studio_user(100)
    make_generation(some_user, outcome="generating", slug="sandbox-video", prompt="waves")

    same = selectors.duplicate_runs_for_user(
        user=some_user, model_slug="sandbox-video", prompt=" waves "
    )
    other_prompt = selectors.duplicate_runs_for_user(
        user=some_user, model_slug="sandbox-video", prompt="wave"
    )
    other_model = selectors.duplicate_runs_for_user(
        user=some_user, model_slug="sandbox-speech", prompt="waves"
    )
    other_user = selectors.duplicate_runs_for_user(
        user=studio_user(0), model_slug="sandbox-video", prompt="waves"
    )

    assert (same.running, same.is_running, same.is_duplicate) == (1, True, True)
    assert not other_prompt.is_duplicate
    assert not other_model.is_duplicate
    assert not other_user.is_duplicate


def test_two_recent_failures_make_a_duplicate_and_say_they_were_refunded(
    studio_user: Any, make_generation: Any
) -> None:
    some_user = studio_user(100)
    make_generation(some_user, outcome="failed", slug="sandbox-video", prompt="waves")
    once = selectors.duplicate_runs_for_user(
        user=some_user, model_slug="sandbox-video", prompt="waves"
    )
    make_generation(some_user, outcome="failed", slug="sandbox-video", prompt="waves")

    twice = selectors.duplicate_runs_for_user(
        user=some_user, model_slug="sandbox-video", prompt="waves"
    )

    assert (once.failed, once.is_duplicate) == (1, False)
    assert (twice.failed, twice.keeps_failing, twice.is_running) == (2, True, False)
    assert twice.failed_reserved_micro == twice.failed_refunded_micro == 2 * C
    assert twice.failures_refunded


def test_failures_older_than_six_hours_or_deleted_do_not_count(
    studio_user: Any, make_generation: Any
) -> None:
    some_user = studio_user(100)
    old = make_generation(some_user, outcome="failed", slug="sandbox-video", prompt="waves")
    deleted = make_generation(some_user, outcome="failed", slug="sandbox-video", prompt="waves")
    make_generation(some_user, outcome="failed", slug="sandbox-video", prompt="waves")
    Task.objects.filter(pk=old.pk).update(
        finished_at=timezone.now() - timedelta(hours=6, seconds=5)
    )
    services.task_delete(user=some_user, task_id=deleted.pk)

    runs = selectors.duplicate_runs_for_user(
        user=some_user, model_slug="sandbox-video", prompt="waves"
    )

    assert (runs.failed, runs.is_duplicate) == (1, False)


def test_a_run_is_heavy_for_video_and_audio_or_over_the_price_threshold(
    seeded_catalog: None, settings: Any
) -> None:
    from tasks.models import AIModel

    settings.STUDIO_HEAVY_PRICE_MICRO = 5 * C
    image, video, speech = (
        AIModel.objects.get(slug=s) for s in ("sandbox-image", "sandbox-video", "sandbox-speech")
    )

    assert selectors.run_is_heavy(model=video, price_micro=C // 2)
    assert selectors.run_is_heavy(model=speech, price_micro=C // 10)
    assert not selectors.run_is_heavy(model=image, price_micro=5 * C)
    assert selectors.run_is_heavy(model=image, price_micro=5 * C + 1)


# --- the duplicate warning in the Studio --------------------------------------------------


def test_a_heavy_duplicate_asks_to_confirm_and_confirming_runs_it(
    studio_user: Any, studio_queued: dict[str, list[str]]
) -> None:
    some_user = studio_user(10)
    client = logged_in(some_user)
    data = submit_data(model="sandbox-video", prompt="waves")
    client.post("/studio/submit/", data, **HX)

    warned = client.post("/studio/submit/", data, **HX)

    page = warned.content.decode()
    assert 'data-testid="duplicate-warning"' in page
    assert "already running" in page
    assert 'name="confirm" value="1"' in page
    assert Task.objects.filter(user=some_user).count() == 1

    confirmed = client.post("/studio/submit/", {**data, "confirm": "1"}, **HX)

    assert 'data-testid="duplicate-warning"' not in confirmed.content.decode()
    assert Task.objects.filter(user=some_user).count() == 2


def test_a_nul_in_a_heavy_runs_prompt_is_a_field_error_not_a_500(
    studio_user: Any, studio_queued: dict[str, list[str]]
) -> None:
    some_user = studio_user(10)

    response = logged_in(some_user).post(
        "/studio/submit/", submit_data(model="sandbox-video", prompt="a\x00b"), **HX
    )

    assert response.status_code == 200  # htmx swaps only 2xx: the errors come out of band
    assert "NUL" in oob_slot(response.content, "err-prompt")
    assert not Task.objects.filter(user=some_user).exists()


def test_the_duplicate_check_reads_by_index_whatever_the_history(
    studio_user: Any, make_generation: Any, django_assert_num_queries: Any
) -> None:
    from tasks.selectors import duplicate_runs_for_user

    some_user = studio_user(10)
    make_generation(some_user, outcome="failed", slug="sandbox-video", prompt="waves")

    with django_assert_num_queries(2) as captured:
        runs = duplicate_runs_for_user(user=some_user, model_slug="sandbox-video", prompt="waves")

    assert (runs.running, runs.failed) == (0, 1)
    failures = captured.captured_queries[1]["sql"]
    assert "created_at" in failures  # bounded to the window, so the task_history index serves it


def test_the_warning_after_repeated_failures_says_they_were_refunded(
    studio_user: Any, make_generation: Any
) -> None:
    some_user = studio_user(10)
    for _ in range(2):
        make_generation(some_user, outcome="failed", slug="sandbox-video", prompt="waves")

    response = logged_in(some_user).post(
        "/studio/submit/", submit_data(model="sandbox-video", prompt="waves"), **HX
    )

    page = response.content.decode()
    assert "It failed 2 times in the last 6 hours" in page
    assert "those failures were refunded (2 credits)" in page
    assert "already running" not in page


def test_a_light_duplicate_runs_without_asking(
    studio_user: Any, studio_queued: dict[str, list[str]], settings: Any
) -> None:
    settings.STUDIO_HEAVY_PRICE_MICRO = 5 * C
    some_user = studio_user(10)
    client = logged_in(some_user)
    client.post("/studio/submit/", submit_data(prompt="fox"), **HX)

    client.post("/studio/submit/", submit_data(prompt="fox"), **HX)

    assert Task.objects.filter(user=some_user).count() == 2


def test_an_image_request_priced_over_the_threshold_is_heavy(
    studio_user: Any, studio_queued: dict[str, list[str]], settings: Any
) -> None:
    settings.STUDIO_HEAVY_PRICE_MICRO = 1 * C
    some_user = studio_user(10)
    client = logged_in(some_user)
    client.post("/studio/submit/", submit_data(prompt="fox", num_outputs=2), **HX)

    response = client.post("/studio/submit/", submit_data(prompt="fox", num_outputs=2), **HX)

    assert 'data-testid="duplicate-warning"' in response.content.decode()
    assert Task.objects.filter(user=some_user).count() == 1


# --- the live run -------------------------------------------------------------------------


def test_the_live_status_polls_while_unfinished_and_answers_204_when_unchanged(
    studio_user: Any, make_generation: Any
) -> None:
    some_user = studio_user(10)
    task = make_generation(some_user, outcome="waiting")
    client = logged_in(some_user)

    first = client.get(f"/studio/tasks/{task.pk}/", **HX)
    unchanged = client.get(f"/studio/tasks/{task.pk}/?seen=WAITING", **HX)

    assert first.status_code == 200
    assert 'hx-trigger="every 1s"' in first.content.decode()
    assert "HX-Trigger" not in first.headers
    assert unchanged.status_code == 204


def test_a_run_that_has_just_finished_stops_polling_and_refreshes_the_header(
    studio_user: Any, make_generation: Any
) -> None:
    some_user = studio_user(10)
    task = make_generation(some_user, outcome="success", num_outputs=2)
    client = logged_in(some_user)

    response = client.get(f"/studio/tasks/{task.pk}/?seen=GENERATING", **HX)

    page = response.content.decode()
    assert "hx-trigger" not in page
    assert json.loads(response["HX-Trigger"]) == {"rivya:changed": True}
    assert f'<img src="/api/v1/tasks/{task.pk}/results/0/"' in page
    assert f'download="{task.pk}-1.png"' in page
    assert "Charged 2 credits" in page


def test_video_and_audio_results_get_players(studio_user: Any, make_generation: Any) -> None:
    some_user = studio_user(10)
    client = logged_in(some_user)
    players = {}
    for slug, mime in (("sandbox-video", "video/webm"), ("sandbox-speech", "audio/wav")):
        task = make_generation(some_user, outcome="generating", slug=slug)
        ext = mime.split("/")[1]
        output = services.StoredOutput(
            name=f"results/{task.pk}/0.{ext}",
            mime=mime,
            bytes=100,
            width=None,
            height=None,
            duration_ms=2000,
        )
        assert services.task_succeed(task_id=task.pk, outputs=[output])
        players[slug] = client.get(f"/studio/tasks/{task.pk}/", **HX).content.decode()

    assert re.search(
        r'<video controls preload="metadata" src="/api/v1/tasks/[^"]+/results/0/"'
        r' aria-label="Video result 1">',
        players["sandbox-video"],
    )
    assert re.search(
        r'<audio controls preload="metadata" src="/api/v1/tasks/[^"]+/results/0/"'
        r' aria-label="Audio result 1">',
        players["sandbox-speech"],
    )


def test_a_failure_says_whose_fault_it_was_and_what_was_refunded(
    studio_user: Any, make_generation: Any
) -> None:
    some_user = studio_user(10)
    task = make_generation(some_user, outcome="failed")

    page = logged_in(some_user).get(f"/studio/tasks/{task.pk}/", **HX).content.decode()

    assert "Cause: the provider failed." in page
    assert "It broke." in page
    assert re.search(r'data-testid="refund">1 credit refunded\.<', page)


def test_another_users_task_is_not_found(studio_user: Any, make_generation: Any) -> None:
    owner, stranger = studio_user(10), studio_user(10)
    task = make_generation(owner, outcome="waiting")
    client = logged_in(stranger)

    assert client.get(f"/studio/tasks/{task.pk}/", **HX).status_code == 404
    assert client.post(f"/studio/tasks/{task.pk}/cancel/", **HX).status_code == 404
    assert Task.objects.get(pk=task.pk).status == Task.Status.WAITING


def test_cancelling_a_run_refunds_it_and_refreshes_the_header(
    studio_user: Any, make_generation: Any, studio_queued: dict[str, list[str]]
) -> None:
    some_user = studio_user(10)
    task = make_generation(some_user, outcome="generating")
    client = logged_in(some_user)

    response = client.post(f"/studio/tasks/{task.pk}/cancel/", **HX)
    again = client.post(f"/studio/tasks/{task.pk}/cancel/", **HX)

    page = response.content.decode()
    assert Task.objects.get(pk=task.pk).status == Task.Status.CANCELLED
    assert 'data-status="CANCELLED"' in page
    assert "hx-trigger" not in page
    assert re.search(r'data-testid="refund">1 credit refunded\.<', page)
    assert json.loads(response["HX-Trigger"]) == {"rivya:changed": True}
    assert again.status_code == 200
    assert billing.balance_for_user(user=some_user).available == 10 * C


def test_cancelling_a_finished_run_shows_it_as_it_is(
    studio_user: Any, make_generation: Any
) -> None:
    some_user = studio_user(10)
    task = make_generation(some_user, outcome="success")

    response = logged_in(some_user).post(f"/studio/tasks/{task.pk}/cancel/", **HX)

    assert 'data-status="SUCCESS"' in response.content.decode()
    assert "It had already finished." in response.content.decode()


# --- re-run --------------------------------------------------------------------------------


def test_rerun_prefills_the_form_from_the_task(studio_user: Any, make_generation: Any) -> None:
    some_user = studio_user(10)
    task = make_generation(some_user, prompt="a tall lighthouse", num_outputs=3, width=320)

    page = logged_in(some_user).get(f"/studio/?rerun={task.pk}").content.decode()

    assert 'data-model="sandbox-image"' in page
    assert ">a tall lighthouse</textarea>" in page
    assert re.search(r'id="id_param_num_outputs" name="param_num_outputs" value="3"', page)
    assert re.search(r'id="id_param_width" name="param_width" value="320"', page)
    assert 'data-testid="rerun-note"' in page


def test_rerun_of_another_users_task_is_ignored(studio_user: Any, make_generation: Any) -> None:
    owner = studio_user(10)
    task = make_generation(owner, prompt="secret plans", slug="sandbox-video")

    response = logged_in(studio_user(10)).get(f"/studio/?rerun={task.pk}")

    page = response.content.decode()
    assert response.status_code == 200
    assert "secret plans" not in page
    assert 'data-model="sandbox-image"' in page


def test_rerun_of_a_task_whose_model_is_gone_opens_the_default(
    studio_user: Any, make_generation: Any
) -> None:
    from tasks.models import AIModel

    some_user = studio_user(10)
    task = make_generation(some_user, prompt="old waves", slug="sandbox-video")
    AIModel.objects.filter(slug="sandbox-video").update(enabled=False)

    page = logged_in(some_user).get(f"/studio/?rerun={task.pk}").content.decode()

    assert 'data-model="sandbox-image"' in page
    assert 'id="cat-video"' not in page


def test_rerun_of_a_task_with_a_reference_file_offers_to_reuse_it(
    studio_user: Any, studio_queued: dict[str, list[str]], settings: Any, tmp_path: Any
) -> None:
    settings.MEDIA_ROOT = str(tmp_path)
    some_user = studio_user(10)
    client = logged_in(some_user)
    client.post("/studio/submit/", {**submit_data(), "files": png()}, **HX)
    task = Task.objects.get(user=some_user)

    page = client.get(f"/studio/?rerun={task.pk}").content.decode()
    client.post("/studio/submit/", {**submit_data(), "upload_ids": task.upload_ids[0]}, **HX)

    assert f'name="upload_ids" value="{task.upload_ids[0]}" checked' in page
    assert "Reuse ref.png" in page
    rerun = Task.objects.filter(user=some_user).exclude(pk=task.pk).get()
    assert rerun.upload_ids == task.upload_ids


# --- queries --------------------------------------------------------------------------------


def test_the_studio_renders_in_a_bounded_number_of_queries(
    studio_user: Any, make_generation: Any, django_assert_max_num_queries: Any
) -> None:
    some_user = studio_user(100)
    for _ in range(6):
        make_generation(some_user, outcome="success", num_outputs=2)
    task = make_generation(some_user, outcome="generating")
    client = logged_in(some_user)
    client.get("/studio/")  # warm the session

    # session, user, models, balance, runs (models joined), header: balance and unread
    with django_assert_max_num_queries(7):
        client.get("/studio/")
    with django_assert_max_num_queries(8):  # and the task re-run
        client.get(f"/studio/?rerun={task.pk}")
    with django_assert_max_num_queries(4):
        client.get("/studio/form/", {"model": "sandbox-video"}, **HX)
    with django_assert_max_num_queries(4):
        client.get("/studio/price/", {"model": "sandbox-image", "param_num_outputs": "2"}, **HX)
    with django_assert_max_num_queries(3):  # polled every second: session, user, task
        client.get(f"/studio/tasks/{task.pk}/?seen=GENERATING", **HX)
    with django_assert_max_num_queries(4):
        client.get(f"/studio/tasks/{task.pk}/", **HX)
