"""The container image, built from deploy/Dockerfile and run (scripts/image_smoke.py): it starts,
answers /healthz and /readyz, relays and meters a stream with no network but the loopback, runs
as a non-root user with a writable state volume, and its HEALTHCHECK passes. And the Debian base
the buildah path builds on, made in an empty container storage, as on a machine that never built
the image.

Built with Docker where an engine runs, else with buildah on a debootstrapped Debian base (both
from `make system-deps`); missing both is a failure, not a skip. Both checks run in the
background from the start of the session (conftest.ImageJobs); these tests wait for them.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .conftest import IMAGE_JOBS


def _needs_builder() -> None:
    if shutil.which("docker") is None and shutil.which("buildah") is None:
        pytest.fail("neither Docker nor buildah is installed: run `make system-deps` "
                    "(Debian's buildah and debootstrap)")


def test_base_is_made_in_an_empty_container_storage() -> None:
    if shutil.which("docker") is not None and subprocess.run(
            ["docker", "info"], capture_output=True, check=False).returncode == 0:
        pytest.skip("a Docker engine builds the image here: the buildah base is not used")
    if shutil.which("buildah") is None or shutil.which("debootstrap") is None:
        pytest.fail("buildah or debootstrap is missing: run `make system-deps`")
    done = IMAGE_JOBS.result("base")
    assert done.returncode == 0, done.stdout + done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["base"] == "localhost/sidecar-base:bookworm"
    assert facts["base_python"].startswith("3.11.")
    # Never found in an empty storage: imported from the verified cache, or made anew.
    assert "reusing" not in done.stdout, done.stdout


def test_image_builds_runs_and_meters() -> None:
    _needs_builder()
    done = IMAGE_JOBS.result("image")
    assert done.returncode == 0, done.stdout + done.stderr
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["uid"] != 0 and facts["output_tokens_metered"] > 0
    assert facts["native_lane"] is True
    assert facts["healthcheck"] == "sidecar health"
    assert set(facts["open_tokenizers"]) == {"deepseek-v4", "qwen", "qwen3.6", "tekken"}
    assert 0 < facts["seconds_to_ready"] < 60 and facts["image_bytes"] > 50_000_000
