"""The wire contract: generated stubs in sync with the .proto files, naming rules, compatibility
with the released descriptor set, and `buf lint` / `buf breaking` when buf is installed."""

from __future__ import annotations

import filecmp
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor

from histoxplain_client._proto.histoxplain.v1 import pacs_pb2, retrieval_service_pb2, types_pb2

REPO = Path(__file__).resolve().parents[3]
PROTO = REPO / "proto"
STUBS = REPO / "client" / "histoxplain_client" / "_proto"
RELEASE = PROTO / "histoxplain_v1.binpb"
# Installed by `npm install --prefix .venv/buf @bufbuild/buf@1.75.0` (make venv).
BUF = REPO / ".venv" / "buf" / "node_modules" / ".bin" / "buf"
FILES = [types_pb2.DESCRIPTOR, pacs_pb2.DESCRIPTOR, retrieval_service_pb2.DESCRIPTOR]
SERVICE = retrieval_service_pb2.DESCRIPTOR.services_by_name["RetrievalService"]


def load_generator():
    spec = importlib.util.spec_from_file_location("histoxplain_proto_generate", PROTO / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    fresh = tmp_path / "_proto"
    load_generator().generate_stubs(fresh)
    committed = sorted(p.relative_to(STUBS) for p in STUBS.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    generated = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert committed == generated, "run: .venv/bin/python proto/generate.py"
    stale = [str(path) for path in generated if not filecmp.cmp(STUBS / path, fresh / path, shallow=False)]
    assert not stale, f"stubs out of date ({stale}); run: .venv/bin/python proto/generate.py"


def test_stubs_import_inside_the_client_package_only():
    """No generated module imports the top-level `histoxplain.v1` (it does not exist)."""
    for path in STUBS.rglob("*.py*"):
        text = path.read_text()
        assert "from histoxplain.v1 import" not in text and "import histoxplain.v1" not in text, path


def test_service_has_the_contracted_rpcs():
    assert SERVICE.full_name == "histoxplain.v1.RetrievalService"
    assert [method.name for method in SERVICE.methods] == [
        "IndexImages", "Search", "Explain", "SearchAndExplain", "DeleteImages", "DescribeIndex", "ListIndexes",
        "GetModelInfo", "IndexDicom", "ExplainDicomRegion",
    ]
    service_proto = descriptor_pb2.ServiceDescriptorProto()
    SERVICE.CopyToProto(service_proto)
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in service_proto.method}
    assert streaming.pop("IndexImages") == (True, False)
    assert set(streaming.values()) == {(False, False)}
    for method in SERVICE.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


def _all_enums():
    for file in FILES:
        yield from file.enum_types_by_name.values()
        for message in file.message_types_by_name.values():
            yield from message.enum_types


def test_every_enum_starts_with_unspecified_zero():
    enums = list(_all_enums())
    assert len(enums) >= 6
    for enum in enums:
        zero = enum.values_by_number[0]
        assert zero.name.endswith("_UNSPECIFIED"), enum.full_name
        assert enum.values[0].number == 0, enum.full_name


def test_heatmaps_travel_as_raw_array_and_overlay_png():
    heatmap = types_pb2.Heatmap.DESCRIPTOR
    assert heatmap.fields_by_name["values"].message_type.name == "RawArray"
    assert heatmap.fields_by_name["overlay_png"].type == FieldDescriptor.TYPE_BYTES
    raw = types_pb2.RawArray.DESCRIPTOR.fields_by_name
    assert raw["shape"].is_repeated and raw["data"].type == FieldDescriptor.TYPE_BYTES
    hit = set(types_pb2.SearchHit.DESCRIPTOR.fields_by_name)
    assert {"score", "image_id", "point_id", "label", "source", "box", "level", "mpp"} <= hit


def _fields(file_set: descriptor_pb2.FileDescriptorSet) -> dict[tuple[str, int], tuple[str, int, int, str]]:
    """(message full name, field number) -> (name, type, label, type_name) for every field."""
    fields = {}

    def walk(prefix: str, messages) -> None:
        for message in messages:
            full = f"{prefix}.{message.name}"
            for field in message.field:
                fields[(full, field.number)] = (field.name, field.type, field.label, field.type_name)
            walk(full, message.nested_type)

    for file in file_set.file:
        walk(file.package, file.message_type)
    return fields


def _current_file_set() -> descriptor_pb2.FileDescriptorSet:
    file_set = descriptor_pb2.FileDescriptorSet()
    for file in FILES:
        file.CopyToProto(file_set.file.add())
    return file_set


def test_current_api_keeps_every_released_field_and_rpc():
    """A buf-free subset of `buf breaking`: no released field or RPC is removed or changed."""
    released = descriptor_pb2.FileDescriptorSet.FromString(RELEASE.read_bytes())
    current = _current_file_set()
    released_fields, current_fields = _fields(released), _fields(current)
    changed = {key: value for key, value in released_fields.items() if current_fields.get(key) != value}
    assert not changed, f"fields removed or changed since the release: {changed}"

    def rpcs(file_set):
        return {
            (service.name, method.name, method.input_type, method.output_type, method.client_streaming)
            for file in file_set.file
            for service in file.service
            for method in service.method
        }

    assert rpcs(released) <= rpcs(current)


def test_generate_script_release_snapshot_matches_the_committed_descriptor(tmp_path):
    """The committed baseline is a protoc descriptor set of the API as it is now (released)."""
    snapshot = tmp_path / "now.binpb"
    load_generator().write_release_descriptor(snapshot)
    now = descriptor_pb2.FileDescriptorSet.FromString(snapshot.read_bytes())
    assert sorted(f.name for f in now.file) == [
        "histoxplain/v1/pacs.proto", "histoxplain/v1/retrieval_service.proto", "histoxplain/v1/types.proto",
    ]
    assert _fields(now) == _fields(_current_file_set())


buf_missing = pytest.mark.skipif(
    not BUF.exists(), reason=f"buf not installed at {BUF} (npm install --prefix .venv/buf @bufbuild/buf@1.75.0)"
)


def _buf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUF), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@buf_missing
def test_buf_lint_passes():
    result = _buf("lint", "proto")
    assert result.returncode == 0, result.stdout + result.stderr


