"""Key ids and teams: aliases from config, keyed hashes otherwise, never the key itself."""

from __future__ import annotations

import hashlib

from sidecar.attribution import Attributor, bearer_key
from sidecar.config import KeyEntry, Secret

KEY = "sk-live-abcdef0123456789"


def test_key_found_in_each_provider_header() -> None:
    assert bearer_key({"Authorization": f"Bearer {KEY}"}) == KEY
    assert bearer_key({"x-api-key": KEY}) == KEY
    assert bearer_key({"api-key": KEY}) == KEY
    assert bearer_key({"x-goog-api-key": KEY}) == KEY
    assert bearer_key({}, f"alt=sse&key={KEY}") == KEY
    assert bearer_key({"Authorization": "Negotiate abc"}) is None


def test_alias_and_team_from_config() -> None:
    entry = KeyEntry(hashlib.sha256(KEY.encode()).hexdigest(), "alice", "research")
    a = Attributor((entry,), "X-Team", None)
    ident = a.identify({"Authorization": f"Bearer {KEY}", "X-Team": "ignored"})
    assert (ident.key, ident.team) == ("alice", "research")


def test_keyed_hash_depends_on_secret_and_hides_key() -> None:
    a1 = Attributor((), "X-Team", Secret("one"))
    a2 = Attributor((), None, Secret("two"))
    i1 = a1.identify({"Authorization": f"Bearer {KEY}", "X-Team": "ops"})
    i2 = a2.identify({"Authorization": f"Bearer {KEY}"})
    assert i1.key.startswith("k-") and len(i1.key) == 14 and i1.key != i2.key
    assert KEY not in i1.key and i1.team == "ops" and i2.team == "none"
    assert a1.identify({"Authorization": f"Bearer {KEY}"}).key == i1.key  # stable


def test_anonymous_requests() -> None:
    a = Attributor((), "X-Team", None)
    assert a.identify({"X-Team": "ops"}).key == "anonymous"


def test_basic_credentials_and_which_key_wins() -> None:
    import base64

    basic = base64.b64encode(f"user:{KEY}".encode()).decode()
    assert bearer_key({"Authorization": f"Basic {basic}"}) == KEY  # the password part
    token_only = base64.b64encode(f"{KEY}:".encode()).decode()
    assert bearer_key({"Authorization": f"Basic {token_only}"}) == KEY  # a user-name token
    assert bearer_key({"Authorization": "Basic !!not-base64"}) is None
    # Two keys in two places: the Authorization header's, the one upstreams read first.
    assert bearer_key({"Authorization": f"Basic {basic}", "x-api-key": "sk-other"}) == KEY
    assert bearer_key({"x-api-key": "sk-other"}, f"key={KEY}") == "sk-other"
    a = Attributor((), None, None)
    assert a.identify({"Authorization": f"Basic {basic}"}).key == a.key_id(KEY)
