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
import hashlib
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


def call(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a command with its output kept apart: callers decide on the exit status (and read
    stdout), never on what was printed. An error on stderr is not an answer on stdout."""
    return subprocess.run(cmd, check=False, text=True, capture_output=True)


def run(*cmd: str, check: bool = True, capture: bool = True) -> str:
    """stdout of a command that must succeed (``check``); a failure raises with everything it
    printed."""
    if not capture:
        code = subprocess.run(cmd, check=False).returncode
        if check and code != 0:
            raise SmokeError(f"{' '.join(cmd)} failed ({code})")
        return ""
    done = call(*cmd)
    if check and done.returncode != 0:
        raise SmokeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                         f"{done.stdout}{done.stderr}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker_available() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, check=False).returncode == 0


# -- building ------------------------------------------------------------------------------------


def base_recipe() -> str:
    """What the base is made of: a cached tarball made from another recipe is not this base."""
    return hashlib.sha256(f"bookworm|minbase|{BASE_PACKAGES}|{MIRROR}".encode()).hexdigest()[:12]


def base_exists() -> bool:
    """Whether buildah's storage holds the base: the exit status of `buildah inspect` decides
    (0: found; 125: not known, or the storage could not be read)."""
    return call("buildah", "inspect", "--type", "image", BASE).returncode == 0


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def cached_tarball(cache: Path) -> Path | None:
    """The cached base tarball of this recipe, if it is whole: its SHA-256 matches the one
    written beside it when it was made. A tarball that does not match is removed."""
    tarball = cache / f"base-bookworm-{base_recipe()}.tar"
    digest = tarball.with_suffix(".tar.sha256")
    if not tarball.is_file() or not digest.is_file():
        return None
    if digest.read_text().strip() == sha256_of(tarball):
        return tarball
    log(f"the cached base {tarball} does not match its SHA-256: making it again")
    discard(tarball)
    return None


def discard(tarball: Path) -> None:
    for path in (tarball, tarball.with_suffix(".tar.sha256")):
        path.unlink(missing_ok=True)


def make_tarball(cache: Path) -> Path:
    """Debian bookworm with Python, made with debootstrap, as a tarball and its SHA-256."""
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"base-bookworm-{base_recipe()}.tar"
    log(f"making the base with debootstrap ({MIRROR}; about a minute)")
    with tempfile.TemporaryDirectory(prefix="sidecar-base-") as tmp:
        run("debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
            tmp, MIRROR)
        with tarfile.open(f"{tarball}.part", "w") as tar:
            tar.add(tmp, arcname=".")
    os.replace(f"{tarball}.part", tarball)
    tarball.with_suffix(".tar.sha256").write_text(sha256_of(tarball) + "\n")
    return tarball


def import_base(tarball: Path) -> None:
    ctr = run("buildah", "from", "scratch").strip()
    try:
        run("buildah", "add", ctr, str(tarball), "/")
        run("buildah", "commit", "-q", ctr, BASE)
    finally:
        run("buildah", "rm", ctr, check=False)


def buildah_base(cache: Path) -> str:
    """A Debian bookworm base with Python in buildah's storage: reused when the storage has
    it, else imported from the cached tarball (checked by its SHA-256), else made with
    debootstrap. A cached tarball that does not import is made again, once."""
    if base_exists():
        log(f"reusing {BASE} from buildah's storage")
        return BASE
    tarball = cached_tarball(cache)
    if tarball is not None:
        log(f"importing the cached base {tarball}")
        try:
            import_base(tarball)
            return BASE
        except SmokeError as exc:
            log(f"the cached base did not import ({exc}); making it again")
            discard(tarball)
    import_base(make_tarball(cache))
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


class _Output:
    """What the containers print, shown when the smoke test fails (a file made on first use:
    importing this module opens nothing)."""

    file: Any = None

    def get(self) -> Any:
        if self.file is None:
            self.file = tempfile.TemporaryFile()
        return self.file

    def tail(self) -> str:
        if self.file is None:
            return ""
        self.file.seek(0)
        return str(self.file.read().decode(errors="replace")[-4000:])


OUTPUT = _Output()


@contextlib.contextmanager
def container(engine: str, cmd: list[str], env: dict[str, str]) -> Iterator[
        tuple[subprocess.Popen[bytes], list[str]]]:
    """The image running ``cmd`` on the host network; yields (process, argv prefix to run more
    commands in the same container). Removed on the way out, whatever happened."""
    envs = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    if engine == "docker":
        name = f"sidecar-smoke-{os.getpid()}"
        proc = subprocess.Popen(["docker", "run", "--rm", "--name", name, "--network", "host",
                                 *envs, IMAGE, *cmd], start_new_session=True, stdout=OUTPUT.get(),
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
    proc = subprocess.Popen([*prefix, "sidecar", *cmd], start_new_session=True, stdout=OUTPUT.get(),
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
        state = call(*exec_prefix, "sh", "-c", "touch /var/lib/sidecar/.smoke && "
                     "rm /var/lib/sidecar/.smoke")
        if state.returncode != 0:
            raise SmokeError("the state volume /var/lib/sidecar is not writable: "
                             f"{state.stdout}{state.stderr}")
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


def check_base() -> dict[str, Any]:
    """The base in buildah's storage runs the Python the build stage needs."""
    ctr = run("buildah", "from", BASE).strip()
    try:
        version = run("buildah", "run", "--isolation", "chroot", ctr, "--", "python3", "-c",
                      "import ssl, sys, venv; print(sys.version.split()[0])").strip()
    finally:
        run("buildah", "rm", ctr, check=False)
    return {"base": BASE, "base_python": version}


@contextlib.contextmanager
def fresh_storage() -> Iterator[Path]:
    """An empty container storage of its own (CONTAINERS_STORAGE_CONF), as on a machine that
    has never built anything; removed afterwards with everything in it."""
    root = Path(tempfile.mkdtemp(prefix="sidecar-storage-"))
    conf = root / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "graph"}"\n'
                    f'runroot = "{root / "run"}"\n')
    before = os.environ.get("CONTAINERS_STORAGE_CONF")
    os.environ["CONTAINERS_STORAGE_CONF"] = str(conf)
    try:
        yield root
    finally:
        run("buildah", "rm", "--all", check=False)
        run("buildah", "rmi", "--all", "--force", check=False)
        for mount in mounts_under(root):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        if before is None:
            os.environ.pop("CONTAINERS_STORAGE_CONF", None)
        else:
            os.environ["CONTAINERS_STORAGE_CONF"] = before
        shutil.rmtree(root, ignore_errors=True)


