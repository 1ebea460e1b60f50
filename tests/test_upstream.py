"""The upstream client over real loopback sockets: the bytes it sends, the answers it reads,
when it reuses a connection and when it must not, and the errors the proxy maps to 502/504."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from sidecar.upstream import AddrInfo, BadUpstreamResponse, Upstream, request_head

from .conftest import eventually, serve
from .test_reliability import _self_signed

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawServer:
    """A TCP server that records each connection's bytes and answers each request with what
    ``reply`` returns for it (None: answer nothing); ``close_after`` ends the connection after
    answering."""

    def __init__(self, reply: Callable[[bytes], bytes | None] = lambda _: OK,
                 close_after: bool = False) -> None:
        self.reply = reply
        self.close_after = close_after
        self.connections: list[bytearray] = []
        self.closed = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = bytearray()
        self.connections.append(seen)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                seen += request
                answer = self.reply(request)
                if answer is None:  # silent until the client gives up
                    await reader.read()
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    client = Upstream(connect_timeout=2, read_timeout=5)
    yield client
    client.close()


async def fetch(client: Upstream, url: str, method: str = "POST", body: bytes = b"",
                headers: list[tuple[str, str]] | None = None) -> tuple[int, bytes]:
    resp = await client.request(method, URL(url, encoded=True), headers or [], body)
    data = await resp.content.read()
    resp.release()
    return resp.status, data


async def test_the_request_is_the_callers_bytes(upstream: Upstream) -> None:
    """Line, Host, headers in order (repeats kept, bytes that were not UTF-8 given back),
    Content-Length and body: nothing added (no Accept, User-Agent or Accept-Encoding)."""
    async with RawServer() as server:
        headers = [("X-A", "1"), ("Authorization", "Bearer k"), ("X-A", "2"),
                   ("X-Raw", b"caf\xe9".decode("utf-8", "surrogateescape"))]
        assert await fetch(upstream, server.url + "/v1/x?a=%2F&b", body=b"body",
                           headers=headers) == (200, b"ok")
        host = server.url.split("//")[1]
        assert bytes(server.connections[0]) == (
            f"POST /v1/x?a=%2F&b HTTP/1.1\r\nHost: {host}\r\nX-A: 1\r\n"
            "Authorization: Bearer k\r\nX-A: 2\r\nX-Raw: caf".encode()
            + b"\xe9\r\nContent-Length: 4\r\n\r\nbody")


async def test_a_large_body_arrives_whole(upstream: Upstream) -> None:
    """Bodies over 64 KB go out in a write of their own, and the client waits for the
    transport to drain before the read timeout starts."""
    body = bytes(range(256)) * 16384  # 4 MiB
    async with RawServer(lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
                         + (b"ok" if r.endswith(body) else b"no")) as server:
        assert await fetch(upstream, server.url + "/", body=body) == (200, b"ok")
        assert bytes(server.connections[0]).endswith(b"\r\n\r\n" + body)


async def test_content_length_where_aiohttp_sends_one(upstream: Upstream) -> None:
    async with RawServer(lambda r: OK[:-2] if r.startswith(b"HEAD") else OK) as server:
        for method in ("GET", "POST", "DELETE", "HEAD"):
            await fetch(upstream, server.url + "/", method=method)
        requests = bytes(server.connections[0]).split(b"\r\n\r\n")[:-1]
    assert [b"Content-Length: 0" in r for r in requests] == [False, True, True, False]


@pytest.mark.parametrize("bad", [("X-A", "1\r\nX-Injected: 1"), ("X-A\n", "1"), ("X", "\r")])
async def test_a_header_that_would_split_the_request_is_refused(
        upstream: Upstream, bad: tuple[str, str]) -> None:
    async with RawServer() as server:
        with pytest.raises(ValueError, match="CR, LF"):
            await upstream.request("POST", URL(server.url + "/"), [bad], b"{}")
        assert server.connections == []  # refused before any connection


def test_request_head_refuses_a_space_in_the_method() -> None:
    with pytest.raises(ValueError):
        request_head("GET /x", URL("http://h/"), "h", [], None)


_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from("\r\n :\udcff"), max_size=12)


@given(st.lists(st.tuples(_TEXT, _TEXT), max_size=5))
@settings(max_examples=500, deadline=None)
def test_no_header_can_split_the_request(headers: list[tuple[str, str]]) -> None:
    """Any names and values: the head has exactly one line per header, each the name and value
    given, or the request is refused. Nothing a client sends can become a second header or a
    second request."""
    try:
        head = request_head("POST", URL("http://h/p"), "h", headers, 2)
    except ValueError:
        assert any("\r" in k + v or "\n" in k + v for k, v in headers)
        return
    lines = head.decode("utf-8", "surrogateescape").split("\r\n")
    assert lines[0] == "POST /p HTTP/1.1" and lines[1] == "Host: h"
    assert lines[2:-3] == [f"{k}: {v}" for k, v in headers]
    assert lines[-3:] == ["Content-Length: 2", "", ""]


async def test_keep_alive_reuses_one_connection_until_the_upstream_says_close(
        upstream: Upstream) -> None:
    closing = {"n": 0}

    def reply(request: bytes) -> bytes:
        closing["n"] += 1
        if closing["n"] == 3:
            return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        return OK

    async with RawServer(reply) as server:
        for _ in range(5):
            assert await fetch(upstream, server.url + "/") == (200, b"ok")
        # Three answers on the first connection (the third said close), two on the next.
        assert [c.count(b"POST") for c in server.connections] == [3, 2]


async def test_an_unread_body_closes_its_connection(upstream: Upstream) -> None:
    async with RawServer(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel") as server:
        resp = await upstream.request("GET", URL(server.url + "/"), [], b"")
        assert resp.content_length == 5
        resp.close()
        resp.close()  # twice is once
        server.reply = lambda _: OK
        assert await fetch(upstream, server.url + "/") == (200, b"ok")
        assert len(server.connections) == 2


async def test_an_answer_dropped_without_release_closes_its_connection(
        upstream: Upstream) -> None:
    async with RawServer(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel") as server:
        resp = await upstream.request("GET", URL(server.url + "/"), [], b"")
        del resp
        gc.collect()
        await eventually(lambda: server.closed == 1, what="the connection closed")


async def test_releasing_before_the_end_does_not_reuse(upstream: Upstream) -> None:
    """``release()`` on a body not read to its end (a misuse) must not hand the half-read
    connection to the next request."""
    async with RawServer(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel") as server:
        resp = await upstream.request("GET", URL(server.url + "/"), [], b"")
        resp.release()
        server.reply = lambda _: OK
        assert await fetch(upstream, server.url + "/") == (200, b"ok")
        assert len(server.connections) == 2


async def test_a_connection_the_upstream_closed_while_idle_is_not_reused(
        upstream: Upstream) -> None:
    async with RawServer(close_after=True) as server:
        for _ in range(3):
            assert await fetch(upstream, server.url + "/") == (200, b"ok")
            # The upstream's FIN has reached the pooled connection.
            await eventually(lambda: not any(conn.is_connected() for origin in
                                             upstream._origins.values()
                                             for conn, _ in origin.idle),
                             what="the idle connection seen closed")
        assert len(server.connections) == 3


async def test_idle_connections_expire_after_the_keep_alive_time() -> None:
    now = [0.0]
    client = Upstream(keepalive=0.2, clock=lambda: now[0])
    try:
        async with RawServer() as server:
            await fetch(client, server.url + "/")
            now[0] = 0.1
            await fetch(client, server.url + "/")
            assert len(server.connections) == 1
            now[0] = 0.35  # idle 0.25 s > 0.2: a fresh connection
            await fetch(client, server.url + "/")
            assert len(server.connections) == 2
            now[0] = 1.0
            # The sweep (every keepalive, 0.2 s here) closes what stayed idle.
            await eventually(lambda: server.closed == 2, what="the idle connections closed")
    finally:
        client.close()


async def test_interim_answers_are_skipped(upstream: Upstream) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with RawServer(lambda _: interim + OK) as server:
        assert await fetch(upstream, server.url + "/", body=b"{}",
                           headers=[("Expect", "100-continue")]) == (200, b"ok")


async def test_a_head_answer_has_no_body_and_keeps_its_connection(upstream: Upstream) -> None:
    async with RawServer(lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
                         if r.startswith(b"HEAD") else OK) as server:
        resp = await upstream.request("HEAD", URL(server.url + "/"), [], b"")
        assert (resp.status, resp.content_length, await resp.content.read()) == (200, 10, b"")
        resp.release()
        assert await fetch(upstream, server.url + "/") == (200, b"ok")
        assert len(server.connections) == 1


async def test_a_body_without_length_is_read_to_the_end_of_the_connection(
        upstream: Upstream) -> None:
    async with RawServer(lambda _: b"HTTP/1.1 200 OK\r\n\r\nuntil close",
                         close_after=True) as server:
        assert await fetch(upstream, server.url + "/") == (200, b"until close")


async def test_chunked_answers_arrive_as_they_are_sent(upstream: Upstream) -> None:
    read = asyncio.Queue[None]()  # the server writes the next chunk once the last was read

    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b"data: %d\n\n" % i)
            await read.get()
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/s", handle)
    runner, port = await serve(app)
    try:
        resp = await upstream.request("GET", URL(f"http://127.0.0.1:{port}/s"), [], b"")
        assert resp.headers["Transfer-Encoding"] == "chunked" and resp.content_length is None
        reads = []
        async for chunk in resp.content.iter_any():
            reads.append(chunk)
            read.put_nowait(None)
        resp.release()
        assert reads == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    finally:
        await runner.cleanup()


async def test_a_malformed_answer_is_a_client_error(upstream: Upstream) -> None:
    async with RawServer(lambda _: b"SPDY/9 banana\r\n\r\n") as server:
        with pytest.raises(BadUpstreamResponse) as info:
            await upstream.request("GET", URL(server.url + "/"), [], b"")
        assert isinstance(info.value, aiohttp.ClientError)


async def test_a_broken_body_raises_a_payload_error(upstream: Upstream) -> None:
    async with RawServer(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
                         close_after=True) as server:
        resp = await upstream.request("GET", URL(server.url + "/"), [], b"")
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()
        resp.close()


async def test_the_read_timeout_is_a_timeout_error() -> None:
    client = Upstream(read_timeout=0.2)
    try:
        async with RawServer(lambda _: None) as server:
            with pytest.raises(TimeoutError):
                await client.request("GET", URL(server.url + "/"), [], b"")
    finally:
        client.close()


async def test_the_connect_timeout_bounds_the_tls_handshake() -> None:
    client = Upstream(connect_timeout=0.2)
    try:
        async with RawServer(lambda _: None) as server:  # accepts TCP, never speaks TLS
            url = server.url.replace("http:", "https:")
            with pytest.raises(TimeoutError):
                await client.request("GET", URL(url + "/"), [], b"")
    finally:
        client.close()


async def test_an_address_that_hangs_does_not_hold_the_request() -> None:
    """Happy Eyeballs: while the first address hangs (a listener whose backlog is full drops
    the handshake), the next is tried after 0.25 s, and the request goes through it."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname())
    hanging = full.getsockname()

    class TwoAddresses(Upstream):
        async def _addresses(self, origin: Any) -> Sequence[AddrInfo]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", hanging),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", (origin.host, origin.port))]

    # Without Happy Eyeballs the request would wait out the whole connect timeout: a minute
    # here, so that a busy machine cannot make the 0.25 s fallback look like that.
    client = TwoAddresses(connect_timeout=60)
    try:
        async with RawServer() as server:
            started = time.monotonic()
            assert await fetch(client, server.url + "/") == (200, b"ok")
            assert time.monotonic() - started < 30
    finally:
        client.close()
        filler.close()
        full.close()


