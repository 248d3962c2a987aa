"""Chat writes: sessions, and a turn's reserve-and-settle (``docs/chat.md``).

A turn runs in three steps. ``start_turn`` (one transaction) records the user message and the
assistant message (STREAMING) and holds the turn's estimated cost; the caller then streams the
reply from the provider with no database connection held (``chat.streaming``); ``finish_turn``
(one transaction) stores the reply and settles the hold from the usage the provider reported,
exactly once. ``settle_abandoned_turns`` settles turns whose server died mid-stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from rest_framework.renderers import JSONRenderer

from billing import selectors as billing_selectors
from billing import services as billing
from chat import tokens, tools
from chat.api.serializers import ChatMessageSerializer
from chat.models import ChatMessage, ChatSession
from notifications import webhooks
from rivya.errors import (
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InsufficientCredits,
    NotFound,
    ValidationFailed,
    contains_nul,
    json_depth,
)
from rivya.money import credits_phrase
from tasks.models import AIModel, Category
from tasks.providers.base import (
    ChatRequest,
    ChatToolCall,
    ChatTurnMessage,
    ChatUsage,
    ProviderError,
)
from tasks.validation import normalize_params

log = logging.getLogger(__name__)

SUBJECT = "chat.message"
TITLE_LENGTH = 60
MAX_JSON_DEPTH = 8
# A turn's attempts to hold when concurrent turns of the same account take the credits first.
HOLD_ATTEMPTS = 3
# Chat models whose catalog entry predates the chat fields.
DEFAULT_CONTEXT_WINDOW = 4096
DEFAULT_MAX_OUTPUT_TOKENS = 1024
# Provider error codes the user can correct by changing the message; others are the provider's.
USER_CORRECTABLE = frozenset({"content_policy", "invalid_request", "context_length_exceeded"})
INTERRUPTED = "turn_interrupted"


# --- the rules: one function each --------------------------------------------------------


@dataclass(frozen=True)
class ChatLimits:
    input_price_micro: int
    output_price_micro: int
    context_window: int
    max_output_tokens: int


def chat_limits(model: AIModel) -> ChatLimits:
    """A chat model's token prices and limits (the output price is ``price_micro``)."""
    output_price = model.price_micro
    input_price = model.input_price_micro if model.input_price_micro is not None else output_price
    window = model.context_window or DEFAULT_CONTEXT_WINDOW
    max_output = min(model.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS, window)
    return ChatLimits(input_price, output_price, window, max_output)


def turn_cost(
    *, input_tokens: int, output_tokens: int, input_price_micro: int, output_price_micro: int
) -> int:
    """What a turn's tokens cost in micro-credits: the one price rule of chat."""
    return input_tokens * input_price_micro + output_tokens * output_price_micro


def chat_model(slug: Any) -> AIModel:
    """An enabled chat model, or 400 (``unknown_model`` / ``model_not_available``)."""
    if not isinstance(slug, str) or not slug:
        raise ValidationFailed({"model": ["Name a chat model by its slug."]})
    model = AIModel.objects.filter(slug=slug, enabled=True).first()
    if model is None:
        raise ValidationFailed({"model": [f"No model {slug!r}."]}, code="unknown_model")
    if model.category != Category.CHAT or model.billing_type != AIModel.BillingType.PER_TOKEN:
        raise ValidationFailed(
            {"model": [f"{model.name} is not a chat model."]}, code="model_not_available"
        )
    return model


# --- sessions --------------------------------------------------------------------------------


def _title(value: Any) -> str:
    if not isinstance(value, str) or contains_nul(value):
        raise ValidationFailed({"title": ["Must be text."]})
    value = " ".join(value.split())
    if len(value) > 200:
        raise ValidationFailed({"title": ["At most 200 characters."]})
    return value


def create_session(*, user: Any, model_slug: Any, title: Any = "") -> ChatSession:
    model = chat_model(model_slug)
    return ChatSession.objects.create(user=user, model=model, title=_title(title or ""))


