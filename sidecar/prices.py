"""Token prices (USD per 1M tokens) and request cost, sans-IO.

The shipped table is a convenience, dated PRICES_AS_OF: providers change prices, so operators
should set their own under ``prices:`` in the config (which overrides entry by entry). A model
with no price is counted as unpriced, never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .meter import Settlement

PRICES_AS_OF = "2025-10-01"


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens. Unset subset prices fall back to the base price of their parent."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write_input: float | None = None
    reasoning: float | None = None


# List prices of the providers' public pages as of PRICES_AS_OF (standard tier, short context).
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 10.00, cached_input=0.125),
    "gpt-5-mini": Price(0.25, 2.00, cached_input=0.025),
    "gpt-5-nano": Price(0.05, 0.40, cached_input=0.005),
    "gpt-4.1": Price(2.00, 8.00, cached_input=0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, cached_input=0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, cached_input=0.025),
    "gpt-4o": Price(2.50, 10.00, cached_input=1.25),
    "gpt-4o-mini": Price(0.15, 0.60, cached_input=0.075),
    "o3": Price(2.00, 8.00, cached_input=0.50),
    "o4-mini": Price(1.10, 4.40, cached_input=0.275),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "claude-opus-4": Price(15.00, 75.00, cached_input=1.50, cache_write_input=18.75),
    "claude-sonnet-4": Price(3.00, 15.00, cached_input=0.30, cache_write_input=3.75),
    "claude-haiku-4-5": Price(1.00, 5.00, cached_input=0.10, cache_write_input=1.25),
    "claude-3-5-haiku": Price(0.80, 4.00, cached_input=0.08, cache_write_input=1.00),
    "gemini-2.5-pro": Price(1.25, 10.00, cached_input=0.31),
    "gemini-2.5-flash": Price(0.30, 2.50, cached_input=0.075),
    "gemini-2.0-flash": Price(0.10, 0.40, cached_input=0.025),
    "deepseek-chat": Price(0.28, 0.42, cached_input=0.028),
    "deepseek-reasoner": Price(0.28, 0.42, cached_input=0.028),
}


class PriceTable:
    """Model -> Price, by exact name or the longest listed prefix (dated snapshots, provider
    prefixes such as ``openai/`` stripped)."""

    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)
        self._order = sorted(self._prices, key=len, reverse=True)
        self._memo: dict[str, Price | None] = {}

    @classmethod
    def with_defaults(cls, overrides: Mapping[str, Price] | None = None) -> PriceTable:
        return cls({**DEFAULT_PRICES, **(overrides or {})})

    def lookup(self, model: str | None) -> Price | None:
        if not model:
            return None
        if model in self._memo:
            return self._memo[model]
        name = model.strip().lower()
        if "/" in name:
            name = name.rsplit("/", 1)[1]
        found = self._prices.get(name)
        if found is None:
            for prefix in self._order:
                if name.startswith(prefix) and (len(name) == len(prefix)
                                                or name[len(prefix)] in "-:@."):
                    found = self._prices[prefix]
                    break
        if len(self._memo) > 10_000:
            self._memo.clear()
        self._memo[model] = found
        return found


def cost_usd(price: Price, input_tokens: float, output_tokens: float,
             cached_input: float = 0, cache_write_input: float = 0,
             reasoning: float = 0) -> float:
    """USD for one request. Cached and cache-write tokens are subsets of input, reasoning of
    output, each at its own price when one is set."""
    cached = cached_input if price.cached_input is not None else 0
    write = cache_write_input if price.cache_write_input is not None else 0
    reason = reasoning if price.reasoning is not None else 0
    plain_in = max(input_tokens - cached - write, 0)
    plain_out = max(output_tokens - reason, 0)
    usd = plain_in * price.input + plain_out * price.output
    usd += cached * (price.cached_input or 0) + write * (price.cache_write_input or 0)
    usd += reason * (price.reasoning or 0)
    return usd / 1_000_000


def settlement_cost(price: Price, s: Settlement) -> float:
    return cost_usd(price, s.input_tokens, s.output_tokens, s.cached_input_tokens or 0,
                    s.cache_write_input_tokens or 0, s.reasoning_tokens or 0)
