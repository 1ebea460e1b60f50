"""Realtime sessions for the demo's mock upstream: OpenAI's Realtime protocol (GA event names)
at ``GET /v1/realtime`` and Gemini's Live protocol at ``.../BidiGenerateContent``.

Usage is reported the way the providers report it: per response (OpenAI ``response.done``) or
per turn (Gemini ``usageMetadata``), each response's input being the whole conversation so far.
Text is counted with the model's tiktoken encoding; audio at a fixed rate per second of PCM16
(OpenAI: 10 tokens per second in, 20 out; Gemini: 32), so reported numbers follow from what
was actually sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import math
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from .realtime import b64_size
from .tokens import Tokenizers

OPENAI_RATES = (10.0, 20.0)  # audio tokens per second, input and output
GEMINI_RATE = 32.0
GEMINI_LIVE_PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
ANSWER = ("Realtime sessions are metered per response: text and audio each counted as they "
          "stream, then settled from the usage the provider reports.")


def _audio_b64(seconds: float, bytes_per_second: int) -> str:
    """Silence of that duration, base64 (what the meter measures is its length)."""
    return base64.b64encode(bytes(int(seconds * bytes_per_second) & ~1)).decode()


def make_realtime_routes(app: web.Application, tokenizers: Tokenizers, pace: float) -> None:
    async def openai(request: web.Request) -> web.WebSocketResponse:
        return await openai_session(request, tokenizers, pace)

    async def gemini(request: web.Request) -> web.WebSocketResponse:
        return await gemini_session(request, tokenizers, pace)

    app.router.add_get("/v1/realtime", openai)
    app.router.add_get(GEMINI_LIVE_PATH, gemini)


async def openai_session(request: web.Request, tokenizers: Tokenizers,
                         pace: float) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("realtime",), max_msg_size=16 * 1024 * 1024)
    await ws.prepare(request)
    model = request.query.get("model") or "gpt-realtime"
    tok = tokenizers.for_model(model)
    session: dict[str, Any] = {
        "type": "realtime", "object": "realtime.session", "id": "sess_mock",
        "model": model, "output_modalities": ["audio"], "instructions": "",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                  "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}}}
    history_text = 0  # tokens of the conversation so far
    history_audio = 0
    pending_audio = 0  # bytes appended since the last response
    n = 0
    ids = itertools.count(1)  # deterministic ids: a session replays identically

    async def send(event: dict[str, Any]) -> None:
        event = {"event_id": f"event_{next(ids):06d}", **event}
        await ws.send_str(orjson.dumps(event).decode())

    await send({"type": "session.created", "session": session})
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue
        ev = orjson.loads(msg.data)
        kind = ev.get("type")
        if kind == "session.update":
            upd = ev.get("session") or {}
            for key in ("instructions", "output_modalities"):
                if key in upd:
                    session[key] = upd[key]
            await send({"type": "session.updated", "session": session})
        elif kind == "input_audio_buffer.append":
            pending_audio += b64_size(ev.get("audio") or "")
        elif kind == "conversation.item.create":
            item = ev.get("item") or {}
            for part in item.get("content") or ():
                if isinstance(part.get("text"), str):
                    history_text += tok.count(part["text"])
            await send({"type": "conversation.item.created", "item": item})
        elif kind == "response.create":
            n += 1
            rid = f"resp_{n:04d}"
            audio_in = math.ceil(pending_audio / 48_000 * OPENAI_RATES[0])
            pending_audio = 0
            history_audio += audio_in
            instr = tok.count(session.get("instructions") or "")
            usage_in_text = instr + history_text
            usage_in = usage_in_text + history_audio
            await send({"type": "response.created",
                        "response": {"id": rid, "object": "realtime.response",
                                     "status": "in_progress", "output": [], "usage": None}})
            audio_mode = "audio" in (session.get("output_modalities") or ["audio"])
            words = ANSWER.split(" ")
            out_seconds = 0.0
            item_id = f"item_{n:04d}"
            for i, w in enumerate(words):
                piece = w if i == 0 else " " + w
                await asyncio.sleep(pace)
                if audio_mode:
                    await send({"type": "response.output_audio_transcript.delta",
                                "response_id": rid, "item_id": item_id, "output_index": 0,
                                "content_index": 0, "delta": piece})
                    sec = 0.06 * len(piece)
                    out_seconds += sec
                    await send({"type": "response.output_audio.delta", "response_id": rid,
                                "item_id": item_id, "output_index": 0, "content_index": 0,
                                "delta": _audio_b64(sec, 48_000)})
                else:
                    await send({"type": "response.output_text.delta", "response_id": rid,
                                "item_id": item_id, "output_index": 0, "content_index": 0,
                                "delta": piece})
            text_out = tok.count(ANSWER)
            audio_out = math.ceil(out_seconds * OPENAI_RATES[1]) if audio_mode else 0
            cached = (usage_in // 64) * 64 if n > 1 and usage_in >= 1024 else 0
            usage = {"total_tokens": usage_in + text_out + audio_out,
                     "input_tokens": usage_in, "output_tokens": text_out + audio_out,
                     "input_token_details": {
                         "text_tokens": usage_in_text, "audio_tokens": history_audio,
                         "image_tokens": 0, "cached_tokens": cached,
                         "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0,
                                                   "image_tokens": 0}},
                     "output_token_details": {"text_tokens": text_out,
                                              "audio_tokens": audio_out}}
            await send({"type": "response.done",
                        "response": {"id": rid, "object": "realtime.response",
                                     "status": "completed", "usage": usage}})
            history_text += text_out
            history_audio += audio_out
    return ws


async def gemini_session(request: web.Request, tokenizers: Tokenizers,
                         pace: float) -> web.WebSocketResponse:
    """Gemini Live: binary JSON frames, as the service sends them."""
    ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024)
    await ws.prepare(request)
    tok = tokenizers.for_model("gemini-live-2.5-flash-preview")
    system = 0
    history = 0
    history_audio = 0
    pending_audio = 0
    pending_text = 0

    async def send(obj: dict[str, Any]) -> None:
        await ws.send_bytes(orjson.dumps(obj))

    async for msg in ws:
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            continue
        obj = orjson.loads(msg.data)
        if "setup" in obj:
            si = (obj["setup"].get("systemInstruction") or {}).get("parts") or []
            system = sum(tok.count(p.get("text", "")) for p in si)
            await send({"setupComplete": {}})
            continue
        turn_done = False
        if "realtimeInput" in obj:
            rt = obj["realtimeInput"]
            audio = rt.get("audio") or {}
            pending_audio += b64_size(audio.get("data") or "")
            if isinstance(rt.get("text"), str):
                pending_text += tok.count(rt["text"])
                turn_done = True
            turn_done = turn_done or bool(rt.get("audioStreamEnd"))
        if "clientContent" in obj:
            cc = obj["clientContent"]
            for t in cc.get("turns") or ():
                for p in t.get("parts") or ():
                    pending_text += tok.count(p.get("text", ""))
            turn_done = bool(cc.get("turnComplete"))
        if not turn_done:
            continue
        audio_in = math.ceil(pending_audio / 32_000 * GEMINI_RATE)
        prompt = system + history + history_audio + pending_text + audio_in
        out_seconds = 0.0
        for i, w in enumerate(ANSWER.split(" ")):
            await asyncio.sleep(pace)
            sec = 0.06 * (len(w) + (i > 0))
            out_seconds += sec
            await send({"serverContent": {"modelTurn": {"parts": [{"inlineData": {
                "mimeType": "audio/pcm;rate=24000", "data": _audio_b64(sec, 48_000)}}]}}})
        audio_out = math.ceil(out_seconds * GEMINI_RATE)
        await send({"serverContent": {"generationComplete": True}})
        await send({"serverContent": {"turnComplete": True}, "usageMetadata": {
            "promptTokenCount": prompt, "responseTokenCount": audio_out,
            "totalTokenCount": prompt + audio_out,
            "promptTokensDetails": [{"modality": "TEXT",
                                     "tokenCount": system + history + pending_text},
                                    {"modality": "AUDIO",
                                     "tokenCount": history_audio + audio_in}],
            "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": audio_out}]}})
        history += pending_text
        history_audio += audio_in + audio_out
        pending_text = pending_audio = 0
    with contextlib.suppress(Exception):
        await ws.close()
    return ws
