"""Writes the Grafana dashboards in grafana/dashboards/ (run: python grafana/generate.py).

The JSON files are committed; tests/test_grafana.py fails when they differ from this script's
output, and evaluates every panel query against a real Prometheus scraping a running sidecar.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, common, prometheus, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

OUT = Path(__file__).resolve().parent / "dashboards"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'provider=~"$provider", model=~"$model", key=~"$key", team=~"$team"'
PM = 'provider=~"$provider", model=~"$model"'


def _var(name: str, query: str, label: str) -> dash.QueryVariable:
    return (dash.QueryVariable(name).label(label).query(query).datasource(DS)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).include_all(True).multi(True)
            .all_value(".*").sort(VariableSort.ALPHABETICAL_ASC))


class Board:
    """One dashboard: Grafana's typed builders, panels laid out on its 24-column grid in rows."""

    def __init__(self, uid: str, title: str, variables: list[dash.QueryVariable],
                 tags: list[str], description: str) -> None:
        self.uid = uid
        self.builder = (
            dash.Dashboard(title).uid(uid).tags(tags).description(description).editable()
            .refresh("10s").time("now-1h", "now").timezone("browser")
            .tooltip(DashboardCursorSync.CROSSHAIR)
            .with_variable(dash.DatasourceVariable("datasource").label("Data source")
                           .type("prometheus")))
        for v in variables:
            self.builder.with_variable(v)
        self._ids = 0

    def _id(self) -> int:
        self._ids += 1
        return self._ids

    def row(self, title: str) -> None:
        self.builder.with_row(dash.Row(title).id(self._id()))

    def panel(self, title: str, targets: list[tuple[str, str]], *, kind: str = "timeseries",
              unit: str = "short", w: int = 12, h: int = 8, description: str = "",
              stack: bool = False, max_value: float | None = None) -> None:
        instant = kind != "timeseries"
        queries = []
        for i, (expr, legend) in enumerate(targets):
            q = prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(65 + i))
            queries.append(q.instant() if instant else q.range())
        p: Any
        if kind == "timeseries":
            p = timeseries.Panel().legend(common.VizLegendOptions().display_mode(
                LegendDisplayMode.LIST).placement(LegendPlacement.BOTTOM).show_legend(True))
            if stack:
                p = p.stacking(common.StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(30)
        else:
            p = (bargauge.Panel() if kind == "bargauge" else stat.Panel()).reduce_options(
                common.ReduceDataOptions().calcs(["lastNotNull"]))
        p = (p.id(self._id()).title(title).description(description).datasource(DS).unit(unit)
             .span(w).height(h).targets(queries))
        if max_value is not None:
            p = p.min(0).max(max_value).thresholds(
                dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([
                    Threshold(value=None, color="green"), Threshold(value=0.8, color="orange"),
                    Threshold(value=1.0, color="red")]))
        self.builder.with_panel(p)

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(json.dumps(self.builder.build(), cls=JSONEncoder))
        doc["id"] = None  # importable anywhere: Grafana assigns its own
        return doc


def _filters() -> list[dash.QueryVariable]:
    return [_var("provider", "label_values(llm_requests_total, provider)", "Provider"),
            _var("model", 'label_values(llm_requests_total{provider=~"$provider"}, model)',
                 "Model"),
            _var("key", "label_values(llm_requests_total, key)", "Key"),
            _var("team", "label_values(llm_requests_total, team)", "Team")]


def _quantiles(metric: str, by: str = "", sel: str = PM) -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[5m])))",
             f"p{int(q * 100)}{suffix}") for q in (0.5, 0.95, 0.99)]


