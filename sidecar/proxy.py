"""The only streaming I/O: forward a request, write each upstream read to the client, then meter it.

The client gets the upstream's status, headers and body bytes as they arrive; the meter works on
a copy after each write, so accounting can lag or fail without touching the stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
import orjson
from aiohttp import web

from . import structure
from .attribution import Attributor, bearer_key, redact
from .calibration import Calibration
from .config import Settings
from .dialects import AUTO, detect, get_dialect, provider_host
from .dialects.base import RequestInfo
from .errors import error_body as api_error_body
from .errors import stream_error_event
from .frames import streamed as streamed_type
from .ledger import Charge, Ledger, exhausted
from .meter import Meter, Report, Settlement, decode_whole
from .metrics import Metrics
from .paths import PathError, canonicalize
from .pricing import UNPRICED, Entry, PriceBook, Priced, live_rates, price_settlement
from .routing import Target, route, targets
from .tokens import CountBudget, Tokenizers
from .upstream import Upstream, UpstreamResponse
from .usage_inject import UsageChunkFilter, inject
from .ws import WebSocketRelay, is_upgrade

log = logging.getLogger("sidecar.proxy")

# RFC 9110 7.6.1 hop-by-hop headers, plus framing headers the server side sets for itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
        "TE", "Trailer", "Trailers", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)
# Request bodies and response reads above this are metered in a worker thread, so that one
# huge body cannot stall every other stream. Below it, the loop reads a response and a worker
# counts only its large texts (DEFER_CHARS): a worker runs tiktoken ~1.45x slower (an
# Encoding is fastest on the first thread that encodes with it: Tokenizers.warm) and trades
# the GIL with the loop for every line of Python it runs, so metering whole 64-640 KB reads
# there cost up to twice the CPU; tiktoken alone releases the GIL, and leaves the loop free
# meanwhile.
OFFLOAD_BYTES = 1024 * 1024
# A slot's text in one read at least this long is counted in a worker (Meter.count_deferred):
# 3-5 ms of tiktoken or more. Measured, pinned: at 32K characters the hand-over and the worker's
# slower tiktoken cost 20-token-event streams 20% more CPU; at 256K, paced streams beside
# tool-call streams waited 39-44 ms (p99) instead of 28-31.
DEFER_CHARS = 128 * 1024
# Request bodies up to this size are read before they are sent (a few microseconds): one that
# asks for a whole answer then goes straight to the whole-answer lane, with nothing to do while
# the upstream works. Larger ones (an agent's 20 KB+ history takes tens of microseconds to
# parse) are sent first and read while the upstream works, on either lane.
LANE_READ_FIRST = 4 * 1024

OUTCOME_COMPLETED = "completed"
OUTCOME_CLIENT_DISCONNECTED = "client_disconnected"
OUTCOME_UPSTREAM_ERROR = "upstream_error"
OUTCOME_TIMEOUT = "timeout"
OUTCOME_REJECTED = "rejected"
OUTCOME_CUT_OFF = "cut_off"

RecordSink = Callable[[dict[str, Any]], None]
_ENCODING: frozenset[str] = frozenset({"accept-encoding"})
_NOTHING: frozenset[str] = frozenset()
# The charge of a request no budget covers: Charge.add and settle do nothing without budgets.
NO_CHARGE = Charge(())


def _forward_headers(headers: Any, drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """The request's headers for the upstream: hop-by-hop ones (and those its Connection header
    names) left out, as are ``drop`` (lower-case names); repeated headers kept, in order."""
    connection = headers.get("Connection")
    if connection:
        drop = drop | {h.strip().lower() for h in connection.split(",") if h.strip()}
    return [(name, value) for name, value in headers.items()
            if (low := name.lower()) not in HOP_BY_HOP and low not in drop]


def error_body(message: str, kind: str) -> bytes:
    """An error in the OpenAI error shape, which every OpenAI-compatible client understands."""
    return orjson.dumps({"error": {"message": message, "type": kind, "code": None}})


@dataclass(slots=True)
class Policy:
    """What a config reload replaces: attribution, prices; budgets live in the ledger."""

    attributor: Attributor
    prices: PriceBook


# Learning from plain answers: every one for a model's first LEARN_ALL, then one in LEARN_EVERY.
LEARN_ALL = 64
LEARN_EVERY = 32
# A whole answer whose usage is reported is estimated (the sample) at least this often per kind.
ESTIMATE_EVERY_S = 60.0

class Proxy:
    """Request handler; one per app. Everything it uses is injected."""

    def __init__(
        self,
        settings: Settings,
        session_getter: Callable[[], aiohttp.ClientSession],
        upstream: Upstream,
        metrics: Metrics,
        tokenizers: Tokenizers,
        policy: Policy,
        ledger: Ledger,
        record_sink: RecordSink | None,
        calibration: Calibration | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        worker: int | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker  # this process's index among --workers (None: the only one)
        self._session = session_getter  # WebSockets (ws.py)
        self.upstream = upstream  # every other request
        self.metrics = metrics
        self.tokenizers = tokenizers
        self.policy = policy
        self.ledger = ledger
        self.record = record_sink
        self.calibration = calibration or Calibration()
        self._seen: dict[tuple[Any, ...], int] = {}  # requests per kind (for _learn)
        self._estimated: dict[tuple[Any, ...], int] = {}  # whole answers per kind (the sample)
        self._estimated_at: dict[tuple[Any, ...], float] = {}  # when each kind last was
        self._learned_cache: dict[tuple[Any, ...], _Learned] = {}
        self.clock = clock
        self.wall = wall
        self.targets = targets(settings)
        self.zero_counters()
        self.count_budget = CountBudget(settings.tokenizer_cpu) if settings.tokenizer_cpu else None
        self.ws = WebSocketRelay(self)

    def providers(self) -> list[str]:
        """The provider labels the configuration names: each route's own, its upstream host's,
        or the wire format's default (openai) for a gateway."""
        return sorted({t.provider or provider_host(t.url.host) or "openai" for t in self.targets})

    def zero_counters(self) -> None:
        """Counters the alert rules and dashboards use exist, at 0, before anything happens
        (a rate() over a missing series is "no data", not 0)."""
        self.metrics.zero(self.providers(), self.ledger.budgets)

    async def _read_body(self, request: web.Request) -> bytes | None:
        limit = self.settings.max_request_body
        if request.content_length is not None:
            if request.content_length > limit:
                return None
            return await request.read()  # the declared length, at most the app's own limit
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = self.clock()
        if request.method == "CONNECT" or not request.raw_path.startswith("/"):
            return web.Response(status=400, content_type="application/json",
                                body=error_body("absolute-URI and CONNECT requests are refused; "
                                                "this is not an open proxy", "invalid_request"))
        raw_path, _, query = request.raw_path.partition("?")
        try:
            canon = canonicalize(raw_path, self.settings.escaped_slashes)
        except PathError as exc:
            return web.Response(status=400, content_type="application/json",
                                body=error_body(str(exc), "invalid_request"))
        target = route(self.targets, canon.path)
        if canon.changed and route(self.targets, canon.decoded) is not target:
            return web.Response(status=400, content_type="application/json",
                                body=error_body("the path's '..' segments climb out of the "
                                                "route it names", "invalid_request"))
        path = unquote(canon.path)
        if target is None:
            return web.Response(status=404, content_type="application/json",
                                body=error_body(f"no route for {path}", "invalid_request"))
        upstream_path = canon.path + ("?" + query if query else "")
        if is_upgrade(request):
            return await self.ws.handle(request, target, path, upstream_path)
        body = await self._read_body(request)
        if body is None:
            return web.Response(
                status=413, content_type="application/json",
                body=error_body(f"request body exceeds the sidecar limit of "
                                f"{self.settings.max_request_body} bytes (max_request_body)",
                                "request_too_large"))
        budgets = self.ledger.budgets
        if target.include_usage or (budgets and any(b.action == "block" for b in budgets)):
            # The request may be refused or rewritten: know it before anything is sent.
            ex = self._exchange(request, target, path, body, t0)
            prompt = 0
            meter = ex.meter
            assert meter is not None
            if ex.charge.blocking and ex.info.body is not None:
                # Admission weighs the prompt: estimate it now (in a thread when large).
                if len(body) > OFFLOAD_BYTES:
                    prompt = await asyncio.get_running_loop().run_in_executor(
                        None, meter.estimate_prompt)
                else:
                    prompt = meter.estimate_prompt()
            rate = ex.charge.in_rate
            blocked = exhausted(self.ledger, ex.charge.blocking, self.wall(), prompt,
                                None if rate is None else prompt * rate)
            if blocked is not None:
                return self._reject(ex, blocked.name)
            return await self._forward(request, target, path, upstream_path, body, ex)
        return await self._forward(request, target, path, upstream_path, body, None, t0)

    def _exchange(self, request: web.Request, target: Target, path: str, body: bytes,
                  t0: float, *, lane: bool = False, info: RequestInfo | None = None
                  ) -> _Exchange:
        """Everything known before forwarding: dialect, attribution, meter, budgets. With
        ``lane``, a request for a whole answer gets no meter (the whole-answer lane) unless it
        is one of the sample that is estimated. ``info``: the request, already read."""
        m = self.metrics
        headers = request.headers
        dialect_name = _dialect_of(target, path, headers)
        dialect = get_dialect(dialect_name)
        provider = target.provider_label(dialect_name)
        ident = self.policy.attributor.identify(headers, request.query_string)
        if info is None:
            info = dialect.parse_request(path, request.query_string, body)
        model = m.model_label(info.model)
        book = self.policy.prices
        entry = book.resolve(provider, info.model, strict=target.provider_known)
        if self.ledger.budgets:
            budgets = self.ledger.matching({"key": ident.key, "team": ident.team,
                                            "model": info.model or "", "provider": provider})
            in_rate, out_rate = live_rates(entry, self.wall()) if budgets else (None, None)
            charge = Charge(budgets, in_rate, out_rate,
                            blocking=tuple(b for b in budgets if b.action == "block"))
        else:
            charge = NO_CHARGE
        recorded = self.record is not None  # the key and an id serve the record alone
        ex = _Exchange(
            secret=bearer_key(headers, request.query_string) if recorded else None,
            request_id=(headers.get("X-Request-Id") or os.urandom(16).hex()) if recorded else "",
            method=request.method, path=path, stream_requested=info.stream, t0=t0,
            key=m.cap_key(ident.key), team=m.cap_team(ident.team), provider=provider,
            model=model, dialect=dialect_name, info=info, meter=None, charge=charge, body=body,
            learned=self._learned(model, dialect.name, info.body), entry=entry, book=book,
            strict_provider=target.provider_known,
            disconnect=target.disconnect_policy(dialect_name))
        # The lane takes bodies whose estimate, should it need one after all, is made on the
        # loop (larger ones are estimated in a worker while the upstream works).
        if not (lane and not self.settings.estimate_all and not info.stream
                and not info.json_stream and len(body) <= OFFLOAD_BYTES
                and not self._estimate_whole((dialect_name, model), t0)):
            ex.meter = self._meter(ex)
        return ex

    def _estimate_whole(self, kind: tuple[str, str], now: float) -> bool:
        """Whether a whole answer of this kind (dialect, model) is in the estimated sample:
        the first LEARN_ALL, then one in LEARN_EVERY, and at least one a minute (a quiet
        model's estimate ratio keeps its data; CPU matters only where requests are many)."""
        last = self._estimated_at.get(kind)
        if _sample(self._estimated, kind) or (last is not None
                                              and now - last >= ESTIMATE_EVERY_S):
            if len(self._estimated_at) > 10_000:
                self._estimated_at.clear()
            self._estimated_at[kind] = now
            return True
        return False

    def _meter(self, ex: _Exchange) -> Meter:
        info = ex.info
        tokenizer = self.tokenizers.for_model(info.model)
        learned = ex.learned
        meter = Meter(get_dialect(ex.dialect), info, tokenizer, self.clock,
                      max_frame_size=self.settings.max_frame_size, budget=self.count_budget,
                      output_overheads=learned.output, prompt_overheads=learned.input)
        meter.hidden_expected = learned.hidden
        meter.defer_chars = DEFER_CHARS
        if not tokenizer.exact:
            meter.output_scale, meter.input_scale = learned.output_scale, learned.input_scale
        return meter

    def _learned(self, model: str, api: str, body: Any) -> _Learned:
        """What the calibration says for this kind of request, per (model, API, effort,
        tool_choice type), read again only after the calibration changed: reading it costs more
        than the rest of a small request's setup."""
        body = body if isinstance(body, dict) else {}
        choice = body.get("tool_choice")
        effort = structure.effort_of(body)
        kind = choice.get("type") if isinstance(choice, dict) else None
        key = (model, api, effort, kind if isinstance(kind, str) else None)
        hit = self._learned_cache.get(key)
        cal = self.calibration
        if hit is not None and hit.version == cal.version:
            return hit
        hit = _Learned(cal.version, structure.overheads(cal, model),
                       structure.input_overheads(cal, model, api, choice),
                       structure.hidden_reasoning(cal, model, effort),
                       structure.scale(cal, model, "output"), structure.scale(cal, model, "input"))
        if len(self._learned_cache) > 10_000:
            self._learned_cache.clear()
        self._learned_cache[key] = hit
        return hit

    def _reject(self, ex: _Exchange, budget: str) -> web.Response:
        """429 in the caller's API format, before anything is sent upstream."""
        message = f"budget {budget!r} is exhausted for this window (or this request's " \
                  "prompt estimate would exceed what is left)"
        body, headers = api_error_body(ex.dialect, message)
        ex.status, ex.outcome, ex.error, ex.billable = 429, OUTCOME_REJECTED, message, False
        self.metrics.c_rejections(ex.provider, budget).inc()
        self._finish(ex)
        return web.Response(status=429, body=body, content_type="application/json",
                            headers=headers)

    async def _forward(self, request: web.Request, target: Target, path: str,
                       upstream_path: str, body: bytes, ex: _Exchange | None,
                       t0: float = 0.0) -> web.StreamResponse:
        """Send the request upstream, then (when not known yet) work out its accounting while
        the upstream answers: nothing the meter does sits between the client and the upstream
        unless the request may be refused or rewritten.

        A small request that asks for a whole answer is read first (a few microseconds): on
        the whole-answer lane nothing is done while the upstream works, so the request is
        simply awaited."""
        usage_filter: UsageChunkFilter | None = None
        if ex is not None and target.include_usage and ex.dialect == "openai":
            injected = inject(ex.info.body)
            if injected is not None:
                body = injected
                usage_filter = UsageChunkFilter()
        # With a usage filter the meter must be able to read what it filters: the stream is
        # asked for uncompressed.
        headers = _forward_headers(request.headers, _ENCODING if usage_filter else _NOTHING)
        info = None
        if ex is None and len(body) <= LANE_READ_FIRST and not self.settings.estimate_all:
            info = get_dialect(_dialect_of(target, path, request.headers)).parse_request(
                path, request.query_string, body)
            if not info.stream and not info.json_stream:  # a whole answer: the lane's
                ex = self._exchange(request, target, path, body, t0, lane=True, info=info)
        send = self.upstream.request(request.method, target.upstream_url(upstream_path),
                                     headers, body)
        estimate: asyncio.Future[int] | None = None
        if ex is not None and ex.meter is None:
            sent: Any = send
        else:
            sent = asyncio.get_running_loop().create_task(send, name="sidecar-upstream-request")
            try:
                if ex is None:
                    await asyncio.sleep(0)  # let the request go out first
                    ex = self._exchange(request, target, path, body, t0, lane=True,
                                        info=info)
                meter = ex.meter
                if meter is not None and meter.info.body is not None \
                        and not meter.prompt_estimated:
                    if len(body) > OFFLOAD_BYTES:
                        estimate = asyncio.get_running_loop().run_in_executor(
                            None, meter.estimate_prompt)
                    else:
                        meter.estimate_prompt()
            except BaseException:
                sent.cancel()
                raise
        try:
            up = await sent
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            if estimate is not None:
                await estimate
            if ex.meter is None:
                self._meter_now(ex)
            self._live_input(ex)
            ex.status = 504 if timed_out else 502
            ex.outcome = OUTCOME_TIMEOUT if timed_out else OUTCOME_UPSTREAM_ERROR
            ex.error = f"upstream {'timed out' if timed_out else 'unreachable'}: " \
                       f"{type(exc).__name__}"
            ex.billable = False  # the provider never answered: nothing to bill
            self._finish(ex)
            return web.Response(status=ex.status, content_type="application/json",
                                body=error_body(ex.error, "upstream_error"))

        try:
            if estimate is not None:
                await estimate
            ex.status = up.status
            content_type = up.headers.get("Content-Type", "")
            encoding = up.headers.get("Content-Encoding")
            meter = ex.meter
            if meter is None:
                if streamed_type(content_type, json_stream=ex.info.json_stream):
                    meter = self._meter_now(ex)  # a stream after all: metered as one
                else:
                    ex.tap = []
                    ex.content_type, ex.content_encoding = content_type, encoding
            if meter is not None:
                self._live_input(ex)
                meter.start_response(content_type, encoding)
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for name, value in up.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    resp.headers.add(name, value)
            if up.content_length is not None and "Content-Length" in up.headers:
                resp.content_length = up.content_length
        except BaseException:  # (cancelled while the prompt estimate ran): the answer unread
            up.close()
            raise
        streamed = meter is not None and meter.streamed
        if usage_filter is not None and not streamed:
            usage_filter = None
        m = self.metrics
        if streamed:
            m.c_in_flight(ex.provider, ex.model).inc()
        try:
            await self._relay(request, resp, up, ex, usage_filter, content_type)
        finally:
            if streamed:
                m.c_in_flight(ex.provider, ex.model).dec()
            if ex.outcome == OUTCOME_COMPLETED:
                up.release()
            else:
                up.close()
            if ex.meter is None:
                self._settle_whole(ex)
            else:
                ex.meter.end_of_body()
                self._live_output(ex)
                self._finish(ex)
        if ex.abort and request.transport is not None:
            # The upstream broke mid-body: end the client's connection the same way rather
            # than sending a clean end of body the upstream never sent.
            request.transport.close()
        return resp

    def _meter_now(self, ex: _Exchange) -> Meter:
        """Leave the whole-answer lane: meter this exchange the general way from here on, with
        what the lane read so far (the prompt estimate and its live count as well)."""
        meter = self._meter(ex)
        ex.meter = meter
        if ex.info.body is not None:
            meter.estimate_prompt()  # on the loop: the lane takes bodies up to OFFLOAD_BYTES
        tap, ex.tap = ex.tap, None
        if tap is not None:
            self._live_input(ex)
            meter.start_response(ex.content_type, ex.content_encoding)
            for chunk in tap:
                meter.feed(chunk)
        return meter

    def _settle_whole(self, ex: _Exchange) -> None:
        """The end of a whole answer on the lane: settled from what the provider reported when
        it reported every count (no estimate is made: the live counters get the reported
        counts), else metered the general way (Meter) from the body the lane kept."""
        s = None
        tap = ex.tap
        if ex.outcome == OUTCOME_COMPLETED and ex.status < 400 and tap is not None:
            report = Report(ex.info.model)
            try:
                report.read(get_dialect(ex.dialect),
                            decode_whole(ex.content_encoding, b"".join(tap)))
                s = report.settle(ex.info.embeddings, ex.learned.hidden)
            except Exception:  # a body we cannot read goes the general way (which counts it)
                s = None
        if s is None:
            self._meter_now(ex).end_of_body()
            self._live_output(ex)
            self._finish(ex)
            return
        ex.tap = None
        m = self.metrics
        if s.input_tokens:
            m.c_live(ex.provider, ex.model, "input", ex.key, ex.team).inc(s.input_tokens)
        if s.output_tokens:
            m.c_live(ex.provider, ex.model, "output", ex.key, ex.team).inc(s.output_tokens)
        self._settle(ex, s, self.clock(), False, 0)

    async def _relay(self, request: web.Request, resp: web.StreamResponse,
                     up: UpstreamResponse, ex: _Exchange,
                     usage_filter: UsageChunkFilter | None, content_type: str) -> None:
        loop = asyncio.get_running_loop()
        meter = ex.meter
        cut_off = tuple(b for b in ex.charge.blocking if b.cut_off_streams) \
            if meter is not None and meter.streamed else ()
        client_ok = True
        drain_deadline: float | None = None
        try:
            try:
                await resp.prepare(request)
            except (ConnectionError, RuntimeError):
                client_ok = False
                ex.outcome = OUTCOME_CLIENT_DISCONNECTED
                if ex.disconnect == "close":
                    return
                drain_deadline = self.clock() + self.settings.drain_timeout
            async for chunk in up.content.iter_any():
                if client_ok:
                    try:
                        await resp.write(chunk if usage_filter is None
                                         else usage_filter.feed(chunk))
                    except (ConnectionError, RuntimeError):
                        client_ok = False
                        ex.outcome = OUTCOME_CLIENT_DISCONNECTED
                        if ex.disconnect == "close":
                            if meter is None:
                                meter = self._meter_now(ex)
                            meter.feed(chunk)
                            return
                        drain_deadline = self.clock() + self.settings.drain_timeout
                if meter is None:  # the whole-answer lane keeps the body for its end
                    tap = ex.tap
                    assert tap is not None
                    tap.append(chunk)
                    ex.tapped += len(chunk)
                    if ex.tapped > OFFLOAD_BYTES:
                        meter = self._meter_now(ex)  # too big to read at the end on the loop
                else:
                    if len(chunk) > OFFLOAD_BYTES:
                        await loop.run_in_executor(None, meter.feed, chunk)
                    else:
                        meter.feed(chunk)
                    if meter.deferred:
                        await loop.run_in_executor(None, meter.count_deferred)
                    self._live_output(ex)
                if drain_deadline is not None and self.clock() > drain_deadline:
                    return
                if client_ok and cut_off and await self._cut_off(resp, ex, cut_off,
                                                                 content_type):
                    return
            if client_ok:
                try:
                    if usage_filter is not None:
                        await resp.write(usage_filter.close())
                    await resp.write_eof()
                except (ConnectionError, RuntimeError):
                    ex.outcome = OUTCOME_CLIENT_DISCONNECTED
                    return
            if ex.outcome is None:
                ex.outcome = OUTCOME_COMPLETED
        except TimeoutError:
            ex.outcome = ex.outcome or OUTCOME_TIMEOUT
            ex.error = "upstream idle past the read timeout"
            ex.abort = client_ok
        except (aiohttp.ClientError, OSError) as exc:
            ex.outcome = ex.outcome or OUTCOME_UPSTREAM_ERROR
            ex.error = f"upstream broke mid-body: {type(exc).__name__}"
            ex.abort = client_ok

    async def _cut_off(self, resp: web.StreamResponse, ex: _Exchange, budgets: tuple[Any, ...],
                       content_type: str) -> bool:
        """End a stream that crossed a hard limit, cleanly, between two upstream frames."""
        hit = exhausted(self.ledger, budgets, self.wall())
        meter = ex.meter
        if hit is None or meter is None or not meter.at_frame_boundary():
            return False
        message = f"budget {hit.name!r} exhausted mid-stream"
        event = stream_error_event(ex.dialect, message, content_type)
        if event is None:
            return False
        try:
            await resp.write(event)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        ex.outcome, ex.error = OUTCOME_CUT_OFF, message
        self.metrics.c_cut_offs(ex.provider, hit.name).inc()
        return True

    def _live_input(self, ex: _Exchange) -> None:
        meter = ex.meter
        assert meter is not None
        n = meter.prompt_estimate
        if n:
            self.metrics.c_live(ex.provider, ex.model, "input", ex.key, ex.team).inc(n)
            if ex.charge.budgets:
                rate = ex.charge.in_rate
                ex.charge.add(self.ledger, n, None if rate is None else n * rate, self.wall())

    def _live_output(self, ex: _Exchange) -> None:
        """Called after every upstream read: the labelled counter is resolved once per request,
        and the budget clock is read only when the request has budgets."""
        meter = ex.meter
        assert meter is not None
        n = meter.take_live()
        if n:
            if ex.live_out is None:
                ex.live_out = self.metrics.c_live(ex.provider, ex.model, "output", ex.key,
                                                  ex.team)
            ex.live_out.inc(n)
            if ex.charge.budgets:
                rate = ex.charge.out_rate
                ex.charge.add(self.ledger, n, None if rate is None else n * rate, self.wall())

    def _finish(self, ex: _Exchange) -> None:
        """Settle a metered exchange: reported usage wins, field by field, else the estimate."""
        meter = ex.meter
        assert meter is not None
        end = self.clock()
        s = meter.settle(billable=ex.billable and not (
            ex.status >= 400 and meter.reported.empty() and not meter.raw_estimated_output))
        self.metrics.metered(meter.bytes_fast, meter.bytes_metered - meter.bytes_fast,
                             meter.estimated_chars)
        self._learn(meter, ex.model)  # structure overheads for every model, factors for profiles
        self._settle(ex, s, end, meter.streamed, meter.estimated_chars)

    def _settle(self, ex: _Exchange, s: Settlement, end: float, streamed: bool,
                estimated_chars: int) -> None:
        """Metrics, cost, budgets and the record of one settled exchange (either lane)."""
        outcome = ex.outcome or OUTCOME_COMPLETED
        if outcome == OUTCOME_COMPLETED and (ex.status >= 400 or s.error):
            outcome = OUTCOME_UPSTREAM_ERROR
        m = self.metrics
        stream = "true" if streamed else "false"
        m.settle(ex.provider, ex.model, ex.key, ex.team, s)
        priced = self._price(ex, s)
        cost = priced.usd
        m.cost(ex.provider, ex.model, ex.key, ex.team, s.source, cost,
               s.input_tokens + s.output_tokens)
        if ex.charge.budgets:
            ex.charge.settle(self.ledger, s.input_tokens + s.output_tokens, cost, self.wall())
        m.c_requests(ex.provider, ex.model, ex.key, ex.team, str(ex.status), outcome,
                     stream).inc()
        duration = end - ex.t0
        m.c_duration(ex.provider, ex.model, stream).observe(duration)
        ttft = tpot = None
        if s.first_token_at is not None and streamed:
            ttft = s.first_token_at - ex.t0
            m.c_ttft(ex.provider, ex.model).observe(ttft)
            if s.output_tokens > 1:
                tpot = (end - s.first_token_at) / (s.output_tokens - 1)
                m.c_tpot(ex.provider, ex.model).observe(tpot)
        if m.genai is not None and outcome == OUTCOME_COMPLETED:
            m.genai.observe(_operation(ex), ex.provider, ex.model, s.input_tokens,
                            s.output_tokens, duration, ttft, tpot)
        if self.record is not None:
            rec = _record(ex, s, outcome, duration, ttft, priced, streamed, estimated_chars)
            if self.worker is not None:
                rec["worker"] = self.worker
            self.record(rec)

    def _price(self, ex: _Exchange, s: Settlement) -> Priced:
        """Priced by the model that answered when the price data lists it (an Azure deployment
        or a router names the real model only in the answer), else by the one requested."""
        if not (s.input_tokens or s.output_tokens or s.server_tools
                or s.reported_cost_usd is not None):
            return UNPRICED
        entry = ex.entry
        if s.model and s.model != ex.info.model:
            entry = ex.book.resolve(ex.provider, s.model, strict=ex.strict_provider) or entry
        return price_settlement(ex.book, entry, s, ex.provider, self.wall())

    def _learn(self, meter: Meter, model: str) -> None:
        """Feed the calibration with what this request showed (visible text only).

        Requests of one kind (model, and whether they had tool calls, tools, thinking, hidden
        reasoning, at which effort) are learned from every time for the first LEARN_ALL, then
        one in LEARN_EVERY: the running means have settled, and learning (the media check walks
        the whole conversation) costs more than the rest of a request's accounting; an agent
        sends the same kind of request all day."""
        kind = (model, bool(meter.calls), bool(meter.prompt_tools), meter.prompt_thinking,
                bool(meter.reported.reasoning), structure.effort_of(meter.info.body)
                if meter.reported.reasoning or meter.prompt_thinking else None)
        if not _sample(self._seen, kind):
            return
        obs = meter.observation(model)
        if obs is not None:
            structure.learn(self.calibration, obs)
            hidden = meter.hidden_reasoning
            if hidden and meter.answers:
                structure.learn_hidden(self.calibration, model,
                                       structure.effort_of(meter.info.body),
                                       hidden / meter.answers)
        given = meter.input_observation(model)
        if given is not None:
            structure.learn_input(self.calibration, given)


