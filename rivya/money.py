"""Credits <-> micro-credits. Amounts are integers in micro-credits everywhere but the edges."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from rivya.errors import InvalidAmount

MICRO = 1_000_000
MAX_MICRO = 10**15  # one billion credits: far above any real balance, well inside BIGINT


def format_credits(micro: int) -> str:
    """12_500_000 -> "12.5"; 10_000_000 -> "10"; -500_000 -> "-0.5"."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")


def credits_phrase(micro: int) -> str:
    """An amount in words, singular when it is one: "1 credit", "0.5 credits", "12 credits"."""
    amount = format_credits(micro)
    return f"{amount} credit" if amount == "1" else f"{amount} credits"


def parse_credits(
    text: str | int | Decimal, *, allow_negative: bool = False, allow_zero: bool = False
) -> int:
    """Parse a credit amount ("25", "0.5", "-3") into micro-credits; at most 6 decimal places."""
    if isinstance(text, float):
        raise InvalidAmount("Amounts must be given as decimal strings, not floats.")
    try:
        value = Decimal(str(text).strip())
    except (InvalidOperation, ValueError):
        raise InvalidAmount(f"{text!r} is not a number of credits.") from None
    if not value.is_finite():
        raise InvalidAmount(f"{text!r} is not a number of credits.")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise InvalidAmount("Credit amounts have at most 6 decimal places.")
    return check_micro(int(micro), allow_negative=allow_negative, allow_zero=allow_zero)


def check_micro(amount: object, *, allow_negative: bool = False, allow_zero: bool = False) -> int:
    """Refuse anything but an integer amount of micro-credits in range."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount("Amounts are integer micro-credits; non-integer amounts are refused.")
    if amount < 0 and not allow_negative:
        raise InvalidAmount("The amount must not be negative.")
    if amount == 0 and not allow_zero:
        raise InvalidAmount("The amount must not be zero.")
    if abs(amount) > MAX_MICRO:
        raise InvalidAmount("The amount is too large.")
    return amount
