"""The proxy's accounting for whole requests, without sockets: what one request costs the sidecar
besides relaying bytes (request parsing, attribution, prices, budgets, metering every read, the
live counters, settlement, metrics and the record).

Run by bench.py once per source tree (PYTHONPATH selects the tree), so a baseline commit and this
checkout are measured side by side in the same run:

    PYTHONPATH=. .venv/bin/python bench/request_path.py --budget --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

WORDS = [" token", " stream", " meter", " sidecar", " budget", " count", " live", " frame"]


def reads(events: int, tokens: int, per_read: int) -> list[bytes]:
    out = []
    for i in range(events):
        text = "".join(WORDS[(i + j) % len(WORDS)] for j in range(tokens))
        out.append(b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
                   b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":'
                   + json.dumps(text).encode() + b'},"finish_reason":null}]}\n\n')
    out.append(b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
               b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":5,'
               b'"completion_tokens":%d,"total_tokens":%d}}\n\ndata: [DONE]\n\n'
               % (events * tokens, events * tokens + 5))
    return [b"".join(out[i:i + per_read]) for i in range(0, len(out), per_read)]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    from aiohttp.test_utils import make_mocked_request
    from prometheus_client import CollectorRegistry

    from sidecar.app import make_app
    from sidecar.config import Settings
    from sidecar.tokens import Tokenizers

    budgets: tuple[Any, ...] = ()
    if args.budget:
        from sidecar.budgets import Budget

        budgets = (Budget("bench", {"model": "*"}, "day", limit_usd=1e9, action="block"),)
    tokenizers = Tokenizers()
    tokenizers.preload()
    apps = make_app(Settings(upstream="http://127.0.0.1:9", records="off", budgets=budgets),
                    registry=CollectorRegistry(), tokenizers=tokenizers,
                    record_sink=lambda rec: None)
    proxy = apps.handler
    target = proxy.targets[0]
    body = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", ' \
           b'"content": "hi"}]}'
    data = reads(args.events, args.tokens, args.per_read)

    def one() -> None:
        req = make_mocked_request("POST", "/v1/chat/completions", headers={
            "Authorization": "Bearer sk-bench", "Content-Type": "application/json"})
        ex = proxy._exchange(req, target, body, proxy.clock())
        ex.meter.estimate_prompt()
        proxy._live_input(ex)
        ex.meter.start_response("text/event-stream", None)
        ex.status = 200
        for chunk in data:
            ex.meter.feed(chunk)
            proxy._live_output(ex)
        ex.meter.end_of_body()
        proxy._live_output(ex)
        ex.outcome = "completed"
        proxy._finish(ex)

    for _ in range(3):
        one()
    runs = []
    for _ in range(args.repeat):
        t0 = time.process_time()
        for _ in range(args.requests):
            one()
        runs.append(time.process_time() - t0)
    per_event = min(runs) / (args.requests * args.events) * 1e6
    return {"us_per_event": per_event, "runs_us_per_event": [
        r / (args.requests * args.events) * 1e6 for r in runs]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1000, help="events per request")
    p.add_argument("--tokens", type=int, default=1, help="tokens of text per event")
    p.add_argument("--per-read", type=int, default=1, help="events per upstream read")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--budget", action="store_true", help="a USD budget matching every request")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['us_per_event']:.3f} us per event (min of {args.repeat})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
