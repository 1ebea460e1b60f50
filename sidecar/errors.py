"""Errors in the caller's own API format: a 429 body before anything is sent upstream, and the
final event that ends a stream cut off at a budget limit."""

from __future__ import annotations

import os
from typing import Any

import orjson

KIND = "budget_exceeded"


def error_body(dialect: str, message: str, status: int = 429) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) of an error response for this API format."""
    body: dict[str, Any]
    if dialect == "anthropic":
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
    elif dialect == "gemini":
        body = {"error": {"code": status, "message": message, "status": "RESOURCE_EXHAUSTED"}}
    elif dialect == "ollama":
        body = {"error": message}
    elif dialect == "ernie":
        body = {"error_code": 18, "error_msg": message}
    elif dialect == "dashscope":
        body = {"code": "Throttling", "message": message}
    elif dialect == "zhipu-v3":
        body = {"code": 1302, "msg": message, "success": False}
    elif dialect in ("cohere", "bedrock"):
        body = {"message": message}
    else:
        body = {"error": {"message": message, "type": KIND, "code": KIND}}
    headers = {"x-amzn-ErrorType": "ThrottlingException"} if dialect == "bedrock" else {}
    return orjson.dumps(body), headers


def stream_error_event(dialect: str, message: str, content_type: str) -> bytes | None:
    """The last frame of a cut-off stream, or None when the format has no clean way to end."""
    ct = content_type.split(";", 1)[0].strip().lower()
    if ct in ("application/x-ndjson", "application/ndjson"):
        return orjson.dumps({"error": message, "done": True}) + b"\n"
    if ct != "text/event-stream":
        return None
    if dialect == "anthropic":
        err = {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
        return b"event: error\ndata: " + orjson.dumps(err) + b"\n\n"
    if dialect == "openai-responses":
        payload: dict[str, Any] = {"type": "error", "code": KIND, "message": message,
                                   "param": None}
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
    if dialect == "zhipu-v3":
        return b"event: error\ndata: " + message.encode() + b"\n\n"
    body, _ = error_body(dialect, message)
    done = b"data: [DONE]\n\n" if dialect == "openai" else b""
    return b"data: " + body + b"\n\n" + done


def realtime_error_event(protocol: str | None, message: str) -> bytes | None:
    """The error event a Realtime session gets before the sidecar closes it (OpenAI's server
    ``error`` event); None where the protocol reports errors only in the close frame (Gemini
    Live)."""
    if protocol != "openai-realtime":
        return None
    return orjson.dumps({
        "type": "error", "event_id": "event_sidecar_" + os.urandom(8).hex(),
        "error": {"type": "invalid_request_error", "code": KIND, "message": message,
                  "param": None, "event_id": None}})
