"""The sidecar's own process and app with the accounting taken out: the floor a request costs
the sidecar before it meters anything.

Runs ``sidecar run`` (same settings, middleware, upstream session, event loop, metrics listener)
with the proxy's handler replaced by the bare pass-through's forwarding: read the body, forward
it, relay the answer read by read. Used by bench/bench.py (non-streaming table) to split the
sidecar's cost into what its process and app cost anyway and what accounting adds. Never used
outside the benchmark.
"""

from __future__ import annotations

import sys
from typing import Any

from aiohttp import web

import sidecar.proxy
from sidecar.cli import main

HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length", "upgrade",
       "te", "trailer", "proxy-authorization", "proxy-authenticate"}


async def forward(self: sidecar.proxy.Proxy, request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    url = self.targets[0].upstream_url(request.raw_path)
    session: Any = self._session()
    async with session.request(request.method, url, headers=headers, data=body or None) as up:
        resp = web.StreamResponse(status=up.status)
        for k, v in up.headers.items():
            if k.lower() not in HOP:
                resp.headers.add(k, v)
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


if __name__ == "__main__":
    sidecar.proxy.Proxy.handle = forward  # type: ignore[method-assign]
    sys.argv[0] = "sidecar"
    sys.exit(main())
