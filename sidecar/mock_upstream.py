"""A built-in OpenAI-compatible upstream for the demo: paced streams, no key, no network.

Answers come from a few canned texts (English and Chinese). Usage is reported the way OpenAI does
(only with ``stream_options.include_usage`` when streaming, always when not), counted with the
model's tiktoken encoding so that "reported" numbers are real token counts of what was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import orjson
from aiohttp import web

from .dialects.openai import estimate_chat_prompt
from .mock_realtime import make_realtime_routes
from .tokens import Tokenizers

ANSWERS = (
    "Token accounting works best when it is boring: every chunk counted as it passes, every "
    "total settled from the provider's own usage frame, and every number labelled with where it "
    "came from. That way a platform team can trust the dashboard at 3 a.m.",
    "流式响应的计费需要在每个数据块到达时进行估算，并在结束时用服务商报告的用量进行校正。"
    "这样，即使客户端中途断开，预算也不会漏算。",
    "Here is a short plan:\n1. Put the sidecar in front of the gateway.\n2. Point Prometheus at "
    "port 9464.\n3. Import the dashboards.\n4. Set budgets per team, and let the alerts page you "
    "before the money is gone.",
    "def fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nprint([fib(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34",
)


def _pick(body: dict[str, Any]) -> str:
    seed = hashlib.sha256(orjson.dumps(body.get("messages") or body.get("prompt"))).digest()
    text = ANSWERS[seed[0] % len(ANSWERS)]
    repeat = 1 + seed[1] % 3
    return " ".join([text] * repeat)


def _fragments(text: str, size: int) -> list[str]:
    """Split text the way gateways re-chunk: fixed-size character fragments, or words."""
    if size > 0:
        return [text[i : i + size] for i in range(0, len(text), size)]
    out, word = [], ""
    for ch in text:
        word += ch
        if ch in " \n" or ord(ch) > 0x2E80:
            out.append(word)
            word = ""
    if word:
        out.append(word)
    return out


def make_mock_app(pace: float = 0.03, tokenizers: Tokenizers | None = None) -> web.Application:
    """The mock upstream. Per-request knobs (headers): X-Mock-Fragment (chars per chunk, 0 = words),
    X-Mock-Pace (seconds between chunks)."""
    tokenizers = tokenizers or Tokenizers()
    app = web.Application()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body.get("model") or "gpt-4o-mini"
        tok = tokenizers.for_model(model)
        legacy = request.path.endswith("/completions") and "chat" not in request.path
        if legacy:
            prompt = body.get("prompt") or ""
            prompt_tokens = tok.count(prompt if isinstance(prompt, str) else " ".join(prompt))
        else:
            prompt_tokens = estimate_chat_prompt(body.get("messages") or [], model, tok)
        text = _pick(body)
        completion_tokens = tok.count(text)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0}}
        rid = "chatcmpl-" + hashlib.sha1(str(time.time_ns()).encode()).hexdigest()[:24]
        created = int(time.time())
        obj = "text_completion" if legacy else "chat.completion"
        if not body.get("stream"):
            choice: dict[str, Any] = (
                {"index": 0, "text": text, "finish_reason": "stop"} if legacy else
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "finish_reason": "stop"})
            return web.json_response({"id": rid, "object": obj, "created": created,
                                      "model": model, "choices": [choice], "usage": usage})
        pace_s = float(request.headers.get("X-Mock-Pace", pace))
        frag = int(request.headers.get("X-Mock-Fragment", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        chunk_obj = "text_completion" if legacy else "chat.completion.chunk"

        async def send(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
            frame = {"id": rid, "object": chunk_obj, "created": created, "model": model,
                     "choices": choices}
            if extra:
                frame.update(extra)
            await resp.write(b"data: " + orjson.dumps(frame) + b"\n\n")

        try:
            if not legacy:
                await send([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None}])
            for piece in _fragments(text, frag):
                await asyncio.sleep(pace_s)
                part = {"text": piece} if legacy else {"delta": {"content": piece}}
                await send([{"index": 0, **part, "finish_reason": None}])
            await send([{"index": 0, "delta": {}, "finish_reason": "stop"}] if not legacy else
                       [{"index": 0, "text": "", "finish_reason": "stop"}])
            opts = body.get("stream_options") or {}
            if opts.get("include_usage"):
                await send([], {"usage": usage})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; a real provider would stop generating too
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "mock"}
            for m in ("gpt-4o-mini", "gpt-4.1", "gpt-3.5-turbo")]})

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    app.router.add_get("/v1/models", models)
    make_realtime_routes(app, tokenizers, pace)
    return app
