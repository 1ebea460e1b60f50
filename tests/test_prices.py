"""Price lookup and cost: subsets priced on their own, unknown models not guessed."""

from __future__ import annotations

from sidecar.prices import DEFAULT_PRICES, Price, PriceTable, cost_usd


def test_lookup_by_prefix_and_override() -> None:
    table = PriceTable.with_defaults({"gpt-4o": Price(1.0, 2.0)})
    assert table.lookup("gpt-4o-2024-08-06") == Price(1.0, 2.0)
    assert table.lookup("gpt-4o-mini-2024-07-18") == DEFAULT_PRICES["gpt-4o-mini"]
    assert table.lookup("openai/gpt-4.1-nano") == DEFAULT_PRICES["gpt-4.1-nano"]
    assert table.lookup("claude-sonnet-4-5-20250929") == DEFAULT_PRICES["claude-sonnet-4"]
    assert table.lookup("gpt-4ox") is None and table.lookup("my-finetune") is None


def test_cost_with_cache_and_reasoning() -> None:
    p = Price(input=3.0, output=15.0, cached_input=0.3, cache_write_input=3.75, reasoning=20.0)
    usd = cost_usd(p, input_tokens=1_000_000, output_tokens=100_000, cached_input=600_000,
                   cache_write_input=100_000, reasoning=50_000)
    expect = (300_000 * 3.0 + 600_000 * 0.3 + 100_000 * 3.75 + 50_000 * 15.0
              + 50_000 * 20.0) / 1e6
    assert abs(usd - expect) < 1e-9
    # Without subset prices, subsets cost the base price.
    assert cost_usd(Price(2.5, 10.0), 1000, 100, cached_input=500) == (1000 * 2.5 + 1000) / 1e6