def _dialect_of(target: Target, path: str, headers: Any) -> str:
    """The route's wire format, or the one the path and headers name (detect is memoized)."""
    return detect(path, headers) if target.dialect == AUTO else target.dialect


def _sample(seen: dict[tuple[Any, ...], int], kind: tuple[Any, ...]) -> bool:
    """Every request of a kind for its first LEARN_ALL, then one in LEARN_EVERY."""
    n = seen.get(kind, 0) + 1
    if len(seen) > 10_000:
        seen.clear()
    seen[kind] = n
    return n <= LEARN_ALL or not n % LEARN_EVERY


@dataclass(frozen=True, slots=True)
class _Learned:
    version: int  # the calibration's version it was read at
    output: structure.Overheads
    input: structure.InputOverheads
    hidden: float
    output_scale: float
    input_scale: float


@dataclass(slots=True)
class _Exchange:
    """Mutable facts about one request/response exchange, filled in as it goes."""

    # The caller's key: only ever used to redact it from what we write; never in repr.
    secret: str | None = field(repr=False)
    request_id: str
    method: str
    path: str  # no query string: it may carry a key (?key=...)
    stream_requested: bool
    t0: float
    key: str
    team: str
    provider: str
    model: str
    dialect: str
    info: RequestInfo
    meter: Meter | None  # None on the whole-answer lane (until it leaves it: Proxy._meter_now)
    charge: Charge
    body: bytes
    learned: _Learned
    book: PriceBook = field(repr=False)  # the price book of the policy this request started with
    status: int = 0
    outcome: str | None = None
    error: str | None = None
    abort: bool = False
    billable: bool = True
    live_out: Any = field(default=None, repr=False)  # the labelled live output counter
    entry: Entry | None = None  # the price entry of the requested model
    strict_provider: bool = True
    disconnect: str = "close"  # what a client disconnect does: close | drain
    # The whole-answer lane: the body read so far, its size, and the response's content type
    # and encoding (for a Meter, should the lane hand the body over).
    tap: list[bytes] | None = field(default=None, repr=False)
    tapped: int = 0
    content_type: str = ""
    content_encoding: str | None = None


