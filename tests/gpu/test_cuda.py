"""On a CUDA machine: the same embeddings, maps and scores as the CPU, from every entry point.

Run on a GPU machine: ``python -m pytest -q -rA tests/gpu --junitxml=gpu.xml`` (the measured
differences are recorded as junit properties). `make test` does not collect it (pyproject
testpaths); without CUDA it stops with a usage error instead of passing vacuously.
Needs torch, timm and the efficientnet-lite0 weights package; the handler test also needs
TorchServe's Python package (``ts``), not its Java server. No Qdrant, no gRPC.

Tolerances. ``fp32``: TF32 off on both cuDNN (convolutions) and cuBLAS (matmuls), so both
devices do IEEE float32 and differ only in summation order (cuDNN/cuBLAS algorithms, parallel
reductions): ~1e-6 relative per op, ~1e-5 after a network. The min-max normalisation of a map
divides by its range, which can amplify that. Maps: 2e-3 max abs (in [0, 1]; SmoothGrad on the
CNN is compared as whole maps, see SMOOTHGRAD_AGREEMENT); scores (cosines): 1e-4. A real device bug (other noise, another layer, a map left on the GPU un-normalised)
moves maps by > 0.1. ``default``: torch's defaults on the GPU, where cuDNN convolutions use TF32
(10-bit mantissa, ~5e-4 relative per product) on Ampere and later: maps 5e-2, scores 2e-3.
"""

from __future__ import annotations

import gc
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():  # `make test` leaves tests/gpu out; naming it here is a mistake
    raise pytest.UsageError("tests/gpu needs a CUDA device: run `make test-gpu` on a GPU machine")

import timm
import torch.nn.functional as F

from histoxplain_model.encoders import Encoder, efficientnet_lite0_package_weights, load_encoder
from histoxplain_model.wire.envelope import decode_envelope, encode_request_image
from histoxplain_model.explain import explain_retrieval
from histoxplain_model.wire.cams import finish_cams
from histoxplain_model.options import SmoothGradOptions
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import RetrievalExplanation

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
PRESET = "efficientnet-lite0-imagenet"
VIT_PRESET = "timm:vit_small_patch16_224"
CUDA = torch.device("cuda:0")
METHODS = ("gradcam", "gradcampp", "smoothgrad")
# precision -> (max abs map difference, max abs score difference); see the module docstring.
TOLERANCE = {"fp32": (2e-3, 1e-4), "default": (5e-2, 2e-3)}
# SmoothGrad on a ReLU6 CNN is compared as whole maps, not pixel by pixel: input gradients through
# piecewise-linear activations jump where a unit crosses a kink, so a rounding difference between
# devices can flip a unit on one noisy copy and move single pixels of an n=4 average (measured on
# an H200: max pixel difference 0.056 with TF32 off, 0.15 with it on, while the ViT's stayed at
# 3e-6). precision -> (max mean abs map difference, min Pearson correlation of the maps).
SMOOTHGRAD_AGREEMENT = {"fp32": (2e-3, 0.995), "default": (1e-2, 0.98)}
MIN_COSINE = 0.9999


@contextmanager
def precision(mode: str) -> Iterator[None]:
    """``fp32``: TF32 off for convolutions and matmuls (restored after); ``default``: as is."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if mode == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _tiles(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth colour blobs with fine noise, (H, W, 3) uint8; odd tiles are not 224 px, so
    resizing runs on the device too."""
    rng = np.random.default_rng(seed)
    tiles = []
    for index in range(count):
        size = (224, 224) if index % 2 == 0 else (192 + 8 * index, 256)
        coarse = torch.from_numpy(rng.random((1, 3, 7, 7), dtype=np.float32))
        smooth = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        image = np.clip(0.1 + 0.8 * smooth + rng.normal(0.0, 0.04, (*size, 3)), 0.0, 1.0)
        tiles.append(np.ascontiguousarray((image * 255).astype(np.uint8)))
    return tiles


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    return _tiles(11)


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random (seeded) ViT-S/16 weights in a file: the generic timm preset loads local weights."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("vit") / "vit_small_random.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def encoders(vit_weights: Path) -> dict[tuple[str, str], Encoder]:
    """(arch, device) -> encoder; arch "cnn" is efficientnet-lite0 with its real weights."""
    loaded = {}
    for device in ("cpu", "cuda"):
        loaded[("cnn", device)] = load_encoder(PRESET, device=device)
        loaded[("vit", device)] = load_encoder(VIT_PRESET, weights=vit_weights, device=device)
    return loaded


def _max_diff(a: np.ndarray | None, b: np.ndarray | None) -> float:
    assert a is not None and b is not None
    assert a.shape == b.shape
    return float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32))))


