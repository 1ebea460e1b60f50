"""Prices from a maintained data set, operator overrides, and the cost of one request, sans-IO.

The data is a pinned snapshot of Pydantic's genai-prices (``sidecar/data/prices.json``, written
by ``scripts/update-prices`` in genai-prices' own v2 ``data.json`` shape), or a newer file of that
shape named by ``prices_file``. Code only interprets it: match clauses pick the model, the last
active conditional price applies, request-context variants (service tier) override per key, and
usage is split into disjoint leaves over the unit registry before each leaf is priced (tiers are
"cliffs" chosen by the request's whole input). A model the data does not list is unpriced; it is
never priced as a neighbour.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from .meter import Settlement

Matcher = Callable[[str], bool]

# The sidecar's provider label -> genai-prices provider id (labels not listed are looked up by id
# and by the data's own provider_match clauses).
PROVIDER_IDS: dict[str, str] = {
    "openai": "openai", "azure-openai": "azure", "anthropic": "anthropic", "gemini": "google",
    "vertex": "google", "bedrock": "aws", "deepseek": "deepseek", "mistral": "mistral",
    "groq": "groq", "xai": "x-ai", "openrouter": "openrouter", "perplexity": "perplexity",
    "zhipu": "zhipuai", "cohere": "cohere", "moonshot": "moonshotai",
}
# Providers with no entry in the data (priced only by operator overrides).
UNLISTED = frozenset({"alibaba-qwen", "baidu-ernie", "ollama"})

# Server-side tools billed per call -> the data's usage key.
TOOL_USAGE_KEYS = {"web_search": "web_searches", "file_search": "storage_searches",
                   "code_execution": "code_executions"}

# Fields of an operator override (USD per 1M tokens, or per 1,000 calls) -> data price keys.
OVERRIDE_KEYS = {
    "input": "input_mtok", "output": "output_mtok", "cached_input": "cache_read_mtok",
    "cache_write_input": "cache_write_mtok", "cache_write_1h_input": "cache_write_1h_mtok",
    "reasoning": "output_reasoning_mtok", "input_audio": "input_audio_mtok",
    "output_audio": "output_audio_mtok", "cached_audio_input": "cache_audio_read_mtok",
    "web_search_per_1k": "web_searches_kcount", "file_search_per_1k": "storage_searches_kcount",
    "request_per_1k": "requests_kcount",
}

_COMPACT_DATE = re.compile(r"(-)(20\d{2})(0[1-9]|1[0-2])(0[1-9]|[12]\d|3[01])(?=-|:|$)")
# What may follow an override's model name: a dated or versioned snapshot of that model.
_SNAPSHOT_SUFFIX = r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4}|@[\w.-]+|:[\w.:-]+|-v\d[\w.:-]*|-latest)?"


class PriceDataError(ValueError):
    """The price data file cannot be used; the message says what and where."""


@dataclass(frozen=True, slots=True)
class Tiered:
    """A price that changes for the whole request once its input passes a threshold."""

    base: float
    tiers: tuple[tuple[int, float], ...]  # (start, price), ascending

    def at(self, total_input: float) -> float:
        for start, price in reversed(self.tiers):
            if total_input > start:
                return price
        return self.base


Rate = float | Tiered
Rates = dict[str, Rate]  # price key (input_mtok, ...) -> USD per unit's `per`


@dataclass(frozen=True, slots=True)
class Unit:
    usage_key: str
    price_key: str
    per: int
    dims: frozenset[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Constraint:
    """A start date, or a daily UTC time window (off-peak prices)."""

    start_date: date | None = None
    start_second: int | None = None  # of the UTC day
    end_second: int | None = None

    def active(self, at: float) -> bool:
        if self.start_date is not None:
            return _utc_date(at) >= self.start_date
        if self.start_second is None or self.end_second is None:
            return True
        s = int(at) % 86400
        if self.end_second < self.start_second:
            return s >= self.start_second or s < self.end_second
        return self.start_second <= s < self.end_second


def _utc_date(at: float) -> date:
    """The UTC date of an epoch time (POSIX days are 86,400 s long)."""
    return _day(int(at // 86400))


@functools.lru_cache(maxsize=8)
def _day(n: int) -> date:
    """Day ``n`` after 1970-01-01 (every request asks the date of its time, most the same day)."""
    return date.fromordinal(_EPOCH_ORDINAL + n)


_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


@dataclass(frozen=True, slots=True)
class Entry:
    """One model's prices at one provider: the schedule a request is charged by."""

    provider: str  # price data provider id, or "override"
    model: str  # the data's model id (or the override's key)
    name: str | None
    source: str  # "genai-prices 0.2.3 (2026-11-10)" or "override"
    standard: tuple[tuple[Constraint | None, Rates], ...]
    variants: tuple[tuple[Mapping[str, str], Constraint | None, Rates], ...] = ()
    context_window: int | None = None
    url: str | None = None

    def rates(self, at: float, context: Mapping[str, str] | None = None) -> Rates:
        """The prices in force at ``at`` (epoch seconds) for this request's context: the last
        active conditional price, then the first matching variant per key (genai-prices rules)."""
        chosen = self.standard[0][1]
        for constraint, rates in reversed(self.standard):
            if constraint is None or constraint.active(at):
                chosen = rates
                break
        if not context:
            return chosen
        overrides: Rates = {}
        for when, constraint, rates in self.variants:
            for key, value in when.items():  # the context first: most variants are another's
                if context.get(key) != value:
                    break
            else:
                if rates and (constraint is None or constraint.active(at)):
                    for k, v in rates.items():
                        overrides.setdefault(k, v)
        return {**chosen, **overrides} if overrides else chosen

    @property
    def label(self) -> str:
        return f"{self.provider}/{self.model}"


