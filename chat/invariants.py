"""Ledger invariant 4 for chat turns (docs/ledger.md, docs/chat.md), registered with billing's
``ledger_check`` registry, and the report of usage left uncollected.

Every assistant message that reserved credits has exactly one hold of that amount: open while it
streams; resolved once it finished, having captured what the message says it charged, the rest
released. A finished turn charged ``turn_cost`` of the tokens it recorded, capped at the hold,
and recorded the excess as uncollected.
"""

from __future__ import annotations

from typing import Any

from django.db import connection

from billing.invariants import describe_rows, query_rows, register, register_report


def _join() -> str:
    if connection.vendor == "postgresql":
        return "h.subject_type = 'chat.message' AND h.subject_id = CAST(m.id AS TEXT)"
    return "h.subject_type = 'chat.message' AND REPLACE(h.subject_id, '-', '') = m.id"


CHAT_BILLING_SQL = """
        SELECT m.id, m.status, m.reserved_micro, m.charged_micro, m.refunded_micro,
               h.id, h.status, h.amount, h.captured
        FROM chat_message m LEFT JOIN billing_hold h ON {join}
        WHERE m.role = 'assistant' AND (
            -- nothing reserved: no hold, nothing charged or given back
            (m.reserved_micro = 0 AND (h.id IS NOT NULL OR m.charged_micro <> 0
                OR m.refunded_micro <> 0))
            -- streaming: an open hold of exactly the reserved amount, nothing settled yet
            OR (m.reserved_micro > 0 AND m.status = 'STREAMING' AND (h.id IS NULL
                OR h.status <> 'open' OR h.amount <> m.reserved_micro
                OR m.charged_micro <> 0 OR m.refunded_micro <> 0))
            -- finished: the hold resolved, captured what the message charged, the rest released
            OR (m.reserved_micro > 0 AND m.status <> 'STREAMING' AND (h.id IS NULL
                OR h.status = 'open' OR h.amount <> m.reserved_micro
                OR h.captured <> m.charged_micro
                OR m.charged_micro + m.refunded_micro <> m.reserved_micro))
        )
        ORDER BY m.created_at"""


@register("4.chat_billing", "every chat turn's hold matches its message")
def check_chat_billing(cursor: Any) -> list[str]:
    # The only substitution is a fixed, vendor-specific join expression (no user input).
    rows = query_rows(cursor, CHAT_BILLING_SQL.replace("{join}", _join()))
    return describe_rows(
        rows,
        lambda r: (
            f"chat message {r[0]} ({r[1]}): reserved {r[2]}, charged {r[3]}, refunded {r[4]}; "
            f"hold {r[5] or 'none'} {r[6] or ''} amount {r[7]} captured {r[8]}"
        ),
    )


@register(
    "4.chat_charge", "a finished chat turn charged the cost of its tokens, capped at the hold"
)
def check_chat_charge(cursor: Any) -> list[str]:
    # Recomputed with the function that owns the price rule, from the message's own tokens and
    # price snapshot.
    from chat.services import turn_cost

    rows = query_rows(
        cursor,
        """
        SELECT id, reserved_micro, charged_micro, uncollected_micro, input_tokens,
               output_tokens, input_price_micro, output_price_micro
        FROM chat_message WHERE role = 'assistant' AND status <> 'STREAMING'""",
    )
    out = []
    for msg_id, reserved, charged, uncollected, tin, tout, pin, pout in rows:
        billed = turn_cost(
            input_tokens=tin or 0,
            output_tokens=tout or 0,
            input_price_micro=pin,
            output_price_micro=pout,
        )
        expected = min(billed, reserved)
        if charged != expected or uncollected != billed - expected:
            out.append(
                f"chat message {msg_id}: {tin} in / {tout} out tokens cost {billed}, reserved "
                f"{reserved}; charged {charged} (expected {expected}), uncollected "
                f"{uncollected} (expected {billed - expected})"
            )
    return out