def _check_maps(
    cpu: RetrievalExplanation, gpu: RetrievalExplanation, method: str, mode: str, record_property, prefix: str = ""
) -> None:
    """GradCAM-family maps pixel by pixel; SmoothGrad maps as wholes (SMOOTHGRAD_AGREEMENT)."""
    pairs = [(cpu.query_heatmaps, gpu.query_heatmaps), (cpu.reference_heatmaps, gpu.reference_heatmaps)]
    max_diff = max(_max_diff(a, b) for a, b in pairs)
    record_property(f"{prefix}max_map_diff", max_diff)
    if method != "smoothgrad":
        assert max_diff <= TOLERANCE[mode][0], (method, mode, max_diff)
        return
    for a, b in pairs:
        a, b = a.astype(np.float64), b.astype(np.float64)
        mean_diff = float(np.mean(np.abs(a - b)))
        correlation = min(float(np.corrcoef(x.ravel(), y.ravel())[0, 1]) for x, y in zip(a, b))
        record_property(f"{prefix}mean_map_diff", mean_diff)
        record_property(f"{prefix}min_map_correlation", correlation)
        max_mean, min_correlation = SMOOTHGRAD_AGREEMENT[mode]
        assert mean_diff <= max_mean and correlation >= min_correlation, (mode, mean_diff, correlation)


def _explain(encoder: Encoder, tiles: list[np.ndarray], method: str, references: int = 3) -> RetrievalExplanation:
    options = SmoothGradOptions(n_samples=4, chunk_size=2, seed=5) if method == "smoothgrad" else None
    return explain_retrieval(encoder, ExplainRequest(tiles[0], tiles[1 : 1 + references], method, options=options))


@pytest.fixture(scope="module")
def cpu_explanations(encoders, tiles) -> dict[tuple[str, str], RetrievalExplanation]:
    """The CPU reference of each (arch, method), computed once for both precision modes."""
    return {(arch, method): _explain(encoders[(arch, "cpu")], tiles, method) for arch in ("cnn", "vit") for method in METHODS}


def _check_numpy(explanation: RetrievalExplanation) -> None:
    for array in (explanation.scores, explanation.query_heatmaps, explanation.reference_heatmaps):
        assert isinstance(array, np.ndarray) and array.dtype == np.float32
        assert np.isfinite(array).all()


# -- model library -----------------------------------------------------------------------------


def test_encoder_moves_to_the_gpu(encoders) -> None:
    for arch in ("cnn", "vit"):
        encoder = encoders[(arch, "cuda")]
        assert encoder.device == CUDA
        assert {parameter.device for parameter in encoder.model.parameters()} == {CUDA}
        pixels = encoder.preprocess(_tiles(2))
        assert pixels.device == CUDA


def test_efficientnet_lite0_embeds_on_cuda_as_on_cpu(encoders, tiles, record_property) -> None:
    """torch's defaults on the GPU (TF32 convolutions included): what a deployment gets."""
    on_cpu = encoders[("cnn", "cpu")].embed_images(tiles)
    on_gpu = encoders[("cnn", "cuda")].embed_images(tiles)
    assert isinstance(on_gpu, np.ndarray) and on_gpu.dtype == np.float32 and on_gpu.shape == (11, 1280)
    cosine = float(np.min(np.sum(on_cpu * on_gpu, axis=1)))
    record_property("lite0_min_cosine_cpu_cuda", cosine)
    assert cosine >= MIN_COSINE


