"""The Studio: pick a model, fill its form, submit, watch the task run.

Views only translate: the form comes from the model's schema (``rivya.pages.forms``), the price
from ``tasks.pricing.task_price``, the duplicate rule from ``tasks.selectors``, and every write
is a service. The page works with htmx (partials swapped in place) and without it (full pages).

Synchronous ("single") models (``runtime == "sync"``: translation, completion, text to speech,
transcription) are offered too: their form posts straight to ``POST /api/v1/single/<type>/``
from ``static/js/studio-single.js`` (the answer is the result), which then shows the result
rendered here (``studio_result``) and the run's card; the price and the form come from the same
places as for the other models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import path, reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from billing import selectors as billing
from rivya.errors import CapacityExceeded, TaskFinished, ValidationFailed
from rivya.money import credits_phrase, format_credits
from rivya.pages import forms
from rivya.pages.common import (
    FAULT,
    OUTPUT_NOUN,
    fault,
    is_htmx,
    mark_changed,
    price_label,
    single_label,
    single_shown,
)
from tasks import selectors, services
from tasks.models import AIModel, Category, Task
from tasks.pricing import output_count, task_price
from tasks.single.registry import SingleService, get_service
from tasks.single.services import single_result
from tasks.uploads import upload_too_large
from tasks.validation import normalize_params

RECENT_RUNS = 3
# The testing knobs people reach for first come first (JSON columns do not keep the schema's
# key order); the others follow by name.
TESTING_FIRST = ("sandbox_outcome", "sandbox_latency_ms")


# --- what the page shows ---------------------------------------------------------------------


def _studio_models() -> list[AIModel]:
    """The models the Studio can run: enabled, direct generations (the chat model is used
    through chat, and ``task_submit`` refuses it), asynchronous ones and the synchronous ones
    of a registered single type."""
    return [
        m
        for m in selectors.models_enabled().filter(
            direct_generation=True, runtime__in=[AIModel.Runtime.ASYNC, AIModel.Runtime.SYNC]
        )
        if m.runtime == AIModel.Runtime.ASYNC or _service(m) is not None
    ]


def _service(model: AIModel | None) -> SingleService | None:
    """The single service a synchronous model runs (None for the others)."""
    if model is None or model.runtime != AIModel.Runtime.SYNC or not model.single_type:
        return None
    return get_service(model.single_type)


def _text_field(service: SingleService) -> str:
    """The body field holding the text a single type works on ("text", "prompt"), or ""."""
    fields = service.request_serializer().fields
    return next((name for name in ("text", "prompt") if name in fields), "")


def _characters(model: AIModel, text: str | None, params: dict[str, Any]) -> int:
    """How many characters a per-character price counts for this text: what the type's own
    payload validator says (``Payload.characters``), never counted here."""
    service = _service(model)
    field = _text_field(service) if service else ""
    if not field or not text:
        return 0
    data = {field: text, "params": {}, **{name: params.get(name) for name in service.param_fields}}
    try:
        return service.validate_payload(data).characters
    except (KeyError, TypeError, ValueError, ValidationFailed):
        return 0


@dataclass(frozen=True)
class Quote:
    """The price of this request next to the credits available to pay for it."""

    price_micro: int | None  # None: the form does not make a valid request yet
    available_micro: int
    detail: str = ""
    from_price: bool = False  # the price grows with the uploaded recording's length

    @property
    def enough(self) -> bool:
        return self.price_micro is not None and self.price_micro <= self.available_micro

    @property
    def price(self) -> str:
        return credits_phrase(self.price_micro or 0) if self.price_micro else "Free"

    @property
    def available(self) -> str:
        return credits_phrase(self.available_micro)

    @property
    def short_by(self) -> str:
        return credits_phrase(max(0, (self.price_micro or 0) - self.available_micro))


def _quote(*, user: Any, model: AIModel, params: dict[str, Any], text: str | None = None) -> Quote:
    available = billing.balance_for_user(user=user).available
    characters = _characters(model, text, params)
    try:
        normalized = normalize_params(model.params_schema, params)
        price = task_price(model=model, params=normalized, durations_ms=[], characters=characters)
    except ValidationFailed:
        return Quote(price_micro=None, available_micro=available)
    detail, from_price = "", False
    unit = format_credits(model.price_micro)
    if model.billing_type == AIModel.BillingType.PER_CHARACTER:
        detail = (
            f"{characters:,} character{'s' if characters != 1 else ''} × {unit}"
            if characters
            else f"{unit} per character of the text"
        )
    if model.billing_type == AIModel.BillingType.PER_OUTPUT:
        count = output_count(normalized)
        noun = OUTPUT_NOUN.get(model.category, "output")
        detail = f"{count} {noun}{'s' if count != 1 else ''} × {unit}"
    elif model.billing_type == AIModel.BillingType.PER_OUTPUT_SECOND:
        if "duration_s" in normalized:
            detail = f"{normalized['duration_s']} s × {unit}"
        else:
            # Priced by the measured length of the uploaded file: known only once it is sent
            # (the submit measures it); the page shows the price of the shortest one.
            detail, from_price = f"{unit} per second of the recording", True
    return Quote(price_micro=price, available_micro=available, detail=detail, from_price=from_price)


def _pick(
    models: list[AIModel], *, slug: str | None = None, category: str | None = None
) -> AIModel | None:
    """The model asked for, else the first of the category asked for, else the default: the
    first image model (the Studio opens on images)."""
    by_slug = {m.slug: m for m in models}
    if slug and slug in by_slug:
        return by_slug[slug]
    for wanted in (category, Category.IMAGE):
        for m in models:
            if m.category == wanted:
                return m
    return models[0] if models else None


def _categories(models: list[AIModel]) -> list[dict[str, Any]]:
    """The picker: categories in catalog order, each with its models and their prices."""
    return [
        {
            "value": value,
            "label": label,
            "models": [
                {"model": m, "price": price_label(m)} for m in models if m.category == value
            ],
        }
        for value, label in Category.choices
        if any(m.category == value for m in models)
    ]


def _takes_files(model: AIModel) -> bool:
    rules = model.file_rules if isinstance(model.file_rules, dict) else {}
    return int(rules.get("max", 0) or 0) > 0


def _errors_by_slot(
    errors: dict[str, list[str]], model: AIModel | None
) -> tuple[dict[str, list[str]], list[str]]:
    """Place field errors next to the model's inputs (by slot id); what belongs to no input
    (the model, the params as a whole, files for a model that takes none) is returned apart,
    for the notice."""
    slots: dict[str, list[str]] = {}
    if model is not None:
        slots = {f.slot: [] for f in forms.param_fields(model.params_schema)}
        slots[forms.error_slot("prompt")] = []
        if _takes_files(model):
            slots[forms.error_slot("files")] = []
    elsewhere: list[str] = []
    for key, messages in errors.items():
        if key.startswith(("files", "upload_ids")):
            slot = forms.error_slot("files")
        elif key == "prompt" or key.startswith("params."):
            slot = forms.error_slot(key)
        else:
            elsewhere.extend(messages)
            continue
        if slot in slots:
            slots[slot].extend(messages)
        else:
            elsewhere.extend(messages)
    return slots, elsewhere


def _workspace(
    request: HttpRequest,
    models: list[AIModel],
    model: AIModel | None,
    *,
    prompt: str = "",
    values: dict[str, Any] | None = None,
    errors: dict[str, list[str]] | None = None,
    reuse: list[Any] | None = None,
    rerun_of: Task | None = None,
) -> dict[str, Any]:
    """Everything the model picker and the form show."""
    context: dict[str, Any] = {
        "models": models,
        "categories": _categories(models),
        "model": model,
        "prompt": prompt,
        "rerun_of": rerun_of,
    }
    if model is None:
        return context
    errors = errors or {}
    fields = forms.param_fields(model.params_schema, values, errors)
    slots, _ = _errors_by_slot(errors, model)
    rules = model.file_rules if isinstance(model.file_rules, dict) else {}
    shown, testing = forms.split_testing(fields, TESTING_FIRST)
    service = _service(model)
    if service is not None:
        fields = forms.param_fields(
            model.params_schema, _single_values(model, service, values), errors
        )
        shown, testing = forms.split_testing(fields, TESTING_FIRST)
        context["single"] = _single_context(model, service, fields)
    context.update(
        fields=shown,
        testing_fields=testing,
        prompt_slot=forms.error_slot("prompt"),
        prompt_errors=slots[forms.error_slot("prompt")],
        files_slot=forms.error_slot("files"),
        files_errors=slots.get(forms.error_slot("files"), []),
        file_rules=forms.file_rules_text(rules),
        accept=",".join(rules.get("accept") or []),
        max_files=int(rules.get("max", 0) or 0),
        min_files=int(rules.get("min", 0) or 0),
        reuse=reuse or [],
        price_label=price_label(model),
        quote=_quote(
            user=request.user,
            model=model,
            params={f.name: f.value for f in fields if f.value is not None},
            text=prompt,
        ),
    )
    return context


# What the single types' forms say: the submit button, and the text input's help.
SINGLE_SUBMIT = {
    "translation": "Translate",
    "completion": "Complete",
    "text_to_speech": "Speak",
    "transcription": "Transcribe",
}
SINGLE_TEXT_HELP = {
    "translation": "The text to translate.",
    "completion": "What to answer or complete.",
    "text_to_speech": "What to say.",
}


def _single_values(
    model: AIModel, service: SingleService, values: dict[str, Any] | None
) -> dict[str, Any]:
    """The form's starting values: ``values`` (a re-run, a resubmit) over the schema's defaults;
    a required choice without a default (translation's languages) starts on an option no other
    such choice took, so the form starts as a valid request (en → hi)."""
    values = dict(values or {})
    required = _required_body_fields(service)
    taken: set[Any] = {values[name] for name in required if name in values}
    for f in forms.param_fields(model.params_schema):
        wanted = f.name in required and f.widget == "select" and f.default is None
        if wanted and f.name not in values:
            choice = next((o for o in f.options if o not in taken), None)
            if choice is not None:
                values[f.name] = choice
                taken.add(choice)
    return values


def _required_body_fields(service: SingleService) -> set[str]:
    fields = service.request_serializer().fields
    return {name for name in service.param_fields if name in fields and fields[name].required}


def _single_context(
    model: AIModel, service: SingleService, fields: list[forms.ParamField]
) -> dict[str, Any]:
    """What the single form and studio-single.js need: where to post, which inputs are body
    fields (the others go in ``params``), and how to read the parameter inputs back."""
    required = _required_body_fields(service)
    text_field = _text_field(service)
    return {
        "type": service.type.value,
        "type_label": service.type.label,
        "api_url": reverse("api-single", args=[service.type.value]),
        "text_field": text_field,
        "text_label": "Prompt" if text_field == "prompt" else "Text",
        "text_help": SINGLE_TEXT_HELP.get(service.type.value, ""),
        "submit_label": SINGLE_SUBMIT.get(service.type.value, "Run"),
        # An optional choice without a default (transcription's language) can be left unset.
        "blank_choices": [
            f.name
            for f in fields
            if f.widget == "select" and f.default is None and f.name not in required
        ],
        "config": {
            "type": service.type.value,
            "apiUrl": reverse("api-single", args=[service.type.value]),
            "textField": text_field,
            "bodyFields": list(service.param_fields),
            "params": [
                {"name": f.name, "widget": f.widget, "kind": f.kind, "options": list(f.options)}
                for f in fields
            ],
            "resultUrl": reverse("studio-result", args=[ANY_TASK]),
            "cardUrl": reverse("studio-task", args=[ANY_TASK]),
            "historyUrl": reverse("history-task", args=[ANY_TASK]),
            "anyTask": str(ANY_TASK),
            "faults": FAULT,
        },
    }


# A placeholder task id in the URLs studio-single.js fills in.
ANY_TASK = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class Result:
    url: str
    kind: str  # image, video, audio, file
    mime: str
    filename: str
    n: int


def _card(task: Task, *, note: str = "") -> dict[str, Any]:
    """One run as the Studio shows it."""
    results = []
    if task.results_available:
        for n, r in enumerate(task.results):
            mime = str(r.get("mime") or "application/octet-stream")
            kind = mime.split("/")[0]
            ext = str(r.get("name", "")).rsplit(".", 1)[-1] if "." in str(r.get("name")) else ""
            results.append(
                Result(
                    url=reverse("api-task-result", args=[task.pk, n]),
                    kind=kind if kind in ("image", "video", "audio") else "file",
                    mime=mime,
                    filename=f"{task.pk}-{n}" + (f".{ext}" if ext else ""),
                    n=n + 1,
                )
            )
    return {
        "task": task,
        "results": results,
        "label": single_label(task),
        "fault": fault(task.error_kind),
        "note": note,
        "reserved": credits_phrase(task.reserved_micro),
        "charged": credits_phrase(task.charged_micro),
        "refunded": credits_phrase(task.refunded_micro),
    }


def _render_card(request: HttpRequest, task: Task, *, note: str = "") -> HttpResponse:
    return render(request, "pages/studio/_task.html", {"run": _card(task, note=note)})


def _page(request: HttpRequest, context: dict[str, Any], *, status: int = 200) -> HttpResponse:
    runs = selectors.history_for_user(user=request.user).select_related("model")[:RECENT_RUNS]
    context.setdefault("runs", [_card(t) for t in runs])
    return render(request, "pages/studio.html", context, status=status)


def _studio_url(model: AIModel) -> str:
    return f"{reverse('studio')}?{urlencode({'model': model.slug})}"


# --- views -----------------------------------------------------------------------------------


@login_required
@require_GET
def studio(request: HttpRequest) -> HttpResponse:
    """The Studio, opened on ``?model=``, ``?category=``, or ``?rerun=<task id>`` (the form
    prefilled from one of the user's tasks; someone else's id is ignored), else the default."""
    models = _studio_models()
    rerun = None
    if request.GET.get("rerun"):
        rerun = selectors.task_get_for_user(user=request.user, task_id=request.GET["rerun"])
    if rerun is not None and rerun.model_slug in {m.slug for m in models}:
        model = _pick(models, slug=rerun.model_slug)
        reuse = [
            u
            for u in (
                selectors.upload_get_for_user(user=request.user, upload_id=i)
                for i in rerun.upload_ids[: max(0, int((model.file_rules or {}).get("max", 0)))]
            )
            if u is not None
        ]
        context = _workspace(
            request,
            models,
            model,
            prompt=rerun.prompt,
            values=rerun.params,
            reuse=reuse,
            rerun_of=rerun,
        )
    else:
        model = _pick(models, slug=request.GET.get("model"), category=request.GET.get("category"))
        context = _workspace(request, models, model)
    return _page(request, context)


@login_required
@require_GET
def studio_form(request: HttpRequest) -> HttpResponse:
    """The model picker and form for another model or category (swapped in place); the prompt
    typed so far is carried over."""
    models = _studio_models()
    model = _pick(models, slug=request.GET.get("model"), category=request.GET.get("category"))
    context = _workspace(request, models, model, prompt=request.GET.get("prompt", ""))
    if not is_htmx(request):
        return _page(request, context)
    response = render(request, "pages/studio/_workspace.html", context)
    if model is not None:
        response["HX-Push-Url"] = _studio_url(model)
    return response


@login_required
@require_http_methods(["GET", "POST"])
def studio_price(request: HttpRequest) -> HttpResponse:
    """The price bar: this request's price (``task_price``) next to the available credits.
    A per-character model's form posts its text (``prompt``), which may be long."""
    data = request.POST if request.method == "POST" else request.GET
    model = _pick(_studio_models(), slug=data.get("model"))
    if model is None or model.slug != data.get("model"):
        raise Http404("No such model.")
    params, errors = forms.params_from_form(model.params_schema, data)
    quote = (
        Quote(None, billing.balance_for_user(user=request.user).available)
        if errors
        else _quote(user=request.user, model=model, params=params, text=data.get("prompt"))
    )
    return render(request, "pages/studio/_price.html", {"quote": quote, "model": model})


@login_required
@require_POST
def studio_submit(request: HttpRequest) -> HttpResponse:
    """Submit the form: field errors inline, a duplicate heavy run asks to confirm first
    (``confirm=1`` resubmits), otherwise the task joins the runs and is watched live."""
    files = request.FILES.getlist("files")  # parses the body: the size mark is set by now
    data = request.POST
    models = _studio_models()
    model = _pick(models, slug=data.get("model"))
    if model is None or model.slug != data.get("model"):
        return _answer(request, models, None, notice=("error", "Pick a model first."))
    prompt = data.get("prompt", "")
    context = {"models": models, "model": model, "prompt": prompt, "data": data}
    if _service(model) is not None:
        # The single form posts to the API from the page's script; without it, it lands here.
        notice = (
            "error",
            f"{model.name} answers inside the page, which needs JavaScript: turn it on and "
            "try again, or use the API (POST /api/v1/single/…).",
        )
        return _answer(request, **context, notice=notice)
    if upload_too_large(request):
        errors = {"files": ["This file is over the upload limit; choose a smaller one."]}
        return _answer(request, **context, errors=errors)
    params, errors = forms.params_from_form(model.params_schema, data)
    if errors:
        return _answer(request, **context, errors=errors)
    upload_ids = data.getlist("upload_ids")
    if data.get("confirm") != "1":
        try:
            duplicate = _heavy_duplicate(
                user=request.user, model=model, prompt=prompt, params=params
            )
        except ValidationFailed as exc:
            return _answer(request, **context, errors=exc.fields)
        if duplicate is not None:
            return _answer(request, **context, duplicate=duplicate)
    try:
        outcome = services.task_submit(
            user=request.user,
            model_slug=model.slug,
            prompt=prompt,
            params=params,
            upload_ids=upload_ids,
            files=files,
        )
    except ValidationFailed as exc:
        return _answer(request, **context, errors=exc.fields)
    except CapacityExceeded as exc:
        return _answer(request, **context, notice=("warning", exc.message))
    if not outcome.accepted:
        # Recorded as FAILED (with a notification): the header's bell changes too.
        return _answer(
            request,
            **context,
            notice=("error", outcome.task.error_message or "Not enough credits."),
            short_of_credits=True,
            changed=True,
        )
    return _answer(request, **context, task=outcome.task, changed=True)


def _heavy_duplicate(
    *, user: Any, model: AIModel, prompt: str, params: dict[str, Any]
) -> selectors.DuplicateRuns | None:
    """The duplicate runs to warn about, when this run is heavy and repeats them; else None.
    Raises ValidationFailed for params the submit would refuse anyway."""
    normalized = normalize_params(model.params_schema, params)
    price = task_price(model=model, params=normalized, durations_ms=[])
    if not selectors.run_is_heavy(model=model, price_micro=price):
        return None
    duplicate = selectors.duplicate_runs_for_user(user=user, model_slug=model.slug, prompt=prompt)
    return duplicate if duplicate.is_duplicate else None


def _answer(
    request: HttpRequest,
    models: list[AIModel],
    model: AIModel | None,
    *,
    prompt: str = "",
    data: Any = None,
    errors: dict[str, list[str]] | None = None,
    notice: tuple[str, str] | None = None,
    duplicate: selectors.DuplicateRuns | None = None,
    task: Task | None = None,
    short_of_credits: bool = False,
    changed: bool = False,
) -> HttpResponse:
    """The submit's answer. With htmx: the notice above the submit button, every field's error
    slot (swapped out of band, so earlier errors clear and chosen files stay chosen) and the new
    run at the top of the runs. Without: the whole page."""
    errors = errors or {}
    slots, elsewhere = _errors_by_slot(errors, model)
    if elsewhere and notice is None:
        notice = ("error", " ".join(elsewhere))
    elif errors and notice is None:
        notice = ("error", "Please fix the highlighted fields.")
    context: dict[str, Any] = {
        "model": model,
        "notice": notice,
        "duplicate_window_hours": int(selectors.DUPLICATE_FAILURE_WINDOW.total_seconds() // 3600),
        "duplicate": duplicate,
        "duplicate_prompt": prompt,
        "short_of_credits": short_of_credits,
        "new_run": _card(task) if task else None,
    }
    if is_htmx(request):
        context["slots"] = sorted(slots.items())
        response = render(request, "pages/studio/_submitted.html", context)
    else:
        values = None
        if model is not None and data is not None:
            values, _ = forms.params_from_form(model.params_schema, data)
        context.update(
            _workspace(request, models, model, prompt=prompt, values=values, errors=errors)
        )
        response = _page(request, context, status=400 if errors else 200)
    if changed:
        mark_changed(response)
    return response


@login_required
@require_GET
def studio_task(request: HttpRequest, pk: str) -> HttpResponse:
    """One run, polled every second while unfinished. ``?seen=<status>`` is what the page shows:
    unchanged answers 204 (nothing to swap, nothing re-announced); a run that has just finished
    also refreshes the header (credits, bell)."""
    task = selectors.task_get_for_user(user=request.user, task_id=pk)
    if task is None:
        raise Http404("No such task.")
    seen = request.GET.get("seen")
    if seen == task.status and not task.is_finished:
        return HttpResponse(status=204)
    response = _render_card(request, task)
    if task.is_finished and seen in Task.UNFINISHED:
        mark_changed(response)
    return response


@login_required
@require_GET
def studio_result(request: HttpRequest, pk: str) -> HttpResponse:
    """A single task's result as the Studio shows it under its form once the request has
    answered: the text and word timings (read back with ``single_result``) or the speech."""
    task = selectors.task_get_for_user(user=request.user, task_id=pk)
    if task is None or not task.single_type:
        raise Http404("No such task.")
    result = single_result(task) if task.status == Task.Status.SUCCESS else None
    context = {
        "task": task,
        "run": _card(task),
        "shown": single_shown(task, result),
        "audio_url": reverse("api-task-result", args=[task.pk, 0])
        if task.results_available and str(task.results[0].get("mime", "")).startswith("audio/")
        else "",
    }
    return render(request, "pages/studio/_single_result.html", context)


@login_required
@require_POST
def studio_cancel(request: HttpRequest, pk: str) -> HttpResponse:
    """Cancel a run (its credits released); one that finished meanwhile is shown as it is."""
    task = selectors.task_get_for_user(user=request.user, task_id=pk)
    if task is None:
        raise Http404("No such task.")
    note = ""
    try:
        task = services.task_cancel(task_id=task.pk, actor=request.user)
    except TaskFinished:
        task.refresh_from_db()
        note = "It had already finished."
    if not is_htmx(request):
        return redirect("studio")
    response = _render_card(request, task, note=note)
    mark_changed(response)
    return response


urlpatterns = [
    path("studio/", studio, name="studio"),
    path("studio/form/", studio_form, name="studio-form"),
    path("studio/price/", studio_price, name="studio-price"),
    path("studio/submit/", studio_submit, name="studio-submit"),
    path("studio/tasks/<uuid:pk>/", studio_task, name="studio-task"),
    path("studio/tasks/<uuid:pk>/result/", studio_result, name="studio-result"),
    path("studio/tasks/<uuid:pk>/cancel/", studio_cancel, name="studio-cancel"),
]
