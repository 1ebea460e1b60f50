"""The command line: help, config errors, `run` as a real process, and the demo."""

from __future__ import annotations

import subprocess

import aiohttp
import pytest

from sidecar.cli import main
from sidecar.demo import run_demo

from .conftest import Script, ScriptedUpstream, SidecarProcess, chat_chunks


def test_help_lists_commands_and_env_twins(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for word in ("--upstream", "SIDECAR_UPSTREAM", "--listen", "SIDECAR_METRICS_LISTEN",
                 "--config"):
        assert word in out


def test_config_error_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDECAR_UPSTREAM", raising=False)
    assert main(["run", "--listen", "bad"]) == 2
    err = capsys.readouterr().err
    assert "--listen" in err and "upstream: required" in err


async def test_run_serves_until_sigterm() -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    sid = upstream.add(Script(chunks=[chat_chunks("hello there", 3)]))
    sidecar = SidecarProcess(upstream.url)
    await sidecar.start(stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(sidecar.url + "/v1/chat/completions",
                              json={"model": "gpt-4o", "stream": True, "messages": []},
                              headers={"X-Script": sid}) as r:
                assert await r.read() == chat_chunks("hello there", 3)
            async with s.get(sidecar.metrics_url + "/metrics") as r:
                text = await r.text()
        assert 'outcome="completed"' in text and "process_resident_memory_bytes" in text
    finally:
        code = await sidecar.stop()
        await upstream.stop()
    assert sidecar.proc is not None and sidecar.proc.stderr is not None
    err = await sidecar.proc.stderr.read()
    assert code == 0, err.decode()
    assert b"encoding o200k_base loaded from" in err


async def test_demo_runs_and_settles_traffic(capsys: pytest.CaptureFixture[str]) -> None:
    table = await run_demo(duration=2.0, workers=3, pace=0.005)
    assert "gpt-" in table and "completed=" in table
    out = capsys.readouterr().out
    assert "final totals" in out and "mock upstream" in out


def test_the_serving_process_raises_the_collector_thresholds_and_never_lowers_them() -> None:
    import gc

    from sidecar.cli import GC_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # CPython's defaults
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLD == (20_000, 10, 10)
        gc.set_threshold(50_000, 5, 20)  # set higher by the host already: kept where higher
        tune_gc()
        assert gc.get_threshold() == (50_000, 10, 20)
    finally:
        gc.set_threshold(*before)
