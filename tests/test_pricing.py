"""Prices from the genai-prices snapshot: lookup without neighbours, every billed dimension, and
the recorded captures priced exactly as genai-prices' own calculator prices their usage frames.
"""

from __future__ import annotations

import datetime
import http.server
import re
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from sidecar.config import ConfigError, load_settings
from sidecar.meter import Settlement
from sidecar.price_cli import price_main, update_main
from sidecar.pricing import (
    Override,
    PriceBook,
    PriceDataError,
    bundled_path,
    cost,
    load_data,
    price_book,
    price_settlement,
    settlement_usage,
)
from sidecar.replay import replay_file
from sidecar.tokens import Tokenizers

from .conftest import ROOT, Script, Stack, chat_chunks, conformance_dir, sse

BOOK = price_book()
# Noon UTC today: prices by date are today's, and no time-of-day window (DeepSeek's peak hours,
# 01:00-04:00 and 06:00-10:00 UTC) applies, whenever the suite runs.
NOW = time.time() // 86400 * 86400 + 12 * 3600


def usd(provider: str, model: str, **usage: float) -> float:
    entry = BOOK.resolve(provider, model)
    assert entry is not None, f"{provider}/{model} should be priced"
    return cost(entry, usage, NOW, BOOK.units).usd


def settlement(**kw: Any) -> Settlement:
    base: dict[str, Any] = dict(
        input_tokens=0, output_tokens=0, cached_input_tokens=None, cache_write_input_tokens=None,
        reasoning_tokens=None, input_source="reported", output_source="reported",
        reasoning_source=None, estimated_input_tokens=0, estimated_output_tokens=0,
        model=None, finish_reason=None, error=None, frame_errors=0,
        first_token_at=None)
    return Settlement(**{**base, **kw})


# -- the data source ---------------------------------------------------------------------------


def test_snapshot_is_what_the_pinned_genai_prices_generates() -> None:
    """The committed snapshot cannot drift from the pinned genai-prices release."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "update-prices"), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    data = load_data()
    assert data.source == "genai-prices" and data.version and data.data_as_of
    assert sum(len(p.models) for p in data.providers) > 1000


@pytest.mark.parametrize(("provider", "model", "inp", "out"), [
    # The rows of the issue: each at its list price (USD per 1M tokens), none a neighbour's.
    ("anthropic", "claude-opus-4-6", 5, 25),
    ("anthropic", "claude-opus-4-5-20251101", 5, 25),
    ("openai", "gpt-5.4-2026-03-05", 2.5, 15),
    ("openai", "gpt-5.5-2026-04-23", 5, 30),
    ("openai", "o3-mini", 1.1, 4.4),
    ("openai", "o3-mini-2025-01-31", 1.1, 4.4),
    ("gemini", "gemini-3-pro-preview", 2, 12),
    ("deepseek", "deepseek-v4-flash", 0.15, 0.6),
    ("mistral", "mistral-small-latest", 0.15, 0.6),
    ("groq", "llama-3.3-70b-versatile", 0.59, 0.79),
    ("groq", "openai/gpt-oss-120b", 0.15, 0.6),
    ("bedrock", "us.amazon.nova-micro-v1:0", 0.035, 0.14),
    ("cohere", "command-a-03-2025", 2.5, 10),
    ("xai", "grok-3-mini", 0.3, 0.5),
    ("openai", "openai/gpt-4o", 2.5, 10),  # a vendor prefix resolves to its model
])
def test_models_are_priced_at_their_own_list_price(provider: str, model: str, inp: float,
                                                   out: float) -> None:
    # 100k input tokens: below every long-context tier.
    assert usd(provider, model, input_tokens=100_000) == pytest.approx(inp / 10)
    assert usd(provider, model, output_tokens=100_000) == pytest.approx(out / 10)


@pytest.mark.parametrize(("provider", "model"), [
    ("openai", "gpt-9"), ("openai", "gpt-4o-mini-foo"), ("openai", "my-finetune"),
    ("anthropic", "claude-opus-7"), ("alibaba-qwen", "qwen3-max"), ("ollama", "llama3"),
    ("openai", "claude-sonnet-4-5"),  # api.openai.com does not sell Claude
])
def test_unknown_models_stay_unpriced(provider: str, model: str) -> None:
    assert BOOK.resolve(provider, model) is None


def test_a_gateway_prices_a_model_at_its_vendor() -> None:
    """Beside a gateway the label is only the wire format's; Claude is still Claude."""
    entry = BOOK.resolve("openai", "claude-sonnet-4-5", strict=False)
    assert entry is not None and entry.label == "anthropic/claude-sonnet-4-5"
    assert BOOK.resolve("openai", "not-a-model", strict=False) is None


