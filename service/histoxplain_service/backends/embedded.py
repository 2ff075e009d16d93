"""The model library in-process: the CLI's backend and the gateway's ``embedded`` backend."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from histoxplain_model.deadlines import check_deadline, deadline
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import ModelInfo, RetrievalExplanation

if TYPE_CHECKING:
    from histoxplain_model.encoders import Encoder
    from histoxplain_service.config import Settings

log = logging.getLogger(__name__)

#: (B, 3, H, W) float32 preprocessed pixels -> (B, D) float32, the model's own embeddings (not
#: normalised: rise's projection target needs |e|); ``embed`` normalises them.
PixelEmbedder = Callable[[np.ndarray], np.ndarray]


class EmbeddedBackend:
    """Embeds and explains with an :class:`~histoxplain_model.encoders.Encoder` in this process.

    ``pixel_embedder`` replaces torch for embeddings only (the ONNX Runtime path, also rise's
    masked images); gradients always come from torch. Concurrent explanations need no lock: each builds its own explainer,
    keeps its state in local variables, and its forward hook on the shared target layer ignores
    the forward passes of other threads (``histoxplain_model.saliency.base``;
    ``tests/unit/model/test_saliency.py::test_concurrent_calls_on_one_model_do_not_mix``).
    """

    def __init__(
        self,
        encoder: Encoder,
        pixel_embedder: PixelEmbedder | None = None,
        embed_batch_size: int = 32,
    ) -> None:
        self._encoder = encoder
        self._pixel_embedder = pixel_embedder
        self._embed_batch_size = embed_batch_size

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    def info(self) -> ModelInfo:
        return self._encoder.model_info("embedded")

    def embed(self, images: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        if len(images) == 0:
            raise InvalidRequest("no images to embed; send at least one image")
        chunks = []
        if self._pixel_embedder is not None:
            from histoxplain_model.onnx_embedder import l2_normalise  # torch: imported only where used
        with deadline(_at(timeout)):
            for start in range(0, len(images), self._embed_batch_size):
                check_deadline()
                pixels = self._encoder.preprocess(list(images[start : start + self._embed_batch_size]))
                # preprocess puts the pixels on the encoder's device (maybe a GPU): numpy needs the CPU.
                if self._pixel_embedder is not None:
                    chunks.append(l2_normalise(self._pixel_embedder(pixels.cpu().numpy())))
                else:
                    chunks.append(self._encoder.embed(pixels).cpu().numpy())
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def explain(self, request: ExplainRequest, timeout: float | None = None) -> RetrievalExplanation:
        """Stored embeddings, when given, replace embedding that side (see ModelBackend.explain)."""
        from histoxplain_model.explain import explain_retrieval

        request.check_embedding_dim(int(self._encoder.embedding_dim))
        with deadline(_at(timeout)):
            if self._pixel_embedder is not None:
                request = self._with_embeddings(request, timeout)
            check_deadline()
            return explain_retrieval(self._encoder, request, pixel_embedder=self._pixel_embedder)

    def _with_embeddings(self, request: ExplainRequest, timeout: float | None) -> ExplainRequest:
        """``request`` with both sides' embeddings, the missing ones from ONNX Runtime: it embeds
        several times faster than a torch forward pass, so the explainer then runs torch only
        where gradients are needed."""
        query_vector, reference_vectors = request.query_embedding, request.reference_embeddings
        if query_vector is None and reference_vectors is None:
            vectors = self.embed([request.query, *request.references], timeout)
            query_vector, reference_vectors = vectors[0], vectors[1:]
        elif query_vector is None:
            query_vector = self.embed([request.query], timeout)[0]
        elif reference_vectors is None:
            reference_vectors = self.embed(list(request.references), timeout)
        return replace(request, query_embedding=query_vector, reference_embeddings=reference_vectors)

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        """Nothing to release: the encoder lives as long as the process."""


def _at(timeout: float | None) -> float | None:
    """The wall-clock deadline of a call with ``timeout`` seconds (``histoxplain_model.deadlines``)."""
    return None if timeout is None else time.time() + timeout


def create_embedded_backend(settings: Settings) -> EmbeddedBackend:
    """Load the configured encoder (local weights only) on ``settings.device`` into an
    in-process backend.

    With onnxruntime installed, embeddings run through an ONNX export of the encoder (cached
    under ``<data_dir>/onnx``, keyed by preset and weights); gradients always come from torch.
    On a CUDA device ONNX Runtime is used only with its CUDA provider (``onnxruntime-gpu``):
    without it torch embeds on the GPU, which is faster than ORT on the CPU.

    Raises:
        InvalidRequest / FailedPrecondition: ``settings.device`` names a GPU this machine lacks.
    """
    from histoxplain_model.encoders import load_encoder
    from histoxplain_model.onnx_embedder import cached_onnx_embedder, onnxruntime_available, onnxruntime_has_cuda

    encoder = load_encoder(settings.model, settings.weights, device=settings.device)
    on_gpu = encoder.device.type == "cuda"
    if not onnxruntime_available():
        return EmbeddedBackend(encoder)
    if on_gpu and not onnxruntime_has_cuda():
        log.info("onnxruntime has no CUDA provider (install onnxruntime-gpu); embedding with torch on %s", encoder.device)
        return EmbeddedBackend(encoder)
    try:
        onnx_embedder = cached_onnx_embedder(encoder, settings.data_dir / "onnx")
    except Exception:  # torch.onnx / onnxruntime raise many types; torch still embeds correctly
        log.warning("ONNX export of %s failed; embedding with torch instead", encoder.preset.name, exc_info=True)
        return EmbeddedBackend(encoder)
    if on_gpu and not onnx_embedder.uses_cuda:
        log.warning("onnxruntime could not start its CUDA provider; embedding with torch on %s", encoder.device)
        return EmbeddedBackend(encoder)
    log.info("embedding %s with onnxruntime (%s)", encoder.preset.name, ", ".join(onnx_embedder.providers))
    return EmbeddedBackend(encoder, pixel_embedder=onnx_embedder.embed_raw)
