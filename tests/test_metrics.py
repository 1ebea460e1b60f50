"""The metric contract: names, labels, bounded cardinality, and promtool's lint."""

from __future__ import annotations

import subprocess

from prometheus_client import CollectorRegistry, generate_latest

from sidecar import __version__
from sidecar.dialects import fastlane
from sidecar.meter import Settlement
from sidecar.metrics import OTHER, LabelCap, Metrics

from .conftest import promtool


def settlement(**kw: object) -> Settlement:
    base: dict[str, object] = dict(
        input_tokens=10, output_tokens=20, cached_input_tokens=4, cache_write_input_tokens=None,
        reasoning_tokens=5, input_source="reported", output_source="reported",
        reasoning_source="reported", estimated_input_tokens=11, estimated_output_tokens=19,
        model="m", finish_reason="stop", error=None, frame_errors=2,
        first_token_at=1.0)
    base.update(kw)
    return Settlement(**base)  # type: ignore[arg-type]


def test_settle_adds_each_token_type_with_source() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.settle("openai", "gpt-4o", "alice", "research", settlement())
    def v(tt: str, src: str = "reported") -> float | None:
        return reg.get_sample_value("llm_tokens_total", {
            "provider": "openai", "model": "gpt-4o", "token_type": tt, "source": src,
            "key": "alice", "team": "research"})
    assert (v("input"), v("output"), v("cached_input"), v("reasoning")) == (10, 20, 4, 5)
    assert v("cache_write_input") is None
    assert reg.get_sample_value("llm_token_estimate_ratio_count", {
        "provider": "openai", "model": "gpt-4o", "token_type": "output"}) == 1
    assert reg.get_sample_value("llm_frame_errors_total", {"provider": "openai"}) == 2


def test_a_reported_zero_is_a_series_at_zero_and_an_absent_count_no_series() -> None:
    """OpenAI states zero details on most answers (cached, reasoning, audio): each is a series
    at 0 (rate() over it is 0, not "no data"), made without an increment; what the provider
    did not state makes no series."""
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.settle("openai", "gpt-4o", "alice", "t", settlement(
        cached_input_tokens=0, reasoning_tokens=0, input_audio_tokens=0, output_audio_tokens=0,
        output_tokens=0))
    m.settle("openai", "gpt-4o", "alice", "t", settlement(
        cached_input_tokens=3, reasoning_tokens=None, input_audio_tokens=0,
        output_audio_tokens=None, output_tokens=7))

    def v(tt: str) -> float | None:
        return reg.get_sample_value("llm_tokens_total", {
            "provider": "openai", "model": "gpt-4o", "token_type": tt, "source": "reported",
            "key": "alice", "team": "t"})
    assert (v("input"), v("output"), v("cached_input"), v("reasoning")) == (20, 7, 3, 0)
    assert (v("input_audio"), v("output_audio")) == (0, 0)
    assert v("cache_write_input") is None and v("cache_write_1h_input") is None
    created = reg.get_sample_value("llm_tokens_created", {
        "provider": "openai", "model": "gpt-4o", "token_type": "reasoning",
        "source": "reported", "key": "alice", "team": "t"})
    assert created is not None


def test_estimated_settlement_has_no_ratio_observation() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.settle("openai", "x", "k", "t", settlement(input_source="estimated",
                                                 output_source="estimated",
                                                 cached_input_tokens=None,
                                                 reasoning_tokens=None, reasoning_source=None))
    assert reg.get_sample_value("llm_token_estimate_ratio_count", {
        "provider": "openai", "model": "x", "token_type": "output"}) is None
    assert reg.get_sample_value("llm_tokens_total", {
        "provider": "openai", "model": "x", "token_type": "output", "source": "estimated",
        "key": "k", "team": "t"}) == 20


def test_build_info_says_whether_the_native_lane_runs() -> None:
    reg = CollectorRegistry()
    Metrics(reg)
    native = "true" if fastlane.NATIVE else "false"
    assert reg.get_sample_value("llm_sidecar_build_info", {
        "version": __version__, "native_lane": native}) == 1
    # where the native core is built, it is what the lane runs (tests may switch it off)
    assert (fastlane._scan_run is not None) == fastlane.NATIVE


def test_label_cap_overflows_to_other() -> None:
    cap = LabelCap("key", 2)
    assert [cap(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]
    assert cap.overflowed == 2


def test_exposition_passes_promtool_lint() -> None:
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.settle("openai", "gpt-4o", "alice", "research", settlement())
    m.live_tokens.labels("openai", "gpt-4o", "output", "alice", "research").inc(3)
    m.requests.labels("openai", "gpt-4o", "alice", "research", "200", "completed", "true").inc()
    m.in_flight.labels("openai", "gpt-4o").set(0)
    for h in (m.ttft, m.tpot):
        h.labels("openai", "gpt-4o").observe(0.1)
    m.duration.labels("openai", "gpt-4o", "true").observe(1.0)
    text = generate_latest(reg)
    for name in ("llm_tokens_total", "llm_live_tokens_total", "llm_requests_total",
                 "llm_streams_in_flight", "llm_time_to_first_token_seconds_bucket",
                 "llm_request_duration_seconds_bucket", "llm_time_per_output_token_seconds_bucket",
                 "llm_token_estimate_ratio_bucket", "llm_frame_errors_total"):
        assert name.encode() in text, name
    res = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == b"" and res.stderr.strip() == b"", res.stdout + res.stderr
