"""The sidecar's HTTP/1.1 client for its upstreams: pooled keep-alive connections, nothing else.

A reverse proxy uses little of what ``aiohttp.ClientSession`` does for every request (cookie
jar, redirects, proxies from the environment, auth, default headers, tracing, a payload object
and timers per request, a request object that re-validates and re-merges headers the server
side already parsed). On the build machine that costs ~70 us of CPU per request, half of what a
bare aiohttp pass-through spends on a whole request (docs/PERFORMANCE.md, seventh stop).

This client keeps aiohttp's own protocol and C parser for the answer (``ResponseHandler`` and
``HttpResponseParser``: the same response reading, flow control, read timeout, payload errors
and body stream as before) and writes the request itself, in one write: the request line, a
``Host`` for the upstream, the caller's headers in their order and bytes (as aiohttp's server
decoded them), a ``Content-Length`` and the body. It adds no header of its own (no ``Accept``,
``User-Agent`` or ``Accept-Encoding``): the upstream sees what the client sent.

WebSockets keep aiohttp's session (``ws.py``); hooks keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aiohappyeyeballs
import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy
from yarl import URL

# Methods that send no Content-Length when they have no body (as aiohttp's client).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# An idle connection is closed after this long (aiohttp's keepalive_timeout default).
KEEPALIVE_S = 15.0
# A TLS connection whose peer never completes the shutdown is aborted this long after close
# (aiohttp's enable_cleanup_closed; CPython before 3.12.7 leaks such transports).
TLS_ABORT_S = 2.0
# Bodies at most this long go out in the same write as the head.
_JOIN_BODY = 65536
# How long a connection attempt has before the next address is tried too (aiohttp's default).
HAPPY_EYEBALLS_S = 0.25

AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


class BadUpstreamResponse(aiohttp.ClientError):
    """The upstream's answer is not HTTP this client can read (a malformed status line or
    header, a header over the size limits)."""


class UpstreamResponse:
    """An upstream's answer, once its head arrived: ``content`` streams the body (aiohttp's
    ``StreamReader``). End it with ``release()`` after reading the body to its end (the
    connection goes back to its pool when it can be reused) or ``close()``."""

    __slots__ = ("_conn", "_done", "_origin", "_reusable", "content", "content_length",
                 "headers", "reason", "status")

    def __init__(self, status: int, reason: str, headers: CIMultiDictProxy[str],
                 content: aiohttp.StreamReader, conn: ResponseHandler, origin: _Origin,
                 reusable: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._conn = conn
        self._origin = origin
        self._reusable = reusable
        self._done = False

    def release(self) -> None:
        """The body was read to its end: the connection is reused when HTTP allows it."""
        if self._done:
            return
        self._done = True
        conn = self._conn
        if self._reusable and conn.is_connected() and not conn.should_close:
            self._origin.put(conn)
        else:
            self._origin.discard(conn)

    def close(self) -> None:
        """Done without reading the body to its end: the connection is closed."""
        if not self._done:
            self._done = True
            self._origin.discard(self._conn)

    def __del__(self) -> None:
        # A safety net, as aiohttp's ClientResponse has: an answer dropped without release()
        # or close() does not keep its connection open.
        with contextlib.suppress(Exception):  # the loop may be gone (interpreter exit)
            self.close()


class _Origin:
    """One scheme, host and port: its idle connections (most recent last) and busy ones."""

    __slots__ = ("_clock", "_keepalive", "_sweep", "busy", "host", "host_header", "idle",
                 "port", "server_hostname", "ssl")

    def __init__(self, url: URL, ssl_context: ssl.SSLContext | None, clock: Callable[[], float],
                 keepalive: float) -> None:
        self.host = url.raw_host or ""
        self.port: int = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl_context
        self.server_hostname = self.host if ssl_context is not None else None
        self.host_header = url.host_port_subcomponent or self.host
        self.idle: list[tuple[ResponseHandler, float]] = []
        self.busy: set[ResponseHandler] = set()
        self._sweep: asyncio.TimerHandle | None = None
        self._clock = clock
        self._keepalive = keepalive

    def take(self) -> ResponseHandler | None:
        """The most recently used idle connection still open, or None."""
        idle = self.idle
        if not idle:
            return None
        oldest = self._clock() - self._keepalive
        while idle:
            conn, since = idle.pop()
            if since > oldest and conn.is_connected() and not conn.should_close:
                self.busy.add(conn)
                return conn
            self._close(conn)
        return None

    def put(self, conn: ResponseHandler) -> None:
        self.busy.discard(conn)
        self.idle.append((conn, self._clock()))
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive, self.sweep)

    def discard(self, conn: ResponseHandler) -> None:
        self.busy.discard(conn)
        self._close(conn)

    def sweep(self) -> None:
        """Close the connections idle past the keep-alive time; come back while any is left."""
        self._sweep = None
        oldest = self._clock() - self._keepalive
        keep = []
        for conn, since in self.idle:
            if since > oldest and conn.is_connected():
                keep.append((conn, since))
            else:
                self._close(conn)
        self.idle = keep
        if keep:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive, self.sweep)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn, _ in self.idle:
            self._close(conn)
        self.idle = []
        for conn in self.busy:
            self._close(conn)
        self.busy = set()

    def _close(self, conn: ResponseHandler) -> None:
        transport = conn.transport
        conn.close()
        if transport is not None and self.ssl is not None:
            with contextlib.suppress(RuntimeError):  # no loop running (__del__ at exit)
                asyncio.get_running_loop().call_later(TLS_ABORT_S, transport.abort)


def _tls_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def request_head(method: str, url: URL, host: str, headers: Iterable[tuple[str, str]],
                 length: int | None) -> bytes:
    """The request line and header block, in the caller's order, as aiohttp's server decoded
    them (``surrogateescape`` gives back bytes that were not UTF-8). A CR or LF inside a
    method, target, name or value would split the request: refused with ``ValueError``."""
    target = url.raw_path_qs
    fields = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    fields.extend(f"{name}: {value}" for name, value in headers)
    if length is not None:
        fields.append(f"Content-Length: {length}")
    head = "\r\n".join(fields)
    breaks = len(fields) - 1
    if head.count("\r") != breaks or head.count("\n") != breaks \
            or " " in method or " " in target:
        raise ValueError("a CR, LF or space where HTTP does not allow one in the upstream "
                         "request's method, target or headers")
    return (head + "\r\n\r\n").encode("utf-8", "surrogateescape")


class Upstream:
    """Keep-alive HTTP/1.1 connections to the upstreams, one pool per scheme, host and port.

    ``connect_timeout`` bounds opening a connection (TCP and TLS); ``read_timeout`` is the
    longest wait for the next bytes of an answer (aiohttp's ``sock_read``)."""

    def __init__(self, *, ssl_verify: ssl.SSLContext | bool = True, connect_timeout: float = 10.0,
                 read_timeout: float | None = 300.0, keepalive: float = KEEPALIVE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._verify = ssl_verify
        self._tls: ssl.SSLContext | None = None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._keepalive = keepalive
        self._clock = clock
        self._origins: dict[tuple[str, str, int | None], _Origin] = {}

    def _origin(self, url: URL) -> _Origin:
        key = (url.scheme, url.raw_host or "", url.port)
        origin = self._origins.get(key)
        if origin is None:
            if url.scheme not in ("http", "https") or not url.raw_host:
                raise ValueError(f"not an http(s) upstream URL: {url}")
            tls = None
            if url.scheme == "https":
                if self._tls is None:
                    self._tls = _tls_context(self._verify)
                tls = self._tls
            origin = self._origins[key] = _Origin(url, tls, self._clock, self._keepalive)
        return origin

    async def _addresses(self, origin: _Origin) -> Sequence[AddrInfo]:
        infos = await asyncio.get_running_loop().getaddrinfo(origin.host, origin.port,
                                                             type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"{origin.host} resolved to no address")
        return infos

    async def _connect(self, origin: _Origin) -> ResponseHandler:
        """A new connection: the host's addresses tried as aiohttp tries them (Happy Eyeballs,
        RFC 8305: the next address after 0.25 s, IPv6 and IPv4 interleaved), so an address
        that hangs (an IPv6 route that goes nowhere) does not hold the request until the
        connect timeout; then TLS where the scheme asks for it."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout):
            sock = await aiohappyeyeballs.start_connection(
                await self._addresses(origin), happy_eyeballs_delay=HAPPY_EYEBALLS_S,
                interleave=1)
            _, conn = await loop.create_connection(
                lambda: ResponseHandler(loop), sock=sock, ssl=origin.ssl,
                server_hostname=origin.server_hostname)
        origin.busy.add(conn)
        return conn

    async def request(self, method: str, url: URL, headers: Iterable[tuple[str, str]],
                      body: bytes = b"") -> UpstreamResponse:
        """Send one request and wait for the head of its answer (interim 1xx answers are
        skipped, as aiohttp does). Raises ``OSError`` or ``TimeoutError`` when the upstream
        cannot be reached in time, ``aiohttp.ClientError`` when its answer is not HTTP or the
        connection ends before one, ``ValueError`` for a request HTTP cannot carry."""
        origin = self._origin(url)
        length = len(body) if body or method not in _NO_BODY_METHODS else None
        head = request_head(method, url, origin.host_header, headers, length)
        conn = origin.take()  # (a ResponseHandler has a length: never test it for truth)
        if conn is None:
            conn = await self._connect(origin)
        try:
            conn.set_response_params(skip_payload=method == "HEAD", read_until_eof=True,
                                     auto_decompress=False, read_timeout=self.read_timeout)
            transport = conn.transport
            if transport is None:
                raise aiohttp.ServerDisconnectedError()
            if len(body) <= _JOIN_BODY:
                transport.write(head + body if body else head)
            else:
                transport.write(head)
                transport.write(body)
            if conn.writing_paused:
                await conn._drain_helper()
            conn.start_timeout()
            while True:
                try:
                    message, payload = await conn.read()
                except HttpProcessingError as exc:
                    raise BadUpstreamResponse(f"{exc.code}, {exc.message}") from exc
                if not 100 <= message.code <= 199 or message.code == 101:
                    break
        except BaseException:
            origin.discard(conn)
            raise
        return UpstreamResponse(message.code, message.reason, message.headers, payload, conn,
                                origin, not message.should_close and message.code != 101)

    def close(self) -> None:
        """Close every connection, idle or in use."""
        for origin in self._origins.values():
            origin.close()
        self._origins.clear()
