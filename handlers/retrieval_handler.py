"""TorchServe handler for histoxplain: decode -> ``histoxplain_model`` -> encode. Nothing else.

TorchServe's gRPC API passes no headers to the handler, so everything travels in the request's
input map (``map<string, bytes>``); TorchServe must run with ``decode_input_request=false`` so the
values arrive as raw bytes (``model_store/config.properties``).

Request (input map; text values UTF-8):

    mode=embed     image.0, image.1, ...  images; at least one
    mode=explain   query                  the query image
                   reference.0, ...       reference images; at least one
                   method                 gradcam | gradcampp | smoothgrad
                   polarity               similar (default) | dissimilar
                   side                   query | retrieved | both (default)
                   smoothgrad_samples, smoothgrad_sigma, smoothgrad_chunk_size, smoothgrad_seed,
                   gradcampp_gradient_scale, gradcampp_eps
                                          optional method options (text); absent: the library
                                          default (``histoxplain_model.options.INPUT_KEYS``).
                                          A bad value fails only its request (INVALID_ARGUMENT).
                   query_embedding        optional stored vector of the query: D raw float32 LE
                   reference_embeddings   optional stored vectors of the references: K*D raw
                                          float32 LE, row-major. Given, that side is not
                                          embedded again; a wrong length fails its request.
    mode=info      (nothing else)         the served encoder's description

An image is an encoded file (PNG, JPEG, TIFF) or a pixel envelope ((H, W, 3) uint8 RGB, what the
gateway sends: no PNG encode/decode on either side).

Response (one per request, also inside a batch): an ``HXP1`` envelope
(``histoxplain_model.wire.envelope`` holds the format, its encoder and its decoder). Arrays:
``embeddings`` (N, D) float32 L2-normalised; ``scores`` (K,) float32; ``query_heatmaps`` /
``reference_heatmaps``: for GradCAM and GradCAM++ the raw class activation maps (K, h, w)
float32 >= 0 at the target layer's resolution, with ``meta["map_size"]`` = [H, W] (the receiver
upsamples and min-max normalises them: ``RetrievalExplanation.finished``; 7x7 instead of
224x224 values for EfficientNet-Lite0); for SmoothGrad the finished maps (K, H, W) float16 in
[0, 1] (rounding moves a value by at most 2**-12 = 2.4e-4). A failed request gets an error
envelope with its error class and gRPC status name.

Batching: embed requests of one batch are decoded one by one (a bad image fails only its
request) and embedded together; explain requests run one after another with gradients enabled
(TorchServe's BaseHandler runs its ``inference`` under ``torch.inference_mode()``, which
``enable_grad`` alone does not undo). The archive's ``setup_config.json`` names the preset and
its weights file (see ``model_store/build_mar.py``). TorchServe allows ONE class per handler
module: helpers here are functions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from histoxplain_model import errors
from histoxplain_model.encoders import load_encoder
from histoxplain_model.explain import explain_retrieval
from histoxplain_model.wire.envelope import decode_request_image, encode_envelope, encode_error
from histoxplain_model.imageio import DEFAULT_MAX_PIXELS
from histoxplain_model.options import options_from_inputs

logger = logging.getLogger(__name__)

SETUP_CONFIG = "setup_config.json"
MODES = ("embed", "explain", "info")


# -- request parsing -------------------------------------------------------------------------


def _text(request: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = request.get(key)
    if value is None:
        if default is None:
            raise errors.InvalidRequest(f"the request has no {key!r} input; send it in the input map")
        return default
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise errors.InvalidRequest(f"input {key!r} is not UTF-8 text") from None
    return str(value).strip()


def _numbered(request: Mapping[str, Any], prefix: str) -> list[bytes]:
    """``prefix.0``, ``prefix.1``, ... in order; the numbering must have no gaps."""
    indices = []
    for key in request:
        head, _, tail = key.rpartition(".")
        if head == prefix:
            if not tail.isdigit():
                raise errors.InvalidRequest(f"input {key!r} is not numbered; use {prefix}.0, {prefix}.1, ...")
            indices.append(int(tail))
    indices.sort()
    if indices != list(range(len(indices))):
        raise errors.InvalidRequest(f"inputs {prefix}.N must be numbered 0..{len(indices) - 1} without gaps")
    return [_image_bytes(request, f"{prefix}.{index}") for index in indices]


def _embeddings(request: Mapping[str, Any], key: str, rows: int | None, dim: int) -> np.ndarray | None:
    """Raw little-endian float32 under ``key`` -> (dim,) (``rows`` None) or (rows, dim); absent: None."""
    value = request.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        raise errors.InvalidRequest(f"input {key!r} is text; send raw little-endian float32 bytes")
    data = bytes(value)
    expected = (1 if rows is None else rows) * dim
    if len(data) != 4 * expected:
        raise errors.InvalidRequest(
            f"input {key!r} has {len(data)} bytes; expected {expected} float32 values ({4 * expected} bytes) "
            f"for a {dim}-d encoder; send embeddings from the served encoder"
        )
    vectors = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(vectors).all():
        raise errors.InvalidRequest(f"input {key!r} has NaN or infinite values; send the stored embeddings unchanged")
    return vectors if rows is None else vectors.reshape(rows, dim)


def _image_bytes(request: Mapping[str, Any], key: str) -> bytes:
    value = request.get(key)
    if value is None:
        raise errors.InvalidRequest(f"the request has no {key!r} image")
    if isinstance(value, str):
        raise errors.ImageDecodeError(f"input {key!r} is text; send the encoded image bytes")
    return bytes(value)


def _worker_device(context: Any) -> str:
    """The device of this worker: ``HISTOXPLAIN_DEVICE`` when set (``auto`` counts as unset),
    else TorchServe's choice as BaseHandler makes it: ``cuda:<gpu_id>`` (the GPU TorchServe
    assigned to this worker, round robin over ``number_of_gpu``) when CUDA is available and a
    gpu_id is given, else ``cpu``."""
    configured = os.environ.get("HISTOXPLAIN_DEVICE", "").strip()
    if configured and configured.lower() != "auto":
        return configured
    gpu_id = context.system_properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        return f"cuda:{gpu_id}"
    return "cpu"


class RetrievalHandler(BaseHandler):
    """Embeds images and explains retrievals with one ``histoxplain_model`` encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = None
        self.max_pixels = DEFAULT_MAX_PIXELS
        self.max_embed_batch = 32

    def initialize(self, context: Any) -> None:
        """Load the preset named in the archive's ``setup_config.json`` with its weights file,
        on the worker's device (:func:`_worker_device`)."""
        torch.set_num_threads(int(os.environ.get("HISTOXPLAIN_TORCH_THREADS", "1")))
        model_dir = Path(context.system_properties["model_dir"])
        setup = json.loads((model_dir / SETUP_CONFIG).read_text())
        weights = setup.get("weights")
        self.max_pixels = int(setup.get("max_pixels", DEFAULT_MAX_PIXELS))
        self.max_embed_batch = int(setup.get("max_embed_batch", 32))
        device = _worker_device(context)
        self.encoder = load_encoder(setup["preset"], weights=model_dir / weights if weights else None, device=device)
        self.device = self.encoder.device
        if self.device.type == "cuda":
            # Library code names its device explicitly; this keeps stray CUDA state (contexts,
            # cuBLAS handles) of this worker off GPU 0.
            torch.cuda.set_device(self.device)
        self.manifest = context.manifest
        self.initialized = True
        import histoxplain_model

        logger.info(
            "histoxplain encoder %s loaded from %s on %s (asked: %s, gpu_id %s; library %s)",
            setup["preset"], model_dir, self.device, device, context.system_properties.get("gpu_id"),
            Path(histoxplain_model.__file__).parent,
        )

    def handle(self, data: list[Mapping[str, Any]], context: Any) -> list[bytes]:
        """One envelope per request; a failing request gets an error envelope, never the batch."""
        start = time.perf_counter()
        self.context = context
        responses: list[bytes | None] = [None] * len(data)
        embed_items: list[tuple[int, list[np.ndarray]]] = []
        for position, request in enumerate(data):
            try:
                mode = _text(request, "mode")
                if mode == "embed":
                    embed_items.append((position, self._decode_all(_numbered(request, "image"), "image")))
                elif mode == "explain":
                    responses[position] = self._explain(request, len(data))
                elif mode == "info":
                    responses[position] = encode_envelope(self._info(), {})
                else:
                    raise errors.UnknownNameError.for_name("mode", mode, MODES)
            except Exception as error:  # one bad request fails only itself
                responses[position] = self._failure(error)
        for position, response in self._embed(embed_items, len(data)):
            responses[position] = response
        if context is not None and getattr(context, "metrics", None) is not None:
            context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return responses  # type: ignore[return-value]  # every slot is filled above

    # -- modes ---------------------------------------------------------------------------------

    def _decode_all(self, encoded: Sequence[bytes], what: str) -> list[np.ndarray]:
        if not encoded:
            raise errors.InvalidRequest(f"no {what} inputs; send {what}.0, {what}.1, ...")
        return [
            decode_request_image(data, self.max_pixels, source=f"{what}.{index}")
            for index, data in enumerate(encoded)
        ]

    def _embed(self, items: list[tuple[int, list[np.ndarray]]], batch: int) -> list[tuple[int, bytes]]:
        """All images of all embed requests in one pass (chunks of ``max_embed_batch``).

        ``batch`` (the number of requests TorchServe batched) is reported in the response meta.
        """
        if not items:
            return []
        images = [image for _, request_images in items for image in request_images]
        try:
            embeddings = self._embed_images(images)
        except Exception as error:
            if len(items) == 1:
                return [(items[0][0], self._failure(error))]
            # Isolate the request that breaks the joint pass.
            return [result for item in items for result in self._embed([item], batch)]
        results = []
        start = 0
        for position, request_images in items:
            stop = start + len(request_images)
            meta = {"mode": "embed", "batch": batch}
            results.append((position, encode_envelope(meta, {"embeddings": embeddings[start:stop]})))
            start = stop
        return results

    def _embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.max_embed_batch):
                pixels = self.encoder.preprocess(images[start : start + self.max_embed_batch])
                chunks.append(self.encoder.embed(pixels).float().cpu().numpy())
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _explain(self, request: Mapping[str, Any], batch: int) -> bytes:
        method = _text(request, "method")
        polarity = _text(request, "polarity", "similar")
        side = _text(request, "side", "both")
        options = options_from_inputs(request)
        query = self._decode_all([_image_bytes(request, "query")], "query")[0]
        references = self._decode_all(_numbered(request, "reference"), "reference")
        dim = int(self.encoder.embedding_dim)
        query_embedding = _embeddings(request, "query_embedding", None, dim)
        reference_embeddings = _embeddings(request, "reference_embeddings", len(references), dim)
        # Saliency needs autograd: leave any inference mode the caller may have entered.
        with torch.inference_mode(False), torch.enable_grad():
            explanation = explain_retrieval(
                self.encoder, query, references, method=method, polarity=polarity, side=side,
                options=options, query_embedding=query_embedding, reference_embeddings=reference_embeddings,
                native_cams=True,
            )
        # Raw CAMs are a few hundred values a map: float32. Finished maps are float16.
        dtype = np.float32 if explanation.map_size is not None else np.float16
        arrays: dict[str, np.ndarray] = {"scores": np.asarray(explanation.scores, dtype=np.float32)}
        if explanation.query_heatmaps is not None:
            arrays["query_heatmaps"] = np.asarray(explanation.query_heatmaps, dtype=dtype)
        if explanation.reference_heatmaps is not None:
            arrays["reference_heatmaps"] = np.asarray(explanation.reference_heatmaps, dtype=dtype)
        meta = {"mode": "explain", "batch": batch, "method": explanation.method,
                "polarity": explanation.polarity, "side": side}
        if explanation.map_size is not None:
            meta["map_size"] = list(explanation.map_size)
        return encode_envelope(meta, arrays)

    def _info(self) -> dict[str, Any]:
        from histoxplain_model.saliency import METHODS

        preset = self.encoder.preset
        return {
            "mode": "info",
            "preset": preset.name,
            "architecture": preset.architecture,
            "embedding_dim": int(self.encoder.embedding_dim),
            "input_size": [int(size) for size in self.encoder.input_size],
            "methods": list(METHODS),
        }

    @staticmethod
    def _failure(error: BaseException) -> bytes:
        if isinstance(error, errors.HistoxplainError):
            logger.info("request failed: %s: %s", type(error).__name__, error)
        else:
            logger.exception("request failed unexpectedly")
        return encode_error(error)