@pytest.mark.parametrize("mode", ["fp32", "default"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_maps_and_scores_on_cuda_match_cpu(encoders, cpu_explanations, tiles, arch, method, mode, record_property) -> None:
    cpu = cpu_explanations[(arch, method)]
    with precision(mode):
        gpu = _explain(encoders[(arch, "cuda")], tiles, method)
    _check_numpy(gpu)
    score_diff = _max_diff(cpu.scores, gpu.scores)
    record_property("max_score_diff", score_diff)
    # GradCAM++ on the random ViT-S (target blocks[-1].norm1, LayerNorm output) gives all-zero
    # maps on the CPU as well (measured on CPU for seeds 0-2, both polarities): there the test
    # checks only that both devices agree. Every other map must reach 1 after min-max.
    if (arch, method) != ("vit", "gradcampp"):
        assert float(gpu.query_heatmaps.max()) > 0.5 and float(gpu.reference_heatmaps.max()) > 0.5
    _check_maps(cpu, gpu, method, mode, record_property)
    assert score_diff <= TOLERANCE[mode][1], score_diff


def test_explaining_twice_does_not_grow_gpu_memory(encoders, tiles, record_property) -> None:
    encoder = encoders[("cnn", "cuda")]
    for method in ("gradcam", "smoothgrad"):
        _explain(encoder, tiles, method, references=10)  # warm-up: cuDNN/cuBLAS workspaces
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = []
        for _ in range(2):
            explanation = _explain(encoder, tiles, method, references=10)
            assert explanation.query_heatmaps.shape == (10, 224, 224)
            del explanation
            gc.collect()
            torch.cuda.synchronize()
            allocated.append(torch.cuda.memory_allocated(CUDA))
        record_property(f"{method}_allocated_after_calls", allocated)
        record_property(f"{method}_peak_bytes_k10", torch.cuda.max_memory_allocated(CUDA))
        assert allocated[1] <= allocated[0], f"{method}: {allocated[0]} -> {allocated[1]} bytes"


# -- embedded backend ----------------------------------------------------------------------------


def test_embedded_backend_on_cuda_matches_the_cpu_backend(tmp_path, tiles, record_property) -> None:
    from histoxplain_service.backends.embedded import create_embedded_backend
    from histoxplain_service.config import Settings

    on_gpu = create_embedded_backend(Settings.from_env({"HISTOXPLAIN_DEVICE": "cuda", "HISTOXPLAIN_DATA": str(tmp_path / "gpu")}))
    on_cpu = create_embedded_backend(Settings.from_env({"HISTOXPLAIN_DEVICE": "cpu", "HISTOXPLAIN_DATA": str(tmp_path / "cpu")}))
    assert on_gpu.encoder.device == CUDA and on_cpu.encoder.device == torch.device("cpu")
    if on_gpu._pixel_embedder is not None:  # onnxruntime-gpu: only with its CUDA provider running
        assert on_gpu._pixel_embedder.__self__.uses_cuda
    record_property("gpu_backend_embedder", "onnxruntime-cuda" if on_gpu._pixel_embedder else "torch-cuda")

    gpu_vectors, cpu_vectors = on_gpu.embed(tiles[:5]), on_cpu.embed(tiles[:5])
    assert isinstance(gpu_vectors, np.ndarray) and gpu_vectors.dtype == np.float32 and gpu_vectors.shape == (5, 1280)
    assert float(np.min(np.sum(gpu_vectors * cpu_vectors, axis=1))) >= MIN_COSINE

    for method in METHODS:
        options = SmoothGradOptions(n_samples=4, seed=2) if method == "smoothgrad" else None
        request = ExplainRequest(tiles[0], tiles[1:4], method, options=options)
        cpu = on_cpu.explain(request)
        with precision("fp32"):
            gpu = on_gpu.explain(request)
        _check_numpy(gpu)
        _check_maps(cpu, gpu, method, "fp32", record_property, prefix=f"backend_{method}_")
        assert _max_diff(cpu.scores, gpu.scores) <= TOLERANCE["fp32"][1], method


# -- TorchServe handler (the Python class, no Java) ------------------------------------------------


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("ts.torch_handler.base_handler", reason="TorchServe's Python package (ts) is not installed")
    spec = importlib.util.spec_from_file_location("retrieval_handler_gpu", REPO / "handlers" / "retrieval_handler.py")
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model_dir = tmp_path_factory.mktemp("model-dir")
    torch.save(efficientnet_lite0_package_weights(), model_dir / "weights.pt")
    (model_dir / "setup_config.json").write_text(json.dumps({"preset": PRESET, "weights": "weights.pt"}))
    context = SimpleNamespace(
        system_properties={"model_dir": str(model_dir), "gpu_id": 0}, manifest={"model": {}}, metrics=None
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("HISTOXPLAIN_DEVICE", raising=False)  # TorchServe's gpu_id decides
        instance = module.RetrievalHandler()
        instance.initialize(context)
    return instance, context


def test_handler_worker_with_gpu_id_0_serves_from_cuda_0(handler, encoders, tiles, record_property) -> None:
    instance, context = handler
    assert instance.device == CUDA
    assert {parameter.device for parameter in instance.encoder.model.parameters()} == {CUDA}

    embed_request = {"mode": b"embed", **{f"image.{i}": encode_request_image(tile) for i, tile in enumerate(tiles[:4])}}
    explain_request = {
        "mode": b"explain", "method": b"gradcam", "query": encode_request_image(tiles[0]),
        **{f"reference.{i}": encode_request_image(tile) for i, tile in enumerate(tiles[1:4])},
    }
    with precision("fp32"), torch.inference_mode():  # TorchServe calls handlers under inference mode
        embed_response, explain_response = instance.handle([embed_request, explain_request], context)
    embed_meta, embed_arrays = decode_envelope(embed_response)
    explain_meta, explain_arrays = decode_envelope(explain_response)
    assert embed_meta["mode"] == "embed" and explain_meta["mode"] == "explain"

    reference = encoders[("cnn", "cpu")]
    expected = reference.embed_images(tiles[:4])
    assert embed_arrays["embeddings"].dtype == np.float32
    assert float(np.min(np.sum(embed_arrays["embeddings"] * expected, axis=1))) >= MIN_COSINE

    local = explain_retrieval(reference, ExplainRequest(tiles[0], tiles[1:4], "gradcam"))
    map_tolerance, score_tolerance = TOLERANCE["fp32"]
    size = tuple(explain_meta["map_size"])  # GradCAM travels as raw CAMs, finished by the receiver
    for name in ("query_heatmaps", "reference_heatmaps"):
        diff = _max_diff(finish_cams(explain_arrays[name], size), getattr(local, name))
        record_property(f"handler_{name}_max_diff", diff)
        assert diff <= map_tolerance, (name, diff)
    assert _max_diff(explain_arrays["scores"], local.scores) <= score_tolerance
