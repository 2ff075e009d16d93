"""The Kubernetes pod of ``docker/k8s/``, run for real as a podman pod (``docker/smoke-test.sh``).

Every setting of the containers comes from ``docker/k8s/deployment.yaml`` and the ConfigMap it
references, read here, so the test and the manifests cannot drift apart: the images, the order
(the native sidecar first, the gateway once the sidecar's startup probe passes), the environment
(``envFrom`` + ``env``; optional secret references left out as Kubernetes does), the volumes
(emptyDirs and the PVC as fresh folders owned by ``fsGroup``, Secrets as read-only folders of
``defaultMode`` files, generated here: a CA, a server certificate for 127.0.0.1, an API token;
an optional Secret it does not make, the PACS's, as the empty folder Kubernetes mounts),
the user, group and ``fsGroup``, the read-only root file system (no tmpfs either), the dropped
capabilities, ``no-new-privileges``, the memory limits, the probes, the preStop hook and the
grace period. A podman pod shares one network namespace (one loopback) like the Kubernetes pod.

Checks, in order (any failure exits 1 with both containers' logs):

1. the sidecar's startup probe passes, then the gateway's readiness probe (gRPC health of
   ``histoxplain.v1.RetrievalService``) reports SERVING, and every probe the manifest declares
   answers (gRPC probes from the host through the published health port, as the kubelet does;
   exec probes inside their container);
2. an SDK round trip from the host over TLS with a bearer token through the published API port:
   index four tiles of scikit-image's IHC image, search (the indexed tile finds itself), explain;
   a call without a token is refused (UNAUTHENTICATED);
3. only the gateway's declared ports listen beyond loopback (``/proc/net/tcp`` of the pod), the
   host reaches them at the pod's address and reaches none of TorchServe's, and the pod publishes
   nothing else;
4. the stop Kubernetes does: a SmoothGrad call in flight, the preStop hook, then SIGTERM with the
   rest of the grace period (``podman stop -t``): the call completes after SIGTERM, the gateway
   exits 0 within a third of its timeout; then the sidecar gets SIGTERM and exits 0 within a third
   of what is left (not at a SIGKILL deadline).

    .venv/bin/python docker/smoke_test.py [--gateway-image IMG] [--torchserve-image IMG] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"
SERVING = health_pb2.HealthCheckResponse.SERVING

# What each Secret file holds, by the gateway variable that names it (docs/SERVING.md "Security").
SECRET_FILES = (
    "HISTOXPLAIN_TLS_CERT",
    "HISTOXPLAIN_TLS_KEY",
    "HISTOXPLAIN_TLS_CLIENT_CA",
    "HISTOXPLAIN_AUTH_TOKENS_FILE",
)


class SmokeTestFailure(Exception):
    """A check failed; the message says which and what was seen."""


def log(message: str) -> None:
    print(f"[smoke-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise SmokeTestFailure(f"podman {' '.join(args[:3])} ... failed ({result.returncode}): {result.stderr.strip()}")
    return result


# -- the manifests -------------------------------------------------------------------------------


@dataclass
class Manifests:
    pod: dict[str, Any]
    config_maps: dict[str, dict[str, str]]
    services: list[dict[str, Any]]

    @classmethod
    def load(cls, folder: Path = K8S) -> Manifests:
        documents = [
            doc for path in sorted(folder.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
        ]
        (deployment,) = [doc for doc in documents if doc["kind"] == "Deployment"]
        config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in documents if doc["kind"] == "ConfigMap"}
        services = [doc for doc in documents if doc["kind"] == "Service"]
        return cls(deployment["spec"]["template"]["spec"], config_maps, services)

    def containers(self) -> list[dict[str, Any]]:
        """Sidecars (init containers with restartPolicy Always) first, as Kubernetes starts them."""
        init = self.pod.get("initContainers", [])
        if any(c.get("restartPolicy") != "Always" for c in init):
            raise SmokeTestFailure("a plain init container: the smoke test runs native sidecars only")
        return [*init, *self.pod["containers"]]

    def environment(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update({k: str(v) for k, v in self.config_maps[source["configMapRef"]["name"]].items()})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "configMapKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["configMapKeyRef"]
                env[item["name"]] = self.config_maps[ref["name"]][ref["key"]]
            elif item.get("valueFrom", {}).get("secretKeyRef", {}).get("optional"):
                continue  # an optional Secret that does not exist: Kubernetes leaves the variable unset
            else:
                raise SmokeTestFailure(f"env {item['name']}: a source the smoke test cannot provide")
        return env

    def published_ports(self, container: dict[str, Any]) -> dict[int, str]:
        """containerPort -> why: the ports a Service targets and the ports the kubelet probes."""
        named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        ports: dict[int, str] = {}
        for service in self.services:
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                number = named.get(target, target) if isinstance(target, str) else target
                if number in named.values() or number in [p["containerPort"] for p in container.get("ports", [])]:
                    ports[int(number)] = f"Service {service['metadata']['name']}"
        for probe in probes(container).values():
            if "grpc" in probe:
                ports[int(probe["grpc"]["port"])] = "kubelet probes"
        return ports


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    if not match or (match[2] and match[2] not in units):
        raise SmokeTestFailure(f"memory quantity {quantity!r}")
    return int(float(match[1]) * units.get(match[2], 1))


# -- Secrets: a CA, a server certificate for 127.0.0.1 and an API token ------------------------------


@dataclass
class Credentials:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    token: str

    @classmethod
    def generate(cls) -> Credentials:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "histoxplain smoke-test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        return cls(
            ca_pem=ca.public_bytes(pem),
            cert_pem=cert.public_bytes(pem),
            key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            token=secrets.token_urlsafe(32),
        )

    def file_for(self, variable: str) -> bytes:
        token_hash = hashlib.sha256(self.token.encode()).hexdigest()
        return {
            "HISTOXPLAIN_TLS_CERT": self.cert_pem,
            "HISTOXPLAIN_TLS_KEY": self.key_pem,
            "HISTOXPLAIN_TLS_CLIENT_CA": self.ca_pem,
            "HISTOXPLAIN_AUTH_TOKENS_FILE": f"{token_hash} writer smoke-test\n".encode(),
        }[variable]


# -- the pod -------------------------------------------------------------------------------------


@dataclass
class Container:
    spec: dict[str, Any]
    name: str
    env: dict[str, str]
    published: dict[int, int] = field(default_factory=dict)  # containerPort -> host port

    @property
    def sidecar(self) -> bool:
        return self.spec.get("restartPolicy") == "Always"


class Pod:
    """The Deployment's pod template as a podman pod; ``remove()`` always cleans up."""

    def __init__(self, manifests: Manifests, images: dict[str, str], work: Path, credentials: Credentials) -> None:
        self.manifests = manifests
        self.images = images
        self.work = work
        self.credentials = credentials
        self.name = f"histoxplain-smoke-{os.getpid()}"
        pod_context = manifests.pod.get("securityContext", {})
        self.uid = int(pod_context["runAsUser"])
        self.gid = int(pod_context.get("runAsGroup", self.uid))
        self.fs_group = pod_context.get("fsGroup")
        self.containers = [
            Container(spec, spec["name"], manifests.environment(spec)) for spec in manifests.containers()
        ]
        self.volumes = self._make_volumes()

    def podman_name(self, container: Container) -> str:
        return f"{self.name}-{container.name}"

    # Volumes: what the kubelet would mount, as host folders.
    def _make_volumes(self) -> dict[str, Path]:
        folders: dict[str, Path] = {}
        group = int(self.fs_group) if self.fs_group is not None else self.gid
        for volume in self.manifests.pod.get("volumes", []):
            folder = self.work / "volumes" / volume["name"]
            folder.mkdir(parents=True)
            if "emptyDir" in volume or "persistentVolumeClaim" in volume:
                # emptyDir: mode 0777; fsGroup: group-owned and setgid (the kubelet's ownership change).
                os.chown(folder, 0, group)
                folder.chmod(0o2777 if "emptyDir" in volume else 0o2775)
            elif "secret" in volume:
                self._fill_secret(volume, folder, group)
            else:
                raise SmokeTestFailure(f"volume {volume['name']}: a kind the smoke test cannot provide")
            folders[volume["name"]] = folder
        return folders

    def _fill_secret(self, volume: dict[str, Any], folder: Path, group: int) -> None:
        mounts = [
            mount["mountPath"]
            for c in self.containers
            for mount in c.spec.get("volumeMounts", [])
            if mount["name"] == volume["name"]
        ]
        files: dict[str, bytes] = {}
        for container in self.containers:
            for variable in SECRET_FILES:
                path = container.env.get(variable)
                if path and any(path.startswith(mount.rstrip("/") + "/") for mount in mounts):
                    files[Path(path).name] = self.credentials.file_for(variable)
        if not files and volume["secret"].get("optional"):
            # an optional Secret the smoke test does not make (the PACS's): Kubernetes mounts an empty folder
            os.chown(folder, 0, group)
            folder.chmod(0o755)
            return
        if not files:
            raise SmokeTestFailure(f"Secret {volume['secret']['secretName']}: no gateway setting names a file in it")
        mode = int(volume["secret"].get("defaultMode", 0o644))
        for name, content in files.items():
            (folder / name).write_bytes(content)
            os.chown(folder / name, 0, group)  # Secret files: root-owned, group fsGroup
            (folder / name).chmod(mode)
        folder.chmod(0o755)

    def create(self) -> None:
        publish: list[str] = []
        for container in self.containers:
            if container.sidecar:
                continue
            for container_port in self.manifests.published_ports(container.spec):
                container.published[container_port] = free_port()
                publish += ["--publish", f"127.0.0.1:{container.published[container_port]}:{container_port}"]
        podman("pod", "create", "--name", self.name, *publish)

    def run(self, container: Container) -> None:
        spec = container.spec
        context = {**self.manifests.pod.get("securityContext", {}), **spec.get("securityContext", {})}
        args = ["run", "--detach", "--pull=never", "--pod", self.name, "--name", self.podman_name(container)]
        args += ["--user", f"{context.get('runAsUser', self.uid)}:{context.get('runAsGroup', self.gid)}"]
        if self.fs_group is not None:
            args += ["--group-add", str(self.fs_group)]
        if context.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]  # Kubernetes adds no tmpfs either
        if context.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        capabilities = context.get("capabilities", {})
        args += [f"--cap-drop={cap.lower()}" for cap in capabilities.get("drop", [])]
        args += [f"--cap-add={cap.lower()}" for cap in capabilities.get("add", [])]
        if context.get("seccompProfile", {}).get("type", "RuntimeDefault") != "RuntimeDefault":
            raise SmokeTestFailure(f"{container.name}: only the RuntimeDefault seccomp profile is supported")
        limits = spec.get("resources", {}).get("limits", {})
        if "memory" in limits:
            args += ["--memory", str(memory_bytes(limits["memory"]))]
        if "cpu" in limits:
            cpu = str(limits["cpu"])
            args += ["--cpus", str(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))]
        for mount in spec.get("volumeMounts", []):
            if "subPath" in mount:
                raise SmokeTestFailure(f"{container.name}: subPath mounts are not supported")
            options = "ro" if mount.get("readOnly") else "rw"
            args += ["--volume", f"{self.volumes[mount['name']]}:{mount['mountPath']}:{options}"]
        env_file = self.work / f"{container.name}.env"
        env_file.write_text("".join(f"{key}={value}\n" for key, value in container.env.items()))
        args += ["--env-file", str(env_file)]
        if "workingDir" in spec:
            args += ["--workdir", spec["workingDir"]]
        if "command" in spec:
            args += ["--entrypoint", json.dumps(spec["command"])]
        args += [self.images[container.name], *spec.get("args", [])]
        podman(*args)

    def exec(self, container: Container, command: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.podman_name(container), *command, check=False, timeout=timeout)

    def logs(self, container: Container, lines: int = 40) -> str:
        result = podman("logs", self.podman_name(container), check=False)
        return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])

    def ip_address(self) -> str:
        infra = podman("pod", "inspect", self.name, "--format", "{{.InfraContainerID}}").stdout.strip()
        networks = json.loads(podman("inspect", infra, "--format", "{{json .NetworkSettings.Networks}}").stdout)
        return next(iter(networks.values()))["IPAddress"]

    def remove(self) -> None:
        podman("pod", "rm", "--force", "--time", "2", self.name, check=False, timeout=120)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connects(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, port), timeout).close()
        return True
    except OSError:
        return False


