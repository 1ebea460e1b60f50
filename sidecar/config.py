"""Settings from a YAML file, environment variables and flags, validated with every problem listed.

Precedence: command-line flag > environment variable > config file > default. Each problem is
reported with the key it concerns and how to fix it; nothing starts until all are fixed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml


class Secret:
    """A string whose repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class ConfigError(ValueError):
    """Invalid settings; ``problems`` lists each as 'key: what is wrong (how to fix)'."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class KeyEntry:
    sha256: str
    alias: str
    team: str | None


@dataclass(frozen=True, slots=True)
class Route:
    """Requests whose path starts with ``prefix`` go to ``upstream``."""

    prefix: str
    upstream: str
    dialect: str = "auto"  # or a dialect name: detection is skipped
    provider: str | None = None  # label; derived from the upstream host or dialect when None
    strip_prefix: bool = True
    include_usage: bool = False
    client_disconnect: str | None = None  # None: the global setting


@dataclass(slots=True)
class Settings:
    upstream: str = ""
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    metrics_listen: tuple[str, int] = ("0.0.0.0", 9464)
    provider: str | None = None
    dialect: str = "auto"
    include_usage: bool = False
    routes: tuple[Route, ...] = ()
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_request_body: int = 32 * 1024 * 1024
    max_frame_size: int = 8 * 1024 * 1024
    max_ws_message: int = 16 * 1024 * 1024
    tokenizer_cpu: float = 0.25
    estimate_all: bool = False
    escaped_slashes: str = "reject"
    client_disconnect: str = "auto"
    drain_timeout: float = 120.0
    max_keys: int = 1000
    max_teams: int = 200
    max_models: int = 200
    team_header: str | None = None
    key_hash_secret: Secret | None = None
    keys: tuple[KeyEntry, ...] = ()
    records: str = "-"
    state: str = "sqlite:///sidecar-state.db"
    prices: tuple[Any, ...] = ()  # pricing.Override, in file order
    prices_file: str | None = None
    budgets: tuple[Any, ...] = ()  # budgets.Budget
    webhook_url: str | None = None
    webhook_timeout: float = 5.0
    admin_token: Secret | None = None
    watch_config: bool = False
    otel_genai: bool = False
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    max_header_size: int = 16 * 1024
    max_concurrent_requests: int = 4096
    shutdown_grace: float = 30.0
    event_loop: str = "auto"
    workers: int = 1
    log_level: str = "INFO"
    config_file: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:8080")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 0 to 65535")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL, e.g. https://api.openai.com")
    return value.rstrip("/")


def _shown(value: Any) -> str:
    """A value as an error quotes it, with any URL's credentials left out."""
    return re.sub(r"//[^/@\s]*@", "//<credentials>@", repr(value))


def _upstream_url(value: str) -> str:
    url = _url(value)
    if urlsplit(url).username is not None:
        raise ValueError("carries credentials (user:password@), which would not be sent: the "
                         "sidecar forwards each client's own Authorization; remove them")
    return url


def _positive_float(value: Any) -> float:
    f = float(value)
    if f <= 0:
        raise ValueError("must be greater than 0")
    return f


def _non_negative_float(value: Any) -> float:
    f = float(value)
    if f < 0:
        raise ValueError("must be 0 or more")
    return f


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota: float | None = None
    try:  # cgroup v2
        raw = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if raw and raw[0] != "max":
            quota = int(raw[0]) / int(raw[1])
    except (OSError, ValueError, IndexError):
        try:  # cgroup v1
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if q > 0:
                quota = q / period
        except (OSError, ValueError):
            pass
    if quota is not None:
        n = min(n, max(1, int(quota + 0.999)))
    return max(1, n)


def _workers(value: Any) -> int:
    if str(value).strip().lower() == "auto":
        return usable_cpus()
    n = int(value)
    if n < 1:
        raise ValueError("expected a number of processes (1 or more) or auto")
    return n


