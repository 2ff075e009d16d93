"""Check what the histoxplain images contain, layer by layer: ``docker/build-images.sh`` runs it.

    python3 docker/check_image_layers.py [--ca-bundle FILE] [--out DIR] [--expect-version V] IMAGE...

Every file of every layer is listed (``podman image save`` streamed, nothing written to disk), so
a file that a later layer deletes is still seen. It fails (exit 1, one line per finding) when a
layer holds:

- a copy of a build-host file: the CA bundle mounted for pip, resolv.conf, hosts, pip or git
  configuration, SSH keys (same size and SHA-256), or a certificate that the host's CA bundle has
  and Debian's ca-certificates does not (a company or proxy CA);
- a private key (outside shared libraries, which embed self-test keys), a credential file
  (``.netrc``, ``.pypirc``, ``key_file.json``, docker or git credentials), a ``.git`` folder,
  a ``.venv``;
- a package or build cache (pip and other caches under ``.cache``, apt archives and lists,
  ``*.whl``), the build sources (``/src``), files under ``/tmp`` or ``/run``, the build mounts;
- pip or a compiler in the runtime image, torch in the gateway image.

With ``--pins``, every Python distribution of each image's ``<name>-<version>.pip-freeze.txt``
(written by build-images.sh) must be pinned to that version (``==``) in one of those files.

It also checks the image configuration: OCI labels (title, version, revision, source,
licences), a numeric non-root user, and no build argument or secret-looking variable in the
environment. Per image it writes ``<name>-<version>.layers.txt``: each layer's size, file count
and largest folders (where the bytes go).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REQUIRED_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
)
# Host files whose exact content must never reach an image (checked by size + SHA-256).
HOST_FILES = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/pip.conf",
    "/etc/xdg/pip/pip.conf",
    "~/.config/pip/pip.conf",
    "~/.pip/pip.conf",
    "~/.netrc",
    "~/.pypirc",
    "~/.gitconfig",
    "~/.git-credentials",
    "~/.docker/config.json",
    "~/.ssh/id_rsa",
    "~/.ssh/id_ed25519",
    "~/.ssh/id_ecdsa",
    "~/.ssh/authorized_keys",
)
# A PEM private key: the header followed by base64 (libraries that parse PEM only hold the header).
PRIVATE_KEY = re.compile(
    rb"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]{64}"
)
SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|CREDENTIAL)", re.IGNORECASE)
BUILD_ONLY_ENV = ("PIP_CERT", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_FIND_LINKS")
CREDENTIAL_NAMES = {
    ".netrc",
    ".pypirc",
    ".git-credentials",
    "key_file.json",
    ".npmrc",
    ".env",
    "pip.conf",
    ".dockercfg",
}
SCAN_LIMIT = 4 * 1024 * 1024  # file contents are searched below this size (keys, CA bundles, configs)


def forbidden_path(path: str, is_dir: bool, image_kind: str) -> str | None:
    """Why ``path`` (relative, no leading slash) must not be in a layer, or None."""
    name = path.rsplit("/", 1)[-1]
    parts = path.split("/")
    if path == "run/host-ca.crt" or path.startswith("run/host-"):
        return "the build-time CA mount"
    if not is_dir and (path.startswith("run/") or path.startswith("tmp/") or path.startswith("var/tmp/")):
        return "a file in a runtime-only folder (/run, /tmp)"
    if path == "src" or path.startswith("src/"):
        return "the build sources"
    if ".git" in parts or ".venv" in parts:
        return "a .git or .venv folder"
    if ".cache" in parts and not is_dir:
        return "a cache (.cache)"
    if path.startswith("var/cache/apt/archives/") and name.endswith(".deb"):
        return "an apt package cache"
    if path.startswith("var/lib/apt/lists/") and not is_dir and name != "lock":
        return "apt lists"
    if name.endswith(".whl"):
        return "a wheel file (a pip cache or a copied wheel)"
    if name in CREDENTIAL_NAMES or name.startswith("id_rsa") or name.startswith("id_ed25519"):
        return "a credential file"
    if name.endswith((".p12", ".pfx", ".jks")) and "java/cacerts" not in path:
        return "a key store"
    if re.fullmatch(r"opt/venv/bin/pip[0-9.]*", path) or path.startswith("opt/venv/lib/python3.11/site-packages/pip/"):
        return "pip in the runtime image"
    if re.fullmatch(r"usr/bin/(gcc|g\+\+|cc|c\+\+|make|x86_64-linux-gnu-gcc)(-[0-9.]+)?", path):
        return "a compiler or build tool"
    if image_kind == "gateway" and re.match(
        r"opt/venv/lib/python3\.11/site-packages/(torch|torchvision|timm|onnxruntime|triton)/", path
    ):
        return "a model package in the torch-free gateway image"
    return None


def certificates(pem: bytes) -> set[bytes]:
    """The base64 bodies (whitespace removed) of the PEM certificates in ``pem``."""
    bodies = re.findall(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", pem, re.S)
    return {re.sub(rb"\s+", b"", body) for body in bodies}


def host_only_certificates(bundle: Path) -> list[bytes]:
    """Certificates of the host's bundle that Debian's ca-certificates does not ship: a local or
    proxy CA that must never be baked in. Returned as the first 64 base64 characters of each, the
    form in which they appear in any PEM file."""
    public: set[bytes] = set()
    for crt in Path("/usr/share/ca-certificates").rglob("*.crt"):
        public |= certificates(crt.read_bytes())
    return [body[:64] for body in sorted(certificates(bundle.read_bytes()) - public)]


def host_file_digests(ca_bundle: Path) -> dict[tuple[int, str], str]:
    """(size, sha256) -> host path, for the host files that must not reach a layer."""
    digests = {}
    for name in (str(ca_bundle), *HOST_FILES):
        path = Path(os.path.expanduser(name))
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if data.strip():
            digests[(len(data), hashlib.sha256(data).hexdigest())] = str(path)
    return digests


@dataclass
class LayerReport:
    digest: str
    files: int = 0
    size: int = 0
    folders: Counter[str] = field(default_factory=Counter)


@dataclass
class ImageReport:
    image: str
    kind: str
    findings: list[str] = field(default_factory=list)
    layers: dict[str, LayerReport] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


def inspect(image: str) -> dict:
    result = subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)[0]


def check_config(report: ImageReport, config: dict, expect_version: str | None) -> None:
    labels = config.get("Labels") or {}
    for label in REQUIRED_LABELS:
        if not labels.get(label) or labels[label] == "unknown":
            report.findings.append(f"{report.image}: label {label} is missing or unknown")
    if expect_version and labels.get("org.opencontainers.image.version") != expect_version:
        report.findings.append(
            f"{report.image}: label version {labels.get('org.opencontainers.image.version')!r} != {expect_version!r}"
        )
    if labels.get("org.opencontainers.image.licenses") != "Apache-2.0":
        report.findings.append(f"{report.image}: licence label is not Apache-2.0")
    user = config.get("User") or ""
    if not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user):
        report.findings.append(f"{report.image}: USER {user!r} is not a numeric non-root uid")
    for entry in config.get("Env") or []:
        name = entry.split("=", 1)[0]
        if name in BUILD_ONLY_ENV or SECRET_ENV.search(name):
            report.findings.append(f"{report.image}: environment variable {name} is baked into the image")


def layer_members(stream) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    layer = tarfile.open(fileobj=stream, mode="r|")
    for member in layer:
        yield member, layer


def scan(report: ImageReport, host_digests: dict, host_certs: list[bytes]) -> None:
    """Stream ``podman image save`` (docker-archive: one tar per layer) and check every file."""
    save = subprocess.Popen(
        ["podman", "image", "save", "--format", "docker-archive", report.image], stdout=subprocess.PIPE
    )
    assert save.stdout is not None
    manifest: list[dict] = []
    with tarfile.open(fileobj=save.stdout, mode="r|") as archive:
        for outer in archive:
            if outer.name == "manifest.json":
                manifest = json.load(archive.extractfile(outer))
                continue
            if not (outer.isfile() and outer.name.endswith(".tar")) or outer.size == 0:
                continue
            digest = outer.name.rsplit("/", 1)[-1].removesuffix(".tar")
            layer = report.layers.setdefault(outer.name, LayerReport(digest))
            for member, tar in layer_members(archive.extractfile(outer)):
                check_member(report, layer, member, tar, host_digests, host_certs)
    if save.wait() != 0:
        raise SystemExit(f"podman image save {report.image} failed ({save.returncode})")
    if manifest:
        report.order = list(manifest[0]["Layers"])


def check_member(
    report: ImageReport,
    layer: LayerReport,
    member: tarfile.TarInfo,
    tar: tarfile.TarFile,
    host_digests: dict,
    host_certs: list[bytes],
) -> None:
    path = member.name.removeprefix("./").lstrip("/")
    if not path:
        return
    name = path.rsplit("/", 1)[-1]
    if name.startswith(".wh."):  # a whiteout: the deletion of a file of an earlier layer
        return
    layer.files += 1
    layer.size += member.size
    depth = 6 if path.startswith("opt/venv/lib/") else 3  # site-packages: one entry per package
    top = "/".join(path.split("/")[:depth])
    layer.folders[top] += member.size
    reason = forbidden_path(path, member.isdir(), report.kind)
    if reason:
        report.findings.append(f"{report.image}: layer {layer.digest[:12]}: /{path}: {reason}")
    if not member.isfile():
        return
    candidates = {key for key in host_digests if key[0] == member.size}
    if member.size > SCAN_LIMIT and not candidates:
        return
    data = tar.extractfile(member).read()
    if candidates:
        digest = (member.size, hashlib.sha256(data).hexdigest())
        if digest in host_digests:
            report.findings.append(
                f"{report.image}: layer {layer.digest[:12]}: /{path} is a copy of the build host's "
                f"{host_digests[digest]}"
            )
    if member.size > SCAN_LIMIT:
        return
    # Shared libraries embed self-test keys (GnuTLS's FIPS tests): a leaked key is a file of its own.
    if not data.startswith(b"\x7fELF") and PRIVATE_KEY.search(data):
        report.findings.append(f"{report.image}: layer {layer.digest[:12]}: /{path} contains a private key")
    if host_certs and b"-----BEGIN CERTIFICATE-----" in data:
        flat = re.sub(rb"\s+", b"", data)
        for head in host_certs:
            if head in flat:
                report.findings.append(
                    f"{report.image}: layer {layer.digest[:12]}: /{path} contains a CA certificate of the build host "
                    "that Debian does not ship"
                )
                break


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(files: list[Path]) -> dict[str, str]:
    """name -> version of every ``name==version`` line in ``files``."""
    pins: dict[str, str] = {}
    for path in files:
        for line in path.read_text().splitlines():
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
            if match:
                pins[_normalise(match[1])] = match[2]
    return pins


def check_pins(report: ImageReport, freeze: Path, pins: dict[str, str], own_version: str | None) -> None:
    """Every distribution in the image's freeze is pinned, at the version installed."""
    if not freeze.is_file():
        report.findings.append(f"{report.image}: no package list {freeze}")
        return
    for line in freeze.read_text().splitlines():
        name, _, version = line.partition("==")
        key = _normalise(name)
        if key in ("histoxplain", "histoxplain-client"):
            if own_version and version != own_version:
                report.findings.append(f"{report.image}: {name} {version} is not the project version {own_version}")
        elif key not in pins:
            report.findings.append(f"{report.image}: {name}=={version} is not pinned in any requirements file")
        elif pins[key] != version:
            report.findings.append(f"{report.image}: {name} is {version}, pinned {pins[key]}")


