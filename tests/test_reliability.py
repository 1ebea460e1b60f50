"""Faults over real loopback sockets: the client sees what the upstream sent, the accounting
settles with the right outcome and source, and nothing raises into the event loop."""

from __future__ import annotations

import asyncio
import gzip
import logging
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from sidecar.config import Secret, load_settings

from .conftest import (
    Script,
    ScriptedUpstream,
    SidecarProcess,
    Stack,
    StackFactory,
    chat_chunks,
    eventually,
    serve,
    sse,
)

USAGE = {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}


def chunk(text: str) -> bytes:
    return sse({"model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": text}}]},
               done=False)


async def post(stack: Stack, sid: str, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(
            stack.proxy_url + "/v1/chat/completions",
            data=b'{"model": "gpt-4o-mini", "stream": true}',
            headers={"X-Script": sid, **headers}) as r:
        return r.status, await r.read()


async def test_client_gone_before_headers_settles_and_releases_upstream(
        stack_factory: StackFactory) -> None:
    stack = await stack_factory(client_disconnect="close")
    sid = stack.upstream.add(Script(chunks=[chunk("late ")] * 50, head_delay=0.4, delay=0.01))
    _, writer = await asyncio.open_connection("127.0.0.1", stack.running.proxy_port)
    body = b'{"model": "gpt-4o-mini", "stream": true}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Script: " + sid.encode()
                 + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    writer.close()  # gone before the upstream even answered
    rec = await stack.wait_record()
    assert rec["outcome"] == "client_disconnected"
    # The upstream connection was closed, not leaked.
    await eventually(lambda: sid in stack.upstream.disconnected, what="the upstream closed")
    assert stack.value("llm_streams_in_flight") == 0


async def test_client_gone_right_after_the_last_frame_keeps_reported_usage(stack: Stack) -> None:
    body = chat_chunks("all of it", 3, usage=USAGE)
    sid = stack.upstream.add(Script(chunks=[body[:-16], body[-16:]], delay=0.05))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(stack.proxy_url + "/v1/chat/completions",
                            data=b'{"model": "gpt-4o-mini"}', headers={"X-Script": sid})
        got = b""
        while b"[DONE]" not in got:
            got += await resp.content.readany()
        resp.close()
    rec = await stack.wait_record()
    assert rec["source"] == "reported" and rec["output_tokens"] == 22


async def test_200_then_error_event_is_an_upstream_error(stack: Stack) -> None:
    body = chunk("partial ") + sse({"error": {"message": "Overloaded", "type": "overloaded"}},
                                   done=False)
    sid = stack.upstream.add(Script(chunks=[body]))
    status, got = await post(stack, sid)
    assert (status, got) == (200, body)
    rec = await stack.wait_record()
    assert (rec["outcome"], rec["error"], rec["output_source"]) == (
        "upstream_error", "Overloaded", "estimated")
    assert rec["output_tokens"] > 0


async def test_stream_closed_without_final_frame_settles_estimated(stack: Stack) -> None:
    body = chunk("no usage ") + chunk("and no done")
    sid = stack.upstream.add(Script(chunks=[body]))
    assert await post(stack, sid) == (200, body)
    rec = await stack.wait_record()
    assert (rec["outcome"], rec["source"]) == ("completed", "estimated")


async def test_single_5mb_event_passes_and_is_counted(stack: Stack) -> None:
    text = "a long tool argument " * 250_000  # ~5 MB in one frame
    body = chunk(text) + b"data: [DONE]\n\n"
    sid = stack.upstream.add(Script(chunks=[body]))
    status, got = await post(stack, sid)
    assert status == 200 and got == body
    rec = await stack.wait_record()
    assert rec["frame_errors"] == 0 and rec["output_tokens"] > 1_000_000


async def test_invalid_utf8_and_json_pass_through_and_are_counted(stack: Stack) -> None:
    body = (b"data: {\"choices\": [{\"delta\": {\"content\": \"\xff\xfe bad\"}}]}\n\n"
            + b"data: {truncated\n\n" + chat_chunks("fine", 2, usage=USAGE))
    sid = stack.upstream.add(Script(chunks=[body]))
    assert await post(stack, sid) == (200, body)
    rec = await stack.wait_record()
    assert rec["frame_errors"] == 2 and rec["source"] == "reported"


async def test_upstream_json_errors_pass_through(stack: Stack) -> None:
    for status, err in ((400, {"error": {"message": "bad request"}}),
                        (500, {"error": {"message": "internal"}}),
                        (401, {"error": {"message": "Incorrect API key provided: sk-live-abcd"
                                                    "efgh1234"}})):
        body = orjson.dumps(err)
        sid = stack.upstream.add(Script(chunks=[body], status=status,
                                        headers={"Content-Type": "application/json"}))
        assert await post(stack, sid) == (status, body)
        rec = await stack.wait_record()
        assert rec["outcome"] == "upstream_error" and rec["input_tokens"] == 0
    assert "sk-live" not in rec["error"]  # an echoed key is redacted from the record


async def test_gzip_stream_split_anywhere(stack: Stack) -> None:
    body = gzip.compress(chat_chunks("compressed " * 30, 4, usage=USAGE))
    sid = stack.upstream.add(Script(chunks=[body[i:i + 7] for i in range(0, len(body), 7)],
                                    headers={"Content-Type": "text/event-stream",
                                             "Content-Encoding": "gzip"}))
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.post(
            stack.proxy_url + "/v1/chat/completions", data=b"{}",
            headers={"X-Script": sid}) as r:
        assert await r.read() == body
    assert (await stack.wait_record())["output_tokens"] == 22


async def test_header_and_concurrency_limits(stack_factory: StackFactory) -> None:
    stack = await stack_factory(max_header_size=1024, max_concurrent_requests=2)
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.proxy_url + "/v1/models", headers={"X-Big": "x" * 5000}) as r:
            assert r.status == 400
        gate = asyncio.Event()  # both slow streams stay open until the third was refused
        sids = [stack.upstream.add(Script(chunks=[chunk("slow ")] * 20, gate=gate, gate_at=1))
                for _ in range(2)]
        slow = [asyncio.create_task(post(stack, sid), name=f"slow-{i}")
                for i, sid in enumerate(sids)]
        await eventually(lambda: all(stack.upstream.written.get(sid) for sid in sids),
                         what="both slow streams under way")
        async with s.post(stack.proxy_url + "/v1/chat/completions", data=b"{}",
                          headers={"X-Script": sids[0]}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert "max_concurrent_requests" in (await r.json())["error"]["message"]
        gate.set()
        assert all(status == 200 for status, _ in await asyncio.gather(*slow))


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_upstream_tls_is_verified_and_a_custom_ca_is_trusted(
        stack_factory: StackFactory, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_route("*", "/{tail:.*}", hello)
    runner, port = await serve(app, ctx)
    url = f"https://127.0.0.1:{port}"
    try:
        strict = await stack_factory(upstream=url)
        trusting = await stack_factory(upstream=url, ca_file=str(cert))
        async with aiohttp.ClientSession() as s:
            async with s.get(strict.proxy_url + "/v1/models") as r:
                assert r.status == 502  # self-signed and not trusted: refused
            async with s.get(trusting.proxy_url + "/v1/models") as r:
                assert r.status == 200 and await r.json() == {"ok": True}
    finally:
        await runner.cleanup()


async def test_known_keys_never_appear_in_any_output(stack_factory: StackFactory,
                                                     caplog: pytest.LogCaptureFixture,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    keys = {"bearer": "sk-proj-SECRETbearer0000000000",
            "x-api-key": "sk-ant-SECRETanthropic00",
            "api-key": "azureSECRETkey000000000000",
            "x-goog-api-key": "AIzaSECRETgoog0000000000000",
            "query": "AIzaSECRETquery000000000000"}
    stack = await stack_factory(key_hash_secret=Secret("hash-secret-value"),
                                admin_token=Secret("admin-secret-value"))
    json_ct = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        for name, key in keys.items():
            said = f"Incorrect API key provided: {key}"  # as providers echo the caller's key
            echo = orjson.dumps({"error": {"message": said}})
            echo_anthropic = orjson.dumps({"type": "error", "error": {
                "type": "authentication_error", "message": said}})
            for path, script in (
                    ("/v1/chat/completions", Script(chunks=[chat_chunks("hi", 1, usage=USAGE)])),
                    ("/v1/chat/completions", Script(chunks=[echo], status=401, headers=json_ct)),
                    ("/v1/messages", Script(chunks=[echo_anthropic], status=401,
                                            headers=json_ct)),
                    ("/v1beta/models/gemini-2.5-pro:streamGenerateContent",
                     Script(chunks=[b"[]"], headers={"Content-Type": "application/json"}))):
                sid = stack.upstream.add(script)
                headers = {"X-Script": sid}
                query = ""
                if name == "bearer":
                    headers["Authorization"] = f"Bearer {key}"
                elif name == "query":
                    query = f"?alt=sse&key={key}"
                else:
                    headers[name] = key
                async with s.post(stack.proxy_url + path + query, data=b'{"model": "m"}',
                                  headers=headers) as r:
                    await r.read()
        # The 502 path too: an upstream that does not answer.
        dead = await stack_factory(upstream="http://127.0.0.1:1")
        async with s.post(dead.proxy_url + "/v1/chat/completions", data=b"{}",
                          headers={"Authorization": f"Bearer {keys['bearer']}"}) as r:
            outputs_502 = await r.text()
            assert r.status == 502
    await eventually(lambda: len(stack.records) == 20 and dead.records, what="every record")
    async with aiohttp.ClientSession() as s:
        async with s.get(stack.metrics_url + "/metrics") as r:
            metrics = await r.text()
        async with s.get(stack.metrics_url + "/budgets",
                         headers={"Authorization": "Bearer admin-secret-value"}) as r:
            budgets = await r.text()
    captured = capsys.readouterr()
    outputs = {
        "metrics": metrics, "budgets": budgets,
        "records": orjson.dumps(stack.records + dead.records).decode(),
        "502 body": outputs_502,
        "logs": "\n".join(r.getMessage() for r in caplog.records),
        "stdout": captured.out, "stderr": captured.err,
        "settings repr": repr(stack.apps.settings), "handler repr": repr(stack.apps.handler),
    }
    for where, text in outputs.items():
        for key in [*keys.values(), "hash-secret-value", "admin-secret-value"]:
            assert key not in text, f"{key} leaked into {where}"
    assert len(stack.records) == 20
    assert sum(1 for r in stack.records if r["error"] and "[redacted]" in r["error"]) == 10


async def test_settings_repr_hides_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstream: http://x\nattribution: {key_hash_secret: topsecret-1}\n"
                   "admin_token: topsecret-2\n")
    s = load_settings(str(cfg), env={})
    assert "topsecret" not in repr(s) and "topsecret" not in str(s)


async def test_sigterm_drains_in_flight_streams_then_exits() -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    body = [chunk(f"w{i} ") for i in range(40)] + [b"data: [DONE]\n\n"]
    gate = asyncio.Event()  # the stream stays open half-way until the test has looked
    sid = upstream.add(Script(chunks=body, gate=gate, gate_at=20))
    sidecar = SidecarProcess(upstream.url, SIDECAR_SHUTDOWN_GRACE="30")
    await sidecar.start()
    try:
        async with aiohttp.ClientSession() as s:
            stream = asyncio.create_task(_read(s, sidecar.url, sid), name="draining-stream")
            await eventually(lambda: upstream.written.get(sid), what="the stream under way")
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGTERM)

            def refused() -> bool:  # no new connections while draining
                try:
                    socket.create_connection(("127.0.0.1", sidecar.port), timeout=1).close()
                except OSError:
                    return True
                return False

            await eventually(refused, what="new connections refused")
            assert not stream.done()
            gate.set()
            assert await stream == b"".join(body)  # the stream in flight finished whole
        assert await asyncio.wait_for(sidecar.proc.wait(), 20) == 0
    finally:
        await sidecar.stop(signal.SIGKILL)
        await upstream.stop()


async def _read(s: aiohttp.ClientSession, url: str, sid: str) -> bytes:
    async with s.post(url + "/v1/chat/completions", data=b"{}", headers={"X-Script": sid}) as r:
        return await r.read()