def health(port: int, service: str, timeout: float = 3.0) -> int | None:
    """The gRPC health status of ``service`` on 127.0.0.1:``port``, or None when it does not answer."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                .status
            )
        except grpc.RpcError:
            return None


# -- probes --------------------------------------------------------------------------------------


def probe_once(pod: Pod, container: Container, probe: dict[str, Any]) -> bool:
    timeout = float(probe.get("timeoutSeconds", 1))
    if "exec" in probe:
        return pod.exec(container, probe["exec"]["command"], timeout=timeout + 30).returncode == 0
    if "grpc" in probe:
        port = container.published[int(probe["grpc"]["port"])]
        return health(port, probe["grpc"].get("service", ""), timeout) == SERVING
    raise SmokeTestFailure(f"{container.name}: a probe kind the smoke test cannot run: {sorted(probe)}")


def wait_for_probe(pod: Pod, container: Container, kind: str, budget_s: float | None = None) -> float:
    """Run ``kind`` as the kubelet does until it passes; returns the seconds it took."""
    probe = container.spec[kind]
    period = float(probe.get("periodSeconds", 10))
    budget = (
        budget_s
        if budget_s is not None
        else period * int(probe.get("failureThreshold", 3)) + float(probe.get("initialDelaySeconds", 0))
    )
    start = time.monotonic()
    while not probe_once(pod, container, probe):
        if time.monotonic() - start > budget:
            raise SmokeTestFailure(f"{container.name}: {kind} did not pass within {budget:.0f} s")
        state = podman("inspect", pod.podman_name(container), "--format", "{{.State.Status}}").stdout.strip()
        if state != "running":
            raise SmokeTestFailure(f"{container.name} is {state} while waiting for its {kind}")
        time.sleep(min(period, 1.0))
    return time.monotonic() - start


# -- the checks ----------------------------------------------------------------------------------


def tiles() -> tuple[list[bytes], bytes]:
    """Four 224 px tiles of scikit-image's IHC image of colonic glands, and a query tile."""
    from skimage import data

    ihc = data.immunohistochemistry()

    def png(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
        return buffer.getvalue()

    references = [png(ihc[y : y + 224, x : x + 224]) for x, y in ((0, 0), (224, 0), (0, 224), (224, 224))]
    return references, png(ihc[100:324, 100:324])


def round_trip(address: str, credentials: Credentials, timings: dict[str, float]) -> None:
    from histoxplain_client import Client, IndexImage
    from histoxplain_client.errors import Unauthenticated

    references, query = tiles()
    image_ids = [f"ihc-{n}" for n in range(len(references))]
    with Client(address, root_certificates=credentials.ca_pem, token=credentials.token, timeout=180) as client:
        client.wait_until_ready(30)
        info = client.info()
        start = time.monotonic()
        summary = client.index_images(
            "smoke", [IndexImage(tile, image_id=i) for tile, i in zip(references, image_ids, strict=True)]
        )
        timings["index 4 tiles"] = time.monotonic() - start
        if summary.images_indexed != len(references) or summary.skipped:
            raise SmokeTestFailure(f"IndexImages: {summary}")
        start = time.monotonic()
        hits = client.search("smoke", references[1], k=3)
        timings["search"] = time.monotonic() - start
        if not hits or hits[0].image_id != image_ids[1] or hits[0].score < 0.99:
            raise SmokeTestFailure(f"Search: the indexed tile did not find itself first: {hits}")
        start = time.monotonic()
        explanation = client.search_and_explain("smoke", query, k=2, method="gradcam")
        timings["search and explain (Grad-CAM, k=2)"] = time.monotonic() - start
        if len(explanation.references) != 2:
            raise SmokeTestFailure(f"SearchAndExplain: {len(explanation.references)} references, expected 2")
        for reference in explanation.references:
            heatmap = reference.query_heatmap
            if heatmap is None or heatmap.values.shape != tuple(info.input_size):
                raise SmokeTestFailure(f"SearchAndExplain: query heatmap {heatmap and heatmap.values.shape}")
            if not np.all(np.isfinite(heatmap.values)) or Image.open(io.BytesIO(heatmap.overlay_png)).size[0] == 0:
                raise SmokeTestFailure("SearchAndExplain: a heatmap is not finite or its overlay does not decode")
        explained = client.explain(query, index="smoke", image_ids=image_ids[:1], method="gradcampp", side="query")
        if len(explained.references) != 1:
            raise SmokeTestFailure(f"Explain: {len(explained.references)} references, expected 1")
        log(
            f"round trip: {info.preset} via {info.backend}, {summary.tiles_indexed} tiles indexed, "
            f"top hit {hits[0].image_id} ({hits[0].score:.4f}), {len(explanation.references)} references explained"
        )
    with Client(address, root_certificates=credentials.ca_pem, timeout=30) as anonymous:
        try:
            anonymous.list_indexes()
        except Unauthenticated:
            pass
        else:
            raise SmokeTestFailure("a call without a token was answered")


def listening_ports(pod: Pod, container: Container) -> dict[int, str]:
    """port -> bound address of every TCP listener in the pod's network namespace."""
    listeners: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        result = pod.exec(container, ["cat", table])
        for line in result.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    host: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[::-1])
                else:
                    host = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                    host = host.ipv4_mapped or host  # Java binds 127.0.0.1 as ::ffff:127.0.0.1
                listeners[int(port, 16)] = str(host)
    return listeners


