"""Build the container image from deploy/Dockerfile and prove it works: it starts, answers
/healthz and /readyz, relays a stream from a mock upstream, meters it on /metrics (with the fast
lane's native core built in), runs as a non-root user, can write its state volume, and its
HEALTHCHECK command succeeds.

With a Docker engine it uses `docker`; without one (these machines, Podman hosts) it uses buildah
with chroot isolation on a Debian base it makes with debootstrap and caches
(~/.cache/token-sidecar, or $SIDECAR_IMAGE_CACHE). Every container, process and temporary image
it starts is removed again, also on failure. Prints the image size and the seconds from start to
/readyz. Exit status 0 on success.

    scripts/image-smoke            # or: make image
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/llm-token-sidecar:smoke"
BASE = "localhost/sidecar-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd"
MIRROR = os.environ.get("SIDECAR_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


class SmokeError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"image-smoke: {msg}", flush=True)


def run(*cmd: str, check: bool = True, capture: bool = True) -> str:
    done = subprocess.run(cmd, check=False, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)
    if check and done.returncode != 0:
        raise SmokeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout or ''}")
    return done.stdout or ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker_available() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, check=False).returncode == 0


# -- building ------------------------------------------------------------------------------------


def buildah_base(cache: Path) -> str:
    """A Debian bookworm base with Python, made once with debootstrap and kept in buildah's
    storage (and as a tarball in the cache, for a storage that was reset)."""
    if run("buildah", "images", "-q", BASE, check=False).strip():
        return BASE
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / "base-bookworm.tar"
    if not tarball.exists():
        log(f"making the base with debootstrap ({MIRROR}; about a minute)")
        with tempfile.TemporaryDirectory(prefix="sidecar-base-") as tmp:
            run("debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
                tmp, MIRROR)
            with tarfile.open(f"{tarball}.part", "w") as tar:
                tar.add(tmp, arcname=".")
        os.replace(f"{tarball}.part", tarball)
    ctr = run("buildah", "from", "scratch").strip()
    try:
        run("buildah", "add", ctr, str(tarball), "/")
        run("buildah", "commit", "-q", ctr, BASE)
    finally:
        run("buildah", "rm", ctr, check=False)
    return BASE


def build(engine: str, cache: Path) -> None:
    secret = ["--secret", f"id=pip-ca,src={HOST_CA}"] if HOST_CA.exists() else []
    if engine == "docker":
        run("docker", "build", *secret, "-f", "deploy/Dockerfile", "-t", IMAGE, str(ROOT),
            capture=False)
        return
    base = buildah_base(cache)
    log("building deploy/Dockerfile with buildah (chroot isolation)")
    run("buildah", "bud", "--format", "docker", "--isolation", "chroot", "--layers",
        "--force-rm", *secret,
        "--build-arg", f"PYTHON_IMAGE={base}", "-t", IMAGE, "-f", "deploy/Dockerfile",
        str(ROOT))


def image_facts(engine: str) -> tuple[int, dict[str, Any]]:
    """(size in bytes, the image's Docker config)."""
    if engine == "docker":
        info = json.loads(run("docker", "image", "inspect", IMAGE))[0]
        return int(info["Size"]), info["Config"]
    info = json.loads(run("buildah", "inspect", "--type", "image", IMAGE))
    shown = json.loads(run("buildah", "images", "--json", IMAGE))[0]["size"]  # e.g. "371 MB"
    number, unit = shown.split()
    scale = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    return int(float(number) * scale), info["Docker"]["config"]


# -- running -------------------------------------------------------------------------------------


# What the containers print, shown when the smoke test fails.
OUTPUT = tempfile.TemporaryFile()


@contextlib.contextmanager
def container(engine: str, cmd: list[str], env: dict[str, str]) -> Iterator[
        tuple[subprocess.Popen[bytes], list[str]]]:
    """The image running ``cmd`` on the host network; yields (process, argv prefix to run more
    commands in the same container). Removed on the way out, whatever happened."""
    envs = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    if engine == "docker":
        name = f"sidecar-smoke-{os.getpid()}"
        proc = subprocess.Popen(["docker", "run", "--rm", "--name", name, "--network", "host",
                                 *envs, IMAGE, *cmd], start_new_session=True, stdout=OUTPUT,
                                stderr=subprocess.STDOUT)
        try:
            yield proc, ["docker", "exec", name]
        finally:
            run("docker", "rm", "-f", name, check=False)
            _stop(proc)
        return
    ctr = run("buildah", "from", IMAGE).strip()
    benv = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
    prefix = ["buildah", "run", "--isolation", "chroot", "--network", "host", *benv, ctr, "--"]
    proc = subprocess.Popen([*prefix, "sidecar", *cmd], start_new_session=True, stdout=OUTPUT,
                            stderr=subprocess.STDOUT)
    try:
        yield proc, prefix
    finally:
        _stop(proc)
        run("buildah", "rm", ctr, check=False)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.asynccontextmanager
async def mock_upstream() -> AsyncIterator[str]:
    from aiohttp import web

    sys.path.insert(0, str(ROOT))
    from sidecar.mock_upstream import make_mock_app

    runner = web.AppRunner(make_mock_app(pace=0.002), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def check_running(engine: str) -> dict[str, Any]:
    import aiohttp

    facts: dict[str, Any] = {}
    proxy, metrics = free_port(), free_port()
    async with mock_upstream() as upstream:
        env = {"SIDECAR_UPSTREAM": upstream, "SIDECAR_LISTEN": f"127.0.0.1:{proxy}",
               "SIDECAR_METRICS_LISTEN": f"127.0.0.1:{metrics}", "SIDECAR_RECORDS": "off",
               # No network at run time: the baked encodings must be enough.
               "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
        started = time.monotonic()
        with container(engine, ["run"], env) as (proc, exec_prefix):
            base = f"http://127.0.0.1:{metrics}"
            async with aiohttp.ClientSession() as s:
                ready = await _wait_ready(s, base, proc)
                facts["seconds_to_ready"] = round(ready - started, 2)
                async with s.get(base + "/healthz") as r:
                    if r.status != 200:
                        raise SmokeError(f"/healthz answered {r.status}")
                body = {"model": "gpt-4o-mini", "stream": True,
                        "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": "hello"}]}
                async with s.post(f"http://127.0.0.1:{proxy}/v1/chat/completions",
                                  json=body) as r:
                    streamed = await r.read()
                if r.status != 200 or b"data: [DONE]" not in streamed:
                    raise SmokeError(f"the stream did not come through: {r.status}")
                async with s.get(base + "/metrics") as r:
                    text = await r.text()
                tokens = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                             if line.startswith("llm_tokens_total{")
                             and 'token_type="output"' in line)
                if tokens <= 0:
                    raise SmokeError("no output tokens metered on /metrics")
                facts["output_tokens_metered"] = tokens
                # The build stage has a C compiler: the fast lane's native core is in the image.
                if 'native_lane="true"' not in text:
                    raise SmokeError("the image's fast lane has no native core "
                                     "(llm_sidecar_build_info says native_lane=\"false\")")
                facts["native_lane"] = True
            size, config = image_facts(engine)
            facts["image_bytes"] = size
            test = (config.get("Healthcheck") or {}).get("Test") or []
            if not test or test[0] not in ("CMD", "CMD-SHELL"):
                raise SmokeError(f"the image has no HEALTHCHECK command: {test!r}")
            cmd = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
            facts["healthcheck"] = " ".join(cmd)
            # The HEALTHCHECK itself, in the image's environment, beside the running sidecar
            # (a second `buildah run` in one working container stops the first: a sibling).
            if engine == "docker":
                run(*exec_prefix, *cmd)
            else:
                sibling = run("buildah", "from", IMAGE).strip()
                try:
                    run("buildah", "run", "--isolation", "chroot", "--network", "host",
                        *[a for k, v in env.items() for a in ("--env", f"{k}={v}")], sibling,
                        "--", *cmd)
                finally:
                    run("buildah", "rm", sibling, check=False)
    # As the image's own user, in a fresh container: not root, and the state volume writable.
    with container(engine, ["--help"], {}) as (proc, exec_prefix):
        proc.wait(60)
        if engine == "docker":  # the --help run has ended: a new one with the same user
            exec_prefix = ["docker", "run", "--rm", "--entrypoint", "", IMAGE]
        uid = run(*exec_prefix, "id", "-u").strip()
        if uid in ("", "0"):
            raise SmokeError(f"the image runs as uid {uid!r}, not a non-root user")
        facts["uid"] = int(uid)
        state = run(*exec_prefix, "sh", "-c", "touch /var/lib/sidecar/.smoke && "
                    "rm /var/lib/sidecar/.smoke && echo writable", check=False)
        if "writable" not in state:
            raise SmokeError(f"the state volume /var/lib/sidecar is not writable: {state}")
        # The tokenizers extra is in the image: every open vocabulary loads, offline, verified.
        loaded = json.loads(run(*exec_prefix, "sidecar", "tokenizers", "--load", "--json"))
        if not all(row.get("loaded") for row in loaded):
            raise SmokeError(f"open tokenizers did not load in the image: {loaded}")
        facts["open_tokenizers"] = {row["name"]: row["rss_mb"] for row in loaded}
    return facts


