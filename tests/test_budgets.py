"""Budget config, matching and calendar/rolling windows (pure)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from sidecar.budgets import Budget, parse_budgets, parse_duration, status


def ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def test_parse_and_defaults() -> None:
    problems: list[str] = []
    (b,) = parse_budgets([{"name": "research-daily", "match": {"team": "research"},
                           "window": "day", "limit_tokens": 2_000_000,
                           "thresholds": [0.8, 0.5, 1.0], "action": "block"}], problems)
    assert problems == []
    assert (b.unit, b.limit, b.thresholds, b.action) == ("tokens", 2e6, (0.5, 0.8, 1.0), "block")
    assert b.admit_margin == 0.1
    (lax, tight) = parse_budgets([
        {"name": "lax", "window": "day", "limit_tokens": 5, "admit_margin": None},
        {"name": "tight", "window": "day", "limit_tokens": 5, "admit_margin": 0.5}], problems)
    assert (lax.admit_margin, tight.admit_margin, problems) == (None, 0.5, [])


def test_admission_weighs_the_prompt_with_its_margin() -> None:
    from sidecar.ledger import Ledger, exhausted

    tokens = Budget("t", {}, "day", limit_tokens=1000, action="block", admit_margin=0.25)
    usd = Budget("u", {}, "day", limit_usd=1.0, action="block")
    lax = Budget("l", {}, "day", limit_tokens=1000, action="block", admit_margin=None)
    ledger = Ledger((tokens, usd, lax))
    ledger.add((tokens, lax), 600, None, 0.0)
    assert exhausted(ledger, [tokens], 0.0, prompt_tokens=320) is None  # 600 + 400 = 1000
    assert exhausted(ledger, [tokens], 0.0, prompt_tokens=321) is tokens
    assert exhausted(ledger, [lax], 0.0, prompt_tokens=10_000) is None
    assert exhausted(ledger, [usd], 0.0, prompt_tokens=10**6) is None  # unpriced: no USD
    assert exhausted(ledger, [usd], 0.0, prompt_tokens=10, prompt_usd=0.95) is usd


def test_every_problem_named() -> None:
    problems: list[str] = []
    parse_budgets([{"name": "a", "window": "fortnight", "limit_tokens": 1, "limit_usd": 2},
                   {"name": "a", "window": {"rolling": "10x"}, "match": {"colour": "red"},
                    "limit_usd": -1, "action": "shout", "timezone": "Mars/Base",
                    "admit_margin": "lots"}], problems)
    text = "\n".join(problems)
    for expected in ("budgets[0].window", "exactly one of limit_tokens or limit_usd",
                     "budgets[1].name", "budgets[1].window.rolling", "budgets[1].match",
                     "budgets[1].limit_usd", "budgets[1].action", "budgets[1].timezone",
                     "budgets[1].admit_margin"):
        assert expected in text, expected


def test_globs_match_all_given_labels() -> None:
    b = Budget("b", {"team": "research*", "model": "gpt-4o*"}, "day", limit_tokens=1)
    assert b.covers({"team": "research-ml", "model": "gpt-4o-mini", "key": "x"})
    assert not b.covers({"team": "research", "model": "claude-x"})
    assert Budget("all", {}, "day", limit_tokens=1).covers({})


@pytest.mark.parametrize("window, now, start, end", [
    ("hour", "2026-11-23T10:42:00", "2026-11-23T10:00:00", "2026-11-23T11:00:00"),
    ("day", "2026-11-23T10:42:00", "2026-11-23T00:00:00", "2026-11-24T00:00:00"),
    ("week", "2026-11-26T10:42:00", "2026-11-23T00:00:00", "2026-11-30T00:00:00"),
    ("month", "2026-02-14T10:42:00", "2026-02-01T00:00:00", "2026-03-01T00:00:00"),
])
def test_calendar_windows(window: str, now: str, start: str, end: str) -> None:
    b = Budget("b", {}, window, limit_tokens=1)
    assert b.window_bounds(ts(now)) == (ts(start), ts(end))


def test_day_window_in_a_timezone_across_dst() -> None:
    b = Budget("b", {}, "day", timezone="Europe/Berlin", limit_tokens=1)
    start, end = b.window_bounds(ts("2026-10-25T12:00:00", "Europe/Berlin"))
    assert start == ts("2026-10-25T00:00:00", "Europe/Berlin")
    assert end - start == 25 * 3600  # the day the clocks go back


def test_rolling_window_and_status() -> None:
    b = Budget("rate", {}, "rolling", rolling_seconds=parse_duration("15m"), limit_tokens=100,
               thresholds=(0.5, 1.0))
    assert b.bucket_seconds() == 15
    st = status(b, 60, 1000.0)
    assert (st.ratio, st.crossed, st.exhausted) == (0.6, (0.5,), False)
    assert st.as_json()["unit"] == "tokens"
    with pytest.raises(ValueError):
        parse_duration("soon")