def rename_session(*, session: ChatSession, title: Any) -> ChatSession:
    session.title = _title(title)
    session.updated_at = timezone.now()
    session.save(update_fields=["title", "updated_at"])
    return session


def delete_session(*, session: ChatSession) -> None:
    """Hide the session and its messages from the user. A turn still streaming runs to its end
    and is settled; the rows stay, because the ledger refers to them."""
    ChatSession.objects.filter(pk=session.pk, deleted_at=None).update(deleted_at=timezone.now())


def session_for_user(*, user: Any, session_id: Any, lock: bool = False) -> ChatSession:
    qs = ChatSession.objects.select_related("model").filter(user=user, deleted_at=None)
    if lock:
        qs = qs.select_for_update(of=("self",))
    try:
        return qs.get(pk=session_id)
    except (ChatSession.DoesNotExist, ValueError, ValidationError):
        raise NotFound("No such chat session.", code="chat_session_not_found") from None


# --- a turn ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TurnStart:
    """What ``start_turn`` decided: the assistant message (STREAMING, with its hold) and the
    request for the provider; or, for a replayed idempotency key, the finished message."""

    message: ChatMessage
    provider: str = ""
    request: ChatRequest | None = None
    replayed: bool = False


def _content(model: AIModel, content: Any) -> str:
    if not isinstance(content, str):
        raise ValidationFailed({"content": ["Must be text."]})
    if contains_nul(content):
        raise ValidationFailed({"content": ["Must not contain NUL characters."]})
    if not content.strip():
        raise ValidationFailed({"content": ["Write a message."]})
    if len(content) > model.max_prompt_length:
        raise ValidationFailed(
            {"content": [f"At most {model.max_prompt_length} characters for {model.name}."]}
        )
    return content


