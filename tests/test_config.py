"""Settings: precedence, validation that names the key and the fix, secrets kept out of repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import ConfigError, Secret, load_settings


def test_defaults_and_env(tmp_path: Path) -> None:
    s = load_settings(env={"SIDECAR_UPSTREAM": "http://gw:3000/"})
    assert s.upstream == "http://gw:3000" and s.listen == ("0.0.0.0", 8080)
    assert s.metrics_listen == ("0.0.0.0", 9464) and s.client_disconnect == "auto"


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("upstream: http://file\nlisten: 127.0.0.1:1\ntimeouts: {read: 5}\n"
                 "limits: {max_request_body: 2MiB}\n")
    s = load_settings(str(f), env={"SIDECAR_LISTEN": "127.0.0.1:2"},
                      flags={"upstream": "https://flag"})
    assert s.upstream == "https://flag" and s.listen == ("127.0.0.1", 2)
    assert s.read_timeout == 5.0 and s.max_request_body == 2 * 1024 * 1024


def test_every_problem_listed_with_key_and_fix(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("listen: nowhere\ntimeouts: {read: -1}\nclient_disconnect: {upstream: maybe}\n"
                 "attribution:\n  keys:\n    - {sha256: abc, alias: a}\n    - {sha256: "
                 + "a" * 64 + "}\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(f), env={})
    text = "\n".join(err.value.problems)
    for expected in ("listen:", "timeouts.read:", "client_disconnect.upstream:",
                     "attribution.keys[0].sha256:", "sha256sum", "attribution.keys[1].alias:",
                     "bogus: unknown key", "upstream: required"):
        assert expected in text, expected


def test_credentials_in_an_upstream_url_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("upstream: https://user:pw@gateway.internal\nroutes:\n"
                 "  - {prefix: /a, upstream: 'http://u@a.internal'}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(f), env={})
    text = "\n".join(err.value.problems)
    assert "upstream: 'https://<credentials>@gateway.internal' is invalid: carries " \
           "credentials" in text
    assert "routes[0].upstream: 'http://<credentials>@a.internal' is invalid" in text
    assert "pw" not in text and "//u@" not in text  # credentials are never echoed


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(str(f), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(str(tmp_path / "nope.yaml"), env={})


def test_secret_never_shown() -> None:
    s = load_settings(env={"SIDECAR_UPSTREAM": "http://x", "SIDECAR_KEY_HASH_SECRET": "hunter2"})
    assert isinstance(s.key_hash_secret, Secret)
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.key_hash_secret)
    assert s.key_hash_secret.reveal() == "hunter2"
