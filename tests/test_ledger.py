"""The ledger: live estimates count at once, settlement corrects, rolling windows slide."""

from __future__ import annotations

from sidecar.budgets import Budget
from sidecar.ledger import Charge, Ledger, exhausted

DAY = Budget("day", {"team": "r"}, "day", limit_tokens=1000, action="block")
USD = Budget("usd", {}, "day", limit_usd=1.0)
RATE = Budget("rate", {}, "rolling", rolling_seconds=600, limit_tokens=100)


def test_live_then_settled_correction() -> None:
    ledger = Ledger([DAY, USD])
    budgets = ledger.matching({"team": "r", "key": "k", "model": "m", "provider": "p"})
    charge = Charge(budgets, 1.0e-6, 2.0e-6, blocking=(DAY,))
    now = 86400 * 10 + 5.0
    charge.add(ledger, 300, 0.0003, now)  # prompt estimate
    charge.add(ledger, 500, 0.001, now)  # streamed output so far
    assert ledger.spent(DAY, now) == 800
    charge.settle(ledger, 950, 0.0025, now)  # reported usage
    assert ledger.spent(DAY, now) == 950 and abs(ledger.spent(USD, now) - 0.0025) < 1e-12
    assert exhausted(ledger, (DAY,), now) is None
    charge.settle(ledger, 1000, 0.0025, now)
    assert exhausted(ledger, (DAY,), now) is DAY
    assert ledger.matching({"team": "x"}) == (USD,)


def test_pending_deltas_flush_and_restore() -> None:
    ledger = Ledger([DAY])
    ledger.add((DAY,), 10, None, 100.0)
    deltas = ledger.take_pending()
    assert list(deltas.values()) == [10] and ledger.take_pending() == {}
    ledger.restore_pending(deltas)
    ledger.add((DAY,), 5, None, 100.0)
    assert list(ledger.take_pending().values()) == [15]
    # Totals from a shared store replace ours; unflushed deltas stay on top.
    ledger.add((DAY,), 1, None, 100.0)
    ledger.load({("day", DAY.bucket(100.0)): 500.0})
    assert ledger.spent(DAY, 100.0) == 501


def test_rolling_window_forgets_old_buckets() -> None:
    ledger = Ledger([RATE])
    ledger.add((RATE,), 60, None, 1000.0)
    ledger.add((RATE,), 30, None, 1300.0)
    assert ledger.spent(RATE, 1300.0) == 90
    assert ledger.spent(RATE, 1620.0) == 30  # the first bucket slid out
    ledger.prune(1620.0)
    assert ledger.spent(RATE, 1620.0) == 30
    assert ledger.expiry(("rate", 1000)) == 1000 + 600 + 10