def _max_tokens(limits: ChatLimits, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationFailed({"max_tokens": ["Must be a whole number."]})
    if isinstance(value, float):
        if not value.is_integer():
            raise ValidationFailed({"max_tokens": ["Must be a whole number."]})
        value = int(value)
    if not 1 <= value <= limits.max_output_tokens:
        raise ValidationFailed(
            {"max_tokens": [f"Must be between 1 and {limits.max_output_tokens}."]}
        )
    return value


def _params(model: AIModel, params: Any) -> dict[str, Any]:
    if json_depth(params) > MAX_JSON_DEPTH:
        raise ValidationFailed({"params": [f"Nested deeper than {MAX_JSON_DEPTH} levels."]})
    if contains_nul(params):
        raise ValidationFailed({"params": ["Must not contain NUL characters."]})
    return normalize_params(model.params_schema, params)


def _replay(*, user: Any, key: str, fingerprint: str) -> ChatMessage | None:
    earlier = ChatMessage.objects.filter(user=user, idempotency_key=key).first()
    if earlier is None:
        return None
    if earlier.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    if not earlier.is_finished:
        raise IdempotencyInProgress()
    return earlier


@dataclass(frozen=True)
class _Context:
    messages: tuple[ChatTurnMessage, ...]
    input_tokens: int
    dropped: int


def _context(session: ChatSession, content: str, budget: int) -> _Context:
    """The newest history that fits ``budget`` input tokens with the new message; the oldest
    messages are left out first (a user message with its reply, never a reply alone)."""
    history = list(
        ChatMessage.objects.filter(session=session)
        .exclude(content="")
        .filter(
            role__in=(ChatMessage.Role.USER, ChatMessage.Role.ASSISTANT),
        )
        .exclude(role=ChatMessage.Role.ASSISTANT, status=ChatMessage.Status.STREAMING)
        .order_by("-created_at", "-id")
        .values_list("role", "content", "tool_calls")[: settings.CHAT_HISTORY_MAX_MESSAGES]
    )
    used = tokens.request_tokens([content])
    kept: list[tuple[str, str]] = []
    for role, text, calls in history:
        if calls:  # the model is told how its tool calls went
            text = f"{text}\n\n{tools.context_note(calls)}"
        cost = tokens.message_tokens(text)
        if used + cost > budget:
            break
        kept.append((role, text))
        used += cost
    # A reply without the question it answers reads wrong: drop a leading assistant message.
    if kept and kept[-1][0] == ChatMessage.Role.ASSISTANT:
        used -= tokens.message_tokens(kept.pop()[1])
    total = ChatMessage.objects.filter(session=session).exclude(content="").count()
    messages = tuple(ChatTurnMessage(role, text) for role, text in reversed(kept))
    return _Context(
        messages=(*messages, ChatTurnMessage(ChatMessage.Role.USER, content)),
        input_tokens=used,
        dropped=max(0, total - len(kept)),
    )


def start_turn(
    *,
    user: Any,
    session_id: Any,
    content: Any,
    max_tokens: Any = None,
    params: Any = None,
    idempotency_key: str | None = None,
    fingerprint: str = "",
) -> TurnStart:
    """Record a turn and hold its estimated cost, before any provider call.

    The estimate is the input (history that fits the context window, plus the new message,
    counted by ``chat.tokens``) and ``max_tokens`` at the output price; ``max_tokens`` is lowered
    to what the available credits afford (``max_tokens_requested`` keeps the asked value).
    Raises InsufficientCredits (402) when not even one reply token is affordable, and the
    validation errors of the API contract; a replayed ``idempotency_key`` returns the first
    turn's message (``replayed``), or 409 while it still streams.
    """
    if idempotency_key is not None:
        billing.check_idempotency_key(idempotency_key)
        earlier = _replay(user=user, key=idempotency_key, fingerprint=fingerprint)
        if earlier is not None:
            return TurnStart(message=earlier, replayed=True)
    session = session_for_user(user=user, session_id=session_id)
    model = session.model
    if not model.enabled:
        raise ValidationFailed(
            {"model": [f"{model.name} is no longer available; start a chat with another."]},
            code="model_not_available",
        )
    limits = chat_limits(model)
    content = _content(model, content)
    requested = _max_tokens(limits, max_tokens)
    params = _params(model, params)

    new_tokens = tokens.request_tokens([content])
    if new_tokens >= limits.context_window:
        raise ValidationFailed(
            {
                "content": [
                    f"Too long for {model.name}'s context of {limits.context_window} tokens."
                ]
            },
            code="context_window_exceeded",
        )
    wanted = min(requested or limits.max_output_tokens, limits.context_window - new_tokens)
    context = _context(session, content, limits.context_window - wanted)

    for attempt in range(HOLD_ATTEMPTS):
        available = billing_selectors.balance_for_user(user=user).available
        input_cost = turn_cost(
            input_tokens=context.input_tokens,
            output_tokens=0,
            input_price_micro=limits.input_price_micro,
            output_price_micro=limits.output_price_micro,
        )
        affordable = (
            (available - input_cost) // limits.output_price_micro
            if limits.output_price_micro
            else wanted
        )
        allowed = min(wanted, affordable)
        if allowed < 1:
            raise InsufficientCredits(
                "Not enough credits for this message: it needs at least "
                f"{credits_phrase(input_cost + limits.output_price_micro)} available, you have "
                f"{credits_phrase(max(0, available))}. Add credits, or shorten the chat.",
                extra={"available_micro": max(0, available)},
            )
        reserve = turn_cost(
            input_tokens=context.input_tokens,
            output_tokens=allowed,
            input_price_micro=limits.input_price_micro,
            output_price_micro=limits.output_price_micro,
        )
        try:
            message = _record_turn(
                user=user,
                session=session,
                content=content,
                params=params,
                limits=limits,
                context=context,
                wanted=wanted,
                allowed=allowed,
                reserve=reserve,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
            )
        except InsufficientCredits:
            if attempt == HOLD_ATTEMPTS - 1:
                raise
            continue  # another turn took credits since we looked: afford less, or refuse
        except IntegrityError:
            # The same idempotency key, raced by a concurrent request that won.
            if idempotency_key is None:
                raise
            earlier = _replay(user=user, key=idempotency_key, fingerprint=fingerprint)
            if earlier is None:
                raise
            return TurnStart(message=earlier, replayed=True)
        request = ChatRequest(
            model=model.upstream_model,
            messages=context.messages,
            max_tokens=allowed,
            params=params,
            tools=tools.tool_definitions(tools.tool_models()),
        )
        return TurnStart(message=message, provider=model.provider, request=request)
    raise AssertionError("unreachable")  # pragma: no cover


@transaction.atomic
def _record_turn(
    *,
    user: Any,
    session: ChatSession,
    content: str,
    params: dict[str, Any],
    limits: ChatLimits,
    context: _Context,
    wanted: int,
    allowed: int,
    reserve: int,
    idempotency_key: str | None,
    fingerprint: str,
) -> ChatMessage:
    now = timezone.now()
    question = ChatMessage.objects.create(
        session=session, user=user, role=ChatMessage.Role.USER, content=content
    )
    answer = ChatMessage.objects.create(
        session=session,
        user=user,
        role=ChatMessage.Role.ASSISTANT,
        status=ChatMessage.Status.STREAMING,
        reply_to=question,
        model_slug=session.model.slug,
        params=params,
        input_price_micro=limits.input_price_micro,
        output_price_micro=limits.output_price_micro,
        max_tokens_requested=wanted,
        max_tokens=allowed,
        input_tokens_estimate=context.input_tokens,
        reserved_micro=reserve,
        context_dropped=context.dropped,
        context_messages=len(context.messages),
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint,
    )
    if reserve:
        billing.hold_create(
            user=user, amount=reserve, subject_type=SUBJECT, subject_id=str(answer.pk)
        )
    updates: dict[str, Any] = {"updated_at": now}
    if not session.title:
        updates["title"] = " ".join(content.split())[:TITLE_LENGTH]
    ChatSession.objects.filter(pk=session.pk).update(**updates)
    return answer


def _settlement(
    message: ChatMessage, *, content: str, usage: ChatUsage | None, streamed_tokens: int
) -> tuple[int, int, bool]:
    """(input tokens, output tokens, whether the provider reported them) billed for a turn.

    Reported usage is billed as reported. Without a report, Rivya counts: the input estimate
    and the tokens streamed (one per streamed piece; text that somehow came without pieces is
    estimated, so delivered text never costs 0); a turn that delivered nothing and reported
    nothing costs nothing.
    """
    if usage is not None:
        return max(0, usage.input_tokens), max(0, usage.output_tokens), True
    if not content and not streamed_tokens:
        return 0, 0, False
    return message.input_tokens_estimate, streamed_tokens or tokens.text_tokens(content), False


def finish_turn(
    *,
    message_id: Any,
    content: str,
    usage: ChatUsage | None,
    streamed_tokens: int,
    finish_reason: str,
    error: ProviderError | None = None,
    client_gone: bool = False,
    tool_calls: Sequence[ChatToolCall] = (),
) -> ChatMessage:
    """Store the reply and settle the turn's hold, exactly once (a second call returns the
    message as the first left it); then run the tools the model called (``chat.tools``), in the
    same transaction, so that each creates its task exactly once, with its own hold.

    Billed: ``turn_cost`` of the usage (``_settlement``), captured up to the hold; the rest of
    the hold is released (``refunded_micro``); what the provider reported beyond the hold is
    ``uncollected_micro``, never charged.
    """
    with transaction.atomic():
        message = ChatMessage.objects.select_for_update().get(pk=message_id)
        if message.is_finished:
            return message
        input_tokens, output_tokens, reported = _settlement(
            message, content=content, usage=usage, streamed_tokens=streamed_tokens
        )
        billed = turn_cost(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            input_price_micro=message.input_price_micro,
            output_price_micro=message.output_price_micro,
        )
        charged = min(billed, message.reserved_micro)
        if tool_calls and error is None:
            # Before the turn's capture, for the lock order every submit and settlement keeps
            # (capacity rows, then holds and accounts): the other way round, a tool call
            # settling while one of the user's tasks settles could deadlock. So the tools'
            # credit check still counts the turn's whole hold (a few hundredths of a credit).
            records = tools.run_tool_calls(user=message.user, calls=tool_calls, stopped=client_gone)
            message.tool_calls = records
            message.task_ids = tools.task_ids(records)
        if message.reserved_micro:
            hold = billing_selectors.hold_for_subject(
                subject_type=SUBJECT, subject_id=str(message.pk)
            )
            if hold is None:  # pragma: no cover - start_turn holds in the same transaction
                raise RuntimeError(f"chat message {message.pk} reserved without a hold")
            billing.hold_capture(hold=hold, amount=charged, reason="chat turn")
        message.content = content
        message.status = ChatMessage.Status.FAILED if error else ChatMessage.Status.COMPLETE
        message.input_tokens, message.output_tokens = input_tokens, output_tokens
        message.usage_reported = reported
        message.finish_reason = finish_reason[:16]
        message.charged_micro = charged
        message.refunded_micro = message.reserved_micro - charged
        message.uncollected_micro = billed - charged
        if error is not None:
            message.error_code = error.code or "provider_error"
            message.error_message = str(error)[:2000]
            message.error_kind = error_kind(error)
        now = timezone.now()
        message.finished_at = now
        if client_gone:
            message.client_gone_at = now
        message.save()
        webhooks.webhook_event_record(
            user_id=message.user_id,
            event_type="chat.message.completed",  # completed or failed: its status says
            subject_type=SUBJECT,
            subject_id=message.pk,
            data=lambda: message_api_shape(message),
        )
    if message.uncollected_micro:
        log.warning(
            "chat message %s: usage beyond the hold, %s micro-credits uncollected",
            message.pk,
            message.uncollected_micro,
        )
    return message


def message_api_shape(message: ChatMessage) -> dict[str, Any]:
    """The message as the API shows it, as plain JSON (a webhook event's ``data``)."""
    return dict(json.loads(JSONRenderer().render(ChatMessageSerializer(message).data)))


def error_kind(error: ProviderError) -> str:
    """Whose fault a failed turn was: ``user`` (change the message), ``infra`` (ours) or
    ``provider``."""
    if error.code in USER_CORRECTABLE:
        return "user"
    if error.code == INTERRUPTED:
        return "infra"
    return "provider"


def settle_abandoned_turns(*, now: datetime | None = None) -> int:
    """Settle turns still STREAMING long after any stream could have ended (the server that ran
    them died). Nothing was stored and no usage is known: the hold is released in full and the
    message says so (``turn_interrupted``, kind infra)."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.CHAT_TURN_MAX_SECONDS + 60)
    ids = list(
        ChatMessage.objects.filter(
            status=ChatMessage.Status.STREAMING, created_at__lt=cutoff
        ).values_list("pk", flat=True)[:500]
    )
    settled = 0
    for message_id in ids:
        try:
            _settle_interrupted(message_id)
        except Exception:
            log.exception("chat message %s: settling the abandoned turn failed", message_id)
        else:
            settled += 1
    return settled


def _settle_interrupted(message_id: Any) -> None:
    finish_turn(
        message_id=message_id,
        content="",
        usage=None,
        streamed_tokens=0,
        finish_reason="error",
        error=ProviderError(
            "The reply was interrupted on our side before it finished; nothing was charged. "
            "Send the message again.",
            retryable=True,
            code=INTERRUPTED,
        ),
    )


def release_connection() -> None:
    """Close this thread's database connection unless a transaction is open (a test's).

    Called before a turn streams, so that an open stream holds no PostgreSQL connection."""
    if not connection.in_atomic_block:
        connection.close()
