"""Budget spend, sans-IO: amounts per (budget, bucket), in-flight estimates included.

A request's ``Charge`` adds its live estimate as it streams (input when sent, output chunk by
chunk) and, when it ends, the difference between the settled count and what it had added. The
store (state.py) receives the pending deltas every second and, when shared (Redis), answers with
the totals every replica has added.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .budgets import Budget, Status, status

Key = tuple[str, int]  # (budget name, bucket start)


class Ledger:
    def __init__(self, budgets: Iterable[Budget] = ()) -> None:
        self._lock = threading.Lock()
        self._spend: dict[Key, float] = defaultdict(float)
        self._pending: dict[Key, float] = defaultdict(float)
        self.budgets: tuple[Budget, ...] = tuple(budgets)

    def set_budgets(self, budgets: Iterable[Budget]) -> None:
        """A reload: spend already recorded under a budget's name stays with that name."""
        self.budgets = tuple(budgets)

    def matching(self, labels: Mapping[str, str]) -> tuple[Budget, ...]:
        return tuple(b for b in self.budgets if b.covers(labels))

    def add(self, budgets: Iterable[Budget], tokens: float, usd: float | None,
            now: float) -> None:
        with self._lock:
            for b in budgets:
                amount = tokens if b.limit_tokens is not None else usd
                if not amount:
                    continue
                key = (b.name, b.bucket(now))
                self._spend[key] += amount
                self._pending[key] += amount

    def spent(self, budget: Budget, now: float) -> float:
        if budget.window != "rolling":
            return self._spend.get((budget.name, budget.bucket(now)), 0.0)
        start = now - budget.rolling_seconds
        size = budget.bucket_seconds()
        with self._lock:
            return sum(v for (name, bucket), v in self._spend.items()
                       if name == budget.name and bucket + size > start)

    def status(self, budget: Budget, now: float) -> Status:
        return status(budget, self.spent(budget, now), now)

    def statuses(self, now: float) -> list[Status]:
        return [self.status(b, now) for b in self.budgets]

    def live_keys(self, now: float) -> list[Key]:
        """Buckets that still count toward some budget's current window."""
        keys = []
        for b in self.budgets:
            if b.window == "rolling":
                size = b.bucket_seconds()
                first = int((now - b.rolling_seconds) // size) * size
                keys += [(b.name, t) for t in range(first, int(now) + 1, size)]
            else:
                keys.append((b.name, b.bucket(now)))
        return keys

    def expiry(self, key: Key) -> float:
        """When a bucket stops mattering (for stores that expire keys)."""
        budget = next((b for b in self.budgets if b.name == key[0]), None)
        if budget is None:
            return key[1] + 86400.0
        if budget.window == "rolling":
            return key[1] + budget.rolling_seconds + budget.bucket_seconds()
        return budget.window_bounds(key[1] + 1)[1]

    def take_pending(self) -> dict[Key, float]:
        with self._lock:
            pending, self._pending = dict(self._pending), defaultdict(float)
        return {k: v for k, v in pending.items() if v}

    def restore_pending(self, deltas: Mapping[Key, float]) -> None:
        """A flush failed: keep the deltas for the next attempt."""
        with self._lock:
            for k, v in deltas.items():
                self._pending[k] += v

    def load(self, totals: Mapping[Key, float]) -> None:
        """Totals from the store; deltas not yet flushed stay on top of them."""
        with self._lock:
            for k, v in totals.items():
                self._spend[k] = v + self._pending.get(k, 0.0)

    def prune(self, now: float) -> None:
        keep = set(self.live_keys(now))
        with self._lock:
            for k in [k for k in self._spend if k not in keep and k not in self._pending]:
                del self._spend[k]


@dataclass(slots=True)
class Charge:
    """What one request has added to its budgets so far."""

    budgets: tuple[Budget, ...]
    # USD per input and output token for live spend (None: unpriced), resolved once per request.
    in_rate: float | None = None
    out_rate: float | None = None
    tokens: float = 0.0
    usd: float = 0.0
    blocking: tuple[Budget, ...] = field(default_factory=tuple)

    def add(self, ledger: Ledger, tokens: float, usd: float | None, now: float) -> None:
        if not self.budgets:
            return
        self.tokens += tokens
        self.usd += usd or 0.0
        ledger.add(self.budgets, tokens, usd, now)

    def settle(self, ledger: Ledger, tokens: float, usd: float | None, now: float) -> None:
        """Replace the live estimate with the settled amounts."""
        self.add(ledger, tokens - self.tokens, None if usd is None else usd - self.usd, now)


def exhausted(ledger: Ledger, budgets: Iterable[Budget], now: float,
              prompt_tokens: float = 0.0, prompt_usd: float | None = None) -> Budget | None:
    """The first blocking budget already at or over its limit, or that the request's prompt
    (its estimate times 1 + the budget's admit_margin) would take over it. Unpriced prompts
    count nothing against USD budgets."""
    for b in budgets:
        if b.action != "block":
            continue
        spent = ledger.spent(b, now)
        if spent >= b.limit:
            return b
        if b.admit_margin is not None:
            prompt = prompt_tokens if b.limit_tokens is not None else (prompt_usd or 0.0)
            if prompt and spent + prompt * (1 + b.admit_margin) > b.limit:
                return b
    return None
