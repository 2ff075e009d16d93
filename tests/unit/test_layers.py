"""The folders are the layers: imports flow one way and form no cycle (read from the source).

    app, gateway, evaluation -> bootstrap -> pacs -> domain -> (index, backends) -> config -> histoxplain_model

Every ``import`` statement counts, function-local ones included, so a cycle cannot hide behind
a lazy import. The SDK imports neither the library nor the service; the library never imports
the service; the library's torch-free modules import no torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {
    "histoxplain_model": REPO / "handlers" / "histoxplain_model",
    "histoxplain_service": REPO / "service" / "histoxplain_service",
    "histoxplain_client": REPO / "client" / "histoxplain_client",
}
# Which service layers each layer may import (besides itself). Generated stubs are left out.
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "index": {"config", "domain.types"},
    "backends": {"config"},
    "domain": {"config", "index", "backends"},
    "pacs": {"config", "domain"},
    "bootstrap": {"config", "index", "backends", "domain", "pacs"},
    "gateway": {"config", "index", "backends", "domain", "bootstrap", "pacs"},
    "evaluation": {"config", "domain", "app.samples"},
    "app": {"config", "index", "backends", "domain", "bootstrap", "gateway", "evaluation", "pacs"},
}
TORCH_FREE = ["errors", "vocabulary", "limits", "options", "requests", "results", "deadlines", "imageio", "overlay", "wire"]


def _module_name(path: Path, package: str) -> str:
    parts = path.relative_to(ROOTS[package]).with_suffix("").parts
    return ".".join((package, *parts)).removesuffix(".__init__")


def _imports(path: Path, module: str) -> set[str]:
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            if "_proto" not in path.parts:
                modules[_module_name(path, package)] = path
    return {name: {i for i in _imports(path, name) if i in modules} for name, path in modules.items()}


GRAPH = _graph()


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2:
        return ""
    if parts[1] == "domain" and len(parts) > 2 and parts[2] == "types":
        return "domain.types"
    if parts[1] == "app" and len(parts) > 2 and parts[2] == "samples":
        return "app.samples"
    return parts[1]


def test_packages_depend_one_way() -> None:
    for module, imported in GRAPH.items():
        package = module.split(".")[0]
        if package == "histoxplain_client":
            assert not any(i.startswith(("histoxplain_model", "histoxplain_service")) for i in imported), module
        if package == "histoxplain_model":
            assert not any(i.startswith(("histoxplain_service", "histoxplain_client")) for i in imported), module


def test_service_layers_import_only_downwards() -> None:
    upward = []
    for module, imported in GRAPH.items():
        if not module.startswith("histoxplain_service."):
            continue
        layer = _layer(module)
        allowed = ALLOWED.get(layer.split(".")[0], set()) | {layer.split(".")[0]}
        for target in imported:
            if target.startswith("histoxplain_service."):
                target_layer = _layer(target)
                if target_layer not in allowed and target_layer.split(".")[0] not in allowed:
                    upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            # a package's __init__ importing its own submodules is how a package exposes them
            if target.startswith(module + "."):
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]) if target in path else target)
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("name", TORCH_FREE)
def test_torch_free_library_modules_import_no_torch(name: str) -> None:
    root = ROOTS["histoxplain_model"]
    paths = sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / f"{name}.py"]
    assert paths and all(path.exists() for path in paths)
    for path in paths:
        module = _module_name(path, "histoxplain_model")
        imported = _imports(path, module)
        heavy = {i for i in imported if i.split(".")[0] in ("torch", "timm", "torchvision")}
        library = {i for i in imported if i in GRAPH and i.split(".")[-1] not in TORCH_FREE and i != "histoxplain_model"}
        assert not heavy, f"{module} imports {sorted(heavy)}"
        assert all(any(part in TORCH_FREE for part in i.split(".")[1:]) for i in library), f"{module}: {sorted(library)}"
