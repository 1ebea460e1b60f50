"""Who a request belongs to: a key id that never contains the key, and a team."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs

from .config import KeyEntry, Secret

# Used when no key_hash_secret is configured: the label is then a plain (but truncated) hash,
# still irreversible for random API keys; configure a secret to make it unlinkable too.
_DEFAULT_SECRET = b"token-sidecar/key-id/v1"
ANONYMOUS = "anonymous"
UNKNOWN_TEAM = "none"


_WS_KEY = "openai-insecure-api-key."


def bearer_key(headers: Mapping[str, str], query: str = "") -> str | None:
    """The API key of a request, whichever header (or query parameter) the provider uses. Where
    a request carries several, the one the upstream reads first wins: ``Authorization`` (a
    bearer token, or the password of Basic credentials, else their user name), then
    ``x-api-key``, ``api-key``, ``x-goog-api-key``, then a WebSocket subprotocol
    ``openai-insecure-api-key.<key>`` (browsers cannot set headers on a WebSocket), then
    ``?key=``."""
    auth = headers.get("Authorization") or headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
        if scheme.lower() == "basic" and token:
            try:
                user, _, password = base64.b64decode(token, validate=True).decode(
                    "utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user = password = ""
            if password or user:
                return password or user
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        value = headers.get(name)
        if value:
            return value.strip()
    protocols = headers.get("Sec-WebSocket-Protocol")
    if protocols and _WS_KEY in protocols:
        for p in protocols.split(","):
            p = p.strip()
            if p.startswith(_WS_KEY) and len(p) > len(_WS_KEY):
                return p[len(_WS_KEY):]
    if query and "key=" in query:
        values = parse_qs(query).get("key")
        if values:
            return values[0]
    return None


# Key shapes of common providers, masked wherever an upstream echoes one back in an error.
_KEY_SHAPES = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{20,})")


def redact(text: str | None, key: str | None) -> str | None:
    """Text safe for logs and records: the request's key and anything key-shaped removed."""
    if not text:
        return text
    if key:
        text = text.replace(key, "[redacted]")
    return _KEY_SHAPES.sub("[redacted]", text)


@dataclass(frozen=True, slots=True)
class Identity:
    key: str
    team: str


class Attributor:
    """Maps a request to (key id, team) using the configured aliases and team header."""

    def __init__(self, keys: tuple[KeyEntry, ...], team_header: str | None,
                 secret: Secret | None) -> None:
        self._by_digest = {k.sha256: k for k in keys}
        self._team_header = team_header
        self._secret = secret.reveal().encode() if secret else _DEFAULT_SECRET
        self._memo: dict[str, Identity] = {}

    def key_id(self, key: str) -> str:
        mac = hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()
        return "k-" + mac[:12]

    def identify(self, headers: Mapping[str, str], query: str = "") -> Identity:
        key = bearer_key(headers, query)
        header_team = headers.get(self._team_header) if self._team_header else None
        if key is None:
            return Identity(ANONYMOUS, (header_team or UNKNOWN_TEAM).strip())
        # Memoized by digest so raw keys are not kept alive in a long-lived table.
        digest = hashlib.sha256(key.encode()).hexdigest()
        ident = self._memo.get(digest)
        if ident is None:
            entry = self._by_digest.get(digest)
            if entry is not None:
                ident = Identity(entry.alias, entry.team or UNKNOWN_TEAM)
            else:
                ident = Identity(self.key_id(key), UNKNOWN_TEAM)
            if len(self._memo) > 10_000:
                self._memo.clear()
            self._memo[digest] = ident
        if header_team and ident.team == UNKNOWN_TEAM:
            return Identity(ident.key, header_team.strip())
        return ident