def check_exposure(pod: Pod) -> None:
    gateway = next(c for c in pod.containers if not c.sidecar)
    declared = {int(p["containerPort"]) for c in pod.containers if not c.sidecar for p in c.spec.get("ports", [])}
    listeners = listening_ports(pod, gateway)
    exposed = {port for port, host in listeners.items() if not ipaddress.ip_address(host).is_loopback}
    if exposed != declared:
        raise SmokeTestFailure(f"ports listening beyond loopback {sorted(exposed)} != the gateway's {sorted(declared)}")
    internal = sorted(set(listeners) - exposed)
    address = pod.ip_address()
    reached = [port for port in internal if connects(address, port)]
    if reached:
        raise SmokeTestFailure(f"the host reaches loopback-only ports {reached} at the pod address {address}")
    unreachable = [port for port in sorted(declared) if not connects(address, port)]
    if unreachable:
        raise SmokeTestFailure(f"the gateway's ports {unreachable} do not answer at the pod address {address}")
    published = podman("port", pod.podman_name(gateway)).stdout
    expected = {f"{port}/tcp" for port in gateway.published}
    found = {line.split(" -> ")[0].strip() for line in published.splitlines() if "->" in line}
    if found != expected:
        raise SmokeTestFailure(f"published ports {sorted(found)} != {sorted(expected)}")
    log(
        f"exposure: beyond loopback only {sorted(exposed)}; loopback-only {internal} (TorchServe's among them) "
        f"refused from the host at {address}"
    )