HOLD_OWNER_SQL = """
        SELECT h.id, h.subject_id, m.id, m.role, m.user_id, a.user_id
        FROM billing_hold h
        LEFT JOIN chat_message m ON {join}
        LEFT JOIN billing_account a ON a.id = h.account_id
        WHERE h.subject_type = 'chat.message'
            AND (m.id IS NULL OR m.role <> 'assistant' OR a.user_id IS NULL
                 OR a.user_id <> m.user_id)
        ORDER BY h.id"""


@register("4.chat_hold_owner", "every chat hold is an assistant message's, on its user's account")
def check_chat_hold_owner(cursor: Any) -> list[str]:
    # The hold is the driving table here, so a hold whose message is missing shows too.
    rows = query_rows(cursor, HOLD_OWNER_SQL.replace("{join}", _join()))
    return describe_rows(
        rows,
        lambda r: (
            f"hold {r[0]} for chat message {r[1]}: "
            + ("no such message" if r[2] is None else f"{r[3]} message of user {r[4]}")
            + f", on the account of user {r[5]}"
        ),
    )


@register("4.chat_reserve", "a chat turn held its estimate: input estimate + max_tokens")
def check_chat_reserve(cursor: Any) -> list[str]:
    from chat.services import turn_cost

    rows = query_rows(
        cursor,
        """
        SELECT id, reserved_micro, input_tokens_estimate, max_tokens, input_price_micro,
               output_price_micro
        FROM chat_message WHERE role = 'assistant' AND reserved_micro > 0""",
    )
    out = []
    for msg_id, reserved, estimate, max_tokens, pin, pout in rows:
        expected = turn_cost(
            input_tokens=estimate,
            output_tokens=max_tokens or 0,
            input_price_micro=pin,
            output_price_micro=pout,
        )
        if reserved != expected:
            out.append(
                f"chat message {msg_id}: reserved {reserved}, but {estimate} input tokens and "
                f"max_tokens {max_tokens} at its prices come to {expected}"
            )
    return out


@register("4.chat_delivered", "delivered chat text was never free (priced models)")
def check_chat_delivered(cursor: Any) -> list[str]:
    rows = query_rows(
        cursor,
        """
        SELECT id, status, output_tokens FROM chat_message
        WHERE role = 'assistant' AND status <> 'STREAMING' AND content <> ''
            AND charged_micro = 0 AND output_price_micro > 0
        ORDER BY created_at""",
    )
    return describe_rows(
        rows, lambda r: f"chat message {r[0]} ({r[1]}) delivered text but charged nothing"
    )


@register_report("chat_uncollected", "chat usage reported beyond the hold (never charged)")
def report_uncollected(cursor: Any) -> list[str]:
    rows = query_rows(
        cursor,
        """
        SELECT id, reserved_micro, uncollected_micro, input_tokens, output_tokens
        FROM chat_message WHERE uncollected_micro > 0 ORDER BY created_at""",
    )
    return describe_rows(
        rows,
        lambda r: (
            f"chat message {r[0]}: the provider reported {r[3]} in / {r[4]} out tokens, "
            f"{r[2]} micro-credits beyond its hold of {r[1]}, uncollected"
        ),
    )


@register_report("chat_abandoned", "chat turns still streaming past the sweep's cutoff")
def report_abandoned(cursor: Any) -> list[str]:
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    cutoff = timezone.now() - timedelta(seconds=settings.CHAT_TURN_MAX_SECONDS + 120)
    rows = query_rows(
        cursor,
        """
        SELECT id, created_at, reserved_micro FROM chat_message
        WHERE status = 'STREAMING' AND created_at < %s ORDER BY created_at""",
        (cutoff,),
    )
    return describe_rows(
        rows,
        lambda r: (
            f"chat message {r[0]} streaming since {r[1]:%Y-%m-%d %H:%M:%S}, {r[2]} held: is "
            "the beat running chat.settle_abandoned?"
        ),
    )