def test_long_context_tier_applies_to_the_whole_request() -> None:
    short = usd("gemini", "gemini-2.5-pro", input_tokens=200_000, output_tokens=1000)
    long = usd("gemini", "gemini-2.5-pro", input_tokens=200_001, output_tokens=1000)
    assert short == pytest.approx(200_000 * 1.25e-6 + 1000 * 10e-6)
    assert long == pytest.approx(200_001 * 2.5e-6 + 1000 * 15e-6)  # a cliff, not a margin


def test_cache_reads_writes_and_one_hour_writes_have_their_own_prices() -> None:
    # claude-sonnet-4-5: input 3, cache read 0.3, 5-minute write 3.75, 1-hour write 6.
    got = usd("anthropic", "claude-sonnet-4-5", input_tokens=10_000, cache_read_tokens=4_000,
              cache_write_tokens=3_000, cache_write_1h_tokens=1_000, output_tokens=500)
    expect = (3_000 * 3 + 4_000 * 0.3 + 2_000 * 3.75 + 1_000 * 6 + 500 * 15) / 1e6
    assert got == pytest.approx(expect)
    s = settlement(input_tokens=10_000, output_tokens=500, cached_input_tokens=4_000,
                   cache_write_input_tokens=3_000, cache_write_1h_input_tokens=1_000)
    entry = BOOK.resolve("anthropic", "claude-sonnet-4-5")
    assert price_settlement(BOOK, entry, s, "anthropic", NOW).usd == pytest.approx(expect)


def test_per_call_fees_and_request_fees() -> None:
    s = settlement(input_tokens=1000, output_tokens=100, server_tools={"web_search": 3})
    entry = BOOK.resolve("anthropic", "claude-sonnet-4-5")
    got = price_settlement(BOOK, entry, s, "anthropic", NOW).usd
    assert got == pytest.approx((1000 * 3 + 100 * 15) / 1e6 + 3 * 10 / 1000)
    # Perplexity's sonar adds a fee per request.
    assert usd("perplexity", "sonar", input_tokens=10, output_tokens=10) == pytest.approx(
        20e-6 + 12 / 1000)


def test_service_tier_from_the_answer_picks_the_variant() -> None:
    entry = BOOK.resolve("openai", "gpt-5")
    assert entry is not None
    standard = settlement(input_tokens=1_000_000, output_tokens=0)
    flex = settlement(input_tokens=1_000_000, output_tokens=0, service_tier="flex")
    priority = settlement(input_tokens=1_000_000, output_tokens=0, service_tier="priority")
    assert price_settlement(BOOK, entry, standard, "openai", NOW).usd == pytest.approx(1.25)
    assert price_settlement(BOOK, entry, flex, "openai", NOW).usd == pytest.approx(0.625)
    assert price_settlement(BOOK, entry, priority, "openai", NOW).usd == pytest.approx(2.5)


def test_price_changes_on_their_date() -> None:
    """claude-opus-4-6 had a long-context tier until 2026-03-13."""
    before = datetime.datetime(2026, 3, 1, tzinfo=datetime.UTC).timestamp()
    after = datetime.datetime(2026, 3, 14, tzinfo=datetime.UTC).timestamp()
    entry = BOOK.resolve("anthropic", "claude-opus-4-6")
    assert entry is not None
    usage = {"input_tokens": 300_000}
    assert cost(entry, usage, before, BOOK.units).usd == pytest.approx(3.0)
    assert cost(entry, usage, after, BOOK.units).usd == pytest.approx(1.5)


def test_billed_units_replace_processed_tokens() -> None:
    s = settlement(input_tokens=507, output_tokens=10, cached_input_tokens=448,
                   billed_input_tokens=12, billed_output_tokens=7)
    assert settlement_usage(s) == {"input_tokens": 12, "output_tokens": 7}


