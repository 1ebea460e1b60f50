"""Dashboards and rules against a real Prometheus scraping a running sidecar.

Every panel query of every dashboard must parse and return data; every alert and recording rule
must evaluate without error and name only metrics the sidecar exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.app import make_app, start
from sidecar.budgets import Budget
from sidecar.config import Settings
from sidecar.mock_upstream import make_mock_app
from sidecar.tokens import Tokenizers

from .conftest import ROOT, _free_port, eventually, tool

DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "rules" / "llm-sidecar.rules.yml"
VARIABLES = re.compile(r"\$\{?(provider|model|key|team|budget)\}?")


def panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target["expr"]))
    return out


def test_dashboards_are_generated_and_well_formed() -> None:
    sys.path.insert(0, str(ROOT / "grafana"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    rendered = generate.render()
    assert sorted(rendered) == [p.name for p in DASHBOARDS]
    for path in DASHBOARDS:
        assert path.read_text() == rendered[path.name], f"{path.name}: run grafana/generate.py"
        board = json.loads(path.read_text())
        assert board["id"] is None and board["uid"]  # importable without an id clash
        names = [v["name"] for v in board["templating"]["list"]]
        assert names[0] == "datasource"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids))
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert panel["targets"] and all(t["expr"] for t in panel["targets"])
    for prov in (ROOT / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(prov.read_text())["apiVersion"] == 1


@contextlib.asynccontextmanager
async def running_stack() -> AsyncIterator[tuple[str, Any]]:
    """Mock upstream + sidecar with budgets and the GenAI names, driven by a little traffic."""
    tokenizers = Tokenizers()
    mock = web.AppRunner(make_mock_app(pace=0.005, tokenizers=tokenizers), access_log=None)
    await mock.setup()
    site = web.TCPSite(mock, "127.0.0.1", 0)
    await site.start()
    mock_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore
    settings = Settings(
        upstream=mock_url, listen=("127.0.0.1", 0), metrics_listen=("127.0.0.1", 0),
        state="memory://", records="off", otel_genai=True, team_header="X-Team",
        budgets=(Budget("all-daily", {}, "day", limit_tokens=10_000_000),
                 Budget("ops-tiny", {"team": "ops"}, "hour", limit_tokens=50, action="block"),
                 Budget("usd-weekly", {"model": "gpt-*"}, "week", limit_usd=100.0)))
    apps = make_app(settings, registry=CollectorRegistry(), tokenizers=tokenizers)
    running = await start(apps, settings, shutdown_timeout=1.0)
    proxy = f"http://127.0.0.1:{running.proxy_port}"
    stop = asyncio.Event()

    async def traffic() -> None:
        bodies = [
            ({"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": "hi"}]}, "research"),
            ({"model": "gpt-4.1", "stream": True, "messages": [{"role": "user",
                                                                 "content": "你好"}]}, "product"),
            ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}, "ops"),
            ({"model": "house-llm", "stream": True, "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": "unpriced"}]}, "research"),
        ]
        async with aiohttp.ClientSession() as s:
            i = 0
            while not stop.is_set():
                body, team = bodies[i % len(bodies)]
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.post(proxy + "/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer sk-{i % 3}",
                                               "X-Team": team}) as r:
                        await r.read()
                i += 1
                await asyncio.sleep(0.05)

    async def voice() -> None:
        """Realtime sessions for the audio panels: audio in, one spoken response each."""
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.ws_connect(proxy + "/v1/realtime?model=gpt-realtime",
                                            headers={"Authorization": "Bearer sk-voice"}) as ws:
                        await ws.send_json({"type": "input_audio_buffer.append",
                                            "audio": "AAAA" * 12_000})
                        await ws.send_json({"type": "response.create"})
                        async for msg in ws:
                            if isinstance(msg.data, str) and '"response.done"' in msg.data:
                                break
                await asyncio.sleep(0.3)

    task = asyncio.create_task(traffic(), name="grafana-traffic")
    voice_task = asyncio.create_task(voice(), name="grafana-voice")
    try:
        yield f"127.0.0.1:{running.metrics_port}", apps
    finally:
        stop.set()
        await task
        await voice_task
        await running.stop()
        await mock.cleanup()


@contextlib.asynccontextmanager
async def prometheus(target: str, tmp: Path) -> AsyncIterator[str]:
    port = _free_port()
    (tmp / "rules").mkdir()
    (tmp / "rules" / RULES.name).write_text(RULES.read_text())
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules" / "*.yml")],
        "scrape_configs": [{"job_name": "llm-sidecar",
                            "static_configs": [{"targets": [target]}]}]}))
    proc = await asyncio.create_subprocess_exec(
        tool("prometheus", "prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async def ready() -> bool:
            assert proc.returncode is None, f"prometheus exited with status {proc.returncode}"
            with contextlib.suppress(aiohttp.ClientError):
                async with aiohttp.ClientSession() as s, s.get(url + "/-/ready") as r:
                    return r.status == 200
            return False

        await eventually(ready, every=0.1, what="prometheus /-/ready")
        yield url
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


async def _query(s: aiohttp.ClientSession, url: str, expr: str) -> dict[str, Any]:
    async with s.get(url + "/api/v1/query", params={"query": expr}) as r:
        data: dict[str, Any] = await r.json()
    return data


async def test_every_panel_and_rule_against_real_prometheus(tmp_path: Path) -> None:
    async with running_stack() as (target, _apps), prometheus(target, tmp_path) as prom:
        async with aiohttp.ClientSession() as s:
            async def panels_without_data() -> list[str]:
                empty = []
                for board, title, expr in panel_queries():
                    res = await _query(s, prom, VARIABLES.sub(".*", expr))
                    assert res["status"] == "success", (board, title, expr, res)
                    if not res["data"]["result"]:
                        empty.append(f"{board}: {title}: {expr}")
                return empty

            # Scrapes are 1 s apart: a rate window has data once it holds two of them (about
            # 14 s on a quiet machine for every panel). Polled, with a deadline for a busy box.
            empty = await panels_without_data()
            deadline = asyncio.get_running_loop().time() + 120
            while empty and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(1.0)
                empty = await panels_without_data()
            assert empty == [], "panels with no data:\n" + "\n".join(empty)
            exported = await _exported_names(s, f"http://{target}/metrics")

            groups = yaml.safe_load(RULES.read_text())["groups"]
            recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
            for group in groups:
                for rule in group["rules"]:
                    res = await _query(s, prom, rule["expr"])
                    assert res["status"] == "success", (rule, res)
                    names = set(re.findall(r"\b(llm_[a-z_]+|gen_ai_[a-z_]+|up)\b",
                                           rule["expr"]))
                    unknown = names - exported - recorded - {"up"}
                    assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"
            async def rule_health() -> tuple[list[Any], list[Any]]:
                async with s.get(prom + "/api/v1/rules") as r:
                    rules = (await r.json())["data"]["groups"]
                return rules, [(rule["name"], rule["health"], rule.get("lastError"))
                               for g in rules for rule in g["rules"] if rule["health"] != "ok"]

            rules, bad = await rule_health()
            while any(h == "unknown" for _, h, _ in bad) and \
                    asyncio.get_running_loop().time() < deadline:  # not evaluated yet
                await asyncio.sleep(0.5)
                rules, bad = await rule_health()
            assert len([rule for g in rules for rule in g["rules"]]) == 10
            assert bad == []


async def _exported_names(s: aiohttp.ClientSession, url: str) -> set[str]:
    """Sample names, plus every family the sidecar declares (a labelled counter that has not
    counted anything yet, such as frame errors, has its # TYPE line but no sample)."""
    async with s.get(url) as r:
        text = await r.text()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


@pytest.mark.parametrize("board, title, expr", panel_queries())
def test_panel_queries_name_only_exported_metrics(board: str, title: str, expr: str) -> None:
    """A static check beside the live one: names in queries are in the metric contract."""
    from sidecar.metrics import Metrics

    reg = CollectorRegistry()
    Metrics(reg, otel_genai=True)
    contract = {name for fam in reg.collect() for name in (
        fam.name, fam.name + "_total", fam.name + "_bucket", fam.name + "_sum",
        fam.name + "_count")}
    contract |= {"llm_budget_limit", "llm_budget_spent", "llm_budget_usage_ratio",
                 "llm_budget_window_end_timestamp_seconds", "llm_budget_threshold"}
    # Metric names (not label names): in these queries always followed by a selector or range.
    names = set(re.findall(r"\b((?:llm|gen_ai)_[a-z_]+)\s*[{\[]", expr))
    assert names and names <= contract, (board, title, names - contract)
