"""Learned estimate factors: converge on reported counts, ignore outliers."""

from __future__ import annotations

from sidecar.calibration import Calibration


def test_factor_converges_toward_reported_ratio() -> None:
    cal = Calibration()
    assert cal.factor("claude-x", "output") == 1.0
    for _ in range(30):
        cal.observe("claude-x", "output", raw_estimate=100, reported=120)
    assert abs(cal.factor("claude-x", "output") - 1.2) < 0.01
    assert cal.factor("claude-x", "input") == 1.0 and cal.dirty


def test_outliers_and_tiny_requests_are_not_learned() -> None:
    cal = Calibration()
    assert not cal.observe("m", "output", raw_estimate=10, reported=500)  # hidden work
    assert not cal.observe("m", "output", raw_estimate=5, reported=6)  # too small to say
    assert not cal.observe(None, "output", raw_estimate=100, reported=100)
    assert cal.factor("m", "output") == 1.0


def test_keeps_adapting_after_much_evidence() -> None:
    cal = Calibration()
    for _ in range(200):
        cal.observe("m", "output", 1000, 1100)
    for _ in range(200):
        cal.observe("m", "output", 1000, 1300)
    assert cal.factor("m", "output") > 1.25


def test_snapshot_and_restore_round_trip() -> None:
    cal = Calibration()
    cal.observe("m", "output", 100, 130)
    snap = cal.snapshot()
    assert not cal.dirty
    other = Calibration()
    other.restore(snap)
    assert other.factor("m", "output") == cal.factor("m", "output")
