"""The container image, built from deploy/Dockerfile and run (scripts/image_smoke.py): it starts,
answers /healthz and /readyz, relays and meters a stream with no network but the loopback, runs
as a non-root user with a writable state volume, and its HEALTHCHECK passes.

Built with Docker where an engine runs, else with buildah on a debootstrapped Debian base (both
from `make system-deps`); missing both is a failure, not a skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT


def test_image_builds_runs_and_meters() -> None:
    if shutil.which("docker") is None and shutil.which("buildah") is None:
        pytest.fail("neither Docker nor buildah is installed: run `make system-deps` "
                    "(Debian's buildah and debootstrap)")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "image_smoke.py"), "--json"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["uid"] != 0 and facts["output_tokens_metered"] > 0
    assert facts["native_lane"] is True
    assert facts["healthcheck"] == "sidecar health"
    assert set(facts["open_tokenizers"]) == {"deepseek-v4", "qwen", "qwen3.6", "tekken"}
    assert 0 < facts["seconds_to_ready"] < 60 and facts["image_bytes"] > 50_000_000
