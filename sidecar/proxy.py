"""The only streaming I/O: forward a request, write each upstream read to the client, then meter it.

The client gets the upstream's status, headers and body bytes as they arrive; the meter works on
a copy after each write, so accounting can lag or fail without touching the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .attribution import Attributor
from .calibration import Calibration
from .config import Settings, all_routes
from .dialects import AUTO, detect, get_dialect, provider_for
from .meter import Meter, Settlement
from .metrics import Metrics
from .tokens import Tokenizers
from .usage_inject import UsageChunkFilter, inject

log = logging.getLogger("sidecar.proxy")

# RFC 9110 7.6.1 hop-by-hop headers, plus framing headers the server side sets for itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
        "TE", "Trailer", "Trailers", "Transfer-Encoding", "Upgrade", "Host", "Content-Length",
    )
)
# Chunks above this are metered in a worker thread so tokenizing never stalls the event loop.
OFFLOAD_BYTES = 64 * 1024

OUTCOME_COMPLETED = "completed"
OUTCOME_CLIENT_DISCONNECTED = "client_disconnected"
OUTCOME_UPSTREAM_ERROR = "upstream_error"
OUTCOME_TIMEOUT = "timeout"

RecordSink = Callable[[dict[str, Any]], None]


def _forward_headers(headers: Any) -> CIMultiDict[str]:
    named = {h.strip().lower() for h in headers.get("Connection", "").split(",") if h.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in HOP_BY_HOP and low not in named:
            out.add(name, value)
    return out


def error_body(message: str, kind: str) -> bytes:
    """An error in the OpenAI error shape, which every OpenAI-compatible client understands."""
    return orjson.dumps({"error": {"message": message, "type": kind, "code": None}})


@dataclass(frozen=True, slots=True)
class Target:
    """A configured route, resolved: where its requests go and how they are read."""

    prefix: str
    url: URL
    dialect: str  # "auto" or a dialect name
    provider: str | None
    strip_prefix: bool
    include_usage: bool

    def matches(self, path: str) -> bool:
        p = self.prefix
        return p == "/" or path == p or path.startswith(p + "/")

    def upstream_url(self, raw_path: str) -> URL:
        if self.strip_prefix and self.prefix != "/":
            raw_path = raw_path[len(self.prefix):] or "/"
            if not raw_path.startswith("/"):
                raw_path = "/" + raw_path
        return URL(str(self.url).rstrip("/") + raw_path, encoded=True)


def targets(settings: Settings) -> list[Target]:
    return [Target(r.prefix, URL(r.upstream), r.dialect, r.provider, r.strip_prefix,
                   r.include_usage) for r in all_routes(settings)]


class Proxy:
    """Request handler; one per app. Everything it uses is injected."""

    def __init__(
        self,
        settings: Settings,
        session_getter: Callable[[], aiohttp.ClientSession],
        metrics: Metrics,
        tokenizers: Tokenizers,
        attributor: Attributor,
        record_sink: RecordSink,
        calibration: Calibration | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._session = session_getter
        self.metrics = metrics
        self.tokenizers = tokenizers
        self.attributor = attributor
        self.record = record_sink
        self.calibration = calibration or Calibration()
        self.clock = clock
        self.targets = targets(settings)

    def route(self, path: str) -> Target | None:
        for t in self.targets:
            if t.matches(path):
                return t
        return None

    async def _read_body(self, request: web.Request) -> bytes | None:
        limit = self.settings.max_request_body
        if request.content_length is not None and request.content_length > limit:
            return None
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
        target = self.route(request.path)
        if target is None:
            return web.Response(status=404, content_type="application/json",
                                body=error_body(f"no route for {request.path}",
                                                "invalid_request"))
        body = await self._read_body(request)
        if body is None:
            return web.Response(
                status=413, content_type="application/json",
                body=error_body(f"request body exceeds the sidecar limit of "
                                f"{self.settings.max_request_body} bytes (max_request_body)",
                                "request_too_large"))

        m = self.metrics
        dialect_name = (detect(request.path, dict(request.headers))
                        if target.dialect == AUTO else target.dialect)
        dialect = get_dialect(dialect_name)
        provider = target.provider or provider_for(dialect_name, target.url.host)
        ident = self.attributor.identify(request.headers, request.query_string)
        key, team = m.cap_key(ident.key), m.cap_team(ident.team)
        info = dialect.parse_request(request.path, request.query_string, body)
        tokenizer = self.tokenizers.for_model(info.model)
        meter = Meter(dialect, info, tokenizer, self.clock,
                      max_frame_size=self.settings.max_frame_size)
        model = m.model_label(info.model)
        if not tokenizer.exact:
            meter.output_scale = self.calibration.factor(model, "output")
            meter.input_scale = self.calibration.factor(model, "input")
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        usage_filter: UsageChunkFilter | None = None
        if target.include_usage and dialect_name == "openai":
            injected = inject(info.body)
            if injected is not None:
                body = injected
                usage_filter = UsageChunkFilter()

        loop = asyncio.get_running_loop()
        estimate: asyncio.Future[int] | None = None
        if info.body is not None:
            if len(body) > OFFLOAD_BYTES:
                estimate = loop.run_in_executor(None, meter.estimate_prompt)
            else:
                meter.estimate_prompt()

        headers = _forward_headers(request.headers)
        skip = [h for h in ("User-Agent", "Accept-Encoding", "Content-Type")
                if h not in request.headers]
        if usage_filter is not None:
            # The meter must be able to read what it filters: ask for an uncompressed stream.
            headers.popall("Accept-Encoding", None)
        state = _Exchange(request_id, request, info.stream, t0, key, team, provider, model)
        try:
            up = await self._session().request(
                request.method, target.upstream_url(request.raw_path), headers=headers,
                data=body if body else None, allow_redirects=False, skip_auto_headers=skip)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            timed_out = isinstance(exc, TimeoutError)
            if estimate is not None:
                await estimate
            self._live_input(meter, state)
            state.status = 504 if timed_out else 502
            state.outcome = OUTCOME_TIMEOUT if timed_out else OUTCOME_UPSTREAM_ERROR
            state.error = f"upstream {'timed out' if timed_out else 'unreachable'}: " \
                          f"{type(exc).__name__}"
            self._finish(meter, state)
            return web.Response(status=state.status, content_type="application/json",
                                body=error_body(state.error, "upstream_error"))

        if estimate is not None:
            await estimate
        state.status = up.status
        self._live_input(meter, state)
        meter.start_response(up.headers.get("Content-Type"), up.headers.get("Content-Encoding"))
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        for name, value in up.headers.items():
            if name.lower() not in HOP_BY_HOP:
                resp.headers.add(name, value)
        if up.content_length is not None and "Content-Length" in up.headers:
            resp.content_length = up.content_length
        if usage_filter is not None and not meter.streamed:
            usage_filter = None
        streamed = meter.streamed
        if streamed:
            m.in_flight.labels(provider, model).inc()
        live = m.live_tokens.labels(provider, model, "output", key, team)
        try:
            await self._relay(request, resp, up, meter, live, state, usage_filter)
        finally:
            if streamed:
                m.in_flight.labels(provider, model).dec()
            if state.outcome == OUTCOME_COMPLETED:
                up.release()
            else:
                up.close()
            meter.end_of_body()
            n = meter.take_live()
            if n:
                live.inc(n)
            self._finish(meter, state)
        if state.abort and request.transport is not None:
            # The upstream broke mid-body: end the client's connection the same way rather
            # than sending a clean end of body the upstream never sent.
            request.transport.close()
        return resp

    async def _relay(self, request: web.Request, resp: web.StreamResponse,
                     up: aiohttp.ClientResponse, meter: Meter, live: Any,
                     state: _Exchange, usage_filter: UsageChunkFilter | None) -> None:
        loop = asyncio.get_running_loop()
        client_ok = True
        drain_deadline: float | None = None
        try:
            try:
                await resp.prepare(request)
            except (ConnectionError, RuntimeError):
                client_ok = False
                state.outcome = OUTCOME_CLIENT_DISCONNECTED
                if self.settings.client_disconnect == "close":
                    return
                drain_deadline = self.clock() + self.settings.drain_timeout
            async for chunk in up.content.iter_any():
                if client_ok:
                    try:
                        await resp.write(chunk if usage_filter is None
                                         else usage_filter.feed(chunk))
                    except (ConnectionError, RuntimeError):
                        client_ok = False
                        state.outcome = OUTCOME_CLIENT_DISCONNECTED
                        if self.settings.client_disconnect == "close":
                            meter.feed(chunk)
                            return
                        drain_deadline = self.clock() + self.settings.drain_timeout
                if len(chunk) > OFFLOAD_BYTES:
                    await loop.run_in_executor(None, meter.feed, chunk)
                else:
                    meter.feed(chunk)
                n = meter.take_live()
                if n:
                    live.inc(n)
                if drain_deadline is not None and self.clock() > drain_deadline:
                    return
            if client_ok:
                try:
                    if usage_filter is not None:
                        await resp.write(usage_filter.close())
                    await resp.write_eof()
                except (ConnectionError, RuntimeError):
                    state.outcome = OUTCOME_CLIENT_DISCONNECTED
                    return
            if state.outcome is None:
                state.outcome = OUTCOME_COMPLETED
        except TimeoutError:
            state.outcome = state.outcome or OUTCOME_TIMEOUT
            state.error = "upstream idle past the read timeout"
            state.abort = client_ok
        except (aiohttp.ClientError, OSError) as exc:
            state.outcome = state.outcome or OUTCOME_UPSTREAM_ERROR
            state.error = f"upstream broke mid-body: {type(exc).__name__}"
            state.abort = client_ok

    def _live_input(self, meter: Meter, st: _Exchange) -> None:
        if meter.prompt_estimate:
            self.metrics.live_tokens.labels(st.provider, st.model, "input", st.key, st.team).inc(
                meter.prompt_estimate)

    def _finish(self, meter: Meter, state: _Exchange) -> None:
        provider, model, key, team = state.provider, state.model, state.key, state.team
        end = self.clock()
        s = meter.settle()
        outcome = state.outcome or OUTCOME_COMPLETED
        if outcome == OUTCOME_COMPLETED and (state.status >= 400 or s.error):
            outcome = OUTCOME_UPSTREAM_ERROR
        m = self.metrics
        stream = "true" if meter.streamed else "false"
        m.settle(provider, model, key, team, s)
        if not meter.tokenizer.exact:
            self._learn(meter, model)
        m.requests.labels(provider, model, key, team, str(state.status), outcome, stream).inc()
        duration = end - state.t0
        m.duration.labels(provider, model, stream).observe(duration)
        ttft = None
        if s.first_token_at is not None and meter.streamed:
            ttft = s.first_token_at - state.t0
            m.ttft.labels(provider, model).observe(ttft)
            if s.output_tokens > 1:
                m.tpot.labels(provider, model).observe(
                    (end - s.first_token_at) / (s.output_tokens - 1))
        self.record(_record(state, s, outcome, duration, ttft, meter.streamed))


    def _learn(self, meter: Meter, model: str) -> None:
        """Feed the calibration with what this request showed (visible text only)."""
        r = meter.reported
        if r.output is not None:
            visible = r.output
            if r.reasoning and not meter.saw_reasoning:
                visible -= r.reasoning  # hidden reasoning is not text the estimate could see
            self.calibration.observe(model, "output", meter.raw_estimated_output, visible)
        if r.input is not None and meter.raw_prompt_estimate:
            self.calibration.observe(model, "input", meter.raw_prompt_estimate, r.input)


class _Exchange:
    """Mutable facts about one request/response exchange, filled in as it goes."""

    __slots__ = ("abort", "error", "key", "method", "model", "outcome", "path", "provider",
                 "request_id", "status", "stream_requested", "t0", "team")

    def __init__(self, request_id: str, request: web.Request, stream: bool, t0: float,
                 key: str, team: str, provider: str, model: str) -> None:
        self.request_id = request_id
        self.key = key
        self.team = team
        self.provider = provider
        self.model = model
        self.method = request.method
        self.path = request.path  # no query string: it may carry a key (?key=...)
        self.stream_requested = stream
        self.t0 = t0
        self.status = 0
        self.outcome: str | None = None
        self.error: str | None = None
        self.abort = False


def _record(state: _Exchange, s: Settlement, outcome: str, duration: float,
            ttft: float | None, streamed: bool) -> dict[str, Any]:
    return {
        "request_id": state.request_id,
        "method": state.method,
        "path": state.path,
        "provider": state.provider,
        "model": state.model,
        "response_model": s.model,
        "key": state.key,
        "team": state.team,
        "stream": streamed,
        "status": state.status,
        "outcome": outcome,
        "finish_reason": s.finish_reason,
        "source": s.source,
        "input_tokens": s.input_tokens,
        "input_source": s.input_source,
        "output_tokens": s.output_tokens,
        "output_source": s.output_source,
        "cached_input_tokens": s.cached_input_tokens,
        "reasoning_tokens": s.reasoning_tokens,
        "estimated_input_tokens": s.estimated_input_tokens,
        "estimated_output_tokens": s.estimated_output_tokens,
        "ttft_seconds": None if ttft is None else round(ttft, 6),
        "duration_seconds": round(duration, 6),
        "frame_errors": s.frame_errors,
        "error": state.error or s.error,
    }
