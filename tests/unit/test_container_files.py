"""The container build files agree with each other and with the manifests (no podman needed).

What the built images hold is checked by ``docker/check_image_layers.py`` and the running pod by
``docker/smoke-test.sh``, both run by ``.ci/run``'s image stage; these tests keep the inputs of
that stage honest: pinned bases and packages, labels, non-root users, the shutdown chain, the
build context, and the image names and tags the manifests and the build script share.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
APPLICATION_DOCKERFILES = [DOCKER / "gateway.Dockerfile", DOCKER / "torchserve.Dockerfile"]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
OCI_LABELS = ("title", "description", "version", "revision", "source", "licenses")
MODEL_PACKAGES = {"torch", "torchvision", "timm", "onnxruntime", "onnx", "triton"}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    result = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    defaults = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value
    return defaults


def requirement_names(path: Path) -> dict[str, str | None]:
    names: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(\S+))?", line)
            assert match, f"{path.name}: {line!r} is not 'name' or 'name==version'"
            names[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return names


def manifest_images() -> dict[str, str]:
    deployment = next(
        doc
        for doc in yaml.safe_load_all((DOCKER / "k8s" / "deployment.yaml").read_text())
        if doc["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]["spec"]
    return {c["name"]: c["image"] for c in pod["containers"] + pod.get("initContainers", [])}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_is_a_pinned_local_image_or_a_stage(dockerfile: Path) -> None:
    defaults = arg_defaults(dockerfile)
    named_stages: set[str] = set()
    for keyword, rest in instructions(dockerfile):
        if keyword != "FROM":
            continue
        image, *alias = rest.split(" AS ") if " AS " in rest else (rest,)
        image = image.strip()
        variable = re.fullmatch(r"\$\{(\w+)\}", image)
        if variable:
            image = defaults[variable[1]]
        assert image in named_stages or re.fullmatch(r"localhost/histoxplain-[a-z]+:[\w.-]+", image), (
            f"{dockerfile.name}: FROM {image}: bases are made locally by docker/build-images.sh (no registry)"
        )
        assert not image.endswith(":latest")
        named_stages.update(a.strip() for a in alias)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_debian_packages_are_pinned_and_their_lists_removed(dockerfile: Path) -> None:
    defaults = arg_defaults(dockerfile)
    for keyword, rest in instructions(dockerfile):
        if keyword != "RUN" or "apt-get install" not in rest:
            continue
        command = rest.split("apt-get install", 1)[1].split("&&", 1)[0]
        packages = [word.strip('"') for word in command.split() if not word.startswith("-")]
        assert packages, rest
        for package in packages:
            name, _, version = package.partition("=")
            assert version, f"{dockerfile.name}: {name} is not pinned (apt-get install {name}=VERSION)"
            variable = re.fullmatch(r"\$\{(\w+)\}", version)
            assert variable is None or defaults.get(variable[1]), f"{dockerfile.name}: {version} has no default"
        assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists/*" in rest


@pytest.mark.parametrize("dockerfile", APPLICATION_DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_is_labelled_non_root_and_free_of_build_settings(dockerfile: Path) -> None:
    runtime = stages(dockerfile)[-1]
    labels = " ".join(rest for keyword, rest in runtime if keyword == "LABEL")
    for label in OCI_LABELS:
        assert f"org.opencontainers.image.{label}=" in labels, f"{dockerfile.name}: no {label} label"
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    (user,) = [rest for keyword, rest in runtime if keyword == "USER"]
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), f"{dockerfile.name}: USER {user} must be numeric, non-root"
    environment = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    assert not re.search(r"PIP_(CERT|EXTRA_INDEX_URL|TRUSTED_HOST|INDEX_URL)", environment)
    runtime_args = {rest.split("=")[0] for keyword, rest in runtime if keyword == "ARG"}
    assert not runtime_args & {"PIP_CERT", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"}
    for keyword, rest in runtime:
        assert keyword != "ADD", f"{dockerfile.name}: ADD fetches or unpacks; COPY what the build made"
        if keyword == "COPY":
            assert "--from=build" in rest or rest.startswith("service/"), f"{dockerfile.name}: COPY {rest}"
    assert any(keyword == "ENTRYPOINT" and rest.startswith("[") for keyword, rest in runtime), "exec-form ENTRYPOINT"


@pytest.mark.parametrize("dockerfile", APPLICATION_DOCKERFILES, ids=lambda p: p.name)
def test_the_host_ca_reaches_only_pip_steps_as_a_build_secret(dockerfile: Path) -> None:
    for stage in stages(dockerfile):
        for keyword, rest in stage:
            if (
                keyword == "RUN"
                and "pip install" in rest
                and not rest.lstrip().startswith("/opt/venv/bin/pip install --no-deps")
            ):
                assert rest.startswith("--mount=type=secret,id=host-ca"), f"{dockerfile.name}: {rest[:60]}"
            if keyword == "COPY":
                assert "ca-certificates.crt" not in rest and "host-ca" not in rest


def test_pip_installs_are_constrained_by_the_freeze_and_binary_only() -> None:
    for dockerfile in APPLICATION_DOCKERFILES:
        for keyword, rest in instructions(dockerfile):
            for command in re.findall(r"pip install ([^&]*)", rest) if keyword == "RUN" else []:
                if "--no-deps" in command or "-r requirements-build.txt" in command.strip():
                    continue
                assert "-c requirements.txt" in command and "--only-binary=:all:" in command, (
                    f"{dockerfile.name}: {command}"
                )


def test_image_requirements_are_pinned_and_the_gateway_has_no_torch() -> None:
    freeze = requirement_names(REPO / "requirements.txt")
    build = requirement_names(DOCKER / "requirements-build.txt")
    assert all(build.values()), "docker/requirements-build.txt pins every build tool"
    gateway = requirement_names(REPO / "requirements-gateway.txt")
    torchserve = requirement_names(DOCKER / "requirements-torchserve.txt")
    for name, version in gateway.items():
        assert version or freeze.get(name), f"requirements-gateway.txt: {name} has no version in requirements.txt"
        assert not (version and freeze.get(name) and version != freeze[name]), f"{name}: {version} != {freeze[name]}"
    for name, version in torchserve.items():
        assert version is None and (freeze.get(name) or build.get(name)), f"requirements-torchserve.txt: {name}"
    assert not gateway.keys() & MODEL_PACKAGES
    assert {"torch", "torchvision", "timm", "torchserve"} <= torchserve.keys()


def test_images_run_under_tini_and_the_torchserve_guard() -> None:
    torchserve = stages(DOCKER / "torchserve.Dockerfile")[-1]
    (entrypoint,) = [rest for keyword, rest in torchserve if keyword == "ENTRYPOINT"]
    words = [word.strip('" ,[]') for word in entrypoint.split()]
    # tini reaps what the launcher leaves behind; the guard turns SIGTERM into a group stop.
    assert words[:5] == ["tini", "--", "python", "-m", "histoxplain_service.backends.torchserve.guard"]
    assert float(words[5]) > 0 and words[6] == "torchserve" and "--foreground" in words
    assert any('"tini=${TINI_VERSION}"' in rest for keyword, rest in torchserve if keyword == "RUN")
    for dockerfile in APPLICATION_DOCKERFILES:
        runtime = stages(dockerfile)[-1]
        assert ("STOPSIGNAL", "SIGTERM") in runtime, f"{dockerfile.name}: Kubernetes sends SIGTERM"


def test_manifests_name_the_images_the_build_script_tags() -> None:
    script = (DOCKER / "build-images.sh").read_text()
    assert 'GATEWAY="localhost/histoxplain-gateway:$VERSION"' in script
    assert 'TORCHSERVE="localhost/histoxplain-torchserve:$VERSION"' in script
    assert manifest_images() == {
        "gateway": f"histoxplain-gateway:{VERSION}",
        "torchserve": f"histoxplain-torchserve:{VERSION}",
    }


def test_build_context_holds_only_what_the_dockerfiles_copy() -> None:
    rules = [
        line.strip()
        for line in (DOCKER / "build.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "the context is an allow-list"
    allowed = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    for dockerfile in DOCKERFILES:
        for keyword, rest in instructions(dockerfile):
            if keyword != "COPY" or rest.startswith("--from"):
                continue
            *sources, _ = rest.split()
            for source in sources:
                source = source.rstrip("/")
                assert any(source == a or source.startswith(a + "/") for a in allowed), f"{dockerfile.name}: {source}"
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
    assert not any(a in (".venv", ".git", "histoxplain-data") for a in allowed)


def _load(name: str):
    """A script of docker/ as a module (registered first: its dataclasses look themselves up)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_layer_check_flags_host_mounts_caches_keys_and_torch_in_the_gateway() -> None:
    layers = _load("check_image_layers")
    flagged = {
        "run/host-ca.crt": "gateway",
        "root/.cache/pip/http/ab/cd": "gateway",
        "var/cache/apt/archives/python3.11_3.11.2_amd64.deb": "other",
        "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease": "other",
        "opt/venv/bin/pip": "other",
        "opt/venv/lib/python3.11/site-packages/torch/__init__.py": "gateway",
        "ts-run/key_file.json": "other",
        "src/pyproject.toml": "other",
        "home/x/.netrc": "other",
    }
    for path, kind in flagged.items():
        assert layers.forbidden_path(path, False, kind), path
    for path, kind in {
        "opt/venv/lib/python3.11/site-packages/torch/__init__.py": "other",
        "etc/ssl/certs/ca-certificates.crt": "gateway",
        "tmp": "gateway",
        "opt/model-store/histoxplain.mar": "other",
    }.items():
        assert layers.forbidden_path(path, path == "tmp", kind) is None, path
    key = (
        b"-----BEGIN PRIVATE KEY-----\n"
        + b"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg" * 2
        + b"\n-----END PRIVATE KEY-----\n"
    )
    assert layers.PRIVATE_KEY.search(key)
    assert not layers.PRIVATE_KEY.search(b"\x00-----BEGIN PRIVATE KEY-----\x00-----END PRIVATE KEY-----\x00")


def test_smoke_test_derives_the_pod_from_the_manifests() -> None:
    smoke = _load("smoke_test")
    manifests = smoke.Manifests.load()
    containers = manifests.containers()
    assert [c["name"] for c in containers] == ["torchserve", "gateway"]  # the native sidecar first
    gateway = containers[1]
    env = manifests.environment(gateway)
    assert env["HISTOXPLAIN_TORCHSERVE_KEY_FILE"].startswith("/ts-run/") and "QDRANT_API_KEY" not in env
    assert set(manifests.published_ports(gateway)) == {
        int(env["HISTOXPLAIN_PORT"]),
        int(env["HISTOXPLAIN_HEALTH_PORT"]),
    }
    assert manifests.published_ports(containers[0]) == {}  # TorchServe is never published
    credentials = smoke.Credentials.generate()
    tokens = credentials.file_for("HISTOXPLAIN_AUTH_TOKENS_FILE").decode().split()
    assert tokens[1] == "writer" and len(tokens[0]) == 64
    assert smoke.memory_bytes("4Gi") == 4 * 2**30 and smoke.memory_bytes("512Mi") == 512 * 2**20
