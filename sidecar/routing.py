"""Routes resolved for the proxy: which upstream a path goes to, and how it is read."""

from __future__ import annotations

from dataclasses import dataclass, field

from yarl import URL

from .config import Settings, all_routes
from .dialects import provider_for, provider_host


@dataclass(frozen=True, slots=True)
class Target:
    """A configured route, resolved: where its requests go and how they are read."""

    prefix: str
    url: URL
    dialect: str  # "auto" or a dialect name
    provider: str | None
    strip_prefix: bool
    include_usage: bool
    client_disconnect: str  # auto | close | drain
    # The upstream is a known provider API (by its host), not a gateway or a self-hosted server.
    provider_api: bool = False
    _labels: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    base: str = field(init=False, compare=False, repr=False)  # the URL, no trailing slash

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", str(self.url).rstrip("/"))

    def provider_label(self, dialect: str) -> str:
        """The ``provider`` label of this route's requests in ``dialect`` (memoized)."""
        label = self._labels.get(dialect)
        if label is None:
            label = self._labels[dialect] = self.provider or provider_for(dialect, self.url.host)
        return label

    @property
    def provider_known(self) -> bool:
        """The provider label is a fact (configured, or the host's), not the format's default:
        prices are then looked up at that provider only."""
        return self.provider is not None or self.provider_api

    def disconnect_policy(self, dialect: str) -> str:
        """What a client disconnect does here. Beside a gateway the gateway keeps reading (and
        billing) the provider anyway, so the sidecar drains to record the bill; in front of a
        provider, or a self-hosted Ollama, closing stops generation and saves the money."""
        if self.client_disconnect != "auto":
            return self.client_disconnect
        return "close" if self.provider_api or dialect == "ollama" else "drain"

    def matches(self, path: str) -> bool:
        p = self.prefix
        return p == "/" or path == p or path.startswith(p + "/")

    def upstream_url(self, raw_path: str) -> URL:
        if self.strip_prefix and self.prefix != "/":
            raw_path = raw_path[len(self.prefix):] or "/"
            if not raw_path.startswith("/"):
                raw_path = "/" + raw_path
        return URL(self.base + raw_path, encoded=True)


def targets(settings: Settings) -> list[Target]:
    """Longest prefix first, --upstream last as the catch-all."""
    out = []
    for r in all_routes(settings):
        url = URL(r.upstream)
        out.append(Target(r.prefix, url, r.dialect, r.provider, r.strip_prefix, r.include_usage,
                          r.client_disconnect or settings.client_disconnect,
                          provider_host(url.host) is not None))
    return out


def route(table: list[Target], path: str) -> Target | None:
    for t in table:
        if t.matches(path):
            return t
    return None
