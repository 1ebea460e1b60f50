"""The floor for any Python proxy: a bare aiohttp pass-through with no accounting at all.

Same forwarding as the sidecar (one shared client, raw bytes, each read written at once),
nothing else. Used by bench/bench.py as the baseline the sidecar is compared with, with
aiohttp's ClientSession as its upstream client; ``--client sidecar`` gives it the sidecar's
own (sidecar/upstream.py) instead: the floor of a proxy with that client.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import aiohttp
from aiohttp import web
from yarl import URL

from sidecar.upstream import Upstream, UpstreamResponse

HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length", "upgrade",
       "te", "trailer", "proxy-authorization", "proxy-authenticate"}


async def forward(client: aiohttp.ClientSession | Upstream, url: str | URL,
                  request: web.Request) -> web.StreamResponse:
    """Forward one request to ``url`` and relay the answer read by read: nothing else. The
    client is aiohttp's session (the bare pass-through) or the sidecar's own (--client sidecar,
    and the sidecar's app floor)."""
    body = await request.read()
    if isinstance(client, Upstream):
        up = await client.request(request.method, URL(url, encoded=True),
                                  [(k, v) for k, v in request.headers.items()
                                   if k.lower() not in HOP], body)
        try:
            resp = await _relay(request, up)
        except BaseException:
            up.close()
            raise
        up.release()
        return resp
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with client.request(request.method, url, headers=headers,
                              data=body or None) as answer:
        return await _relay(request, answer)


async def _relay(request: web.Request, up: aiohttp.ClientResponse | UpstreamResponse
                 ) -> web.StreamResponse:
    resp = web.StreamResponse(status=up.status, reason=up.reason)
    for k, v in up.headers.items():
        if k.lower() not in HOP:
            resp.headers.add(k, v)
    await resp.prepare(request)
    async for chunk in up.content.iter_any():
        await resp.write(chunk)
    await resp.write_eof()
    return resp


def make_app(upstream: str, client: str = "aiohttp") -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)
    lean = Upstream() if client == "sidecar" else None

    async def ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=300))
        yield
        await app[session_key].close()
        if lean is not None:
            lean.close()

    async def relay(request: web.Request) -> web.StreamResponse:
        """The bare WebSocket relay: connect upstream, then pump messages both ways."""
        async with app[session_key].ws_connect(upstream + request.raw_path,
                                               max_msg_size=16 * 2**20) as up:
            ws = web.WebSocketResponse(max_msg_size=16 * 2**20)
            await ws.prepare(request)

            async def pump(src, dst) -> None:  # type: ignore[no-untyped-def]
                async for msg in src:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        await dst.send_str(msg.data)
                    elif msg.type is aiohttp.WSMsgType.BINARY:
                        await dst.send_bytes(msg.data)
                await dst.close()

            await asyncio.gather(pump(ws, up), pump(up, ws))
            return ws

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await relay(request)
        client = lean if lean is not None else app[session_key]
        return await forward(client, upstream + request.raw_path, request)

    app.cleanup_ctx.append(ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--processes", type=int, default=1,
                   help="processes sharing the port (SO_REUSEPORT), to compare with --workers")
    p.add_argument("--client", choices=("aiohttp", "sidecar"), default="aiohttp",
                   help="the upstream client: aiohttp's ClientSession (the bare pass-through), "
                   "or the sidecar's own (sidecar/upstream.py)")
    args = p.parse_args()
    for _ in range(args.processes - 1):
        if os.fork() == 0:
            break
    web.run_app(make_app(args.upstream.rstrip("/"), args.client), host="127.0.0.1", port=args.port,
                access_log=None, print=None, backlog=4096, reuse_port=args.processes > 1)


if __name__ == "__main__":
    # The same loop the sidecar picks by default (uvloop when installed): compare like with like.
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    main()
