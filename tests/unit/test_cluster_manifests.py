"""The Qdrant-cluster manifests (docker/k8s/cluster/): schema-valid, checkov-clean with the whole
docker/k8s/ tree, and wired together: peers, API key, network policy, gateway replicas.

checkov runs from its own venv under .venv/checkov (`make venv` creates it; the Makefile says
why it is kept apart), so the test runs wherever the project's venv was built.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from histoxplain_service.config import _VARIABLES, Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "docker" / "k8s"
CLUSTER = sorted((K8S / "cluster").glob("*.yaml"))
CHECKOV = Path(sys.executable).parent.parent / "checkov" / "bin" / "checkov"
QDRANT_LABELS = {"app.kubernetes.io/name": "qdrant", "app.kubernetes.io/component": "index"}


def _documents(paths: list[Path]) -> list[dict[str, Any]]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def _one(kind: str, name: str, paths: list[Path] = CLUSTER) -> dict[str, Any]:
    (document,) = [d for d in _documents(paths) if d["kind"] == kind and d["metadata"]["name"] == name]
    return document


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
@pytest.mark.parametrize("path", CLUSTER, ids=lambda path: path.name)
def test_cluster_manifests_match_the_kubernetes_schema(path: Path, version: str) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, version, strict=True)


def test_checkov_passes_every_manifest() -> None:
    assert CHECKOV.is_file(), f"checkov is not installed at {CHECKOV}; run `make venv`"
    result = subprocess.run(
        [str(CHECKOV), "--config-file", str(REPO / "docker" / "checkov.yaml"), "-d", str(K8S), "-o", "json"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},  # offline: no policy metadata download
    )
    report = json.loads(result.stdout)
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == [] and result.returncode == 0, failed
    assert report["summary"]["parsing_errors"] == 0
    # the workloads of both set-ups were checked (checkov has no checks for the other kinds)
    scanned = {Path(c["file_path"]).name for c in report["results"]["passed_checks"]}
    assert {"deployment.yaml", "gateway.yaml", "qdrant.yaml"} <= scanned
    # the one per-resource exception, with its reason in the manifest
    skipped = [(c["check_id"], c["resource"]) for c in report["results"]["skipped_checks"]]
    assert skipped == [("CKV_K8S_40", "StatefulSet.default.qdrant")]


def test_qdrant_runs_as_a_three_node_cluster_bootstrapped_from_the_first_peer() -> None:
    statefulset = _one("StatefulSet", "qdrant")
    spec = statefulset["spec"]
    assert spec["replicas"] == 3 and spec["selector"]["matchLabels"] == QDRANT_LABELS
    headless = _one("Service", spec["serviceName"])["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["ports"]} == {6333, 6334, 6335}
    pod = spec["template"]["spec"]
    qdrant = _container(pod, "qdrant")
    env = _env(qdrant)
    assert env["QDRANT__CLUSTER__ENABLED"] == "true" and env["QDRANT__CLUSTER__P2P__PORT"] == "6335"
    assert env["QDRANT__SERVICE__API_KEY"] == {"secretKeyRef": {"name": "histoxplain-qdrant", "key": "api-key"}}
    script = qdrant["args"][0]
    assert f"--bootstrap \"http://{statefulset['metadata']['name']}-0.{spec['serviceName']}:6335\"" in script
    assert '--uri "$peer"' in script and f".{spec['serviceName']}:6335" in script
    assert {p["name"]: p["containerPort"] for p in qdrant["ports"]} == {"http": 6333, "grpc": 6334, "p2p": 6335}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert qdrant[probe]["httpGet"]["port"] == "http"
    assert "memory" in qdrant["resources"]["limits"] and "cpu" in qdrant["resources"]["requests"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    context = qdrant["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    # every path Qdrant writes is a volume: storage from the claim template, the rest scratch
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in qdrant["volumeMounts"]}
    assert mounts[env["QDRANT__STORAGE__STORAGE_PATH"]] == claim["metadata"]["name"]
    assert env["QDRANT__STORAGE__SNAPSHOTS_PATH"] in mounts
    assert str(Path(env["QDRANT_INIT_FILE_PATH"]).parent) in mounts and "/tmp" in mounts
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["labelSelector"]["matchLabels"] == QDRANT_LABELS
    assert _one("PodDisruptionBudget", "qdrant")["spec"]["maxUnavailable"] == 1


def test_network_policy_admits_the_gateway_on_the_api_and_peers_on_p2p_only() -> None:
    gateway_labels = _one("Deployment", "histoxplain")["spec"]["template"]["metadata"]["labels"]
    policy = _one("NetworkPolicy", "qdrant")["spec"]
    assert policy["podSelector"]["matchLabels"] == QDRANT_LABELS
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    admitted = {
        tuple(sorted(rule["from"][0]["podSelector"]["matchLabels"].items())): {p["port"] for p in rule["ports"]}
        for rule in policy["ingress"]
    }
    assert admitted == {
        tuple(sorted(gateway_labels.items())): {6333, 6334},
        tuple(sorted(QDRANT_LABELS.items())): {6335},
    }
    peers, dns = policy["egress"]
    assert peers["to"][0]["podSelector"]["matchLabels"] == QDRANT_LABELS and [p["port"] for p in peers["ports"]] == [6335]
    assert {p["port"] for p in dns["ports"]} == {53}


def test_gateway_replicas_use_the_cluster_with_pixels_in_the_payload() -> None:
    base = _one("ConfigMap", "histoxplain-config", [K8S / "configmap.yaml"])["data"]
    cluster = _one("ConfigMap", "histoxplain-cluster-config")["data"]
    known = {var.env for var in _VARIABLES}
    assert set(cluster) <= known, f"variables the gateway does not read: {sorted(set(cluster) - known)}"
    settings = Settings.from_env({**base, **cluster})  # later envFrom sources win, as in the pod
    url = urlparse(settings.qdrant_url or "")
    qdrant_service = _one("Service", url.hostname or "")
    assert url.port in {p["port"] for p in qdrant_service["spec"]["ports"]}
    assert qdrant_service["spec"]["selector"] == QDRANT_LABELS
    assert settings.tile_pixels == "payload" and settings.replication_factor == 2
    assert settings.shard_number >= _one("StatefulSet", "qdrant")["spec"]["replicas"]
    assert 1 <= settings.write_consistency_factor <= settings.replication_factor

    deployment = _one("Deployment", "histoxplain")
    assert deployment["spec"]["replicas"] >= 3 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    gateway = _container(deployment["spec"]["template"]["spec"], "gateway")
    assert [s["configMapRef"]["name"] for s in gateway["envFrom"]] == ["histoxplain-config", "histoxplain-cluster-config"]
    assert _env(gateway)["QDRANT_API_KEY"] == {"secretKeyRef": {"name": "histoxplain-qdrant", "key": "api-key"}}
    hpa = _one("HorizontalPodAutoscaler", "histoxplain")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "histoxplain"}
    assert hpa["minReplicas"] == deployment["spec"]["replicas"] < hpa["maxReplicas"]
    pdb = _one("PodDisruptionBudget", "histoxplain")["spec"]
    assert pdb["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert pdb["minAvailable"] < hpa["minReplicas"]


def test_cluster_gateway_pod_is_the_single_machine_pod_but_for_the_stated_differences() -> None:
    single = _one("Deployment", "histoxplain", [K8S / "deployment.yaml"])
    cluster = _one("Deployment", "histoxplain")
    assert cluster["metadata"]["labels"] == single["metadata"]["labels"]
    assert cluster["spec"]["selector"] == single["spec"]["selector"]

    def comparable(deployment: dict[str, Any]) -> dict[str, Any]:
        pod = copy.deepcopy(deployment["spec"]["template"])
        pod["spec"].pop("affinity", None)
        gateway = _container(pod["spec"], "gateway")
        gateway["envFrom"] = gateway["envFrom"][:1]
        for entry in gateway.get("env", []):
            entry.get("valueFrom", {}).get("secretKeyRef", {}).pop("optional", None)
        pod["spec"]["volumes"] = [v for v in pod["spec"]["volumes"] if v["name"] != "data"]
        return pod

    assert comparable(cluster) == comparable(single)
    data = next(v for v in cluster["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert "emptyDir" in data  # no PVC: nothing of the index lives in the gateway pod