def smoothgrad_samples_for(address: str, credentials: Credentials, query: bytes, target_s: float) -> int:
    """SmoothGrad samples for a call of about ``target_s`` seconds, measured with 32 samples."""
    from histoxplain_client import Client

    with Client(address, root_certificates=credentials.ca_pem, token=credentials.token, timeout=120) as client:
        start = time.monotonic()
        client.explain(query, references=[query], method="smoothgrad", smoothgrad_samples=32, side="query")
        elapsed = time.monotonic() - start
    return max(32, min(256, int(32 * target_s / elapsed)))


def stop_pod(pod: Pod, credentials: Credentials, timings: dict[str, float]) -> None:
    """Kubernetes' stop: preStop, SIGTERM with the rest of the grace period, the sidecar last."""
    from histoxplain_client import Client

    grace = float(pod.manifests.pod.get("terminationGracePeriodSeconds", 30))
    gateway = next(c for c in pod.containers if not c.sidecar)
    address = f"127.0.0.1:{gateway.published[int(gateway.env['HISTOXPLAIN_PORT'])]}"
    _, query = tiles()
    pre_stop = gateway.spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pre_stop_s = float(pre_stop[-1]) if pre_stop and pre_stop[0] == "sleep" else 0.0
    samples = smoothgrad_samples_for(address, credentials, query, target_s=pre_stop_s + 7.0)
    outcome: dict[str, Any] = {}

    def in_flight() -> None:
        with Client(address, root_certificates=credentials.ca_pem, token=credentials.token, timeout=grace) as client:
            try:
                outcome["result"] = client.explain(
                    query, references=[query], method="smoothgrad", smoothgrad_samples=samples, side="query"
                )
            except Exception as error:  # reported below as the check's failure
                outcome["error"] = error
            outcome["finished"] = time.monotonic()

    call = threading.Thread(target=in_flight)
    start = time.monotonic()
    call.start()
    time.sleep(1.0)
    if pre_stop:
        result = pod.exec(gateway, pre_stop, timeout=grace)
        if result.returncode != 0:
            raise SmokeTestFailure(f"preStop {pre_stop} failed: {result.stderr}")
    sigterm = time.monotonic()
    remaining = max(1, int(grace - (sigterm - start)))
    stopped = podman("stop", "--time", str(remaining), pod.podman_name(gateway), timeout=grace + 30)
    timings["gateway: podman stop (SIGTERM to exit)"] = time.monotonic() - sigterm
    call.join(timeout=grace)
    exit_code = podman("inspect", pod.podman_name(gateway), "--format", "{{.State.ExitCode}}").stdout.strip()
    if stopped.returncode != 0 or exit_code != "0":
        raise SmokeTestFailure(f"gateway: podman stop -> {stopped.returncode}, exit code {exit_code}")
    if "error" in outcome or "result" not in outcome:
        raise SmokeTestFailure(f"the call in flight at SIGTERM failed: {outcome.get('error')!r}")
    if outcome["finished"] <= sigterm:
        raise SmokeTestFailure(f"the SmoothGrad call ({samples} samples) ended before SIGTERM: no drain was exercised")
    if timings["gateway: podman stop (SIGTERM to exit)"] > remaining / 3:
        raise SmokeTestFailure(
            f"gateway: stop took {timings['gateway: podman stop (SIGTERM to exit)']:.1f} s of {remaining} s"
        )
    log(
        f"gateway: drained a SmoothGrad call ({samples} samples) that ended "
        f"{outcome['finished'] - sigterm:.1f} s after SIGTERM, exited 0 "
        f"{timings['gateway: podman stop (SIGTERM to exit)']:.1f} s after SIGTERM (timeout {remaining} s)"
    )
    for sidecar in [c for c in pod.containers if c.sidecar]:
        remaining = max(1, int(grace - (time.monotonic() - start)))
        begin = time.monotonic()
        stopped = podman("stop", "--time", str(remaining), pod.podman_name(sidecar), timeout=grace + 30)
        elapsed = time.monotonic() - begin
        timings[f"{sidecar.name}: podman stop (SIGTERM to exit)"] = elapsed
        exit_code = podman("inspect", pod.podman_name(sidecar), "--format", "{{.State.ExitCode}}").stdout.strip()
        if stopped.returncode != 0 or exit_code != "0":
            raise SmokeTestFailure(f"{sidecar.name}: podman stop -> {stopped.returncode}, exit code {exit_code}")
        if elapsed > remaining / 3:
            raise SmokeTestFailure(
                f"{sidecar.name}: stop took {elapsed:.1f} s of {remaining} s: its processes did not all exit on "
                "SIGTERM and were killed at a deadline (the TorchServe guard's is 15 s)"
            )
        log(f"{sidecar.name}: exited 0 {elapsed:.1f} s after SIGTERM (timeout {remaining} s)")