def overview() -> Board:
    b = Board("llm-sidecar-overview", "LLM token sidecar: live tokens, cost, latency",
              _filters(), ["llm", "tokens", "sidecar"],
              "Live and settled token consumption per model, key and team, from the sidecar.")
    b.row("Live consumption")
    b.panel("Live output tokens/s by model", [(
        f'sum by (model) (rate(llm_live_tokens_total{{token_type="output", {SEL}}}[1m]))',
        "{{model}}")], description="Estimated chunk by chunk while streams run.")
    b.panel("Live versus settled tokens/s", [
        (f"sum(rate(llm_live_tokens_total{{{SEL}}}[5m]))", "live (estimate)"),
        (f'sum(rate(llm_tokens_total{{token_type=~"input|output", {SEL}}}[5m]))',
         "settled")], description="Live leads (estimated as streams run; a whole answer "
        "settled from its report adds the reported counts when it arrives); settled follows "
        "when requests end.")
    b.panel("Tokens/s by key (top 10)", [(
        f'topk(10, sum by (key) (rate(llm_tokens_total{{token_type=~"input|output", {SEL}}}'
        "[5m])))", "{{key}}")], stack=True)
    b.panel("Tokens/s by team", [(
        f'sum by (team) (rate(llm_tokens_total{{token_type=~"input|output", {SEL}}}[5m]))',
        "{{team}}")], stack=True)
    b.panel("Streams in flight", [(f"sum by (model) (llm_streams_in_flight{{{PM}}})",
                                   "{{model}}")], w=8)
    b.panel("Settled tokens/s by type and source", [(
        f"sum by (token_type, source) (rate(llm_tokens_total{{{SEL}}}[5m]))",
        "{{token_type}} ({{source}})")], w=16,
        description="source=reported: the provider's usage frame; estimated: the sidecar's "
                    "count (no usage reported, or the client left).")
    b.row("Realtime sessions and audio")
    b.panel("Audio tokens/s by model", [(
        f"sum by (model, token_type) (rate(llm_tokens_total{{"
        f'token_type=~"input_audio|output_audio", {SEL}}}[5m]))',
        "{{model}} {{token_type}}")], stack=True,
        description="Subsets of input and output, priced apart (several times text); settled "
                    "per Realtime response or Gemini Live turn.")
    b.panel("WebSocket sessions/s by outcome", [(
        f'sum by (outcome) (rate(llm_requests_total{{stream="ws", {SEL}}}[5m]))',
        "{{outcome}}")], stack=True,
        description="One WebSocket connection is one request with stream=\"ws\"; it counts "
                    "in Streams in flight while open.")
    b.row("Cost")
    b.panel("Cost USD/hour by model", [(
        f"sum by (model) (rate(llm_cost_usd_total{{{SEL}}}[5m])) * 3600", "{{model}}")],
        unit="currencyUSD", stack=True)
    b.panel("Cost in the last 24 h by team", [(
        f"sum by (team) (increase(llm_cost_usd_total{{{SEL}}}[24h]))", "{{team}}")],
        kind="bargauge", unit="currencyUSD")
    b.panel("Unpriced tokens/s (no price configured)", [(
        f"sum by (model) (rate(llm_unpriced_tokens_total{{{PM}}}[5m])) or vector(0)",
        "{{model}}")], w=24, h=6)
    b.row("Latency")
    b.panel("Time to first token", _quantiles("llm_time_to_first_token_seconds"), unit="s",
            w=8)
    b.panel("Time per output token", _quantiles("llm_time_per_output_token_seconds"),
            unit="s", w=8)
    b.panel("Request duration", _quantiles("llm_request_duration_seconds", "stream"),
            unit="s", w=8)
    b.row("Outcomes")
    b.panel("Requests/s by outcome", [(
        f"sum by (outcome) (rate(llm_requests_total{{{SEL}}}[5m]))", "{{outcome}}")],
        stack=True)
    b.panel("Disconnects, upstream errors, rejections/s", [(
        "sum by (outcome) (rate(llm_requests_total{outcome=~"
        f'"client_disconnected|upstream_error|timeout|rejected|cut_off", {SEL}}}[5m]))'
        " or vector(0)", "{{outcome}}")])
    b.panel("Upstream status codes/s", [(
        f"sum by (code) (rate(llm_requests_total{{{SEL}}}[5m]))", "{{code}}")], w=24, h=6)
    b.row("Estimate accuracy")
    b.panel("Estimate / reported (median) by model", [(
        "histogram_quantile(0.5, sum by (le, provider, model, token_type) "
        f"(rate(llm_token_estimate_ratio_bucket{{{PM}}}[1h])))",
        "{{provider}} {{model}} {{token_type}}")],
        description="1 means live estimates match the provider's usage; the learned factors "
                    "pull models without a public tokenizer toward 1.")
    b.panel("Share of output tokens by source", [(
        f'sum by (source) (rate(llm_tokens_total{{token_type="output", {SEL}}}[1h])) '
        "/ ignoring (source) group_left () "
        f'sum(rate(llm_tokens_total{{token_type="output", {SEL}}}[1h]))', "{{source}}")],
        unit="percentunit", stack=True)
    b.panel("Frame errors/s (passed through, not metered)", [(
        'sum by (provider) (rate(llm_frame_errors_total{provider=~"$provider"}[5m]))'
        " or vector(0)", "{{provider}}")], w=24, h=6)
    return b


