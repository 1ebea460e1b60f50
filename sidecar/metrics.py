"""Every metric the sidecar exports, on an injected registry. Names and labels are a contract."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from .dialects.fastlane import NATIVE
from .ledger import Ledger
from .meter import SOURCE_ESTIMATED, Settlement
from .pricing import PriceBook

OTHER = "other"

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 21, 34, 60, 120, 300, 600)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1)
_RATIO_BUCKETS = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 1.0, 1.01, 1.02, 1.05, 1.1, 1.25, 1.5, 2)


class Children:
    """A metric's labelled children, memoized: ``labels()`` takes a lock and validates its
    arguments on every call, a dict lookup does not (label values are capped upstream, so the
    memo is as bounded as the metric itself)."""

    __slots__ = ("_cache", "_labels")

    def __init__(self, metric: Any) -> None:
        self._labels = metric.labels
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._labels(*values)
        return child


class LabelCap:
    """Admits at most ``limit`` distinct values of one label; later ones become ``other``."""

    def __init__(self, name: str, limit: int, gauge: Any = None) -> None:
        self.name = name
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.overflowed = 0
        self._gauge = gauge.labels(name) if gauge is not None else None
        if self._gauge is not None:
            self._gauge.set(0)

    def __call__(self, value: str | None) -> str:
        v = value or "unknown"
        if v in self._seen:
            return v
        with self._lock:
            if v in self._seen:
                return v
            if len(self._seen) < self.limit:
                self._seen.add(v)
                if self._gauge is not None:
                    self._gauge.set(len(self._seen))
                return v
            self.overflowed += 1
            return OTHER


def build_info(registry: CollectorRegistry) -> None:
    """``llm_sidecar_build_info``: the version, and whether the fast lane runs its native core
    (built where a C compiler was present at install; the Python lane counts the same)."""
    Info("llm_sidecar_build", "This sidecar's version, and whether its fast lane runs its "
         "native core", registry=registry).info(
        {"version": __version__, "native_lane": "true" if NATIVE else "false"})


class BudgetCollector(Collector):
    """Budget gauges computed at scrape time from the ledger (settled plus in-flight)."""

    def __init__(self, ledger: Ledger, wall: Callable[[], float]) -> None:
        self._ledger = ledger
        self._wall = wall

    def collect(self):  # type: ignore[no-untyped-def]
        limit = GaugeMetricFamily("llm_budget_limit", "Budget limit in its unit",
                                  labels=["budget", "unit"])
        spent = GaugeMetricFamily(
            "llm_budget_spent", "Spent in the current window, in-flight estimates included",
            labels=["budget", "unit"])
        ratio = GaugeMetricFamily("llm_budget_usage_ratio", "Spent / limit", labels=["budget"])
        end = GaugeMetricFamily("llm_budget_window_end_timestamp_seconds",
                                "When the current window ends (rolling: now)", labels=["budget"])
        thresholds = GaugeMetricFamily(
            "llm_budget_threshold", "Configured alert thresholds, as ratios of the limit",
            labels=["budget", "threshold"])
        for st in self._ledger.statuses(self._wall()):
            b = st.budget
            limit.add_metric([b.name, b.unit], b.limit)
            spent.add_metric([b.name, b.unit], st.spent)
            ratio.add_metric([b.name], st.ratio)
            end.add_metric([b.name], st.window_end)
            for t in b.thresholds:
                thresholds.add_metric([b.name, f"{t:g}"], t)
        yield from (limit, spent, ratio, end, thresholds)


# OpenTelemetry GenAI semantic conventions: bucket boundaries the spec recommends.
_GENAI_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                        16777216, 67108864)
_GENAI_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                           20.48, 40.96, 81.92)
_GENAI_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                       2.5, 5.0, 7.5, 10.0)
_GENAI_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_GENAI_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]


class GenAIMetrics:
    """The OpenTelemetry GenAI names, for dashboards built for other GenAI instrumentation."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Number of input and output tokens used (per request)",
            [*_GENAI_LABELS, "gen_ai_token_type"], buckets=_GENAI_TOKEN_BUCKETS,
            registry=registry)
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "GenAI operation duration",
            _GENAI_LABELS, buckets=_GENAI_DURATION_BUCKETS, registry=registry)
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to generate the first token for successful responses",
            _GENAI_LABELS, buckets=_GENAI_TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, for successful responses",
            _GENAI_LABELS, buckets=_GENAI_TPOT_BUCKETS, registry=registry)

    def observe(self, operation: str, provider: str, model: str, input_tokens: int,
                output_tokens: int, duration: float, ttft: float | None,
                tpot: float | None) -> None:
        labels = (operation, provider, model)
        self.token_usage.labels(*labels, "input").observe(input_tokens)
        self.token_usage.labels(*labels, "output").observe(output_tokens)
        self.duration.labels(*labels).observe(duration)
        if ttft is not None:
            self.ttft.labels(*labels).observe(ttft)
        if tpot is not None:
            self.tpot.labels(*labels).observe(tpot)


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, max_keys: int = 1000,
                 max_teams: int = 200, max_models: int = 200, otel_genai: bool = False) -> None:
        self.registry = registry
        label_values = Gauge(
            "llm_label_values", "Distinct values admitted per capped label (others go to "
            "'other'); with --workers, the largest count of any worker", ["label"],
            registry=registry, multiprocess_mode="max")
        self.cap_key = LabelCap("key", max_keys, label_values)
        self.cap_team = LabelCap("team", max_teams, label_values)
        self.cap_model = LabelCap("model", max_models, label_values)
        self.tokens = Counter(
            "llm_tokens", "Settled tokens, added once when a request ends",
            ["provider", "model", "token_type", "source", "key", "team"], registry=registry)
        self.live_tokens = Counter(
            "llm_live_tokens",
            "Live token estimates: input when the request is sent, output chunk by chunk "
            "(a whole answer settled from its report: the reported counts when it arrives)",
            ["provider", "model", "token_type", "key", "team"], registry=registry)
        self.requests = Counter(
            "llm_requests", "Requests by outcome",
            ["provider", "model", "key", "team", "code", "outcome", "stream"], registry=registry)
        self.in_flight = Gauge(
            "llm_streams_in_flight", "Streamed responses currently being relayed",
            ["provider", "model"], registry=registry, multiprocess_mode="livesum")
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds", "Request start to first generated text",
            ["provider", "model"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.duration = Histogram(
            "llm_request_duration_seconds", "Request start to end of the response",
            ["provider", "model", "stream"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram(
            "llm_time_per_output_token_seconds", "Generation time per output token after the first",
            ["provider", "model"], buckets=_TPOT_BUCKETS, registry=registry)
        self.estimate_ratio = Histogram(
            "llm_token_estimate_ratio", "Estimated / reported tokens, when both exist",
            ["provider", "model", "token_type"], buckets=_RATIO_BUCKETS, registry=registry)
        self.frame_errors = Counter(
            "llm_frame_errors", "Frames or bodies the meter could not read (passed through)",
            ["provider"], registry=registry)
        self.cost_usd = Counter(
            "llm_cost_usd", "Settled cost in USD from the price table",
            ["provider", "model", "key", "team", "source"], registry=registry)
        self.unpriced = Counter(
            "llm_unpriced_tokens", "Settled tokens of models with no price (not in any cost)",
            ["provider", "model"], registry=registry)
        self.server_tool_calls = Counter(
            "llm_server_tool_calls", "Server-side tool calls the provider reported (billed per "
            "call: web search, file search, ...)", ["provider", "model", "tool"],
            registry=registry)
        self.rejections = Counter(
            "llm_budget_rejections", "Requests refused with 429 before reaching the upstream, by "
            "the block budget that refused them", ["provider", "budget"], registry=registry)
        self.cut_offs = Counter(
            "llm_budget_cut_offs", "Streams ended mid-way because they crossed a block budget "
            "with cut_off_streams", ["provider", "budget"], registry=registry)
        self.meter_bytes = Counter(
            "llm_meter_bytes", "Response bytes the meter read, by path: the fast lane (runs of "
            "known event shapes) or the general reader", ["path"], registry=registry)
        self.meter_fast = self.meter_bytes.labels("fast")
        self.meter_general = self.meter_bytes.labels("general")
        self.estimated_chars = Counter(
            "llm_tokenizer_estimated_chars", "Generated text counted by its length instead of "
            "the tokenizer, because the tokenizer CPU budget was spent (limits.tokenizer_cpu)",
            registry=registry)
        self.price_info = Info(
            "llm_price_data", "The price data costs are computed from", registry=registry)
        build_info(registry)
        self.genai = GenAIMetrics(registry) if otel_genai else None
        self.c_tokens = Children(self.tokens)
        self.c_live = Children(self.live_tokens)
        self.c_requests = Children(self.requests)
        self.c_in_flight = Children(self.in_flight)
        self.c_ttft = Children(self.ttft)
        self.c_duration = Children(self.duration)
        self.c_tpot = Children(self.tpot)
        self.c_ratio = Children(self.estimate_ratio)
        self.c_cost = Children(self.cost_usd)
        self.c_unpriced = Children(self.unpriced)
        self.c_tools = Children(self.server_tool_calls)
        self.c_frame_errors = Children(self.frame_errors)
        self.c_rejections = Children(self.rejections)
        self.c_cut_offs = Children(self.cut_offs)

    def cost(self, provider: str, model: str, key: str, team: str, source: str,
             usd: float | None, tokens: int) -> None:
        if usd is None:
            if tokens:
                self.c_unpriced(provider, model).inc(tokens)
        elif usd > 0:
            self.c_cost(provider, model, key, team, source).inc(usd)

    def zero(self, providers: Iterable[str], budgets: Iterable[Any]) -> None:
        """Create, at 0, the labelled series alerts and dashboards read."""
        budgets = list(budgets)
        for provider in providers:
            self.c_frame_errors(provider)
            for b in budgets:
                if b.action == "block":
                    self.c_rejections(provider, b.name)
                    self.c_cut_offs(provider, b.name)

    def metered(self, fast: int, general: int, estimated_chars: int) -> None:
        if fast:
            self.meter_fast.inc(fast)
        if general:
            self.meter_general.inc(general)
        if estimated_chars:
            self.estimated_chars.inc(estimated_chars)

    def price_data(self, book: PriceBook) -> None:
        d = book.data
        self.price_info.info({"source": d.source, "version": d.version or "",
                              "data_as_of": d.data_as_of or "",
                              "overrides": str(len(book.overrides))})

    def model_label(self, model: str | None) -> str:
        return self.cap_model(model)

    def settle(self, provider: str, model: str, key: str, team: str, s: Settlement) -> None:
        """Add one request's settled counts (labels already capped). A count of 0 makes its
        series exist, at 0, without an increment (inc(0) changes nothing, at the price of a
        locked add: OpenAI reports four zero details on most answers)."""
        t = self.c_tokens

        def add(token_type: str, source: str | None, n: int | None) -> None:
            if n is not None and source is not None:
                child = t(provider, model, token_type, source, key, team)
                if n:
                    child.inc(n)

        add("input", s.input_source, s.input_tokens)
        add("output", s.output_source, s.output_tokens)
        add("cached_input", s.input_source, s.cached_input_tokens)
        add("cache_write_input", s.input_source, s.cache_write_input_tokens)
        add("reasoning", s.reasoning_source, s.reasoning_tokens)
        add("cache_write_1h_input", s.input_source, s.cache_write_1h_input_tokens)
        add("input_audio", s.input_source, s.input_audio_tokens)
        add("output_audio", s.output_source, s.output_audio_tokens)
        if s.server_tools:
            for tool, calls in s.server_tools.items():
                self.c_tools(provider, model, tool).inc(calls)
        if s.output_source != SOURCE_ESTIMATED and s.output_tokens > 0 and (
            s.estimated_output_tokens > 0
        ):
            self.c_ratio(provider, model, "output").observe(
                s.estimated_output_tokens / s.output_tokens)
        if s.input_source != SOURCE_ESTIMATED and s.input_tokens > 0 and (
            s.estimated_input_tokens > 0
        ):
            self.c_ratio(provider, model, "input").observe(
                s.estimated_input_tokens / s.input_tokens)
        if s.frame_errors:
            self.c_frame_errors(provider).inc(s.frame_errors)
