"""The sidecar's own process and app with the accounting taken out: the floor a request costs
the sidecar before it meters anything.

Runs ``sidecar run`` (same settings, middleware, upstream client, event loop, metrics listener)
with the proxy's handler replaced by the bare pass-through's forwarding (passthrough.forward):
read the body, forward it, relay the answer read by read. Used by bench/bench.py (non-streaming
table) to split the sidecar's cost into what its process and app cost anyway and what
accounting adds. Never used outside the benchmark.
"""

from __future__ import annotations

import sys

from aiohttp import web
from passthrough import forward

import sidecar.proxy
from sidecar.cli import main


async def handle(self: sidecar.proxy.Proxy, request: web.Request) -> web.StreamResponse:
    return await forward(self.upstream, self.targets[0].upstream_url(request.raw_path),
                         request)


if __name__ == "__main__":
    sidecar.proxy.Proxy.handle = handle  # type: ignore[method-assign]
    sys.argv[0] = "sidecar"
    sys.exit(main())