class Cost(NamedTuple):
    usd: float
    input_usd: float
    output_usd: float
    other_usd: float  # per-call fees (web searches, requests)


# Priced units, most specific first: (unit, usage keys of its priced descendants, direction).
Plan = tuple[tuple["Unit", tuple[str, ...], str], ...]
# A plan with a table's rates filled in: (usage key, rate, per, descendants, direction).
Steps = tuple[tuple[str, "float | Tiered", int, tuple[str, ...], str], ...]


class Units:
    """The unit registry: which usage keys nest inside which (by dimensions)."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.by_price_key: dict[str, Unit] = {}
        for usage_key, spec in raw.items():
            unit = Unit(usage_key, str(spec["price_key"]), int(spec["per"]),
                        frozenset((str(k), str(v)) for k, v in spec["dimensions"].items()))
            self.by_price_key[unit.price_key] = unit
        self._plans: dict[frozenset[str], Plan] = {}
        # The plan of a rates table the price data holds (tables live as long as the data):
        # keyed by the table's identity, checked against the table itself.
        self._by_table: dict[int, tuple[Mapping[str, Any], Steps]] = {}

    def plan_for(self, rates: Mapping[str, Any]) -> Steps:
        """plan() of a rates table with its rates filled in, remembered for tables that are
        seen again (each request reads a few flat tuples instead of units and tables)."""
        hit = self._by_table.get(id(rates))
        if hit is not None and hit[0] is rates:
            return hit[1]
        found = tuple((u.usage_key, rates[u.price_key], u.per, descendants, direction)
                      for u, descendants, direction in self.plan(rates))
        if len(self._by_table) > 4096:
            self._by_table.clear()
        self._by_table[id(rates)] = (rates, found)
        return found

    def plan(self, price_keys: Iterable[str]) -> Plan:
        """Priced units, most specific first, each with the usage keys of its priced
        descendants (whose leaves are subtracted from it) and its direction."""
        keys = frozenset(k for k in price_keys if k in self.by_price_key)
        plan = self._plans.get(keys)
        if plan is None:
            units = sorted((self.by_price_key[k] for k in keys),
                           key=lambda u: (-len(u.dims), u.usage_key))
            plan = tuple(
                (u, tuple(d.usage_key for d in units if d is not u and u.dims <= d.dims),
                 dict(u.dims).get("direction", ""))
                for u in units)
            self._plans[keys] = plan
        return plan


def cost(entry: Entry, usage: Mapping[str, float], at: float, units: Units,
         context: Mapping[str, str] | None = None) -> Cost:
    """USD for one request's usage (keys are the data's usage keys: input_tokens, output_tokens,
    cache_read_tokens, cache_write_tokens, cache_write_1h_tokens, web_searches, ...; input and
    output totals include their subsets)."""
    rates = entry.rates(at, context)
    total_input = usage.get("input_tokens", 0)
    leaves: dict[str, float] = {}
    usd_in = usd_out = usd_other = 0.0
    for usage_key, rate, per, descendants, direction in units.plan_for(rates):
        if usage_key == "requests":
            count: float = 1
        else:
            count = usage.get(usage_key, 0)
            if descendants and count:
                subsets: float = 0
                for d in descendants:
                    subsets += leaves[d]
                # a provider's subsets exceeding their total: never negative
                count = max(count - subsets, 0)
            leaves[usage_key] = count
        if not count:
            continue
        price = rate.at(total_input) if isinstance(rate, Tiered) else rate
        amount = price * count / per
        if direction == "input":
            usd_in += amount
        elif direction == "output":
            usd_out += amount
        else:
            usd_other += amount
    return Cost(usd_in + usd_out + usd_other, usd_in, usd_out, usd_other)


# -- the data ---------------------------------------------------------------------------------


def _matcher(clause: Any, where: str) -> Matcher:
    if not isinstance(clause, Mapping) or len(clause) != 1:
        raise PriceDataError(f"{where}: a match clause must be one of starts_with, ends_with, "
                             "contains, equals, regex, or, and")
    (kind, arg), = clause.items()
    if kind in ("or", "and"):
        parts = [_matcher(c, where) for c in arg]
        if kind == "or":
            return lambda s: any(p(s) for p in parts)
        return lambda s: all(p(s) for p in parts)
    if kind == "regex":
        rx = re.compile(str(arg))
        return lambda s: rx.search(s) is not None
    v = str(arg).lower()
    if kind == "starts_with":
        return lambda s: s.startswith(v)
    if kind == "ends_with":
        return lambda s: s.endswith(v)
    if kind == "contains":
        return lambda s: v in s
    if kind == "equals":
        return lambda s: s == v
    raise PriceDataError(f"{where}: unknown match clause {kind!r}")


def _rate(value: Any, where: str) -> Rate:
    if isinstance(value, Mapping):
        try:
            tiers = tuple(sorted((int(t["start"]), float(t["price"])) for t in value["tiers"]))
            return Tiered(float(value["base"]), tiers)
        except (KeyError, TypeError, ValueError):
            raise PriceDataError(f"{where}: tiered price needs base and tiers[start, price]")\
                from None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise PriceDataError(f"{where}: a price must be a number >= 0")
    return float(value)


def _rates(raw: Any, where: str) -> Rates:
    if not isinstance(raw, Mapping):
        raise PriceDataError(f"{where}: prices must be a mapping of price keys")
    return {str(k): _rate(v, f"{where}.{k}") for k, v in raw.items() if v is not None}


def _constraint(raw: Any, where: str) -> Constraint | None:
    if raw is None:
        return None
    try:
        if "start_date" in raw:
            return Constraint(start_date=date.fromisoformat(str(raw["start_date"])))
        return Constraint(start_second=_seconds(str(raw["start_time"])),
                          end_second=_seconds(str(raw["end_time"])))
    except (KeyError, TypeError, ValueError):
        raise PriceDataError(f"{where}: constraint needs start_date, or start_time and "
                             "end_time") from None


def _seconds(text: str) -> int:
    """Seconds into the UTC day of an ISO time (an offset, if given, is applied)."""
    m = re.fullmatch(r"(\d\d):(\d\d)(?::(\d\d)(?:\.\d+)?)?(Z|[+-]\d\d:\d\d)?", text)
    if m is None:
        raise ValueError(text)
    s = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3) or 0)
    tz = m.group(4)
    if tz and tz != "Z":
        off = int(tz[1:3]) * 3600 + int(tz[4:6]) * 60
        s -= off if tz[0] == "+" else -off
    return s % 86400


@dataclass(slots=True)
class _Model:
    id: str
    match: Matcher
    entry: Entry


@dataclass(slots=True)
class _Provider:
    id: str
    name: str
    models: list[_Model]
    provider_match: Matcher | None
    model_match: Matcher | None
    fallback: tuple[str, ...]
    url: str | None

    def find(self, ref: str) -> Entry | None:
        for m in self.models:
            if m.match(ref):
                return m.entry
        return None


@dataclass(frozen=True, slots=True)
class PriceData:
    """A loaded price data set: providers with their models, and the unit registry."""

    source: str
    version: str | None
    data_as_of: str | None
    providers: tuple[_Provider, ...]
    units: Units
    path: str

    @property
    def label(self) -> str:
        v = f"{self.source} {self.version}" if self.version else self.source
        return f"{v} ({self.data_as_of})" if self.data_as_of else v


def bundled_path() -> Path:
    return Path(str(resources.files("sidecar") / "data" / "prices.json"))


_LOADED: dict[tuple[str, int], PriceData] = {}


def load_data(path: str | Path | None = None) -> PriceData:
    """A price data file, parsed once per path and modification time (see _load)."""
    p = Path(path) if path else bundled_path()
    try:
        key = (str(p), p.stat().st_mtime_ns)
    except OSError as exc:
        raise PriceDataError(f"prices_file: {p} cannot be read ({exc.strerror})") from None
    data = _LOADED.get(key)
    if data is None:
        data = _LOADED[key] = _load(p)
    return data


def _load(path: Path) -> PriceData:
    """The bundled snapshot, or a genai-prices data file (our wrapped snapshot, or upstream's
    bare list of providers, whose unit registry then comes from the bundled snapshot)."""
    bundled = bundled_path()
    p = path
    try:
        doc = orjson.loads(p.read_bytes())
    except OSError as exc:
        raise PriceDataError(f"prices_file: {p} cannot be read ({exc.strerror})") from None
    except orjson.JSONDecodeError as exc:
        raise PriceDataError(f"prices_file: {p} is not JSON ({exc})") from None
    if isinstance(doc, list):
        meta: dict[str, Any] = {"source": "genai-prices", "providers": doc}
    elif isinstance(doc, dict) and isinstance(doc.get("providers"), list):
        meta = doc
    else:
        raise PriceDataError(f"prices_file: {p} is neither a genai-prices data.json (a list of "
                             "providers) nor a sidecar price snapshot")
    raw_units = meta.get("units")
    if raw_units is None:
        raw_units = orjson.loads(bundled.read_bytes())["units"]
    label = f"{meta.get('source', 'genai-prices')} {meta.get('version') or ''}".strip()
    as_of = meta.get("data_as_of")
    source = f"{label} ({as_of})" if as_of else label
    providers = tuple(_provider(raw, i, source) for i, raw in enumerate(meta["providers"]))
    return PriceData(str(meta.get("source", "genai-prices")), meta.get("version"), as_of,
                     providers, Units(raw_units), str(p))


def _provider(raw: Any, i: int, source: str) -> _Provider:
    where = f"providers[{i}]"
    if not isinstance(raw, Mapping) or not isinstance(raw.get("id"), str):
        raise PriceDataError(f"{where}: a provider needs an id")
    pid = raw["id"]
    urls = raw.get("pricing_urls") or []
    url = urls[0] if urls else None
    models = []
    for j, m in enumerate(raw.get("models") or []):
        mw = f"{where}({pid}).models[{j}]"
        if not isinstance(m, Mapping) or not isinstance(m.get("id"), str):
            raise PriceDataError(f"{mw}: a model needs an id")
        prices = m.get("prices")
        if isinstance(prices, list):
            if not prices:
                continue
            standard = tuple((_constraint(c.get("constraint"), mw),
                              _rates(c.get("prices"), f"{mw}.prices")) for c in prices)
        else:
            standard = ((None, _rates(prices or {}, f"{mw}.prices")),)
        variants = tuple(
            ({str(k): str(v) for k, v in (pv.get("when") or {}).items()},
             _constraint(pv.get("constraint"), mw), _rates(pv.get("prices") or {}, mw))
            for pv in m.get("price_variants") or [])
        entry = Entry(pid, m["id"], m.get("name"), source, standard, variants,
                      m.get("context_window"), url)
        models.append(_Model(m["id"], _matcher(m.get("match"), f"{mw}.match"), entry))
    return _Provider(
        pid, str(raw.get("name") or pid), models,
        _matcher(raw["provider_match"], where) if raw.get("provider_match") else None,
        _matcher(raw["model_match"], where) if raw.get("model_match") else None,
        tuple(raw.get("fallback_model_providers") or ()), url)


# -- operator overrides -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Override:
    """One ``prices:`` entry: a model name (its dated snapshots too) or a glob, optionally only
    for one provider label."""

    key: str
    rates: Rates
    provider: str | None = None
    _match: Matcher = field(default=lambda s: False, compare=False, repr=False)

    @classmethod
    def build(cls, key: str, prices: Mapping[str, float], provider: str | None = None
              ) -> Override:
        k = key.strip().lower()
        if any(c in k for c in "*?["):
            rx = re.compile(fnmatch.translate(k))
        else:
            rx = re.compile(re.escape(k) + _SNAPSHOT_SUFFIX + r"\Z")
        rates: Rates = {OVERRIDE_KEYS[f]: float(v) for f, v in prices.items()}
        return cls(k, rates, provider, lambda s: rx.match(s) is not None)

    def entry(self) -> Entry:
        return Entry("override", self.key, None, "override", ((None, self.rates),))


# -- lookup -----------------------------------------------------------------------------------


class PriceBook:
    """Resolves (provider label, model) to an Entry: overrides first, then the data."""

    def __init__(self, data: PriceData, overrides: Iterable[Override] = ()) -> None:
        self.data = data
        self.overrides = tuple(overrides)
        self._by_id = {p.id: p for p in data.providers}
        self._memo: dict[tuple[str, str, bool], Entry | None] = {}

    @property
    def units(self) -> Units:
        return self.data.units

    def resolve(self, provider: str, model: str | None, *, strict: bool = True
                ) -> Entry | None:
        """``strict``: the provider label is a fact (configured, or the upstream's host); when
        False (a gateway whose label came from the wire format), a model the label's provider
        does not list is looked up at the vendor whose names it matches (claude-* at
        Anthropic), as the gateway's own upstream would bill it."""
        if not model:
            return None
        key = (provider, model, strict)
        if key in self._memo:
            return self._memo[key]
        found = self._resolve(provider, model.strip().lower(), strict)
        if len(self._memo) > 10_000:
            self._memo.clear()
        self._memo[key] = found
        return found

    def _resolve(self, label: str, ref: str, strict: bool) -> Entry | None:
        for o in self.overrides:
            if (o.provider is None or o.provider == label) and (
                    o._match(ref) or ("/" in ref and o._match(ref.rsplit("/", 1)[1]))):
                return o.entry()
        provider = self._provider_for(label)
        if provider is not None:
            found = self._find(provider, ref)
            if found is not None:
                return found
        if "/" in ref:  # a vendor prefix, LiteLLM or OpenRouter style: openai/gpt-4o
            vendor, rest = ref.split("/", 1)
            other = self._provider_for(vendor)
            if other is not None and (provider is None or not strict or other is provider):
                found = self._find(other, rest)
                if found is not None:
                    return found
        if not strict or (provider is None and label not in UNLISTED):
            for p in self.data.providers:
                if p.model_match is not None and p.model_match(ref):
                    found = self._find(p, ref)
                    if found is not None:
                        return found
        return None

    def _provider_for(self, label: str) -> _Provider | None:
        pid = PROVIDER_IDS.get(label, label)
        p = self._by_id.get(pid)
        if p is None:
            for cand in self.data.providers:
                if cand.provider_match is not None and cand.provider_match(label):
                    return cand
        return p

    def _find(self, provider: _Provider, ref: str) -> Entry | None:
        for r in (ref, _COMPACT_DATE.sub(_dashed, ref)):
            found = provider.find(r)
            if found is None:
                for fid in provider.fallback:  # Azure sells OpenAI's models, and so on
                    fb = self._by_id.get(fid)
                    if fb is not None and (found := fb.find(r)) is not None:
                        break
            if found is not None:
                return found
        return None


def _dashed(m: re.Match[str]) -> str:
    y, mo, d = int(m.group(2)), int(m.group(3)), int(m.group(4))
    try:
        date(y, mo, d)
    except ValueError:
        return m.group(0)
    return f"{m.group(1)}{y:04d}-{mo:02d}-{d:02d}"


def price_book(overrides: Iterable[Override] = (), path: str | None = None) -> PriceBook:
    return PriceBook(load_data(path), overrides)


# -- one request ------------------------------------------------------------------------------

# Providers whose usage frames state the request's cost in USD: that figure is the invoice.
REPORTED_COST_PROVIDERS = frozenset({"openrouter", "xai"})


class Priced(NamedTuple):
    """The cost of one settled request and what it was priced by."""

    usd: float | None  # None: unpriced
    source: str | None  # "reported" (the provider's own figure), the data's label, "override"
    priced_as: str | None  # provider/model entry used


UNPRICED = Priced(None, None, None)


def settlement_usage(s: Settlement) -> dict[str, float]:
    """A settlement in the price data's usage keys. Billed units, where the provider states
    them, replace the processed counts (and their cache subsets, which they already reflect)."""
    u: dict[str, float] = {}
    billed = s.billed_input_tokens is not None or s.billed_output_tokens is not None
    u["input_tokens"] = s.billed_input_tokens if s.billed_input_tokens is not None \
        else s.input_tokens
    u["output_tokens"] = s.billed_output_tokens if s.billed_output_tokens is not None \
        else s.output_tokens
    if not billed:
        for key, value in (("cache_read_tokens", s.cached_input_tokens),
                           ("cache_write_tokens", s.cache_write_input_tokens),
                           ("cache_write_1h_tokens", s.cache_write_1h_input_tokens),
                           ("input_audio_tokens", s.input_audio_tokens),
                           ("cache_audio_read_tokens", s.cached_audio_input_tokens),
                           ("output_audio_tokens", s.output_audio_tokens),
                           ("output_reasoning_tokens", s.reasoning_tokens)):
            if value:
                u[key] = value
    for tool, n in (s.server_tools or {}).items():
        usage_key = TOOL_USAGE_KEYS.get(tool)
        if usage_key is not None:
            u[usage_key] = u.get(usage_key, 0) + n
    return u


def price_settlement(book: PriceBook, entry: Entry | None, s: Settlement, provider: str,
                     at: float) -> Priced:
    if s.reported_cost_usd is not None and provider in REPORTED_COST_PROVIDERS:
        return Priced(s.reported_cost_usd, "reported", entry.label if entry else None)
    if entry is None:
        return UNPRICED
    context = {"service_tier": s.service_tier} if s.service_tier else None
    c = cost(entry, settlement_usage(s), at, book.units, context)
    return Priced(c.usd, entry.source, entry.label)


def live_rates(entry: Entry | None, at: float,
               keys: tuple[str, str] = ("input_mtok", "output_mtok"),
               ) -> tuple[float | None, float | None]:
    """USD per input and per output token for live spend while a request streams (the base
    tier: settlement corrects it); ``keys`` name other units (audio tokens)."""
    if entry is None:
        return None, None
    rates = entry.rates(at)
    out = []
    for key in keys:
        r = rates.get(key)
        out.append(None if r is None else (r.base if isinstance(r, Tiered) else r) / 1e6)
    return out[0], out[1]
