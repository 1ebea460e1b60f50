"""The SQLite state file: learned factors survive a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.calibration import Calibration, Factor
from sidecar.state import SQLiteState, StateError, parse_state_url


def test_state_url_forms() -> None:
    assert parse_state_url("sqlite:///sidecar-state.db") == "sidecar-state.db"
    assert parse_state_url("sqlite:////var/lib/sidecar/s.db") == "/var/lib/sidecar/s.db"
    assert parse_state_url("memory://") is None
    for bad in ("redis://x", "sqlite://", "state.db"):
        with pytest.raises(StateError):
            parse_state_url(bad)


def test_calibration_persists_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "state.db")
    cal = Calibration()
    for _ in range(5):
        cal.observe("glm-4", "output", 200, 150)
    store = SQLiteState(path)
    store.save_calibration(cal.snapshot())
    store.close()
    again = SQLiteState(path)
    loaded = again.load_calibration()
    again.close()
    assert loaded[("glm-4", "output")].value == cal.factor("glm-4", "output")
    assert isinstance(loaded[("glm-4", "output")], Factor)
