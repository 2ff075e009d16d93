"""Device selection on any machine: names, settings, SmoothGrad noise, the TorchServe worker's choice.

CUDA's presence is faked with monkeypatch where a test is about the choice (not the hardware),
so these tests mean the same on a CPU-only machine and on a GPU one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import timm
import torch

from histoxplain_model.devices import check_device_name, resolve_device
from histoxplain_model.errors import FailedPrecondition, InvalidRequest
from histoxplain_model.options import SmoothGradOptions
from histoxplain_model.saliency import SmoothGrad
from histoxplain_service.config import Settings

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[3]
FIX = "HISTOXPLAIN_DEVICE=cpu or auto"


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, available: bool, count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)


# -- resolve_device ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu "])
def test_cpu_is_the_cpu(name: str) -> None:
    assert resolve_device(name) == torch.device("cpu")


def test_auto_is_cuda_0_when_torch_sees_a_gpu_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    _fake_cuda(monkeypatch, available=False)
    assert resolve_device("auto") == torch.device("cpu")
    _fake_cuda(monkeypatch, available=True, count=2)
    assert resolve_device("auto") == torch.device("cuda:0")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_failed_precondition_saying_what_to_do(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    _fake_cuda(monkeypatch, available=False)
    with pytest.raises(FailedPrecondition) as excinfo:
        resolve_device(name)
    message = str(excinfo.value)
    assert "sees no CUDA device" in message and FIX in message and "\n" not in message


def test_cuda_names_a_gpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, available=True, count=2)
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("CUDA:1") == torch.device("cuda:1")
    with pytest.raises(InvalidRequest, match=r"has 2 CUDA device\(s\), cuda:0..cuda:1") as excinfo:
        resolve_device("cuda:2")
    assert FIX in str(excinfo.value)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "cuda:-1", "cuda0", "mps", "", "cpu:0"])
def test_other_names_are_invalid_and_the_message_lists_the_choices(name: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        resolve_device(name)
    assert not isinstance(excinfo.value, FailedPrecondition)
    message = str(excinfo.value)
    assert "cpu, cuda, cuda:N" in message and FIX in message and repr(name) in message
    with pytest.raises(InvalidRequest):
        check_device_name(name)


def test_checking_a_name_does_not_import_torch() -> None:
    """Settings validate the device without torch (the gateway with TorchServe has no use for it)."""
    code = (
        "import sys; from histoxplain_service.config import Settings; "
        "s = Settings.from_env({'HISTOXPLAIN_DEVICE': 'cuda:3'}); "
        "assert s.device == 'cuda:3'; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- Settings ----------------------------------------------------------------------------------


def test_settings_device_defaults_to_auto_and_reads_the_variable() -> None:
    assert Settings.from_env({}).device == "auto"
    assert Settings.from_env({"HISTOXPLAIN_DEVICE": ""}).device == "auto"
    assert Settings.from_env({"HISTOXPLAIN_DEVICE": " CUDA:1 "}).device == "cuda:1"
    assert Settings.from_env({"HISTOXPLAIN_DEVICE": "cpu"}).device == "cpu"


@pytest.mark.parametrize("value", ["gpu", "cuda:one", "tpu"])
def test_settings_reject_bad_devices_naming_the_variable(value: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        Settings.from_env({"HISTOXPLAIN_DEVICE": value})
    assert "HISTOXPLAIN_DEVICE" in str(excinfo.value) and "cuda:N" in str(excinfo.value)
    with pytest.raises(InvalidRequest, match="HISTOXPLAIN_DEVICE"):
        Settings().with_changes(device=value)


# -- encoder and embedded backend ---------------------------------------------------------------


def test_load_encoder_refuses_a_missing_gpu_before_reading_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from histoxplain_model.encoders import load_encoder

    _fake_cuda(monkeypatch, available=False)
    # "retccl" needs a weights file: the device error must come first, naming the fix.
    with pytest.raises(FailedPrecondition, match=FIX):
        load_encoder("retccl", weights=None, device="cuda")


def test_embedded_backend_on_a_gpu_without_ort_cuda_embeds_with_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """ORT on the CPU would be slower than torch on the GPU: no pixel embedder then."""
    import histoxplain_model.encoders as encoders
    import histoxplain_model.onnx_embedder as onnx_backend
    from histoxplain_service.backends.embedded import create_embedded_backend

    asked: list[str] = []
    gpu_encoder = SimpleNamespace(device=torch.device("cuda:0"), preset=SimpleNamespace(name="fake"))

    def fake_load_encoder(preset, weights=None, device="cpu"):
        asked.append(device)
        return gpu_encoder

    def no_export(*args, **kwargs):
        raise AssertionError("a CUDA encoder must not be exported to CPU-only onnxruntime")

    monkeypatch.setattr(encoders, "load_encoder", fake_load_encoder)
    monkeypatch.setattr(onnx_backend, "onnxruntime_available", lambda: True)
    monkeypatch.setattr(onnx_backend, "onnxruntime_has_cuda", lambda: False)
    monkeypatch.setattr(onnx_backend, "cached_onnx_embedder", no_export)
    backend = create_embedded_backend(Settings(data_dir=tmp_path, device="cuda:0"))
    assert asked == ["cuda:0"]
    assert backend.encoder is gpu_encoder and backend._pixel_embedder is None


def test_ort_providers_follow_the_torch_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import histoxplain_model.onnx_embedder as onnx_backend

    monkeypatch.setattr(onnx_backend, "onnxruntime_has_cuda", lambda: True)
    assert onnx_backend.providers_for("cpu") == ["CPUExecutionProvider"]
    assert onnx_backend.providers_for(torch.device("cuda:1")) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"
    ]
    assert onnx_backend.providers_for("cuda")[0] == ("CUDAExecutionProvider", {"device_id": 0})
    monkeypatch.setattr(onnx_backend, "onnxruntime_has_cuda", lambda: False)
    assert onnx_backend.providers_for("cuda:0") == ["CPUExecutionProvider"]


# -- SmoothGrad noise ------------------------------------------------------------------------


def test_smoothgrad_noise_is_drawn_on_the_cpu_whatever_the_device() -> None:
    """The same seed gives the same noise on every device: a CUDA generator would give others."""
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    smoothgrad = SmoothGrad(model, options=SmoothGradOptions(n_samples=3, seed=7))
    expected = torch.randn((3, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    assert torch.equal(smoothgrad.noise((3, 8, 8), torch.device("cpu")), expected)
    # A generator cannot live on "meta"; the noise can: it is drawn on the CPU and moved.
    on_meta = smoothgrad.noise((3, 8, 8), torch.device("meta"))
    assert on_meta.device.type == "meta" and tuple(on_meta.shape) == (3, 3, 8, 8)
    if torch.cuda.is_available():
        assert torch.equal(smoothgrad.noise((3, 8, 8), torch.device("cuda:0")).cpu(), expected)


# -- the TorchServe worker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def handler_module() -> ModuleType:
    pytest.importorskip("ts.torch_handler.base_handler", reason="TorchServe (package torchserve) is not installed")
    spec = importlib.util.spec_from_file_location("retrieval_handler_devices", REPO / "handlers" / "retrieval_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir laid out like the .mar's: the real efficientnet-lite0 weights in timm names."""
    from histoxplain_model.encoders import efficientnet_lite0_package_weights

    folder = tmp_path_factory.mktemp("model-dir")
    torch.save(efficientnet_lite0_package_weights(), folder / "weights.pt")
    (folder / "setup_config.json").write_text(json.dumps({"preset": "efficientnet-lite0-imagenet", "weights": "weights.pt"}))
    return folder


