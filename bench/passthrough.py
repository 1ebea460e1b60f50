"""The floor for any Python proxy: a bare aiohttp pass-through with no accounting at all.

Same forwarding as the sidecar (one shared session, raw bytes, each read written at once),
nothing else. Used by bench/bench.py as the baseline the sidecar is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import aiohttp
from aiohttp import web
from yarl import URL

HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length", "upgrade",
       "te", "trailer", "proxy-authorization", "proxy-authenticate"}


async def forward(session: aiohttp.ClientSession, url: str | URL,
                  request: web.Request) -> web.StreamResponse:
    """Forward one request to ``url`` and relay the answer read by read: nothing else."""
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with session.request(request.method, url, headers=headers,
                               data=body or None) as up:
        resp = web.StreamResponse(status=up.status)
        for k, v in up.headers.items():
            if k.lower() not in HOP:
                resp.headers.add(k, v)
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=300))
        yield
        await app[session_key].close()

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
        return await forward(app[session_key], upstream + request.raw_path, request)

    app.cleanup_ctx.append(ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--processes", type=int, default=1,
                   help="processes sharing the port (SO_REUSEPORT), to compare with --workers")
    args = p.parse_args()
    for _ in range(args.processes - 1):
        if os.fork() == 0:
            break
    web.run_app(make_app(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port,
                access_log=None, print=None, backlog=4096, reuse_port=args.processes > 1)


if __name__ == "__main__":
    # The same loop the sidecar picks by default (uvloop when installed): compare like with like.
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    main()
