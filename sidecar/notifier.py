"""Optional direct webhook for budget thresholds (for teams without Alertmanager).

Each threshold of each budget fires once per window: the claim is taken in the state store, so
replicas sharing Redis do not fire twice and a restart does not fire again. Delivery retries with
exponential backoff in its own task; traffic never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from .budgets import Status
from .state import StateStore

log = logging.getLogger("sidecar.notifier")

MAX_ATTEMPTS = 6
FIRST_BACKOFF = 1.0  # seconds; doubles each attempt


def payload(st: Status, threshold: float) -> dict[str, Any]:
    return {"event": "budget_threshold_crossed", "threshold": threshold, **st.as_json()}


class Notifier:
    def __init__(self, url: str, store: StateStore, session: aiohttp.ClientSession,
                 timeout: float = 5.0, sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.url = url
        self.store = store
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._sleep = sleep
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent: list[dict[str, Any]] = []

    async def check(self, statuses: list[Status]) -> None:
        """Claim and send every newly crossed threshold."""
        for st in statuses:
            for threshold in st.crossed:
                name = f"{st.budget.name}:{int(st.window_start)}:{threshold}"
                if not await self.store.claim(name, st.window_end + 3600):
                    continue
                task = asyncio.create_task(self._deliver(payload(st, threshold)),
                                           name=f"webhook-{name}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _deliver(self, body: dict[str, Any]) -> None:
        delay = FIRST_BACKOFF
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self.session.post(self.url, json=body, timeout=self.timeout) as resp:
                    if resp.status < 300:
                        self.sent.append(body)
                        return
                    reason = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = type(exc).__name__
            log.warning("budget webhook attempt %d/%d failed (%s)", attempt, MAX_ATTEMPTS, reason)
            if attempt < MAX_ATTEMPTS:
                await self._sleep(delay)
                delay *= 2
        log.error("budget webhook gave up after %d attempts: %s", MAX_ATTEMPTS, body["name"])

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
