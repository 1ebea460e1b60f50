"""State stores: SQLite file (default) and a real Redis; learned factors, spend, claims."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sidecar.calibration import Calibration
from sidecar.state import RedisState, SQLiteState, StateError, StateStore, parse_state_url


def test_state_url_forms() -> None:
    assert parse_state_url("sqlite:///sidecar-state.db") == ("sqlite", "sidecar-state.db")
    assert parse_state_url("sqlite:////var/lib/s.db") == ("sqlite", "/var/lib/s.db")
    assert parse_state_url("memory://") == ("memory", None)
    assert parse_state_url("redis://r:6379/0") == ("redis", "redis://r:6379/0")
    for bad in ("mongo://x", "sqlite://", "state.db", "redis:///0"):
        with pytest.raises(StateError):
            parse_state_url(bad)


async def _exercise(store: StateStore, reopen: object) -> None:
    cal = Calibration()
    for _ in range(5):
        cal.observe("glm-4", "output", 200, 150)
    await store.save_calibration(cal.snapshot())
    now = int(time.time())
    key = ("team-daily", now - now % 86400)
    await store.apply_spend({key: 100.5}, {key: now + 3600.0}, [key])
    await store.apply_spend({key: -0.5}, {key: now + 3600.0}, [key])
    assert await store.claim(f"b:{key[1]}:0.5", now + 3600.0)
    assert not await store.claim(f"b:{key[1]}:0.5", now + 3600.0)  # once per window
    await store.close()
    again: StateStore = reopen()  # type: ignore[operator]
    loaded = await again.load_calibration()
    assert loaded[("glm-4", "output")].value == cal.factor("glm-4", "output")
    assert await again.load_spend([key, ("other", 0)]) == {key: 100.0}
    assert not await again.claim(f"b:{key[1]}:0.5", now + 3600.0)
    await again.close()


async def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "state.db")
    await _exercise(SQLiteState(path), lambda: SQLiteState(path))


async def test_redis_persists_and_shares(redis_url: str) -> None:
    await _exercise(RedisState(redis_url), lambda: RedisState(redis_url))
    a, b = RedisState(redis_url), RedisState(redis_url)
    key = ("shared", 0)
    await a.apply_spend({key: 3.0}, {key: time.time() + 60}, [key])
    totals = await b.apply_spend({key: 4.0}, {key: time.time() + 60}, [key])
    assert totals == {key: 7.0}  # both replicas' increments, atomically
    await a.close()
    await b.close()