@buf_missing
def test_buf_breaking_against_the_released_descriptor_passes():
    result = _buf("breaking", "proto", "--against", str(RELEASE.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr


@buf_missing
def test_buf_breaking_detects_a_removed_field(tmp_path):
    """The check can fail: deleting a released field is reported."""
    copy = tmp_path / "proto"
    shutil.copytree(PROTO, copy)
    types_proto = copy / "histoxplain" / "v1" / "types.proto"
    text = types_proto.read_text()
    assert "  uint32 matched_tiles = 9;\n" in text
    types_proto.write_text(text.replace("  uint32 matched_tiles = 9;\n", ""))
    result = subprocess.run(
        [str(BUF), "breaking", str(copy), "--against", str(RELEASE)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "matched_tiles" in result.stdout + result.stderr


def test_generate_script_runs_as_documented(tmp_path):
    out, torchserve_out = tmp_path / "stubs", tmp_path / "torchserve"
    result = subprocess.run(
        [sys.executable, str(PROTO / "generate.py"), "--out", str(out), "--torchserve-out", str(torchserve_out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "histoxplain" / "v1" / "retrieval_service_pb2_grpc.py").is_file()
    # The one generator also writes TorchServe's stubs: the committed ones are its output, unedited.
    committed = REPO / "service" / "histoxplain_service" / "backends" / "torchserve" / "_proto"
    names = sorted(path.name for path in torchserve_out.iterdir())
    assert names == sorted(path.name for path in committed.iterdir() if path.name != "__pycache__")
    for name in names:
        assert (torchserve_out / name).read_bytes() == (committed / name).read_bytes(), name