@contextmanager
def running_pod(manifests: Manifests, images: dict[str, str], keep: bool) -> Iterator[tuple[Pod, Credentials]]:
    work = Path(tempfile.mkdtemp(prefix="histoxplain-smoke-"))
    credentials = Credentials.generate()
    pod = Pod(manifests, images, work, credentials)
    try:
        pod.create()
        yield pod, credentials
    except BaseException:
        for container in pod.containers:
            print(f"---- {container.name} (last lines) ----\n{pod.logs(container)}", file=sys.stderr)
        raise
    finally:
        if not keep:
            pod.remove()
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run docker/k8s/'s pod as a podman pod and check it.")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="CONTAINER=IMAGE",
        help="run another image than the manifest's for a container",
    )
    parser.add_argument("--keep", action="store_true", help="leave the pod and its folders for inspection")
    args = parser.parse_args(argv)
    manifests = Manifests.load()
    images = {c["name"]: c["image"] for c in manifests.containers()}
    images.update(dict(item.split("=", 1) for item in args.image))
    timings: dict[str, float] = {}
    total = time.monotonic()
    try:
        with running_pod(manifests, images, args.keep) as (pod, credentials):
            for container in pod.containers:
                start = time.monotonic()
                pod.run(container)
                log(f"{container.name}: started {images[container.name]}")
                if "startupProbe" in container.spec:
                    timings[f"{container.name}: startupProbe passes"] = wait_for_probe(pod, container, "startupProbe")
                if "readinessProbe" in container.spec:
                    timings[f"{container.name}: readinessProbe (SERVING)"] = wait_for_probe(
                        pod, container, "readinessProbe", budget_s=240
                    )
                log(f"{container.name}: ready {time.monotonic() - start:.1f} s after start")
            for container in pod.containers:
                for kind, probe in probes(container.spec).items():
                    if not probe_once(pod, container, probe):
                        raise SmokeTestFailure(f"{container.name}: {kind} fails once the pod is ready")
                log(f"{container.name}: {', '.join(probes(container.spec))} answer")
            gateway = next(c for c in pod.containers if not c.sidecar)
            if health(gateway.published[int(gateway.env["HISTOXPLAIN_HEALTH_PORT"])], "") != SERVING:
                raise SmokeTestFailure("health of the whole server ('') is not SERVING")
            round_trip(f"127.0.0.1:{gateway.published[int(gateway.env['HISTOXPLAIN_PORT'])]}", credentials, timings)
            check_exposure(pod)
            stop_pod(pod, credentials, timings)
    except SmokeTestFailure as failure:
        print(f"smoke-test: FAILED: {failure}", file=sys.stderr)
        return 1
    timings["smoke test, total"] = time.monotonic() - total
    print("\nsmoke test passed")
    for name, seconds in timings.items():
        print(f"  {name:48s} {seconds:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
