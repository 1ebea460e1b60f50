"""WebSocket sessions: the upgrade forwarded, every message relayed both ways, metered beside.

A request with ``Upgrade: websocket`` is connected to the upstream first (its subprotocols,
auth and other end-to-end headers forwarded); the client's handshake is answered only once the
upstream accepted, with the subprotocol the upstream chose, and a refused handshake returns the
upstream's status. Then two pumps relay messages in order, each awaiting the write before it
reads the next message (backpressure both ways, nothing buffered beyond one message), with
pings, pongs and close codes relayed rather than answered. The meter reads a copy of each
message after it was forwarded (``realtime.RealtimeMeter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import WSMsgType, web

from . import realtime
from .attribution import bearer_key, redact
from .errors import error_body as api_error_body
from .errors import realtime_error_event
from .ledger import Charge, exhausted
from .meter import Settlement
from .pricing import UNPRICED, Entry, live_rates, price_settlement
from .realtime import NOTHING
from .routing import Target

if TYPE_CHECKING:
    from .proxy import Proxy

log = logging.getLogger("sidecar.ws")

STREAM = "ws"  # the llm_requests_total stream label of a WebSocket session
# Handshake headers aiohttp writes itself on each side.
_HANDSHAKE = frozenset(("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                        "sec-websocket-protocol", "sec-websocket-accept"))
# Close codes an endpoint may put on the wire (RFC 6455 7.4); others (1005, 1006, 1015: "no
# code", "abnormal") are only ever reported locally.
_NOT_SENDABLE = frozenset((0, 1004, 1005, 1006, 1015))
_NORMAL = frozenset((1000, 1001, 1005))
CLOSE_TIMEOUT = 10.0
IDLE_CHECKS = 4


def is_upgrade(request: web.Request) -> bool:
    return request.method == "GET" and \
        request.headers.get("Upgrade", "").strip().lower() == "websocket"


def _sendable(code: Any, default: int = 1000) -> int:
    if isinstance(code, int) and 1000 <= code <= 4999 and code not in _NOT_SENDABLE:
        return code
    return default


def _reason(text: Any) -> bytes:
    """A close reason fits in 123 bytes (the control frame's 125 less the code)."""
    raw = text.encode() if isinstance(text, str) else (text or b"")
    if len(raw) <= 123:
        return bytes(raw)
    return raw[:123].decode("utf-8", "ignore").encode()


@dataclass(slots=True, eq=False)
class _Session:
    """One relayed WebSocket session and its accounting."""

    secret: str | None = field(repr=False)
    request_id: str
    path: str
    t0: float
    key: str
    team: str
    provider: str
    model: str
    meter: realtime.RealtimeMeter
    charge: Charge
    entry: Entry | None
    strict_provider: bool
    book: Any = field(repr=False)
    client: web.WebSocketResponse[Any] | None = None
    upstream: aiohttp.ClientWebSocketResponse[Any] | None = None
    relayed: int = 0  # messages and control frames relayed either way (the idle watchdog)
    ending: bool = False
    shutdown: bool = False
    status: int = 101
    outcome: str | None = None
    error: str | None = None
    close_code: int | None = None  # the code that ended the session, from whichever side
    closed_by: str | None = None  # client | upstream | sidecar
    in_flight: Any = None  # the labelled in-flight gauge child
    live_in: Any = None  # the labelled live counters, resolved once per model label
    live_out: Any = None
    seen_model: str | None = None  # the meter's model when the labels were last checked
    cut_off: tuple[Any, ...] = ()  # block budgets that end sessions mid-way
    rates: tuple[float | None, ...] = (None, None, None, None)
    tokens: int = 0  # settled so far
    usd: float = 0.0
    cost: float | None = None
    totals: dict[str, int] = field(default_factory=dict)
    responses: int = 0
    messages_in: int = 0
    messages_out: int = 0


class WebSocketRelay:
    """WebSocket handling of one ``Proxy`` (same settings, metrics, budgets and records)."""

    def __init__(self, proxy: Proxy) -> None:
        self.p = proxy
        self.sessions: set[_Session] = set()

    async def handle(self, request: web.Request, target: Target, path: str,
                     upstream_path: str) -> web.StreamResponse:
        p = self.p
        m = p.metrics
        t0 = p.clock()
        query = request.query_string
        protocol = realtime.detect(path) or (realtime.GEMINI if target.dialect == "gemini"
                                             else None)
        dialect = "gemini" if protocol == realtime.GEMINI else (
            target.dialect if protocol is None and target.dialect != "auto" else "openai")
        provider = target.provider_label(dialect)
        ident = p.policy.attributor.identify(request.headers, query)
        model = realtime.model_from_query(query)
        meter = realtime.RealtimeMeter(protocol, model, p.tokenizers.for_model, p.calibration,
                                       p.clock, budget=p.count_budget)
        budgets = p.ledger.matching({"key": ident.key, "team": ident.team,
                                     "model": model or "", "provider": provider})
        book = p.policy.prices
        s = _Session(
            secret=bearer_key(request.headers, query),
            request_id=request.headers.get("X-Request-Id") or os.urandom(16).hex(),
            path=path, t0=t0, key=m.cap_key(ident.key), team=m.cap_team(ident.team),
            provider=provider, model=m.model_label(model), meter=meter,
            charge=Charge(budgets, blocking=tuple(b for b in budgets if b.action == "block")),
            entry=book.resolve(provider, model, strict=target.provider_known),
            strict_provider=target.provider_known, book=book)
        self._rates(s)
        s.seen_model = model
        s.cut_off = tuple(b for b in s.charge.blocking if b.cut_off_streams)
        blocked = exhausted(p.ledger, s.charge.blocking, p.wall())
        if blocked is not None:
            message = f"budget {blocked.name!r} is exhausted for this window"
            body, headers = api_error_body(dialect, message)
            s.status, s.outcome, s.error = 429, "rejected", message
            m.c_rejections(provider, blocked.name).inc()
            self._finish(s)
            return web.Response(status=429, body=body, content_type="application/json",
                                headers=headers)
        upstream = await self._connect(request, target, upstream_path, s)
        if isinstance(upstream, web.Response):
            return upstream
        s.upstream = upstream
        ws = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=False,
            autoping=False, max_msg_size=p.settings.max_ws_message, compress=True,
            decode_text=False, timeout=CLOSE_TIMEOUT)
        # The upstream's own headers of its 101 answer (request ids, rate limits), if any.
        up_resp = getattr(upstream, "_response", None)
        for name, value in getattr(up_resp, "headers", {}).items():
            low = name.lower()
            if low not in _HANDSHAKE and low not in ("connection", "upgrade", "date", "server",
                                                     "content-length", "transfer-encoding"):
                ws.headers.add(name, value)
        try:
            await ws.prepare(request)
        except (ConnectionError, RuntimeError):
            s.outcome = "client_disconnected"
            await upstream.close(code=1001)
            self._finish(s)
            return ws
        s.client = ws
        if model is not None or protocol is None:
            self._track(s)  # else once the first message named the model (Gemini's setup)
        self.sessions.add(s)
        try:
            await self._relay(request, s)
        finally:
            self.sessions.discard(s)
            if s.in_flight is not None:
                s.in_flight.dec()
            self._finish(s)
        return ws

    async def shutdown(self) -> None:
        """Close every session as the server stops (1001 going away, both sides)."""
        async def one(s: _Session) -> None:
            s.shutdown = True
            s.outcome = s.outcome or "completed"
            s.closed_by, s.close_code = "sidecar", 1001
            with contextlib.suppress(Exception):
                if s.client is not None:
                    await s.client.close(code=1001, message=b"server shutting down")
        await asyncio.gather(*(one(s) for s in list(self.sessions)))

    # -- handshake ------------------------------------------------------------------------------

    async def _connect(self, request: web.Request, target: Target, upstream_path: str,
                       s: _Session) -> aiohttp.ClientWebSocketResponse[Any] | web.Response:
        from .proxy import _forward_headers, error_body

        p = self.p
        headers = _forward_headers(request.headers, _HANDSHAKE)
        offered = [x.strip() for x in request.headers.getall("Sec-WebSocket-Protocol", ())
                   for x in x.split(",") if x.strip()]
        deflate = "permessage-deflate" in request.headers.get("Sec-WebSocket-Extensions", "")
        try:
            return await p._session().ws_connect(
                target.upstream_url(upstream_path), protocols=offered, headers=headers,
                autoclose=False, autoping=False, max_msg_size=p.settings.max_ws_message,
                compress=15 if deflate else 0, decode_text=False, heartbeat=None,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT))
        except aiohttp.WSServerHandshakeError as exc:
            # The upstream answered but refused the upgrade: its status and headers, and an
            # error body naming it (aiohttp does not keep the refused answer's body).
            s.status = exc.status or 502
            s.outcome, s.error = "upstream_error", f"upstream refused the WebSocket " \
                                                    f"handshake with {exc.status}"
            self._finish(s)
            resp = web.Response(status=s.status, content_type="application/json",
                                body=error_body(s.error, "upstream_error"))
            for name, value in (exc.headers or {}).items():
                if name.lower() not in ("content-type", "content-length", "transfer-encoding",
                                        "connection", "upgrade") and \
                        name.lower() not in _HANDSHAKE:
                    resp.headers.add(name, value)
            return resp
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            s.status = 504 if timed_out else 502
            s.outcome = "timeout" if timed_out else "upstream_error"
            s.error = f"upstream {'timed out' if timed_out else 'unreachable'}: " \
                      f"{type(exc).__name__}"
            self._finish(s)
            return web.Response(status=s.status, content_type="application/json",
                                body=error_body(s.error, "upstream_error"))

    # -- relay ----------------------------------------------------------------------------------

    async def _relay(self, request: web.Request, s: _Session) -> None:
        client, up = s.client, s.upstream
        assert client is not None and up is not None
        c2u = asyncio.create_task(self._pump(s, client, up, True), name="sidecar-ws-c2u")
        u2c = asyncio.create_task(self._pump(s, up, client, False), name="sidecar-ws-u2c")
        idle = self.p.settings.read_timeout
        pending: set[asyncio.Task[tuple[str, Any, Any]]] = {c2u, u2c}
        done: set[asyncio.Task[tuple[str, Any, Any]]] = set()
        try:
            # Idle: nothing relayed either way over IDLE_CHECKS looks spanning timeouts.read
            # (so the timeout is enforced within a quarter of it, and the pumps never read a
            # clock per message).
            seen, quiet = -1, 0
            while not done and quiet < IDLE_CHECKS:
                done, pending = await asyncio.wait(pending, timeout=idle / IDLE_CHECKS,
                                                   return_when=asyncio.FIRST_COMPLETED)
                quiet = quiet + 1 if s.relayed == seen else 0
                seen = s.relayed
            s.ending = True
            if not done:
                s.outcome, s.error = "timeout", "no message either way past timeouts.read"
                s.closed_by, s.close_code = "sidecar", 1001
                await self._close_both(s, 1001, b"idle timeout")
            else:
                first = done.pop()
                await self._after(request, s, first is c2u, first.result())
        finally:
            for task in (c2u, u2c):
                if not task.done():
                    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(task), CLOSE_TIMEOUT)
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            if not up.closed:
                with contextlib.suppress(Exception):
                    await up.close(code=1001)

    async def _pump(self, s: _Session, src: Any, dst: Any,
                    from_client: bool) -> tuple[str, Any, Any]:
        """Relay ``src`` to ``dst`` until a close, an error or the end: returns why it stopped
        (``close`` with code and reason; ``gone`` when either side vanished; ``cut``)."""
        meter = s.meter
        feed = meter.client if from_client else meter.server
        account = self._account
        text, binary = WSMsgType.TEXT, WSMsgType.BINARY
        n = 0
        try:
            while not s.ending:
                msg = await src.receive()
                t = msg.type
                s.relayed += 1
                if t is text or t is binary:
                    await dst.send_frame(msg.data, t)
                    n += 1
                    if meter.protocol is not None or not from_client:
                        feed(msg.data)
                        if meter.protocol is not None:
                            cut = account(s)
                            if cut is not None:
                                return "cut", cut, None
                elif t is WSMsgType.PING:
                    await dst.ping(msg.data)
                elif t is WSMsgType.PONG:
                    await dst.pong(msg.data)
                elif t is WSMsgType.CLOSE:
                    return "close", msg.data, msg.extra
                elif t is WSMsgType.ERROR:
                    return "gone", msg.data, None
                else:  # CLOSING (closed from our side) or CLOSED (the peer vanished)
                    return "gone", None, None
        except (ConnectionError, RuntimeError, aiohttp.ClientError, OSError) as exc:
            return "gone", exc, "write"
        finally:
            if from_client:
                s.messages_in += n
            else:
                s.messages_out += n
        return "gone", None, None

    async def _after(self, request: web.Request, s: _Session, from_client: bool,
                     result: tuple[str, Any, Any]) -> None:
        """The first pump stopped: finish the close handshake on both sides."""
        client, up = s.client, s.upstream
        assert client is not None and up is not None
        why, a, b = result
        if s.shutdown:
            await self._close_both(s, 1001, b"server shutting down")
            return
        if why == "close":
            code = _sendable(a)
            s.close_code = a if isinstance(a, int) else None
            if from_client:
                s.closed_by, s.outcome = "client", "completed"
                with contextlib.suppress(Exception):
                    await up.close(code=code, message=_reason(b))
                reply = _sendable(up.close_code, code)
                with contextlib.suppress(Exception):
                    await client.close(code=reply)
            else:
                s.closed_by = "upstream"
                normal = a in _NORMAL or (isinstance(a, int) and a >= 3000)
                s.outcome = "completed" if normal else "upstream_error"
                if not normal:
                    s.error = f"upstream closed the session with {a} {b or ''}".strip()
                with contextlib.suppress(Exception):
                    await client.close(code=code, message=_reason(b))
                with contextlib.suppress(Exception):
                    await up.close(code=code)
        elif why == "cut":
            budget = a
            message = f"budget {budget.name!r} exhausted mid-session"
            s.outcome, s.error = "cut_off", message
            s.closed_by, s.close_code = "sidecar", 1008
            self.p.metrics.c_cut_offs(s.provider, budget.name).inc()
            event = realtime_error_event(s.meter.protocol, message)
            if event is not None:
                with contextlib.suppress(Exception):
                    await client.send_frame(event, WSMsgType.TEXT)
            with contextlib.suppress(Exception):
                await up.close(code=1000)
            with contextlib.suppress(Exception):
                await client.close(code=1008, message=_reason(message))
        elif from_client:
            # The client vanished (or broke the protocol): the upstream hears it is going away.
            s.closed_by, s.outcome = "client", "client_disconnected"
            s.close_code = client.close_code
            with contextlib.suppress(Exception):
                await up.close(code=1001)
        else:
            # The upstream vanished: so does the client's connection, as it would directly.
            s.closed_by, s.outcome = "upstream", "upstream_error"
            s.close_code = up.close_code
            s.error = "upstream connection lost mid-session"
            if request.transport is not None:
                request.transport.close()
            with contextlib.suppress(Exception):
                await client.close(code=1011)

    async def _close_both(self, s: _Session, code: int, reason: bytes) -> None:
        for ws in (s.client, s.upstream):
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(code=code, message=reason), CLOSE_TIMEOUT)

    # -- accounting -----------------------------------------------------------------------------

    def _rates(self, s: _Session) -> None:
        if s.charge.budgets:
            now = self.p.wall()
            text = live_rates(s.entry, now)
            audio = live_rates(s.entry, now, ("input_audio_mtok", "output_audio_mtok"))
            s.rates = (text[0], audio[0] if audio[0] is not None else text[0],
                       text[1], audio[1] if audio[1] is not None else text[1])

    def _account(self, s: _Session) -> Any:
        """After each metered message: live counts, settlements, the budget check. Returns the
        block budget a session with cut_off_streams just crossed, if any."""
        meter = s.meter
        p = self.p
        if meter.model is not s.seen_model:
            s.seen_model = meter.model
            label = p.metrics.model_label(meter.model)
            if label != s.model:
                self._relabel(s, label)
        if s.in_flight is None and s in self.sessions:
            self._track(s)
        live = meter.take_live()
        if live is not NOTHING:
            i = live[0] + live[1]
            o = live[2] + live[3]
            if i:
                if s.live_in is None:
                    s.live_in = p.metrics.c_live(s.provider, s.model, "input", s.key, s.team)
                s.live_in.inc(i)
            if o:
                if s.live_out is None:
                    s.live_out = p.metrics.c_live(s.provider, s.model, "output", s.key,
                                                  s.team)
                s.live_out.inc(o)
            if s.charge.budgets:
                usd = sum(n * r for n, r in zip(live, s.rates, strict=True) if r is not None)
                s.charge.add(p.ledger, i + o, usd, p.wall())
        if meter.settled:
            for st in meter.take_settled():
                self._settle(s, st)
        if s.cut_off:
            return exhausted(p.ledger, s.cut_off, p.wall())
        return None

    def _track(self, s: _Session) -> None:
        s.in_flight = self.p.metrics.c_in_flight(s.provider, s.model)
        s.in_flight.inc()

    def _relabel(self, s: _Session, model: str) -> None:
        """The session named its model after the handshake (session.created, Gemini's setup)."""
        if s.in_flight is not None:
            s.in_flight.dec()
            s.in_flight = self.p.metrics.c_in_flight(s.provider, model)
            s.in_flight.inc()
        s.model = model
        s.live_in = s.live_out = None
        s.entry = s.book.resolve(s.provider, s.meter.model, strict=s.strict_provider) \
            or s.entry
        self._rates(s)

    def _settle(self, s: _Session, st: Settlement) -> None:
        p = self.p
        m = p.metrics
        model = m.model_label(st.model) if st.model else s.model
        m.settle(s.provider, model, s.key, s.team, st)
        entry = s.entry
        if st.model and st.model != s.meter.model:  # input transcription: its own model
            entry = s.book.resolve(s.provider, st.model, strict=s.strict_provider)
        priced = price_settlement(s.book, entry, st, s.provider, p.wall()) \
            if entry is not None or st.reported_cost_usd is not None else UNPRICED
        tokens = st.input_tokens + st.output_tokens
        m.cost(s.provider, model, s.key, s.team, st.source, priced.usd, tokens)
        s.tokens += tokens
        if priced.usd is not None:
            s.usd += priced.usd
            s.cost = (s.cost or 0.0) + priced.usd
        s.charge.settle(p.ledger, s.tokens, s.usd, p.wall())
        if not st.model or st.model == s.meter.model:
            s.responses += 1
        t = s.totals
        for name, value in (("input_tokens", st.input_tokens),
                            ("output_tokens", st.output_tokens),
                            ("cached_input_tokens", st.cached_input_tokens),
                            ("input_audio_tokens", st.input_audio_tokens),
                            ("cached_audio_input_tokens", st.cached_audio_input_tokens),
                            ("output_audio_tokens", st.output_audio_tokens),
                            ("estimated_input_tokens", st.estimated_input_tokens),
                            ("estimated_output_tokens", st.estimated_output_tokens)):
            if value is not None:
                t[name] = t.get(name, 0) + value
        if st.source != "reported":
            t["estimated_responses"] = t.get("estimated_responses", 0) + 1

    def _finish(self, s: _Session) -> None:
        p = self.p
        m = p.metrics
        meter = s.meter
        for st in meter.close():
            self._settle(s, st)
        self._account(s)
        s.charge.settle(p.ledger, s.tokens, s.usd, p.wall())  # drop live input never billed
        errors = meter.take_errors()
        if errors:
            m.c_frame_errors(s.provider).inc(errors)
        if meter.estimated_chars:
            m.metered(0, 0, meter.estimated_chars)
        outcome = s.outcome or "completed"
        m.c_requests(s.provider, s.model, s.key, s.team, str(s.status), outcome, STREAM).inc()
        duration = p.clock() - s.t0
        m.c_duration(s.provider, s.model, STREAM).observe(duration)
        if p.record is None:
            return
        t = s.totals
        est = t.get("estimated_responses", 0)
        rec: dict[str, Any] = {
            "request_id": s.request_id, "method": "GET", "path": s.path,
            "provider": s.provider, "model": s.model, "response_model": meter.model,
            "key": s.key, "team": s.team, "stream": STREAM, "status": s.status,
            "outcome": outcome, "protocol": meter.protocol,
            "source": "estimated" if est and est >= s.responses else
                      ("mixed" if est else "reported"),
            "responses": s.responses,
            "input_tokens": t.get("input_tokens", 0), "output_tokens": t.get("output_tokens", 0),
            "cached_input_tokens": t.get("cached_input_tokens"),
            "input_audio_tokens": t.get("input_audio_tokens"),
            "cached_audio_input_tokens": t.get("cached_audio_input_tokens"),
            "output_audio_tokens": t.get("output_audio_tokens"),
            "estimated_input_tokens": t.get("estimated_input_tokens", 0),
            "estimated_output_tokens": t.get("estimated_output_tokens", 0),
            "cost_usd": None if s.cost is None else round(s.cost, 10),
            "messages_from_client": s.messages_in, "messages_from_upstream": s.messages_out,
            "closed_by": s.closed_by, "close_code": s.close_code,
            "budgets": [b.name for b in s.charge.budgets],
            "duration_seconds": round(duration, 6), "frame_errors": meter.frame_errors,
            "error": redact(s.error or meter.error_message, s.secret),
        }
        if p.worker is not None:
            rec["worker"] = p.worker
        p.record(rec)