async def test_a_refused_connection_is_an_os_error(upstream: Upstream) -> None:
    with pytest.raises(OSError):
        await upstream.request("GET", URL("http://127.0.0.1:1/"), [], b"")


async def test_a_cancelled_request_closes_its_connection(upstream: Upstream) -> None:
    async with RawServer(lambda _: None) as server:
        task = asyncio.create_task(upstream.request("GET", URL(server.url + "/"), [], b""))
        await eventually(lambda: server.connections and server.connections[0],
                         what="the request sent")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: server.closed == 1, what="the connection closed")


async def test_close_ends_idle_and_busy_connections() -> None:
    client = Upstream()
    async with RawServer() as server:
        await fetch(client, server.url + "/")  # idle now
        server.reply = lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot all"
        busy = await client.request("GET", URL(server.url + "/"), [], b"")
        other = URL(server.url.replace("127.0.0.1", "localhost") + "/")
        server.reply = lambda _: OK
        await fetch(client, str(other))
        client.close()
        await eventually(lambda: server.closed == len(server.connections) == 2,
                         what="both connections closed")
        busy.close()  # after close(): nothing left to do, no error


async def _tls_server(tmp_path: Path) -> tuple[web.AppRunner, str, Path]:
    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"tls ok")

    app.router.add_get("/", hello)
    runner, port = await serve(app, ctx)
    return runner, f"https://127.0.0.1:{port}/", cert


@pytest.mark.parametrize("verify", ["system", "ca", "off"])
async def test_tls_is_verified_unless_told_not_to(tmp_path: Path, verify: str) -> None:
    runner, url, cert = await _tls_server(tmp_path)
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=str(cert))
    client = Upstream(ssl_verify={"system": True, "ca": ctx, "off": False}[verify])
    try:
        if verify == "system":
            with pytest.raises(ssl.SSLCertVerificationError):
                await fetch(client, url, "GET")
        else:
            for _ in range(2):  # the second over the same connection
                assert await fetch(client, url, "GET") == (200, b"tls ok")
    finally:
        client.close()
        await runner.cleanup()
