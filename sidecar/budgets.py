"""Budgets, sans-IO: which requests a budget covers, its current window, and its status.

Spend is kept by the ledger (ledger.py) as one additive amount per (budget, window bucket): live
estimates are added as tokens stream, and the difference to the settled count is added when the
request ends. So a budget's spend always includes the tokens still streaming.
"""

from __future__ import annotations

import calendar
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CALENDAR_WINDOWS = ("hour", "day", "week", "month")
MATCH_KEYS = ("key", "team", "model", "provider")
ACTIONS = ("alert", "block")
# Prompt estimates are exact for OpenAI chat and within docs/ACCURACY.md's input errors
# elsewhere (warm median a few percent); 0.1 covers the median miss, not every outlier.
DEFAULT_ADMIT_MARGIN = 0.1


@dataclass(frozen=True, slots=True)
class Budget:
    name: str
    match: Mapping[str, str]  # label -> glob; all must match
    window: str  # hour | day | week | month | rolling
    rolling_seconds: int = 0
    timezone: str = "UTC"
    limit_tokens: int | None = None
    limit_usd: float | None = None
    thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    action: str = "alert"
    cut_off_streams: bool = False  # block: also end streams that cross the limit mid-way
    # block: also refuse a request whose prompt estimate, times 1 + this margin, would take the
    # budget over its limit (None: refuse only once the budget is spent)
    admit_margin: float | None = DEFAULT_ADMIT_MARGIN

    @property
    def unit(self) -> str:
        return "tokens" if self.limit_tokens is not None else "usd"

    @property
    def limit(self) -> float:
        return float(self.limit_tokens if self.limit_tokens is not None else self.limit_usd or 0)

    def covers(self, labels: Mapping[str, str]) -> bool:
        return all(fnmatch.fnmatchcase(labels.get(k, ""), pattern)
                   for k, pattern in self.match.items())

    def bucket_seconds(self) -> int:
        """Rolling windows are summed from buckets: 60 per window, at least 1 s each."""
        return max(1, self.rolling_seconds // 60)

    def window_bounds(self, now: float) -> tuple[float, float]:
        """(start, end) epoch seconds of the window containing ``now``."""
        if self.window == "rolling":
            return now - self.rolling_seconds, now
        tz = ZoneInfo(self.timezone)
        t = datetime.fromtimestamp(now, tz)
        if self.window == "hour":
            start = t.replace(minute=0, second=0, microsecond=0)
            end = start + timedelta(hours=1)
        elif self.window == "day":
            start = t.replace(hour=0, minute=0, second=0, microsecond=0)
            end = _add_days(start, 1)
        elif self.window == "week":  # ISO weeks start on Monday
            start = (t - timedelta(days=t.weekday())).replace(hour=0, minute=0, second=0,
                                                              microsecond=0)
            end = _add_days(start, 7)
        else:
            start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            days = calendar.monthrange(start.year, start.month)[1]
            end = _add_days(start, days)
        return start.timestamp(), end.timestamp()

    def bucket(self, now: float) -> int:
        """The ledger bucket an amount spent at ``now`` goes to (window start, or rolling bucket
        start)."""
        if self.window == "rolling":
            size = self.bucket_seconds()
            return int(now // size) * size
        return int(self.window_bounds(now)[0])


def _add_days(start: datetime, days: int) -> datetime:
    """Calendar days in the budget's zone (a day is 23 or 25 hours across DST changes)."""
    naive = start.replace(tzinfo=None) + timedelta(days=days)
    return naive.replace(tzinfo=start.tzinfo)


@dataclass(slots=True)
class Status:
    budget: Budget
    spent: float
    window_start: float
    window_end: float
    crossed: tuple[float, ...] = field(default_factory=tuple)

    @property
    def ratio(self) -> float:
        return self.spent / self.budget.limit if self.budget.limit > 0 else 0.0

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.budget.limit

    def as_json(self) -> dict[str, Any]:
        b = self.budget
        return {"name": b.name, "match": dict(b.match), "window": b.window,
                "unit": b.unit, "limit": b.limit, "spent": round(self.spent, 6),
                "ratio": round(self.ratio, 6), "action": b.action,
                "thresholds": list(b.thresholds), "crossed": list(self.crossed),
                "window_start": _iso(self.window_start), "window_end": _iso(self.window_end)}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def status(budget: Budget, spent: float, now: float) -> Status:
    start, end = budget.window_bounds(now)
    st = Status(budget, spent, start, end)
    st.crossed = tuple(t for t in budget.thresholds if st.ratio >= t)
    return st


def parse_budgets(raw: Any, problems: list[str]) -> tuple[Budget, ...]:
    """Validate the ``budgets:`` list; every problem names its key and the fix."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("budgets: expected a list of budgets (see README, Budgets)")
        return ()
    out: list[Budget] = []
    names: set[str] = set()
    for i, b in enumerate(raw):
        where = f"budgets[{i}]"
        if not isinstance(b, Mapping):
            problems.append(f"{where}: expected a mapping with name, window and a limit")
            continue
        n_before = len(problems)
        name = str(b.get("name") or "").strip()
        if not name:
            problems.append(f"{where}.name: required, a short unique name")
        elif name in names:
            problems.append(f"{where}.name: {name!r} is used by an earlier budget")
        names.add(name)
        match = b.get("match") or {}
        if not isinstance(match, Mapping) or set(match) - set(MATCH_KEYS):
            problems.append(f"{where}.match: expected keys among {', '.join(MATCH_KEYS)} "
                            "with glob values, e.g. {team: research}")
            match = {}
        window, rolling = _window(b.get("window"), f"{where}.window", problems)
        tz = str(b.get("timezone") or "UTC")
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            problems.append(f"{where}.timezone: unknown zone {tz!r}, e.g. Europe/Berlin")
        lt, lu = b.get("limit_tokens"), b.get("limit_usd")
        if (lt is None) == (lu is None):
            problems.append(f"{where}: set exactly one of limit_tokens or limit_usd")
        for key, value in (("limit_tokens", lt), ("limit_usd", lu)):
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, int | float) or value <= 0):
                problems.append(f"{where}.{key}: expected a positive number")
        thresholds = b.get("thresholds", [0.5, 0.8, 1.0])
        if not isinstance(thresholds, list) or not thresholds or not all(
                isinstance(t, int | float) and 0 < t <= 10 for t in thresholds):
            problems.append(f"{where}.thresholds: expected a list of ratios such as "
                            "[0.5, 0.8, 1.0]")
            thresholds = [1.0]
        action = str(b.get("action") or "alert")
        if action not in ACTIONS:
            problems.append(f"{where}.action: expected alert or block")
        margin = b.get("admit_margin", DEFAULT_ADMIT_MARGIN)
        if margin is not None and (isinstance(margin, bool) or not isinstance(
                margin, int | float) or not 0 <= margin <= 10):
            problems.append(f"{where}.admit_margin: expected a ratio from 0 to 10 (0.1 = the "
                            "prompt estimate plus 10%), or null to refuse only spent budgets")
        unknown = set(b) - {"name", "match", "window", "timezone", "limit_tokens", "limit_usd",
                            "thresholds", "action", "cut_off_streams", "admit_margin"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}")
        if len(problems) > n_before:
            continue
        out.append(Budget(
            name=name, match={str(k): str(v) for k, v in match.items()}, window=window,
            rolling_seconds=rolling, timezone=tz,
            limit_tokens=int(lt) if lt is not None else None,
            limit_usd=float(lu) if lu is not None else None,
            thresholds=tuple(sorted(float(t) for t in thresholds)), action=action,
            cut_off_streams=bool(b.get("cut_off_streams", False)),
            admit_margin=None if margin is None else float(margin)))
    return tuple(out)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    text = text.strip()
    if len(text) < 2 or text[-1] not in _UNITS or not text[:-1].isdigit():
        raise ValueError("expected a duration such as 15m, 1h or 7d")
    return int(text[:-1]) * _UNITS[text[-1]]


def _window(raw: Any, where: str, problems: list[str]) -> tuple[str, int]:
    if isinstance(raw, str) and raw in CALENDAR_WINDOWS:
        return raw, 0
    if isinstance(raw, Mapping) and set(raw) == {"rolling"}:
        try:
            seconds = parse_duration(str(raw["rolling"]))
        except ValueError as exc:
            problems.append(f"{where}.rolling: {exc}")
            return "rolling", 60
        if seconds < 60:
            problems.append(f"{where}.rolling: at least 1m")
        return "rolling", seconds
    problems.append(f"{where}: expected hour, day, week, month, or {{rolling: 15m}}")
    return "day", 0