def budgets() -> Board:
    sel = 'budget=~"$budget"'
    b = Board("llm-sidecar-budgets", "LLM token sidecar: budgets",
              [_var("budget", "label_values(llm_budget_limit, budget)", "Budget")],
              ["llm", "budgets", "sidecar"],
              "Budget usage, burn-down and forecast; spend includes streams still running.")
    b.row("Usage")
    b.panel("Budget usage (ratio of limit)", [(f"llm_budget_usage_ratio{{{sel}}}",
                                               "{{budget}}")],
            kind="bargauge", unit="percentunit", max_value=1.0, w=24, h=7)
    b.panel("Spent and limit", [(f"llm_budget_spent{{{sel}}}", "{{budget}} spent ({{unit}})"),
                                (f"llm_budget_limit{{{sel}}}", "{{budget}} limit ({{unit}})")])
    b.panel("Burn-down: remaining", [(
        f"llm_budget_limit{{{sel}}} - llm_budget_spent{{{sel}}}", "{{budget}} ({{unit}})")])
    b.row("Burn rate and forecast")
    b.panel("Burn rate per hour", [(f"deriv(llm_budget_spent{{{sel}}}[15m]) * 3600",
                                    "{{budget}} ({{unit}}/h)")])
    b.panel("Forecast at window end / limit", [(
        f"(llm_budget_spent{{{sel}}} + on (budget, unit) group_left () "
        f"(deriv(llm_budget_spent{{{sel}}}[30m]) * on (budget) group_left () "
        f"clamp_min(llm_budget_window_end_timestamp_seconds{{{sel}}} - time(), 0))) "
        f"/ on (budget, unit) llm_budget_limit{{{sel}}}", "{{budget}}")],
        unit="percentunit",
        description="Where the last 30 minutes' burn rate lands by the end of the window.")
    b.panel("Time left in window", [(
        f"llm_budget_window_end_timestamp_seconds{{{sel}}} - time()", "{{budget}}")],
        kind="stat", unit="s", w=8)
    b.panel("Rejected and cut-off requests/s by budget", [
        (f"sum by (budget) (rate(llm_budget_rejections_total{{{sel}}}[5m]))",
         "{{budget}} rejected"),
        (f"sum by (budget) (rate(llm_budget_cut_offs_total{{{sel}}}[5m]))",
         "{{budget}} cut off")], w=16)
    return b


def genai() -> Board:
    sel = ('gen_ai_provider_name=~"$provider", gen_ai_request_model=~"$model"')
    variables = [
        _var("provider", "label_values(gen_ai_client_token_usage_count, gen_ai_provider_name)",
             "Provider"),
        _var("model", "label_values(gen_ai_client_token_usage_count, gen_ai_request_model)",
             "Model")]
    b = Board("llm-sidecar-genai", "GenAI (OpenTelemetry semantic conventions)", variables,
              ["llm", "genai", "opentelemetry"],
              "The same traffic under the OpenTelemetry GenAI metric names (--otel-genai).")
    b.row("Tokens")
    b.panel("Tokens/s by type", [(
        f"sum by (gen_ai_token_type) (rate(gen_ai_client_token_usage_sum{{{sel}}}[5m]))",
        "{{gen_ai_token_type}}")], stack=True)
    b.panel("Tokens/s by model", [(
        f"sum by (gen_ai_request_model) (rate(gen_ai_client_token_usage_sum{{{sel}}}[5m]))",
        "{{gen_ai_request_model}}")], stack=True)
    b.panel("Tokens per request (median)", [(
        "histogram_quantile(0.5, sum by (le, gen_ai_token_type) "
        f"(rate(gen_ai_client_token_usage_bucket{{{sel}}}[5m])))", "{{gen_ai_token_type}}")])
    b.panel("Operations/s by provider", [(
        "sum by (gen_ai_provider_name, gen_ai_operation_name) "
        f"(rate(gen_ai_client_operation_duration_seconds_count{{{sel}}}[5m]))",
        "{{gen_ai_provider_name}} {{gen_ai_operation_name}}")])
    b.row("Latency")
    b.panel("Operation duration", _quantiles("gen_ai_client_operation_duration_seconds",
                                             sel=sel), unit="s", w=8)
    b.panel("Time to first token", _quantiles("gen_ai_server_time_to_first_token_seconds",
                                              sel=sel), unit="s", w=8)
    b.panel("Time per output token", _quantiles("gen_ai_server_time_per_output_token_seconds",
                                                sel=sel), unit="s", w=8)
    return b


BOARDS = (overview, budgets, genai)


def render() -> dict[str, str]:
    return {f"{b.uid}.json": json.dumps(b.json(), indent=2) + "\n"
            for b in (fn() for fn in BOARDS)}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