def test_a_provider_stated_cost_is_the_invoice() -> None:
    s = settlement(input_tokens=43, output_tokens=10, reported_cost_usd=0.0)
    priced = price_settlement(BOOK, None, s, "openrouter", NOW)  # a free model, not in the data
    assert priced.usd == 0.0 and priced.source == "reported"
    # Only providers known to state USD are trusted; others are priced from the data.
    s = settlement(input_tokens=1_000_000, output_tokens=0, reported_cost_usd=99.0)
    entry = BOOK.resolve("openai", "gpt-4o")
    assert price_settlement(BOOK, entry, s, "openai", NOW).usd == pytest.approx(2.5)


def test_overrides_win_entry_by_entry_and_never_spread() -> None:
    book = PriceBook(load_data(), [
        Override.build("gpt-4o", {"input": 1.0, "output": 2.0}),
        Override.build("claude-*", {"input": 7.0, "output": 8.0}, provider="anthropic")])
    assert book.resolve("openai", "gpt-4o-2024-08-06").source == "override"  # type: ignore[union-attr]
    mini = book.resolve("openai", "gpt-4o-mini")  # not a snapshot of gpt-4o: the data's price
    assert mini is not None and mini.source.startswith("genai-prices")
    claude = book.resolve("anthropic", "claude-haiku-4-5")
    assert claude is not None and claude.rates(NOW)["input_mtok"] == 7.0
    bedrock = book.resolve("bedrock", "anthropic.claude-haiku-4-5-20251001-v1:0")
    assert bedrock is not None and bedrock.source != "override"  # scoped to one provider


