"""Learned estimate corrections for models without a public tokenizer, sans-IO.

After each request that has both a reported and an estimated count, the factor
``reported / estimated`` of that model moves toward the observed ratio, weighted by tokens, so
live estimates converge on what the provider bills. Outliers are ignored rather than learned:
ratios far from 1 come from things the text does not show (hidden reasoning, server-side tools,
context compaction), not from the tokenizer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# Observations whose ratio falls outside this band are not learned from (see module doc).
RATIO_BAND = (0.5, 2.0)
# Tokens of evidence after which old observations stop dominating: the factor keeps adapting.
MAX_WEIGHT = 50_000.0
# Requests smaller than this say more about framing overhead than about the tokenizer.
MIN_TOKENS = 20
# Additive overheads (structure.py): observations after which the mean stops moving faster,
# and after which an observation far from the mean is an outlier (not learned from).
OFFSET_MAX_SAMPLES = 50
OFFSET_SETTLED = 3


@dataclass(slots=True)
class Factor:
    value: float = 1.0
    weight: float = 0.0  # tokens of evidence behind value
    samples: int = 0


class Calibration:
    """Per (model, token type) correction factors; thread-safe for the metering threads."""

    def __init__(self, initial: dict[tuple[str, str], Factor] | None = None) -> None:
        self._factors: dict[tuple[str, str], Factor] = dict(initial or {})
        self._lock = threading.Lock()
        self.dirty = False
        # Moves whenever a learned value may have changed (readers cache what they read).
        self.version = 0

    def restore(self, factors: dict[tuple[str, str], Factor]) -> None:
        with self._lock:
            self._factors.update(factors)
            self.version += 1

    def adopt(self, factors: dict[tuple[str, str], Factor]) -> None:
        """Factors other processes learned (workers, replicas): each one backed by more
        samples than ours replaces ours."""
        with self._lock:
            for key, theirs in factors.items():
                ours = self._factors.get(key)
                if ours is None or theirs.samples > ours.samples:
                    self._factors[key] = Factor(theirs.value, theirs.weight, theirs.samples)
                    self.version += 1

    def learned(self, model: str | None, token_type: str) -> bool:
        f = self._factors.get((model or "", token_type))
        return f is not None and f.samples > 0

    def factor(self, model: str | None, token_type: str) -> float:
        f = self._factors.get((model or "", token_type))
        return f.value if f is not None else 1.0

    def observe(self, model: str | None, token_type: str, raw_estimate: float,
                reported: int, band: tuple[float, float] = RATIO_BAND) -> bool:
        """Learn from one settled request; True if the factor moved. ``band`` bounds the
        observed ratio to the current factor that is learned from (outliers are not)."""
        if not model or raw_estimate < MIN_TOKENS or reported < MIN_TOKENS:
            return False
        key = (model, token_type)
        with self._lock:
            f = self._factors.setdefault(key, Factor())
            ratio = reported / (raw_estimate * f.value)
            if not band[0] <= ratio <= band[1]:
                return False
            target = reported / raw_estimate
            w = min(f.weight, MAX_WEIGHT)
            f.value = (f.value * w + target * reported) / (w + reported)
            f.weight = w + reported
            f.samples += 1
            self.dirty = True
            self.version += 1
            return True

    def offset(self, model: str | None, kind: str) -> float | None:
        """A learned additive overhead (tokens), or None when nothing was learned."""
        f = self._factors.get((model or "", kind))
        return f.value if f is not None and f.samples else None

    def observe_offset(self, model: str | None, kind: str, value: float,
                       bounds: tuple[float, float]) -> bool:
        """Learn an additive overhead: a running mean over the last ``OFFSET_MAX_SAMPLES``
        observations within ``bounds``; once settled, an observation further from the mean
        than the mean itself (and more than 10 tokens) is an outlier and ignored."""
        if not model or not bounds[0] <= value <= bounds[1]:
            return False
        key = (model, kind)
        with self._lock:
            f = self._factors.setdefault(key, Factor(value=0.0))
            if f.samples >= OFFSET_SETTLED and abs(value - f.value) > max(10.0, f.value):
                return False
            self._add(f, value)
            return True

    def samples(self, model: str | None, kind: str) -> int:
        f = self._factors.get((model or "", kind))
        return f.samples if f is not None else 0

    def observe_mean(self, model: str | None, kind: str, value: float) -> float | None:
        """A running mean (over the last ``OFFSET_MAX_SAMPLES``) that keeps every observation,
        for quantities that vary by nature (hidden reasoning); returns |value - old mean|, the
        deviation callers track beside it (None when nothing was learned)."""
        if not model or value < 0:
            return None
        with self._lock:
            f = self._factors.setdefault((model, kind), Factor(value=0.0))
            deviation = abs(value - f.value) if f.samples else 0.0
            self._add(f, value)
            return deviation

    def _add(self, f: Factor, value: float) -> None:
        """One more observation in a running mean over the last OFFSET_MAX_SAMPLES (the lock is
        held by the caller)."""
        n = min(f.weight, OFFSET_MAX_SAMPLES)
        f.value = (f.value * n + value) / (n + 1)
        f.weight = n + 1
        f.samples += 1
        self.dirty = True
        self.version += 1

    def snapshot(self) -> dict[tuple[str, str], Factor]:
        with self._lock:
            self.dirty = False
            return {k: Factor(v.value, v.weight, v.samples) for k, v in self._factors.items()}
