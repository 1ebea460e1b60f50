"""`sidecar top`: a terminal view of any running sidecar, read from its /metrics endpoint."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


@dataclass(slots=True)
class Snapshot:
    at: float
    live: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    settled: dict[tuple[str, str, str], float] = field(default_factory=lambda: defaultdict(float))
    in_flight: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    outcomes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    frame_errors: float = 0.0


def parse(text: str, at: float) -> Snapshot:
    """Sum the sidecar's series by model (and token type / source)."""
    snap = Snapshot(at)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            lb = s.labels
            if s.name == "llm_live_tokens_total":
                snap.live[(lb["model"], lb["token_type"])] += s.value
            elif s.name == "llm_tokens_total":
                snap.settled[(lb["model"], lb["token_type"], lb["source"])] += s.value
            elif s.name == "llm_streams_in_flight":
                snap.in_flight[lb["model"]] += s.value
            elif s.name == "llm_requests_total":
                snap.outcomes[lb["outcome"]] += s.value
            elif s.name == "llm_frame_errors_total":
                snap.frame_errors += s.value
    return snap


def render(prev: Snapshot | None, cur: Snapshot) -> str:
    """A fixed-width table: per model, live tokens/s and totals, settled by source."""
    dt = (cur.at - prev.at) if prev else 0.0
    models = sorted({m for m, _ in cur.live} | {m for m, _, _ in cur.settled} | set(cur.in_flight))
    head = (f"{'model':<22}{'streams':>8}{'out tok/s':>11}{'live in':>10}{'live out':>10}"
            f"{'settled in':>12}{'settled out':>13}{'reported':>10}{'estimated':>11}")
    lines = [head, "-" * len(head)]
    for m in models:
        rate = 0.0
        if prev and dt > 0:
            rate = (cur.live.get((m, "output"), 0.0) - prev.live.get((m, "output"), 0.0)) / dt
        s_in = sum(v for (mm, t, _), v in cur.settled.items() if mm == m and t == "input")
        s_out = sum(v for (mm, t, _), v in cur.settled.items() if mm == m and t == "output")
        rep = sum(v for (mm, t, src), v in cur.settled.items()
                  if mm == m and t == "output" and src == "reported")
        est = sum(v for (mm, t, src), v in cur.settled.items()
                  if mm == m and t == "output" and src == "estimated")
        lines.append(
            f"{m[:21]:<22}{cur.in_flight.get(m, 0):>8.0f}{rate:>11.1f}"
            f"{cur.live.get((m, 'input'), 0):>10.0f}{cur.live.get((m, 'output'), 0):>10.0f}"
            f"{s_in:>12.0f}{s_out:>13.0f}{rep:>10.0f}{est:>11.0f}")
    outcomes = "  ".join(f"{k}={v:.0f}" for k, v in sorted(cur.outcomes.items())) or "none yet"
    lines.append("")
    lines.append(f"requests: {outcomes}   frame errors: {cur.frame_errors:.0f}")
    return "\n".join(lines)


async def fetch(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.text()


async def run_top(url: str, interval: float = 1.0, iterations: int | None = None,
                  out: TextIO | None = None) -> None:
    """Poll ``url`` and redraw; plain appended frames when the output is not a terminal."""
    stream = out or sys.stdout
    tty = stream.isatty()
    prev: Snapshot | None = None
    n = 0
    async with aiohttp.ClientSession() as session:
        while iterations is None or n < iterations:
            try:
                cur = parse(await fetch(session, url), time.monotonic())
            except (aiohttp.ClientError, OSError) as exc:
                print(f"cannot read {url}: {exc}", file=stream)
            else:
                table = render(prev, cur)
                if tty:
                    stream.write("\x1b[H\x1b[2J")
                stamp = time.strftime("%H:%M:%S")
                print(f"token sidecar - {url} - {stamp}\n{table}\n", file=stream, flush=True)
                prev = cur
            n += 1
            if iterations is None or n < iterations:
                await asyncio.sleep(interval)
