"""ONNX Runtime embedding path: export an encoder once, embed through onnxruntime.

Only embeddings go through ONNX (indexing and search); gradients for explanations always come
from the torch model. The export uses the TorchScript-based exporter (``dynamo=False``: the
default dynamo exporter needs the ``onnxscript`` package), opset 17 and a dynamic batch axis.
:func:`cached_onnx_embedder` keeps one ``.onnx`` file per preset and weights fingerprint in a
cache folder, checks it against torch after export, writes it atomically and rebuilds it when
missing or corrupt. The cached embedder runs where the encoder runs: on a CUDA encoder it asks
for ORT's CUDAExecutionProvider on the same GPU when ORT offers it (the ``onnxruntime-gpu``
package; plain ``onnxruntime`` has only the CPU provider), on a CPU encoder the CPU provider.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from .encoders import Encoder

__all__ = [
    "OPSET",
    "onnxruntime_available",
    "onnxruntime_has_cuda",
    "providers_for",
    "export_onnx",
    "l2_normalise",
    "OnnxEmbedder",
    "weights_fingerprint",
    "cached_onnx_embedder",
]

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "embeddings"
_MIN_COSINE = 0.9999  # export check against torch


def onnxruntime_available() -> bool:
    """True when the ``onnxruntime`` package can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def onnxruntime_has_cuda() -> bool:
    """True when the installed onnxruntime offers CUDAExecutionProvider (``onnxruntime-gpu``).

    Offered is not guaranteed to start (it also needs CUDA and cuDNN libraries that fit);
    :attr:`OnnxEmbedder.uses_cuda` says what a session really got.
    """
    if not onnxruntime_available():
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def providers_for(device: torch.device | str) -> list[str | tuple[str, dict[str, Any]]]:
    """ORT execution providers for a torch device: the CUDA provider on the same GPU first when
    ``device`` is CUDA and ORT offers it, then always the CPU provider."""
    device = torch.device(device)
    if device.type == "cuda" and onnxruntime_has_cuda():
        index = device.index if device.index is not None else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """(B, D) -> (B, D) float32 rows of unit length (a zero row stays zero)."""
    embeddings = embeddings.astype(np.float32, copy=False)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return np.ascontiguousarray(embeddings / np.maximum(norms, 1e-12), dtype=np.float32)


def export_onnx(model: nn.Module, path: str | os.PathLike[str], input_size: tuple[int, int] = (224, 224)) -> Path:
    """Export ``model`` ((B, 3, H, W) -> (B, D)) to ONNX at ``path`` with a dynamic batch axis.

    ``model`` may be an :class:`Encoder` (its ``.model`` and ``input_size`` are used) or a module.
    """
    if hasattr(model, "model") and hasattr(model, "input_size"):
        input_size = tuple(model.input_size)  # type: ignore[assignment]
        model = model.model  # type: ignore[assignment]
    path = Path(path)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    example = torch.zeros(1, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        # The tracer warns about Python-side shape checks in timm; shapes are fixed but the batch.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    finally:
        model.train(was_training)
    return path


class OnnxEmbedder:
    """An onnxruntime session over an exported encoder.

    Args:
        path: the ``.onnx`` file.
        intra_op_threads: ORT intra-op threads (1 by default: on small shared machines more
            threads stall when another process is busy); None leaves ORT's default.
        providers: execution providers (names or ``(name, options)`` pairs, see
            :func:`providers_for`); default CUDA where available, then CPU.
        preprocess: images -> (B, 3, H, W) pixels (an Encoder's ``preprocess``), for ``embed_images``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        intra_op_threads: int | None = 1,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        preprocess: Callable[[Sequence[np.ndarray]], Any] | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=list(providers))
        self.providers: list[str] = self.session.get_providers()
        self.input_name = self.session.get_inputs()[0].name
        self.embedding_dim = int(self.session.get_outputs()[0].shape[-1])
        self._preprocess = preprocess

    @property
    def uses_cuda(self) -> bool:
        """Whether the session really runs on CUDA (ORT falls back to the CPU, with only a log
        line, when the CUDA provider cannot start)."""
        return "CUDAExecutionProvider" in self.providers

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 preprocessed pixels -> (B, D) float32 L2-normalised embeddings."""
        return l2_normalise(self.embed_raw(pixels))

    def embed_raw(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 preprocessed pixels -> (B, D) float32, the model's own output (not
        normalised; what a target that needs |e|, such as the projection, is computed from)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {pixels.shape}")
        (embeddings,) = self.session.run([OUTPUT_NAME], {self.input_name: pixels})
        return np.asarray(embeddings, dtype=np.float32)

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """(H, W, 3) uint8 RGB tiles -> (B, D) float32 L2-normalised embeddings (needs ``preprocess``)."""
        if self._preprocess is None:
            raise RuntimeError("OnnxEmbedder was built without a preprocess function; use embed(pixels)")
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = self._preprocess(images[start:start + batch_size])
            pixels = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels
            chunks.append(self.embed(pixels))
        if not chunks:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return np.concatenate(chunks)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and values of the model's state dict."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_against_torch(encoder: Encoder, embedder: OnnxEmbedder) -> float:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, *encoder.input_size, generator=generator)
    expected = encoder.embed(pixels).cpu().numpy()
    actual = embedder.embed(pixels.numpy())
    return float(np.min(np.sum(expected * actual, axis=1)))


def cached_onnx_embedder(
    encoder: Encoder, cache_dir: str | os.PathLike[str], intra_op_threads: int | None = 1
) -> OnnxEmbedder:
    """An ONNX embedder for ``encoder``, exported once into ``cache_dir`` and reused.

    The file name holds the preset, input size, opset, torch version and a fingerprint of the
    weights, so other weights never reuse a stale export. A missing or unreadable file is
    re-exported to a temporary file, checked against torch (cosine >= 0.9999) and moved into
    place atomically. The session's providers follow ``encoder.device`` (:func:`providers_for`).
    """
    import onnxruntime  # noqa: F401  (fail early and clearly when it is not installed)

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    safe_preset = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.preset.name)
    height, width = encoder.input_size
    key = f"{weights_fingerprint(encoder.model)}:{height}x{width}:{OPSET}:{torch.__version__}"
    path = cache_dir / f"{safe_preset}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.onnx"
    providers = providers_for(getattr(encoder, "device", "cpu"))
    if path.exists():
        try:
            return OnnxEmbedder(path, intra_op_threads, providers, preprocess=encoder.preprocess)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            log.warning("cached ONNX model %s is unreadable (%s); exporting it again", path, exc)
    handle, temporary = tempfile.mkstemp(prefix=f".{safe_preset}-", suffix=".onnx.tmp", dir=cache_dir)
    os.close(handle)
    try:
        export_onnx(encoder, temporary)
        embedder = OnnxEmbedder(temporary, intra_op_threads, providers, preprocess=encoder.preprocess)
        cosine = _check_against_torch(encoder, embedder)
        if cosine < _MIN_COSINE:
            raise RuntimeError(f"ONNX export of {encoder.preset.name} disagrees with torch (cosine {cosine:.6f})")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    log.info("exported %s to %s (cosine to torch %.7f)", encoder.preset.name, path, cosine)
    return OnnxEmbedder(path, intra_op_threads, providers, preprocess=encoder.preprocess)