def _context(model_dir: Path, gpu_id: int | None) -> SimpleNamespace:
    properties = {"model_dir": str(model_dir)} | ({} if gpu_id is None else {"gpu_id": gpu_id})
    return SimpleNamespace(system_properties=properties, manifest={"model": {}}, metrics=None)


def test_worker_with_a_gpu_id_but_no_cuda_runs_on_the_cpu_and_answers(
    handler_module: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histoxplain_model.wire.envelope import decode_envelope, encode_request_image

    monkeypatch.delenv("HISTOXPLAIN_DEVICE", raising=False)
    _fake_cuda(monkeypatch, available=False)
    handler = handler_module.RetrievalHandler()
    context = _context(model_dir, gpu_id=0)
    handler.initialize(context)
    assert handler.device == torch.device("cpu")
    assert {parameter.device for parameter in handler.encoder.model.parameters()} == {torch.device("cpu")}
    tile = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (response,) = handler.handle([{"mode": b"embed", "image.0": encode_request_image(tile)}], context)
    _, arrays = decode_envelope(response)
    assert arrays["embeddings"].shape == (1, 1280)


@pytest.mark.parametrize(
    ("env", "cuda", "gpu_id", "expected"),
    [
        (None, True, 1, "cuda:1"),     # TorchServe's assignment (BaseHandler's rule)
        (None, True, None, "cpu"),     # TorchServe started without GPUs
        (None, False, 0, "cpu"),       # a gpu_id but no CUDA
        ("auto", True, 2, "cuda:2"),   # auto leaves the choice to TorchServe
        ("cpu", True, 0, "cpu"),       # the variable overrides the worker's GPU
        ("cuda:1", True, 0, "cuda:1"),
    ],
)
def test_worker_device_rule(
    handler_module: ModuleType, monkeypatch: pytest.MonkeyPatch, env: str | None, cuda: bool, gpu_id: int | None, expected: str
) -> None:
    if env is None:
        monkeypatch.delenv("HISTOXPLAIN_DEVICE", raising=False)
    else:
        monkeypatch.setenv("HISTOXPLAIN_DEVICE", env)
    _fake_cuda(monkeypatch, available=cuda, count=4)
    assert handler_module._worker_device(_context(Path("."), gpu_id)) == expected


def test_worker_with_a_bad_device_variable_fails_to_load_saying_what_to_do(
    handler_module: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HISTOXPLAIN_DEVICE", "gpu")
    with pytest.raises(InvalidRequest, match=FIX):
        handler_module.RetrievalHandler().initialize(_context(model_dir, gpu_id=0))