def test_config_parses_overrides_and_rejects_bad_ones(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("upstream: http://gw\nprices:\n  my-llm: {input: 1, output: 2, "
                 "cache_write_1h_input: 3, web_search_per_1k: 10}\n")
    s = load_settings(str(f), env={})
    assert s.prices[0].rates == {"input_mtok": 1.0, "output_mtok": 2.0,
                                 "cache_write_1h_mtok": 3.0, "web_searches_kcount": 10.0}
    f.write_text("upstream: http://gw\nprices:\n  my-llm: {input: -1, output: 2, colour: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(f), env={})
    assert "prices.my-llm" in str(err.value) and "colour" in str(err.value)
    bad = tmp_path / "prices.json"
    bad.write_text('{"not": "prices"}')
    with pytest.raises(ConfigError) as err:
        load_settings(env={"SIDECAR_UPSTREAM": "http://gw", "SIDECAR_PRICES_FILE": str(bad)})
    assert "SIDECAR_PRICES_FILE" in str(err.value) and "prices-update" in str(err.value)


def test_upstream_data_json_loads_as_a_prices_file(tmp_path: Path) -> None:
    """genai-prices publishes a bare list of providers; the sidecar reads that shape too."""
    doc = orjson.loads(bundled_path().read_bytes())
    f = tmp_path / "data.json"
    f.write_bytes(orjson.dumps(doc["providers"]))
    book = price_book(path=str(f))
    assert book.data.version is None and book.resolve("openai", "gpt-4o") is not None
    f.write_bytes(b'[{"id": "x", "models": [{"id": "m", "match": {"nope": 1}}]}]')
    with pytest.raises(PriceDataError, match=r"providers\[0\]"):
        load_data(f)


def test_prices_update_downloads_checks_and_replaces(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    doc = orjson.loads(bundled_path().read_bytes())
    (served / "data.json").write_bytes(orjson.dumps(doc["providers"][:3]))
    (served / "broken.json").write_bytes(b"<html>rate limited</html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *a: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, name="prices-http", daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        out = tmp_path / "prices.json"
        out.write_text("keep me")
        assert update_main(str(out), base + "/broken.json") == 1
        assert out.read_text() == "keep me"  # a bad download never replaces good data
        assert update_main(str(out), base + "/data.json") == 0
        assert len(load_data(out).providers) == 3
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_price_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = price_main("claude-opus-4-6", provider="anthropic", as_json=True,
                    usage={"input_tokens": 1_000_000, "output_tokens": 100_000})
    doc = orjson.loads(capsys.readouterr().out)
    assert rc == 0 and doc["priced_as"] == "anthropic/claude-opus-4-6"
    assert doc["cost_usd"] == pytest.approx(7.5) and doc["price_source"].startswith("genai-prices")
    assert price_main("gpt-9", provider="openai", as_json=True, usage={}) == 1
    assert orjson.loads(capsys.readouterr().out)["cost_usd"] is None


# -- the recorded captures, against genai-prices' own calculator -------------------------------

BASE = conformance_dir()
# Folder (our provider label) -> genai-prices provider id and the usage extractor flavor of the
# capture's API.
_ORACLE = {
    "openai": ("openai", {"openai.responses": "responses"}, "chat"),
    "azure-openai": ("azure", {"azure-openai.responses": "responses"}, "chat"),
    "anthropic": ("anthropic", {}, "default"),
    "gemini": ("google", {}, "default"),
    "bedrock": ("aws", {}, "default"),
    "deepseek": ("deepseek", {}, "chat"),
    "groq": ("groq", {}, "default"),
    "mistral": ("mistral", {}, "default"),
    "zhipu": ("zhipuai", {}, "chat"),
    "openrouter": ("openrouter", {}, "chat"),
    "xai": ("x-ai", {}, "chat"),
    "cohere": ("cohere", {}, "default"),
    "perplexity": ("perplexity", {}, "default"),
}
# Captures whose stream names no model: priced as this model (the request, or the path, would
# name it). Cohere's captures do not say which model answered: the test assumes Command A.
_MODEL_FOR = {"cohere": "command-a-03-2025"}
_PATH_NAMES_MODEL = ("bedrock",)
_TIER = re.compile(rb'"service_tier":\s*"([a-z]+)"')


def _manifest() -> list[dict[str, Any]]:
    if BASE is None:
        return []
    return [e for e in orjson.loads((BASE / "streams" / "MANIFEST.json").read_bytes())
            if e["reported_usage"] and e["file"].split("/")[0] in _ORACLE]


def _expected_cost(entry: dict[str, Any]) -> tuple[Decimal, str] | None:
    """genai-prices' price for the capture's raw usage frame (never through our parsers)."""
    from genai_prices import data_snapshot
    from genai_prices.types import Usage

    folder = entry["file"].split("/")[0]
    pid, flavors, default = _ORACLE[folder]
    flavor = flavors.get(entry["api"], default)
    raw = entry["reported_usage"]["raw"]
    model = _MODEL_FOR.get(folder) or str(entry["model"]).split(" ")[0]
    snap = data_snapshot.get_snapshot()
    context = None
    if entry["api"] == "anthropic.messages":
        start, delta = raw["message_start"], raw["message_delta"]
        usage_obj = {**start, **delta}
        if delta.get("iterations"):  # the bill is every iteration, not the last one
            usage_obj = {k: sum(it.get(k, 0) for it in delta["iterations"])
                         for k in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                                   "cache_creation_input_tokens")}
        response: dict[str, Any] = {"usage": usage_obj}
    elif entry["api"] == "gemini.interactions":  # no extractor: thoughts bill as output
        usage = Usage(input_tokens=raw["total_input_tokens"],
                      output_tokens=raw["total_output_tokens"] + raw["total_thought_tokens"])
        response = {}
    elif folder == "gemini":
        response = {"usageMetadata": raw}
        if raw.get("trafficType") == "ON_DEMAND_FLEX":
            context = {"service_tier": "flex"}
    else:
        response = {"usage": raw}
        # OpenAI-style answers state their service tier beside the usage (flex bills half).
        assert BASE is not None
        tiers = _TIER.findall((BASE / "streams" / entry["file"]).read_bytes())
        if tiers:
            context = {"service_tier": tiers[-1].decode()}
    if entry["api"] == "deepseek.responses":  # DeepSeek's Responses endpoint, OpenAI's shape
        pid_extract, flavor = "openai", "responses"
    else:
        pid_extract = pid
    provider = next(p for p in snap.providers if p.id == pid)
    if response:
        extractor = next(p for p in snap.providers if p.id == pid_extract)
        _, usage = extractor.extract_usage(response, api_flavor=flavor)
    model_info = provider.find_model(model, all_providers=snap.providers)
    if model_info is None:
        return None
    calc = model_info.calc_price(usage, provider, price_context=context,
                                 genai_request_timestamp=datetime.datetime.now(datetime.UTC))
    return calc.total_price, model


PRICED = [pytest.param(e, id=e["file"]) for e in _manifest()]
if not PRICED:
    PRICED = [pytest.param(None, marks=pytest.mark.skip(
        reason="conformance fixtures not found: set SIDECAR_CONFORMANCE_DIR"))]


@pytest.mark.parametrize("entry", PRICED)
def test_capture_cost_matches_genai_prices(entry: dict[str, Any], tokenizers: Tokenizers
                                           ) -> None:
    pytest.importorskip("genai_prices", reason="pip install -e '.[test]' (pins genai-prices)")
    expected = _expected_cost(entry)
    if expected is None:
        pytest.skip(f"genai-prices lists no {entry['model']!r}: unpriced by design")
    want, model = expected
    assert BASE is not None
    folder = entry["file"].split("/")[0]
    given = model if folder in _PATH_NAMES_MODEL else _MODEL_FOR.get(folder)
    result = replay_file(BASE / "streams" / entry["file"], tokenizers, prices=BOOK,
                         provider=folder, model=given)
    assert result.cost_usd is not None, f"{model} was not priced"
    assert result.cost_usd == pytest.approx(float(want), rel=0.005, abs=1e-12)


def _stated_costs() -> list[Any]:
    """Captures whose answer states its own cost (OpenRouter ``usage.cost``, xAI
    ``cost_in_usd_ticks``): the provider's invoice for that request."""
    found = []
    for e in _manifest():
        raw = e["reported_usage"]["raw"]
        stated = raw.get("cost") if isinstance(raw, dict) else None
        if isinstance(raw, dict) and raw.get("cost_in_usd_ticks") is not None:
            stated = raw["cost_in_usd_ticks"] / 1e10
        if isinstance(stated, int | float) and stated > 0:
            found.append(pytest.param(e, stated, id=e["file"]))
    return found or [pytest.param(None, 0.0, marks=pytest.mark.skip(
        reason="conformance fixtures not found: set SIDECAR_CONFORMANCE_DIR"))]


@pytest.mark.parametrize("entry, stated", _stated_costs())
def test_list_prices_reproduce_the_stated_invoice(entry: dict[str, Any], stated: float,
                                                  tokenizers: Tokenizers,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a provider states what a request cost, pricing the same answer from the price
    data (the stated figure ignored) must come to that figure: every billed dimension (cached
    input, reasoning billed outside the completion count) counted and priced as the invoice."""
    import sidecar.pricing

    assert BASE is not None
    folder = entry["file"].split("/")[0]
    path = BASE / "streams" / entry["file"]
    trusted = replay_file(path, tokenizers, prices=BOOK, provider=folder)
    assert trusted.price_source == "reported" and trusted.cost_usd == pytest.approx(stated)
    monkeypatch.setattr(sidecar.pricing, "REPORTED_COST_PROVIDERS", frozenset())
    listed = replay_file(path, tokenizers, prices=BOOK, provider=folder)
    assert listed.price_source != "reported"
    assert listed.cost_usd == pytest.approx(stated, rel=0.005, abs=1e-12)


def test_compaction_settles_every_iteration(tokenizers: Tokenizers) -> None:
    if BASE is None:
        pytest.skip("conformance fixtures not found: set SIDECAR_CONFORMANCE_DIR")
    capture = BASE / "streams" / "anthropic" / "messages-sonnet-4.6-compaction-cache-read.sse"
    r = replay_file(capture, tokenizers, prices=BOOK, provider="anthropic")
    assert (r.settled_input, r.settled_output) == (55_377, 91)
    # 281 uncached input, 55,096 cache reads and 91 output tokens at Sonnet 4.6's prices.
    assert r.cost_usd == pytest.approx((281 * 3 + 55_096 * 0.3 + 91 * 15) / 1e6)


def test_cohere_is_priced_on_billed_units(tokenizers: Tokenizers) -> None:
    if BASE is None:
        pytest.skip("conformance fixtures not found: set SIDECAR_CONFORMANCE_DIR")
    r = replay_file(BASE / "streams" / "cohere" / "v2-chat-text-usage.sse", tokenizers,
                    prices=BOOK, provider="cohere", model="command-a-03-2025")
    assert (r.settled_input, r.settled_output) == (507, 10)  # processed tokens, as counted
    assert r.cost_usd == pytest.approx((12 * 2.5 + 7 * 10) / 1e6)  # billed units, as billed


# -- through the proxy ---------------------------------------------------------------------------


async def test_proxy_prices_every_billed_dimension(stack: Stack) -> None:
    """An Anthropic stream with a 1-hour cache write and two web searches: the record, the cost
    counter and the tool-call counter all carry the bill."""
    start = {"type": "message_start", "message": {
        "model": "claude-sonnet-4-5-20250929", "usage": {
            "input_tokens": 100, "cache_creation_input_tokens": 2000,
            "cache_read_input_tokens": 5000, "output_tokens": 1,
            "cache_creation": {"ephemeral_5m_input_tokens": 500,
                               "ephemeral_1h_input_tokens": 1500}}}}
    delta = {"type": "content_block_delta", "index": 0,
             "delta": {"type": "text_delta", "text": "Found it."}}
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {
        "output_tokens": 40, "server_tool_use": {"web_search_requests": 2}}}
    sid = stack.upstream.add(Script(chunks=[sse(start, delta, end, done=False)]))
    async with aiohttp.ClientSession() as s, s.post(
            stack.proxy_url + "/v1/messages", headers={
                "X-Script": sid, "anthropic-version": "2023-06-01"},
            json={"model": "claude-sonnet-4-5", "stream": True, "max_tokens": 100,
                  "messages": [{"role": "user", "content": "search"}]}) as r:
        await r.read()
    rec = await stack.wait_record()
    expect = (100 * 3 + 5000 * 0.3 + 500 * 3.75 + 1500 * 6 + 40 * 15) / 1e6 + 2 * 10 / 1000
    assert rec["input_tokens"] == 7100 and rec["server_tool_calls"] == {"web_search": 2}
    assert rec["cost_usd"] == pytest.approx(expect)
    assert rec["priced_as"] == "anthropic/claude-sonnet-4-5"
    assert rec["price_source"].startswith("genai-prices")
    assert stack.value("llm_cost_usd_total") == pytest.approx(expect)
    assert stack.value("llm_server_tool_calls_total", tool="web_search") == 2
    assert stack.value("llm_tokens_total", token_type="cache_write_1h_input") == 1500
    assert stack.value("llm_price_data_info", source="genai-prices") == 1


async def test_proxy_prices_the_model_that_answered(stack: Stack) -> None:
    """An Azure deployment (or a model router) names the real model only in its answer."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    body = chat_chunks("hi", 2, model="gpt-5-nano-2025-08-07", usage=usage)
    sid = stack.upstream.add(Script(chunks=[body]))
    async with aiohttp.ClientSession() as s, s.post(
            stack.proxy_url + "/openai/deployments/router/chat/completions?api-version=1",
            headers={"X-Script": sid}, json={"stream": True, "messages": []}) as r:
        await r.read()
    rec = await stack.wait_record()
    assert rec["model"] == "router" and rec["priced_as"].endswith("/gpt-5-nano")
    assert rec["cost_usd"] == pytest.approx((1000 * 0.05 + 100 * 0.4) / 1e6)


def test_variants_apply_by_the_genai_prices_rule_across_the_data() -> None:
    """Every entry with variants, in each of its variants' contexts and at times inside and
    outside their windows: the standard price in force, then per key the first variant that
    matches the context and is active (stated here without the shortcuts rates() takes)."""
    day = NOW // 86400 * 86400
    times = [day + h * 3600 for h in (0, 2, 5, 7, 12, 23)] + [day - 400 * 86400]
    checked = 0
    for provider in BOOK.data.providers:
        for model in provider.models:
            entry = model.entry
            if not entry.variants:
                continue
            contexts = [dict(when) for when, _, _ in entry.variants] + [{"service_tier": "x"}]
            for at in times:
                base = entry.rates(at)
                for context in contexts:
                    expect = dict(base)
                    seen: set[str] = set()
                    for when, constraint, rates in entry.variants:
                        if all(context.get(k) == v for k, v in when.items()) and (
                                constraint is None or constraint.active(at)):
                            for k, v in rates.items():
                                if k not in seen:
                                    seen.add(k)
                                    expect[k] = v
                    assert dict(entry.rates(at, context)) == expect, (entry.label, at, context)
                    checked += 1
    assert checked > 100
