"""deploy/: Dockerfile lint and offline encodings, compose, Kubernetes, Helm, copies in sync.

A Docker engine and Helm are not available on the build machine: the Dockerfile is linted with
hadolint, manifests validated against the Kubernetes schemas, and the chart checked for
template/values consistency.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import load_settings

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "llm-token-sidecar"
RULES = DEPLOY / "prometheus" / "rules" / "llm-sidecar.rules.yml"


class _TagLoader(yaml.SafeLoader):
    """Compose files may use compose-spec tags such as !reset."""


_TagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _load_all(path: Path) -> list[Any]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_TagLoader) if d]


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: pip install -e '.[test]' (make test does)")
    return found


def test_dockerfile_passes_hadolint_and_has_the_essentials() -> None:
    res = subprocess.run([_bin("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # multi-stage
    assert re.search(r"^USER 10001", text, re.M)  # non-root
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert "python -m sidecar.tokens --bake" in text and "TIKTOKEN_CACHE_DIR=/opt/tiktoken" in text


def test_baked_encodings_load_with_no_network(tmp_path: Path) -> None:
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "sidecar.tokens", "--bake"], env=env, check=True,
                   capture_output=True)
    # tiktoken alone, every proxy pointing nowhere: only the baked cache can satisfy it.
    env.update({"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"})
    code = ("import tiktoken; print(tiktoken.get_encoding('o200k_base').encode('hi there'), "
            "tiktoken.get_encoding('cl100k_base').encode('hi there'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[3686, 1354] [6151, 1070]"


def test_yaml_lint() -> None:
    cfg = ("{extends: default, rules: {line-length: {max: 120}, document-start: disable, "
           "truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}, "
           "braces: {max-spaces-inside: 1}, brackets: {max-spaces-inside: 1}, "
           "indentation: {indent-sequences: whatever}}}")
    files = [p for p in list(DEPLOY.rglob("*.y*ml")) + list((ROOT / "grafana").rglob("*.yml"))
             if "templates" not in p.parts]
    res = subprocess.run([_bin("yamllint"), "-d", cfg, "-f", "parsable", *map(str, files)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout


def test_kubernetes_manifests_match_the_schemas() -> None:
    files = [DEPLOY / "kubernetes" / "sidecar-in-gateway-pod.yaml",
             DEPLOY / "kubernetes" / "standalone.yaml"]
    res = subprocess.run([_bin("kubernetes-validate"), "--strict", "--quiet",
                          *map(str, files)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    kinds = {d["kind"] for f in files for d in _load_all(f)}
    assert {"Deployment", "Service", "ConfigMap"} <= kinds
    pod = _load_all(files[0])[1]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["one-api", "llm-sidecar"]


def test_embedded_sidecar_configs_are_valid() -> None:
    """Every sidecar config shipped in deploy/ passes the sidecar's own validation."""
    configs: list[str] = []
    for f in (DEPLOY / "kubernetes").glob("*.yaml"):
        configs += [d["data"]["sidecar.yaml"] for d in _load_all(f) if d["kind"] == "ConfigMap"]
    configs += [(DEPLOY / "compose" / name).read_text()
                for name in ("sidecar.yaml", "sidecar.provider.yaml")]
    for i, text in enumerate(configs):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sidecar-deploy-check-{os.getpid()}-{i}"
        path.write_text(text)
        try:
            settings = load_settings(str(path), env={"SIDECAR_UPSTREAM": "http://gateway:3000"})
        finally:
            path.unlink()
        assert settings.upstream


def test_compose_mounts_builds_and_scrape_target_exist() -> None:
    base = _load_all(DEPLOY / "compose" / "docker-compose.yml")[0]
    over = _load_all(DEPLOY / "compose" / "docker-compose.provider.yml")[0]
    compose_dir = DEPLOY / "compose"
    for doc in (base, over):
        for name, svc in doc["services"].items():
            for vol in svc.get("volumes", []):
                src = vol.split(":", 1)[0]
                if src.startswith("."):
                    assert (compose_dir / src).exists(), f"{name}: {src} does not exist"
    build = base["services"]["sidecar"]["build"]
    assert (compose_dir / build["context"] / build["dockerfile"]).exists()
    assert set(over["services"]) <= set(base["services"])
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "llm-sidecar"  # the rules' LLMSidecarDown selects this job
    assert job["static_configs"][0]["targets"] == ["sidecar:9464"]
    assert "sidecar" in base["services"] and "alertmanager" in base["services"]


def test_rule_copies_are_identical() -> None:
    rules = yaml.safe_load(RULES.read_text())
    operator = _load_all(DEPLOY / "kubernetes" / "prometheusrule.yaml")[0]
    assert operator["kind"] == "PrometheusRule" and operator["spec"] == rules
    assert (CHART / "files" / "llm-sidecar.rules.yml").read_text() == RULES.read_text()


def _flatten(tree: Any, prefix: str = "") -> set[str]:
    out = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.add(prefix + k)
            out |= _flatten(v, prefix + k + ".")
    return out


def test_helm_templates_use_only_documented_values() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] and chart["version"]
    values = _flatten(yaml.safe_load((CHART / "values.yaml").read_text()))
    used = set()
    for tpl in (CHART / "templates").iterdir():
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", tpl.read_text()))
    missing = {u for u in used if u not in values}
    assert not missing, f"templates use values not in values.yaml: {missing}"
    for required in ("serviceMonitor.enabled", "prometheusRule.enabled", "gateway.enabled",
                     "state.url"):
        assert required in used
    # Every top-level key is explained: a comment just above it or inside its section.
    sections = re.split(r"\n(?=[A-Za-z])", (CHART / "values.yaml").read_text())
    for section, before in zip(sections[1:], sections, strict=False):
        key = section.split(":", 1)[0]
        comment_above = before.rstrip().splitlines()[-1].startswith("#")
        assert "#" in section or comment_above, f"values.yaml: {key} is not documented"
