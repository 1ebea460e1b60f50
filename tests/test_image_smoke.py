"""scripts/image_smoke.py decides on exit statuses, not on printed text: a fake `buildah` and
`debootstrap` on PATH answer as the real ones do, and the base is found, imported from the
verified cache, or made with debootstrap accordingly."""

from __future__ import annotations

import importlib.util
import os
import stat
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import ROOT

FAKE_BUILDAH = r"""#!/usr/bin/env bash
# Records each call; answers like buildah 1.28 does.
echo "buildah $*" >> "$FAKE_LOG"
case "$1" in
  inspect|images)
    if [ -n "$FAKE_HAS_BASE" ]; then echo '{"Docker": {}}'; exit 0; fi
    # What the real one prints when the storage lacks the image: on stderr, status 125.
    echo 'Error: localhost/sidecar-base:bookworm: image not known' >&2; exit 125 ;;
  from) echo "ctr-1" ;;
  add)
    if [ -n "$FAKE_ADD_FAILS" ] && [ ! -e "$FAKE_LOG.added-once" ]; then
      touch "$FAKE_LOG.added-once"
      echo 'Error: archive/tar: invalid tar header' >&2; exit 125
    fi ;;
  commit|rm) ;;
  *) echo "unexpected: $*" >&2; exit 1 ;;
esac
"""

FAKE_DEBOOTSTRAP = r"""#!/usr/bin/env bash
echo "debootstrap $*" >> "$FAKE_LOG"
target="${@: -2:1}"
mkdir -p "$target/usr/bin" && echo python > "$target/usr/bin/python3"
"""


@pytest.fixture
def smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("buildah", FAKE_BUILDAH), ("debootstrap", FAKE_DEBOOTSTRAP)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    for name in ("FAKE_HAS_BASE", "FAKE_ADD_FAILS"):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location("image_smoke", ROOT / "scripts" /
                                                  "image_smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_a_storage_that_answers_125_leads_to_debootstrap(smoke: ModuleType,
                                                         tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert smoke.buildah_base(cache) == smoke.BASE
    done = calls(tmp_path)
    assert done[0].startswith("buildah inspect --type image")
    assert any(c.startswith("debootstrap --variant=minbase") for c in done)
    assert [c.split()[1] for c in done[2:]] == ["from", "add", "commit", "rm"]
    tarball = next(cache.glob("*.tar"))
    assert tarball.with_suffix(".tar.sha256").read_text().strip() == smoke.sha256_of(tarball)


def test_a_storage_holding_the_base_is_reused(smoke: ModuleType, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_HAS_BASE", "1")
    assert smoke.buildah_base(tmp_path / "cache") == smoke.BASE
    assert calls(tmp_path) == [f"buildah inspect --type image {smoke.BASE}"]


def test_a_verified_cache_is_imported_without_debootstrap(smoke: ModuleType,
                                                          tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    smoke.make_tarball(cache)
    (tmp_path / "calls.log").unlink()
    smoke.buildah_base(cache)
    done = calls(tmp_path)
    assert not any(c.startswith("debootstrap") for c in done)
    assert [c.split()[1] for c in done] == ["inspect", "from", "add", "commit", "rm"]


def test_a_cache_that_fails_its_hash_is_made_again(smoke: ModuleType, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tarball = smoke.make_tarball(cache)
    with tarball.open("ab") as f:
        f.write(b"truncated or changed")
    (tmp_path / "calls.log").unlink()
    smoke.buildah_base(cache)
    done = calls(tmp_path)
    assert sum(c.startswith("debootstrap") for c in done) == 1
    assert smoke.cached_tarball(cache) is not None  # the new one verifies


def test_a_cache_that_does_not_import_is_made_again_once(
        smoke: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    smoke.make_tarball(cache)
    (tmp_path / "calls.log").unlink()
    monkeypatch.setenv("FAKE_ADD_FAILS", "1")
    smoke.buildah_base(cache)
    done = [c.split()[0] + " " + c.split()[1] for c in calls(tmp_path)]
    assert done == ["buildah inspect", "buildah from", "buildah add", "buildah rm",
                    "debootstrap --variant=minbase", "buildah from", "buildah add",
                    "buildah commit", "buildah rm"]


def test_run_raises_with_stderr_and_call_keeps_it_apart(smoke: ModuleType) -> None:
    done = smoke.call("buildah", "inspect", "--type", "image", smoke.BASE)
    assert done.returncode == 125 and done.stdout == "" and "image not known" in done.stderr
    with pytest.raises(smoke.SmokeError, match="image not known"):
        smoke.run("buildah", "images", "-q", smoke.BASE)
