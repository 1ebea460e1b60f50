"""`sidecar price MODEL` (a model's schedule and the cost of some usage) and
`sidecar prices-update` (the opt-in refresh of the price data from genai-prices)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, TextIO

import orjson

from .pricing import (
    OVERRIDE_KEYS,
    PriceBook,
    PriceDataError,
    Tiered,
    cost,
    load_data,
    price_book,
)

# genai-prices' own auto-update source (the same file its Python package refreshes from).
UPDATE_URL = ("https://raw.githubusercontent.com/pydantic/genai-prices/refs/heads/main/"
              "prices/new_data/v2/data.json")
_NAMES = {v: k for k, v in OVERRIDE_KEYS.items()}


def _rate_text(rate: Any) -> Any:
    if isinstance(rate, Tiered):
        return {"base": rate.base, "tiers": [{"above_input_tokens": s, "price": p}
                                             for s, p in rate.tiers]}
    return rate


def price_main(model: str, *, provider: str | None, usage: dict[str, int], as_json: bool,
               service_tier: str | None = None, prices_file: str | None = None,
               book: PriceBook | None = None, out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    try:
        book = book or price_book(path=prices_file)
    except PriceDataError as exc:
        print(f"sidecar price: {exc}", file=sys.stderr)
        return 2
    label = provider or "openai"
    entry = book.resolve(label, model, strict=provider is not None)
    now = time.time()
    if entry is None:
        doc: dict[str, Any] = {"model": model, "provider": provider, "priced": False,
                               "price_source": None, "cost_usd": None,
                               "reason": "the price data lists no such model for this provider; "
                                         "it stays unpriced (set prices: in the config)"}
        stream.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
                     if as_json else f"{model}: unpriced ({doc['reason']})\n")
        return 1
    context = {"service_tier": service_tier} if service_tier else None
    rates = entry.rates(now, context)
    c = cost(entry, usage, now, book.units, context)
    units = book.units.by_price_key
    doc = {
        "model": model, "provider": provider, "priced": True, "priced_as": entry.label,
        "name": entry.name, "price_source": entry.source, "pricing_url": entry.url,
        "context_window": entry.context_window, "service_tier": service_tier,
        "schedule": {k: {"price": _rate_text(v),
                         "per": units[k].per if k in units else None,
                         "usage_key": units[k].usage_key if k in units else None}
                     for k, v in rates.items()},
        "variants": [dict(when) for when, _, _ in entry.variants],
        "usage": usage,
        "cost_usd": round(c.usd, 10), "input_usd": round(c.input_usd, 10),
        "output_usd": round(c.output_usd, 10), "fees_usd": round(c.other_usd, 10),
    }
    if as_json:
        stream.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    lines = [f"{model}{f' at {provider}' if provider else ''}: priced as {entry.label}"
             + (f" ({entry.name})" if entry.name else ""),
             f"source: {entry.source}" + (f"; {entry.url}" if entry.url else "")]
    for key, item in doc["schedule"].items():
        per = item["per"]
        unit = "1M tokens" if per == 1_000_000 else f"{per:,} {item['usage_key'] or 'units'}"
        price = item["price"]
        text = (f"{price['base']:g}" + "".join(f", {t['price']:g} above {t['above_input_tokens']:,}"
                                               " input tokens" for t in price["tiers"])
                if isinstance(price, dict) else f"{price:g}")
        name = _NAMES.get(key, key)
        lines.append(f"  {name:<22} USD {text} per {unit}")
    if doc["variants"]:
        lines.append("  variants: " + ", ".join(
            " ".join(f"{k}={v}" for k, v in w.items()) for w in doc["variants"]))
    if usage:
        shown = ", ".join(f"{k}={v:,}" for k, v in usage.items())
        lines.append(f"cost of {shown}: USD {c.usd:.8f} (input {c.input_usd:.8f}, "
                     f"output {c.output_usd:.8f}, fees {c.other_usd:.8f})")
    stream.write("\n".join(lines) + "\n")
    return 0


def update_main(out: str, url: str = UPDATE_URL, timeout: float = 60.0) -> int:
    """Download a genai-prices data file, check it loads, then replace ``out`` atomically."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except OSError as exc:
        print(f"sidecar prices-update: {url} could not be fetched: {exc}", file=sys.stderr)
        return 1
    target = Path(out)
    fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=".prices-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        try:
            data = load_data(tmp)
        except PriceDataError as exc:
            print(f"sidecar prices-update: {url} is not usable price data: {exc}",
                  file=sys.stderr)
            return 1
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    models = sum(len(p.models) for p in data.providers)
    print(f"wrote {target}: {len(data.providers)} providers, {models} models; use it with "
          f"--prices-file {target} (or prices_file: in the config), then SIGHUP to reload")
    return 0
