"""Durable sidecar state: an embedded SQLite file by default (the learned estimate factors).

Every call here is blocking; the app runs them in a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from urllib.parse import urlsplit

from .calibration import Factor


class StateError(ValueError):
    """A state URL that cannot be used."""


def parse_state_url(url: str) -> str | None:
    """The SQLite path of ``sqlite:///PATH`` (relative) or ``sqlite:////abs/PATH``; None for
    ``memory://`` (nothing persists)."""
    if url in ("memory", "memory://"):
        return None
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or not parts.path or parts.path == "/":
        raise StateError("expected sqlite:///PATH (e.g. sqlite:///sidecar-state.db) or memory://")
    return parts.path[1:] if parts.path.startswith("/") else parts.path


class SQLiteState:
    """The state file: WAL mode, one connection guarded by a lock."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path or ":memory:", check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            if path:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS calibration (model TEXT NOT NULL, "
                "token_type TEXT NOT NULL, factor REAL NOT NULL, weight REAL NOT NULL, "
                "samples INTEGER NOT NULL, PRIMARY KEY (model, token_type))")
            self._db.commit()

    def load_calibration(self) -> dict[tuple[str, str], Factor]:
        with self._lock:
            rows = self._db.execute(
                "SELECT model, token_type, factor, weight, samples FROM calibration").fetchall()
        return {(m, t): Factor(f, w, n) for m, t, f, w, n in rows}

    def save_calibration(self, factors: dict[tuple[str, str], Factor]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO calibration VALUES (?, ?, ?, ?, ?) ON CONFLICT(model, token_type) "
                "DO UPDATE SET factor=excluded.factor, weight=excluded.weight, "
                "samples=excluded.samples",
                [(m, t, f.value, f.weight, f.samples) for (m, t), f in factors.items()])
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()