def _size(value: Any) -> int:
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]i?[bB]?)?\s*", str(value))
        if not m:
            raise ValueError("expected a size in bytes, e.g. 33554432 or 32MiB")
        mult = {"k": 1024, "m": 1024**2, "g": 1024**3}.get((m.group(2) or " ")[0].lower(), 1)
        n = int(m.group(1)) * mult
    if n <= 0:
        raise ValueError("must be greater than 0")
    return n


def _positive_int(value: Any) -> int:
    n = int(value)
    if n <= 0:
        raise ValueError("must be greater than 0")
    return n


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        v = str(value).strip().lower()
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return v

    return check


def _state_url(value: Any) -> str:
    from .state import parse_state_url

    v = str(value).strip()
    parse_state_url(v)
    return v


def _readable_file(value: Any) -> str:
    path = Path(str(value))
    if not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return str(path)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _dialect(value: Any) -> str:
    from .dialects import AUTO, DIALECTS

    v = str(value).strip().lower()
    if v != AUTO and v not in DIALECTS:
        raise ValueError(f"expected auto or one of {', '.join(sorted(DIALECTS))}")
    return v


def _label(value: Any) -> str:
    v = str(value).strip()
    if not v:
        raise ValueError("must not be empty")
    return v


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: where it lives in the file, its env var and flag, how to parse it."""

    attr: str
    file_key: str  # dotted path in the YAML file
    env: str
    parse: Callable[[Any], Any]
    help: str
    switch: bool = False  # a boolean: `--flag` alone means true


OPTIONS: tuple[Option, ...] = (
    Option("upstream", "upstream", "SIDECAR_UPSTREAM", _upstream_url,
           "upstream base URL every request is forwarded to (required)"),
    Option("listen", "listen", "SIDECAR_LISTEN", parse_hostport,
           "proxy address HOST:PORT (default 0.0.0.0:8080)"),
    Option("metrics_listen", "metrics_listen", "SIDECAR_METRICS_LISTEN", parse_hostport,
           "metrics/health address HOST:PORT (default 0.0.0.0:9464)"),
    Option("provider", "provider", "SIDECAR_PROVIDER", _label,
           "value of the 'provider' label for --upstream (default: from the upstream host or "
           "the detected format)"),
    Option("dialect", "dialect", "SIDECAR_DIALECT", lambda v: _dialect(v),
           "wire format of --upstream: auto (detect per request) or a dialect name"),
    Option("include_usage", "include_usage", "SIDECAR_INCLUDE_USAGE", lambda v: _bool(v),
           "add stream_options.include_usage to OpenAI-format streams of --upstream and hide "
           "the extra usage chunk from clients that did not ask for it (default false)",
           switch=True),
    Option("connect_timeout", "timeouts.connect", "SIDECAR_CONNECT_TIMEOUT", _positive_float,
           "seconds to connect to the upstream (default 10)"),
    Option("read_timeout", "timeouts.read", "SIDECAR_READ_TIMEOUT", _positive_float,
           "seconds the upstream may stay silent mid-response (default 300)"),
    Option("max_request_body", "limits.max_request_body", "SIDECAR_MAX_REQUEST_BODY", _size,
           "largest request body accepted, else 413 (default 32MiB)"),
    Option("max_frame_size", "limits.max_frame_size", "SIDECAR_MAX_FRAME_SIZE", _size,
           "largest SSE/NDJSON frame the meter buffers (default 8MiB)"),
    Option("max_ws_message", "limits.max_ws_message", "SIDECAR_MAX_WS_MESSAGE", _size,
           "largest WebSocket message relayed, either way; a larger one closes the session "
           "with 1009 (default 16MiB: OpenAI Realtime accepts 15MiB of audio per message)"),
    Option("tokenizer_cpu", "limits.tokenizer_cpu", "SIDECAR_TOKENIZER_CPU",
           lambda v: _non_negative_float(v),
           "CPU (in cores) exact tokenizing of large texts (1K+ characters in one read) may use; "
           "beyond it they are estimated from their length, so counting never falls behind "
           "(0: always exact; default 0.25)"),
    Option("estimate_all", "limits.estimate_all", "SIDECAR_ESTIMATE_ALL", lambda v: _bool(v),
           "estimate every non-streamed answer even when the provider reports its usage "
           "(default: the first 64 per model, then one in 32 and one a minute at least, feed "
           "the estimate ratio and what the sidecar learns; the rest settle from the report "
           "alone, at a fraction of the CPU)",
           switch=True),
    Option("escaped_slashes", "paths.escaped_slashes", "SIDECAR_ESCAPED_SLASHES",
           _choice("reject", "keep"),
           "a request path with an encoded slash or backslash (%2F, %5C) or a backslash: "
           "reject with 400 (default), or keep it as is for upstreams that need it"),
    Option("client_disconnect", "client_disconnect.upstream", "SIDECAR_CLIENT_DISCONNECT",
           _choice("auto", "close", "drain"),
           "on client disconnect: drain the upstream to its end so the record equals the bill, "
           "or close it at once (stops generation at a provider); auto = drain beside a "
           "gateway, close in front of a known provider host or Ollama (default auto)"),
    Option("drain_timeout", "client_disconnect.drain_timeout", "SIDECAR_DRAIN_TIMEOUT",
           _positive_float, "seconds to drain the upstream after a disconnect (default 120)"),
    Option("prices_file", "prices_file", "SIDECAR_PRICES_FILE", lambda v: _prices_file(v),
           "price data: a genai-prices data.json to use instead of the bundled snapshot "
           "(default: bundled; refresh with 'sidecar prices-update')"),
    Option("max_keys", "labels.max_keys", "SIDECAR_MAX_KEYS", _positive_int,
           "distinct 'key' label values before new ones become 'other' (default 1000); each "
           "adds one series per model and token type"),
    Option("max_teams", "labels.max_teams", "SIDECAR_MAX_TEAMS", _positive_int,
           "distinct 'team' label values before 'other' (default 200)"),
    Option("max_models", "labels.max_models", "SIDECAR_MAX_MODELS", _positive_int,
           "distinct 'model' label values before 'other' (default 200)"),
    Option("team_header", "attribution.team_header", "SIDECAR_TEAM_HEADER", _label,
           "request header naming the team (optional)"),
    Option("key_hash_secret", "attribution.key_hash_secret", "SIDECAR_KEY_HASH_SECRET",
           lambda v: Secret(_label(v)),
           "secret for the keyed hash that names API keys in labels (recommended)"),
    Option("records", "records", "SIDECAR_RECORDS", _label,
           "where the per-request JSON lines go: '-' for stderr, 'off', or a file path"),
    Option("state", "state", "SIDECAR_STATE", lambda v: _state_url(v),
           "durable state: sqlite:///PATH (default sqlite:///sidecar-state.db) or memory://"),
    Option("webhook_url", "notify.webhook_url", "SIDECAR_WEBHOOK_URL", _url,
           "POST budget threshold crossings here (optional; for teams without Alertmanager)"),
    Option("webhook_timeout", "notify.timeout", "SIDECAR_WEBHOOK_TIMEOUT", _positive_float,
           "seconds per webhook attempt (default 5)"),
    Option("admin_token", "admin_token", "SIDECAR_ADMIN_TOKEN", lambda v: Secret(_label(v)),
           "if set, GET /budgets needs 'Authorization: Bearer TOKEN'"),
    Option("watch_config", "watch_config", "SIDECAR_WATCH_CONFIG", lambda v: _bool(v),
           "reload the config file when it changes (SIGHUP always reloads)", switch=True),
    Option("otel_genai", "otel_genai", "SIDECAR_OTEL_GENAI", lambda v: _bool(v),
           "also export the OpenTelemetry GenAI names (gen_ai_client_token_usage, ...)",
           switch=True),
    Option("ca_file", "tls.ca_file", "SIDECAR_CA_FILE", lambda v: _readable_file(v),
           "PEM bundle of extra CAs to trust for upstream TLS (verification is always on "
           "unless tls.insecure_skip_verify)"),
    Option("insecure_skip_verify", "tls.insecure_skip_verify", "SIDECAR_INSECURE_SKIP_VERIFY",
           lambda v: _bool(v), "do not verify upstream TLS certificates (testing only)",
           switch=True),
    Option("max_header_size", "limits.max_header_size", "SIDECAR_MAX_HEADER_SIZE", _size,
           "largest request line or header field accepted, else 400 (default 16KiB)"),
    Option("max_concurrent_requests", "limits.max_concurrent_requests",
           "SIDECAR_MAX_CONCURRENT_REQUESTS", _positive_int,
           "requests handled at once; more get a 503 with Retry-After (default 4096)"),
    Option("shutdown_grace", "shutdown_grace", "SIDECAR_SHUTDOWN_GRACE", _positive_float,
           "seconds in-flight streams may finish after SIGTERM (default 30)"),
    Option("workers", "workers", "SIDECAR_WORKERS", lambda v: _workers(v),
           "worker processes sharing the proxy port, one /metrics and the budgets: a number, or "
           "auto (the CPUs this process may use, cgroup limits and affinity included); "
           "default 1"),
    Option("event_loop", "event_loop", "SIDECAR_EVENT_LOOP", _choice("auto", "uvloop", "asyncio"),
           "event loop: auto (uvloop when installed), uvloop, or asyncio"),
    Option("log_level", "log_level", "SIDECAR_LOG_LEVEL",
           lambda v: _choice("debug", "info", "warning", "error")(v).upper(),
           "log level (default info)"),
)

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _lookup(tree: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


_KNOWN_TOP = {o.file_key.split(".")[0] for o in OPTIONS}
_SECTIONS = {"routes", "prices", "budgets"}


def _parse_keys(raw: Any, problems: list[str]) -> tuple[KeyEntry, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("attribution.keys: expected a list of {sha256, alias, team} entries")
        return ()
    out = []
    for i, entry in enumerate(raw):
        where = f"attribution.keys[{i}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: expected a mapping with sha256, alias and optional team")
            continue
        digest = str(entry.get("sha256", "")).strip().lower()
        if not _SHA256.fullmatch(digest):
            problems.append(
                f"{where}.sha256: expected 64 hex digits (fix: printf %s \"$KEY\" | sha256sum)"
            )
            continue
        alias = entry.get("alias")
        if not isinstance(alias, str) or not alias.strip():
            problems.append(f"{where}.alias: required, the name shown in the 'key' label")
            continue
        team = entry.get("team")
        out.append(KeyEntry(digest, alias.strip(), str(team).strip() if team else None))
    return tuple(out)


def _parse_routes(raw: Any, problems: list[str]) -> tuple[Route, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append("routes: expected a list of {prefix, upstream, dialect?, provider?}")
        return ()
    out = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"routes[{i}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: expected a mapping with prefix and upstream")
            continue
        unknown = set(entry) - {"prefix", "upstream", "dialect", "provider", "strip_prefix",
                                "include_usage", "client_disconnect"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)} (known: prefix, upstream, "
                            "dialect, provider, strip_prefix, include_usage, "
                            "client_disconnect)")
        prefix = str(entry.get("prefix", "")).strip()
        if not prefix.startswith("/"):
            problems.append(f"{where}.prefix: must start with '/', e.g. /anthropic")
            continue
        if prefix in seen:
            problems.append(f"{where}.prefix: {prefix} is used by an earlier route")
        seen.add(prefix)
        kwargs: dict[str, Any] = {"prefix": prefix.rstrip("/") or "/"}
        for key, parse in (("upstream", _upstream_url), ("dialect", _dialect), ("provider", _label),
                           ("strip_prefix", _bool), ("include_usage", _bool),
                           ("client_disconnect", _choice("auto", "close", "drain"))):
            if entry.get(key) is None:
                if key == "upstream":
                    problems.append(f"{where}.upstream: required, the URL this prefix goes to")
                continue
            try:
                kwargs[key] = parse(entry[key])
            except ValueError as exc:
                problems.append(f"{where}.{key}: {_shown(entry[key])} is invalid: {exc}")
        if "upstream" in kwargs:
            out.append(Route(**kwargs))
    return tuple(out)


def _parse_prices(raw: Any, problems: list[str]) -> tuple[Any, ...]:
    from .pricing import OVERRIDE_KEYS, Override

    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        problems.append("prices: expected model: {input: USD, output: USD, ...} per 1M tokens")
        return ()
    out = []
    known = (*OVERRIDE_KEYS, "provider")
    for model, entry in raw.items():
        where = f"prices.{model}"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: expected {{input: USD, output: USD}} per 1M tokens")
            continue
        unknown = set(entry) - set(known)
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)} (known: {', '.join(known)})")
            continue
        values: dict[str, float] = {}
        for f in OVERRIDE_KEYS:
            v = entry.get(f)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                unit = "per 1,000 calls" if f.endswith("_per_1k") else "per 1M tokens"
                problems.append(f"{where}.{f}: expected USD {unit}, a number >= 0")
                continue
            values[f] = float(v)
        if "input" not in values or "output" not in values:
            problems.append(f"{where}: input and output prices are required")
            continue
        provider = entry.get("provider")
        out.append(Override.build(str(model), values,
                                  str(provider).strip() if provider else None))
    return tuple(out)


def _prices_file(value: Any) -> str:
    from .pricing import PriceDataError, load_data

    path = _readable_file(value)
    try:
        load_data(path)
    except PriceDataError as exc:
        raise ValueError(f"{exc} (fix: a genai-prices data.json, e.g. from "
                         "'sidecar prices-update --out FILE')") from None
    return path


def all_routes(settings: Settings) -> list[Route]:
    """Configured routes, plus --upstream as the catch-all; longest prefix first."""
    routes = list(settings.routes)
    if settings.upstream and not any(r.prefix == "/" for r in routes):
        routes.append(Route("/", settings.upstream, settings.dialect, settings.provider,
                            strip_prefix=False, include_usage=settings.include_usage))
    return sorted(routes, key=lambda r: -len(r.prefix))


def load_settings(
    file: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings; raises ConfigError listing every problem at once."""
    env = os.environ if env is None else env
    flags = flags or {}
    problems: list[str] = []
    tree: dict[str, Any] = {}
    file = file or env.get("SIDECAR_CONFIG") or None
    if file:
        try:
            loaded = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                [f"config: file {file} does not exist (fix: check --config)"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"config: {file} is not valid YAML: {exc}"]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"config: {file} must hold a mapping at the top level"])
        tree = loaded
        for key in tree:
            if key not in _KNOWN_TOP | _SECTIONS:
                problems.append(
                    f"{key}: unknown key (known: {', '.join(sorted(_KNOWN_TOP | _SECTIONS))})")

    settings = Settings(config_file=file)
    for opt in OPTIONS:
        if flags.get(opt.attr) is not None:
            value, origin = flags[opt.attr], f"--{opt.attr.replace('_', '-')}"
        elif env.get(opt.env):
            value, origin = env[opt.env], opt.env
        else:
            found, value = _lookup(tree, opt.file_key)
            if not found or value is None:
                continue
            origin = opt.file_key
        try:
            setattr(settings, opt.attr, opt.parse(value))
        except (ValueError, TypeError) as exc:
            shown = "<hidden>" if opt.attr in ("key_hash_secret", "admin_token") else _shown(value)
            problems.append(f"{origin}: {shown} is invalid: {exc}")

    found, raw_keys = _lookup(tree, "attribution.keys")
    settings.keys = _parse_keys(raw_keys if found else None, problems)
    settings.routes = _parse_routes(tree.get("routes"), problems)
    settings.prices = _parse_prices(tree.get("prices"), problems)
    from .budgets import parse_budgets

    settings.budgets = parse_budgets(tree.get("budgets"), problems)
    if settings.workers > 1 and settings.state.startswith("memory"):
        problems.append("workers: several workers share budgets through the state store; "
                        "memory:// keeps none (fix: state sqlite:///PATH or redis://HOST/DB, or "
                        "workers: 1)")
    if not settings.upstream and not settings.routes:
        problems.append(
            "upstream: required (fix: --upstream URL, SIDECAR_UPSTREAM, 'upstream:' or "
            "'routes:' in the file)"
        )
    if problems:
        raise ConfigError(problems)
    return settings
