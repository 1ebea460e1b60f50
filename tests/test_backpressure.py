"""Slow clients: the sidecar reads from the upstream only as fast as the client drains."""

from __future__ import annotations

import asyncio
import socket

from .conftest import Script, ScriptedUpstream, SidecarProcess, steady

CHUNK = b"data: " + b"x" * 16_000 + b"\n\n"
MIB = 2**20


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _stalled_client(port: int, sid: str) -> asyncio.StreamWriter:
    """Sends a request, reads a little, then stops reading and keeps the socket open."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Script: {sid}\r\n"
                 "Content-Length: 2\r\n\r\n{}".encode())
    await writer.drain()
    await reader.read(100)
    return writer


async def _run(streams: int, per_stream: int) -> tuple[int, int, int]:
    """(bytes offered, bytes the upstream got written, sidecar RSS growth) with stalled clients."""
    upstream = ScriptedUpstream()
    await upstream.start()
    n = per_stream // len(CHUNK)
    sidecar = SidecarProcess(upstream.url)
    await sidecar.start()
    writers = []
    try:
        before = rss_bytes(sidecar.pid)
        sids = [upstream.add(Script(chunks=[CHUNK] * n)) for _ in range(streams)]
        writers = [await _stalled_client(sidecar.port, sid) for sid in sids]
        # Until the flow stops: every stream's buffers are full and the sidecar waits.
        written = await steady(lambda: sum(upstream.written.get(sid, 0) for sid in sids))
        grown = rss_bytes(sidecar.pid) - before
        offered = streams * n * len(CHUNK)
        print(f"\n{streams} stalled clients: offered {offered / MIB:.0f} MiB, upstream wrote "
              f"{written / MIB:.1f} MiB, sidecar RSS grew {grown / MIB:.1f} MiB")
        return offered, written, grown
    finally:
        for w in writers:
            w.close()
        await sidecar.stop()
        await upstream.stop()


async def test_100_stalled_clients_do_not_grow_memory() -> None:
    offered, _, grown = await _run(100, 2 * MIB)
    # The kernel's loopback socket buffers take the bytes; the sidecar holds a bounded buffer
    # per stream (the transport's high-water mark), not the 200 MiB offered.
    assert grown < 40 * MIB < offered


async def test_a_stalled_client_holds_the_upstream_back() -> None:
    # Loopback TCP autotuning can park ~36 MiB per connection in kernel buffers; beyond that,
    # the sidecar stops reading from the upstream until its client drains.
    offered, written, grown = await _run(4, 96 * MIB)
    assert written < offered * 0.6
    assert grown < 40 * MIB
