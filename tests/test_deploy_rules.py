"""The shipped Prometheus rules and configs: promtool and amtool, for real."""

from __future__ import annotations

import subprocess

from .conftest import ROOT, promtool, tool

PROM = ROOT / "deploy" / "prometheus"


def run(*args: str) -> str:
    res = subprocess.run(args, capture_output=True, text=True, check=False, cwd=PROM)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def test_rules_are_valid() -> None:
    out = run(promtool(), "check", "rules", "rules/llm-sidecar.rules.yml")
    assert "SUCCESS: 10 rules found" in out


def test_rule_unit_tests_pass() -> None:
    assert "SUCCESS" in run(promtool(), "test", "rules", "tests/llm-sidecar.test.yml")


def test_prometheus_config_is_valid() -> None:
    assert "is valid prometheus config" in run(promtool(), "check", "config", "prometheus.yml")


def test_alertmanager_example_is_valid() -> None:
    amtool = tool("amtool", "prometheus-alertmanager")
    out = run(amtool, "check-config", str(ROOT / "deploy" / "alertmanager" / "alertmanager.yml"))
    assert "SUCCESS" in out
