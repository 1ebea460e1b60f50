"""The command line: help, config errors, `run` as a real process, and the demo."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from sidecar.cli import main
from sidecar.demo import run_demo

from .conftest import ROOT, Script, ScriptedUpstream, chat_chunks


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_run_serves_until_sigterm() -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    sid = upstream.add(Script(chunks=[chat_chunks("hello there", 3)]))
    proxy_port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "SIDECAR_UPSTREAM": upstream.url, "SIDECAR_RECORDS": "off",
           "SIDECAR_STATE": "memory://"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "--listen", f"127.0.0.1:{proxy_port}",
        "--metrics-listen", f"127.0.0.1:{metrics_port}", env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                try:
                    async with s.get(f"http://127.0.0.1:{metrics_port}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            async with s.post(f"http://127.0.0.1:{proxy_port}/v1/chat/completions",
                              json={"model": "gpt-4o", "stream": True, "messages": []},
                              headers={"X-Script": sid}) as r:
                assert await r.read() == chat_chunks("hello there", 3)
            async with s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                text = await r.text()
        assert 'llm_requests_total{code="200"' in text or "llm_requests_total{" in text
        assert "process_resident_memory_bytes" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        await upstream.stop()
    assert proc.returncode == 0, err.decode()
    assert b"encoding o200k_base loaded from" in err


async def test_demo_runs_and_settles_traffic(capsys: pytest.CaptureFixture[str]) -> None:
    table = await run_demo(duration=2.0, workers=3, pace=0.005)
    assert "gpt-" in table and "completed=" in table
    out = capsys.readouterr().out
    assert "final totals" in out and "mock upstream" in out