def write_report(report: ImageReport, out: Path, version: str) -> None:
    name = report.image.removeprefix("localhost/").split(":")[0]
    lines = [f"{report.image}: {len(report.layers)} layers, bottom first", ""]
    ordered = [report.layers[key] for key in report.order if key in report.layers] or list(report.layers.values())
    for number, layer in enumerate(ordered, start=1):
        lines.append(f"layer {number} sha256:{layer.digest[:16]}: {layer.size / 1e6:.1f} MB in {layer.files} entries")
        for folder, size in layer.folders.most_common(8):
            lines.append(f"    {size / 1e6:9.1f} MB  /{folder}")
    lines += ["", f"findings: {len(report.findings)}", *report.findings, ""]
    (out / f"{name}-{version}.layers.txt").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--ca-bundle", type=Path, default=Path("/etc/ssl/certs/ca-certificates.crt"))
    parser.add_argument("--out", type=Path, default=Path("build/images"))
    parser.add_argument("--expect-version")
    parser.add_argument("--pins", type=Path, nargs="*", default=[], help="requirements files with the pins")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    host_digests = host_file_digests(args.ca_bundle)
    host_certs = host_only_certificates(args.ca_bundle) if args.ca_bundle.is_file() else []
    print(f"checking for {len(host_digests)} host files and {len(host_certs)} host-only CA certificates")
    failed = False
    for image in args.images:
        config = inspect(image)
        labels = config.get("Config", {}).get("Labels") or {}
        kind = "gateway" if "gateway" in labels.get("org.opencontainers.image.title", image) else "other"
        report = ImageReport(image, kind)
        check_config(report, config.get("Config", {}), args.expect_version)
        scan(report, host_digests, host_certs)
        if args.pins:
            name = image.removeprefix("localhost/").split(":")[0]
            freeze = args.out / f"{name}-{args.expect_version or 'latest'}.pip-freeze.txt"
            check_pins(report, freeze, read_pins(args.pins), args.expect_version)
        write_report(report, args.out, args.expect_version or "latest")
        files = sum(layer.files for layer in report.layers.values())
        print(f"{image}: {len(report.layers)} layers, {files} entries, {len(report.findings)} findings")
        for finding in report.findings:
            print(f"  {finding}")
        failed |= bool(report.findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
