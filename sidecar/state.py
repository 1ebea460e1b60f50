"""Durable state: budget spend per window bucket, learned estimate factors, alert claims.

``sqlite:///PATH`` (default; embedded, WAL) keeps it in one file; ``redis://HOST:PORT/DB`` shares
it between replicas (atomic increments, keys expire with their window); ``memory://`` keeps
nothing. All stores have the same async interface; SQLite work runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from .calibration import Factor

Key = tuple[str, int]


class StateError(ValueError):
    """A state URL that cannot be used."""


def parse_state_url(url: str) -> tuple[str, str | None]:
    """("sqlite", path) for sqlite:///PATH (relative) or sqlite:////abs/PATH; ("memory", None);
    ("redis", url) for redis://HOST:PORT/DB."""
    if url in ("memory", "memory://"):
        return "memory", None
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise StateError("expected redis://HOST:PORT/DB, e.g. redis://redis:6379/0")
        return "redis", url
    if parts.scheme != "sqlite" or not parts.path or parts.path == "/":
        raise StateError("expected sqlite:///PATH (e.g. sqlite:///sidecar-state.db), "
                         "redis://HOST:PORT/DB or memory://")
    return "sqlite", parts.path[1:] if parts.path.startswith("/") else parts.path


class StateStore(Protocol):
    shared: bool  # several replicas see the same totals

    async def load_calibration(self) -> dict[tuple[str, str], Factor]: ...

    async def save_calibration(self, factors: dict[tuple[str, str], Factor]) -> None: ...

    async def load_spend(self, keys: list[Key]) -> dict[Key, float]: ...

    async def apply_spend(self, deltas: Mapping[Key, float], expiries: Mapping[Key, float],
                          read: list[Key]) -> dict[Key, float] | None: ...

    async def claim(self, name: str, expires_at: float) -> bool: ...

    async def close(self) -> None: ...