def mounts_under(root: Path) -> list[str]:
    """Mount points below ``root``, deepest first (the storage driver may leave some)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[4] for line in lines if len(line.split()) > 4]
    return sorted((m for m in points if m.startswith(f"{root}/")), key=len, reverse=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["auto", "docker", "buildah"], default="auto")
    p.add_argument("--keep-image", action="store_true", help="keep the built image")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.add_argument("--fresh-storage", action="store_true",
                   help="buildah: use an empty container storage of its own (a temporary "
                        "CONTAINERS_STORAGE_CONF), removed afterwards")
    p.add_argument("--base-only", action="store_true",
                   help="buildah: only make (or import) the Debian base and check that it runs "
                        "Python; build no image")
    args = p.parse_args()
    engine = args.engine
    if engine == "auto":
        engine = "buildah" if args.base_only or args.fresh_storage or not docker_available() \
            else "docker"
    if engine == "buildah" and (shutil.which("buildah") is None
                                or shutil.which("debootstrap") is None):
        print("image-smoke: needs a Docker engine, or buildah and debootstrap "
              "(Debian packages; `make system-deps` installs them)", file=sys.stderr)
        return 2
    if engine == "docker" and (args.base_only or args.fresh_storage):
        print("image-smoke: --base-only and --fresh-storage are for buildah", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("SIDECAR_IMAGE_CACHE")
                 or Path.home() / ".cache" / "token-sidecar")
    with fresh_storage() if args.fresh_storage else contextlib.nullcontext():
        if args.base_only:
            try:
                t0 = time.monotonic()
                buildah_base(cache)
                facts = {**check_base(), "engine": engine,
                         "base_seconds": round(time.monotonic() - t0, 1)}
            except SmokeError as exc:
                print(f"image-smoke: FAILED: {exc}", file=sys.stderr)
                return 1
            print(json.dumps(facts) if args.json else f"image-smoke: ok: {facts}")
            return 0
        return smoke(engine, cache, args.keep_image, args.json)


def smoke(engine: str, cache: Path, keep_image: bool, as_json: bool) -> int:
    t0 = time.monotonic()
    try:
        build(engine, cache)
        built = time.monotonic() - t0
        facts = asyncio.run(check_running(engine))
        facts.update(engine=engine, build_seconds=round(built, 1))
    except SmokeError as exc:
        shown = OUTPUT.tail()
        print(f"image-smoke: FAILED: {exc}\n--- container output ---\n{shown}", file=sys.stderr)
        return 1
    finally:
        tool = "docker" if engine == "docker" else "buildah"
        if not keep_image:
            run(tool, "rmi", IMAGE, check=False)
        if engine == "buildah":  # intermediate layers of earlier builds: bounded disk
            run("buildah", "rmi", "--prune", check=False)
    if as_json:
        print(json.dumps(facts))
    else:
        log(f"ok: {engine}, image {facts['image_bytes'] / 1e6:.0f} MB, built in "
            f"{facts['build_seconds']} s, ready {facts['seconds_to_ready']} s after start, "
            f"uid {facts['uid']}, {facts['output_tokens_metered']:.0f} output tokens metered, "
            f"HEALTHCHECK `{facts['healthcheck']}` passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
