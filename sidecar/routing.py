"""Routes resolved for the proxy: which upstream a path goes to, and how it is read."""

from __future__ import annotations

from dataclasses import dataclass

from yarl import URL

from .config import Settings, all_routes


@dataclass(frozen=True, slots=True)
class Target:
    """A configured route, resolved: where its requests go and how they are read."""

    prefix: str
    url: URL
    dialect: str  # "auto" or a dialect name
    provider: str | None
    strip_prefix: bool
    include_usage: bool

    def matches(self, path: str) -> bool:
        p = self.prefix
        return p == "/" or path == p or path.startswith(p + "/")

    def upstream_url(self, raw_path: str) -> URL:
        if self.strip_prefix and self.prefix != "/":
            raw_path = raw_path[len(self.prefix):] or "/"
            if not raw_path.startswith("/"):
                raw_path = "/" + raw_path
        return URL(str(self.url).rstrip("/") + raw_path, encoded=True)


def targets(settings: Settings) -> list[Target]:
    """Longest prefix first, --upstream last as the catch-all."""
    return [Target(r.prefix, URL(r.upstream), r.dialect, r.provider, r.strip_prefix,
                   r.include_usage) for r in all_routes(settings)]


def route(table: list[Target], path: str) -> Target | None:
    for t in table:
        if t.matches(path):
            return t
    return None