class SQLiteState:
    """The embedded default: one file, WAL, a connection guarded by a lock. ``shared``: several
    processes of one host (``--workers``) write it, and read back the totals all of them wrote,
    the way replicas share Redis."""

    def __init__(self, path: str | None, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path or ":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            if path:
                # Other workers may hold the write lock for a moment: wait, do not fail.
                self._db.execute("PRAGMA busy_timeout=5000")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS calibration (model TEXT NOT NULL, "
                "token_type TEXT NOT NULL, factor REAL NOT NULL, weight REAL NOT NULL, "
                "samples INTEGER NOT NULL, PRIMARY KEY (model, token_type));"
                "CREATE TABLE IF NOT EXISTS spend (budget TEXT NOT NULL, bucket INTEGER NOT NULL,"
                " amount REAL NOT NULL, expires REAL NOT NULL, PRIMARY KEY (budget, bucket));"
                "CREATE TABLE IF NOT EXISTS claims (name TEXT PRIMARY KEY, expires REAL NOT NULL);")
            self._db.commit()

    # Blocking implementations, run in a worker thread by the async methods.

    def _load_calibration(self) -> dict[tuple[str, str], Factor]:
        with self._lock:
            rows = self._db.execute(
                "SELECT model, token_type, factor, weight, samples FROM calibration").fetchall()
        return {(m, t): Factor(f, w, n) for m, t, f, w, n in rows}

    def _save_calibration(self, factors: dict[tuple[str, str], Factor]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO calibration VALUES (?, ?, ?, ?, ?) ON CONFLICT(model, token_type) "
                "DO UPDATE SET factor=excluded.factor, weight=excluded.weight, "
                "samples=excluded.samples",
                [(m, t, f.value, f.weight, f.samples) for (m, t), f in factors.items()])
            self._db.commit()

    def _load_spend(self, keys: list[Key]) -> dict[Key, float]:
        wanted = set(keys)
        with self._lock:
            self._db.execute("DELETE FROM spend WHERE expires < ?", (time.time(),))
            self._db.commit()
            rows = self._db.execute("SELECT budget, bucket, amount FROM spend").fetchall()
        return {(b, k): a for b, k, a in rows if (b, k) in wanted}

    def _apply_spend(self, deltas: Mapping[Key, float], expiries: Mapping[Key, float]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO spend VALUES (?, ?, ?, ?) ON CONFLICT(budget, bucket) "
                "DO UPDATE SET amount = amount + excluded.amount, expires = excluded.expires",
                [(b, k, v, expiries.get((b, k), k + 86400.0)) for (b, k), v in deltas.items()])
            self._db.commit()

    def _claim(self, name: str, expires_at: float) -> bool:
        with self._lock:
            self._db.execute("DELETE FROM claims WHERE expires < ?", (time.time(),))
            cur = self._db.execute("INSERT OR IGNORE INTO claims VALUES (?, ?)",
                                   (name, expires_at))
            self._db.commit()
            return cur.rowcount == 1

    async def load_calibration(self) -> dict[tuple[str, str], Factor]:
        return await asyncio.to_thread(self._load_calibration)

    async def save_calibration(self, factors: dict[tuple[str, str], Factor]) -> None:
        await asyncio.to_thread(self._save_calibration, factors)

    async def load_spend(self, keys: list[Key]) -> dict[Key, float]:
        return await asyncio.to_thread(self._load_spend, keys)

    async def apply_spend(self, deltas: Mapping[Key, float], expiries: Mapping[Key, float],
                          read: list[Key]) -> dict[Key, float] | None:
        if deltas:
            await asyncio.to_thread(self._apply_spend, deltas, expiries)
        if self.shared:
            return await asyncio.to_thread(self._load_spend, read)
        return None  # this process is the only writer: its own totals are authoritative

    async def claim(self, name: str, expires_at: float) -> bool:
        return await asyncio.to_thread(self._claim, name, expires_at)

    async def close(self) -> None:
        def close() -> None:
            with self._lock:
                self._db.close()

        await asyncio.to_thread(close)


class RedisState:
    """Shared state for several replicas: INCRBYFLOAT per bucket, keys expire with the window."""

    shared = True

    def __init__(self, url: str, prefix: str = "llm-sidecar:") -> None:
        import redis.asyncio as aioredis

        self._r: Any = aioredis.Redis.from_url(url)
        self._p = prefix

    def _spend_key(self, key: Key) -> str:
        return f"{self._p}spend:{key[0]}:{key[1]}"

    async def load_calibration(self) -> dict[tuple[str, str], Factor]:
        raw = await self._r.hgetall(self._p + "calibration")
        out = {}
        for field, value in raw.items():
            model, _, token_type = field.decode().partition("\x00")
            f, w, n = orjson.loads(value)
            out[(model, token_type)] = Factor(f, w, n)
        return out

    async def save_calibration(self, factors: dict[tuple[str, str], Factor]) -> None:
        if factors:
            await self._r.hset(self._p + "calibration", mapping={
                f"{m}\x00{t}": orjson.dumps([f.value, f.weight, f.samples])
                for (m, t), f in factors.items()})

    async def load_spend(self, keys: list[Key]) -> dict[Key, float]:
        if not keys:
            return {}
        values = await self._r.mget([self._spend_key(k) for k in keys])
        return {k: float(v) for k, v in zip(keys, values, strict=True) if v is not None}

    async def apply_spend(self, deltas: Mapping[Key, float], expiries: Mapping[Key, float],
                          read: list[Key]) -> dict[Key, float] | None:
        if deltas:
            pipe = self._r.pipeline(transaction=False)
            for key, value in deltas.items():
                name = self._spend_key(key)
                pipe.incrbyfloat(name, value)
                pipe.expireat(name, int(expiries.get(key, key[1] + 86400.0)) + 60)
            await pipe.execute()
        return await self.load_spend(read)

    async def claim(self, name: str, expires_at: float) -> bool:
        ttl = max(1, int(expires_at - time.time()))
        return bool(await self._r.set(f"{self._p}claim:{name}", 1, nx=True, ex=ttl))

    async def close(self) -> None:
        await self._r.aclose()


def open_store(url: str, shared: bool = False) -> StateStore:
    """The store a URL names; ``shared``: other processes of this host write it too."""
    kind, target = parse_state_url(url)
    if kind == "redis":
        assert target is not None
        return RedisState(target)
    return SQLiteState(target, shared=shared and kind == "sqlite")