def _operation(ex: _Exchange) -> str:
    """gen_ai.operation.name of the OpenTelemetry GenAI conventions."""
    if ex.info.embeddings:
        return "embeddings"
    if ex.dialect == "gemini":
        return "generate_content"
    if ex.dialect == "openai" and ex.path.rstrip("/").endswith("/completions") \
            and "/chat/" not in ex.path:
        return "text_completion"
    return "chat"


def _record(ex: _Exchange, s: Settlement, outcome: str, duration: float,
            ttft: float | None, priced: Priced, streamed: bool,
            estimated_chars: int) -> dict[str, Any]:
    estimated = ex.meter is not None  # the whole-answer lane estimates nothing
    return {
        "request_id": ex.request_id,
        "method": ex.method,
        "path": ex.path,
        "provider": ex.provider,
        "model": ex.model,
        "response_model": s.model,
        "key": ex.key,
        "team": ex.team,
        "stream": streamed,
        "status": ex.status,
        "outcome": outcome,
        "finish_reason": s.finish_reason,
        "source": s.source,
        "input_tokens": s.input_tokens,
        "input_source": s.input_source,
        "output_tokens": s.output_tokens,
        "output_source": s.output_source,
        "cached_input_tokens": s.cached_input_tokens,
        "reasoning_tokens": s.reasoning_tokens,
        "estimated_input_tokens": s.estimated_input_tokens if estimated else None,
        "estimated_output_tokens": s.estimated_output_tokens if estimated else None,
        "cache_write_input_tokens": s.cache_write_input_tokens,
        "billed_input_tokens": s.billed_input_tokens,
        "billed_output_tokens": s.billed_output_tokens,
        "server_tool_calls": s.server_tools,
        "service_tier": s.service_tier,
        "cost_usd": None if priced.usd is None else round(priced.usd, 10),
        "price_source": priced.source,
        "priced_as": priced.priced_as,
        "client_disconnect": ex.disconnect if outcome == OUTCOME_CLIENT_DISCONNECTED else None,
        "budgets": [b.name for b in ex.charge.budgets],
        "ttft_seconds": None if ttft is None else round(ttft, 6),
        "duration_seconds": round(duration, 6),
        "frame_errors": s.frame_errors,
        "length_estimated_chars": estimated_chars,
        "error": redact(ex.error or s.error, ex.secret),
    }