async def _wait_ready(s: Any, base: str, proc: subprocess.Popen[bytes]) -> float:
    import aiohttp

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SmokeError(f"the container exited with status {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with s.get(base + "/readyz") as r:
                if r.status == 200:
                    return time.monotonic()
        await asyncio.sleep(0.05)
    raise SmokeError("/readyz did not answer 200 within 60 s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["auto", "docker", "buildah"], default="auto")
    p.add_argument("--keep-image", action="store_true", help="keep the built image")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = p.parse_args()
    engine = args.engine
    if engine == "auto":
        engine = "docker" if docker_available() else "buildah"
    if engine == "buildah" and (shutil.which("buildah") is None
                                or shutil.which("debootstrap") is None):
        print("image-smoke: needs a Docker engine, or buildah and debootstrap "
              "(Debian packages; `make system-deps` installs them)", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("SIDECAR_IMAGE_CACHE")
                 or Path.home() / ".cache" / "token-sidecar")
    t0 = time.monotonic()
    try:
        build(engine, cache)
        built = time.monotonic() - t0
        facts = asyncio.run(check_running(engine))
        facts.update(engine=engine, build_seconds=round(built, 1))
    except SmokeError as exc:
        OUTPUT.seek(0)
        shown = OUTPUT.read().decode(errors="replace")[-4000:]
        print(f"image-smoke: FAILED: {exc}\n--- container output ---\n{shown}", file=sys.stderr)
        return 1
    finally:
        tool = "docker" if engine == "docker" else "buildah"
        if not args.keep_image:
            run(tool, "rmi", IMAGE, check=False)
        if engine == "buildah":  # intermediate layers of earlier builds: bounded disk
            run("buildah", "rmi", "--prune", check=False)
    if args.json:
        print(json.dumps(facts))
    else:
        log(f"ok: {engine}, image {facts['image_bytes'] / 1e6:.0f} MB, built in "
            f"{facts['build_seconds']} s, ready {facts['seconds_to_ready']} s after start, "
            f"uid {facts['uid']}, {facts['output_tokens_metered']:.0f} output tokens metered, "
            f"HEALTHCHECK `{facts['healthcheck']}` passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
