"""Random sequences of ledger operations against a plain reference model.

After every step: every invariant ``ledger_check`` knows holds, and each account's balance and
held agree with the model. Each example runs in a savepoint that is rolled back afterwards.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from billing import selectors, services
from billing.invariants import run_checks
from billing.models import LedgerTransaction
from rivya.errors import (
    HoldAlreadyResolved,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidAmount,
    NotReversible,
)

C = 1_000_000
EXAMPLES = int(os.environ.get("LEDGER_STATEFUL_EXAMPLES", "500"))
_names = itertools.count()

amounts = st.integers(min_value=1, max_value=40).map(lambda q: q * C // 4)
signed_amounts = st.integers(min_value=-40, max_value=40).filter(bool).map(lambda q: q * C // 4)
keys = st.sampled_from(["", "", "k1", "k2", "k3"])
subjects = st.sampled_from(["s1", "s2", "s3", "s4", "s5"])


@dataclass
class ModelHold:
    user: int
    amount: int
    status: str = "open"
    captured: int = 0


@dataclass
class ModelTxn:
    pk: int
    kind: str
    legs: dict[int, int]  # user index -> amount on that user's account
    reversed: bool = False


@dataclass
class Model:
    balance: list[int] = field(default_factory=lambda: [0, 0])
    holds: dict[str, ModelHold] = field(default_factory=dict)
    keyed: dict[tuple[int, str], tuple[Any, ...]] = field(default_factory=dict)
    txns: list[ModelTxn] = field(default_factory=list)

    def held(self, u: int) -> int:
        return sum(h.amount for h in self.holds.values() if h.user == u and h.status == "open")

    def available(self, u: int) -> int:
        return self.balance[u] - self.held(u)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.savepoint = transaction.savepoint()
        users = get_user_model().objects
        self.users = [users.create_user(username=f"sm{next(_names)}") for _ in range(2)]
        self.staff = users.create_user(username=f"sm-staff{next(_names)}", is_staff=True)
        self.model = Model()

    def teardown(self) -> None:
        transaction.savepoint_rollback(self.savepoint)

    def _keyed(self, u: int, key: str, args: tuple[Any, ...]) -> str:
        """'new', 'replay' or 'reused' for a keyed single-phase operation."""
        if not key:
            return "new"
        seen = self.model.keyed.get((u, key))
        if seen is None:
            return "new"
        return "replay" if seen == args else "reused"

    @rule(u=st.integers(0, 1), amount=amounts, key=keys)
    def grant(self, u: int, amount: int, key: str) -> None:
        args = ("grant", amount)
        expected = self._keyed(u, key, args)
        if expected == "reused":
            with pytest.raises(IdempotencyKeyReused):
                services.grant(user=self.users[u], amount=amount, reason="g", idempotency_key=key)
            return
        txn = services.grant(user=self.users[u], amount=amount, reason="g", idempotency_key=key)
        if expected == "new":
            self.model.balance[u] += amount
            self.model.txns.append(ModelTxn(txn.pk, "grant", {u: amount}))
            if key:
                self.model.keyed[(u, key)] = args

    @rule(u=st.integers(0, 1), amount=signed_amounts, key=keys)
    def adjust(self, u: int, amount: int, key: str) -> None:
        args = ("adjust", amount)
        expected = self._keyed(u, key, args)
        call = lambda: services.adjust(
            user=self.users[u],
            amount=amount,
            actor=self.staff,
            reason="a",
            idempotency_key=key,
        )
        if expected == "reused":
            with pytest.raises(IdempotencyKeyReused):
                call()
            return
        if expected == "new" and self.model.available(u) + amount < 0:
            with pytest.raises(InsufficientCredits):
                call()
            return
        txn = call()
        if expected == "new":
            self.model.balance[u] += amount
            self.model.txns.append(ModelTxn(txn.pk, "adjustment", {u: amount}))
            if key:
                self.model.keyed[(u, key)] = args

    @rule(u=st.integers(0, 1), subject=subjects, amount=amounts)
    def hold(self, u: int, subject: str, amount: int) -> None:
        call = lambda: services.hold_create(
            user=self.users[u],
            amount=amount,
            subject_type="sm",
            subject_id=subject,
        )
        existing = self.model.holds.get(subject)
        if existing is not None:
            if (existing.user, existing.amount) == (u, amount):
                call()  # a replay: nothing changes
            else:
                with pytest.raises(IdempotencyKeyReused):
                    call()
            return
        if self.model.available(u) < amount:
            with pytest.raises(InsufficientCredits):
                call()
            return
        call()
        self.model.holds[subject] = ModelHold(user=u, amount=amount)

    @rule(subject=subjects, part=st.sampled_from([None, 0, 1, 2, 3, 4, 5]))
    def capture(self, subject: str, part: int | None) -> None:
        """``part`` quarters of the hold (None: the whole hold; 5: more than held)."""
        hold = self.model.holds.get(subject)
        if hold is None:
            return
        db_hold = selectors.hold_for_subject(subject_type="sm", subject_id=subject)
        amount = None if part is None else hold.amount * part // 4
        target = hold.amount if amount is None else amount
        call = lambda: services.hold_capture(hold=db_hold, amount=amount)
        if target > hold.amount:
            with pytest.raises(InvalidAmount):
                call()
            return
        final = "released" if target == 0 else "captured"
        if hold.status == "open":
            call()
            hold.status, hold.captured = final, (0 if final == "released" else target)
            if final == "captured":
                capture = LedgerTransaction.objects.get(hold=db_hold)
                self.model.balance[hold.user] -= target
                self.model.txns.append(ModelTxn(capture.pk, "capture", {hold.user: -target}))
        elif hold.status == final and hold.captured == (0 if final == "released" else target):
            call()  # the same resolution again: harmless
        else:
            with pytest.raises(HoldAlreadyResolved):
                call()

    @rule(subject=subjects)
    def release(self, subject: str) -> None:
        hold = self.model.holds.get(subject)
        if hold is None:
            return
        db_hold = selectors.hold_for_subject(subject_type="sm", subject_id=subject)
        if hold.status == "captured":
            with pytest.raises(HoldAlreadyResolved):
                services.hold_release(hold=db_hold)
            return
        services.hold_release(hold=db_hold)
        hold.status = "released"

    @rule(index=st.integers(0, 30))
    def reverse(self, index: int) -> None:
        if not self.model.txns:
            return
        txn = self.model.txns[index % len(self.model.txns)]
        call = lambda: services.reverse(txn=txn.pk, actor=self.staff, reason="r")
        if txn.kind == "reversal" or txn.reversed:
            with pytest.raises(NotReversible):
                call()
            return
        if any(self.model.available(u) - amount < 0 for u, amount in txn.legs.items()):
            with pytest.raises(InsufficientCredits):
                call()
            return
        rev = call()
        txn.reversed = True
        for u, amount in txn.legs.items():
            self.model.balance[u] -= amount
        self.model.txns.append(ModelTxn(rev.pk, "reversal", {u: -a for u, a in txn.legs.items()}))

    @invariant()
    def ledger_agrees_with_model(self) -> None:
        breaches = run_checks()
        assert breaches == [], breaches
        for u, user in enumerate(self.users):
            balance = selectors.balance_for_user(user=user)
            assert (balance.balance, balance.held) == (self.model.balance[u], self.model.held(u))
            assert balance.available >= 0


@pytest.mark.django_db
def test_random_ledger_operations_keep_every_invariant() -> None:
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=12,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
