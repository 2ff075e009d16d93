"""TorchServe handler for histoxplain: decode -> ``histoxplain_model`` -> encode. Nothing else.

The wire contract lives in ``histoxplain_model.wire`` and is shared with the gateway's
TorchServe backend: ``wire.inputs`` is the request's input map (modes ``embed``, ``explain``,
``info``; images, method, polarity, side, the method's options, stored embeddings as raw
float32), ``wire.outputs`` what each mode answers, ``wire.envelope`` the ``HXP1`` byte format
(a failed request gets an error envelope with its error class and gRPC status name). TorchServe
must run with ``decode_input_request=false`` so the values arrive as raw bytes
(``config.properties``). ``model_store/README.md`` documents the format.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

from histoxplain_model import errors
from histoxplain_model.encoders import load_encoder
from histoxplain_model.explain import explain_retrieval
from histoxplain_model.imageio import DEFAULT_MAX_REQUEST_PIXELS
from histoxplain_model.wire import inputs as wire_inputs
from histoxplain_model.wire.envelope import encode_error
from histoxplain_model.wire.outputs import encode_embeddings, encode_explanation, encode_info

logger = logging.getLogger(__name__)

SETUP_CONFIG = "setup_config.json"


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
        # Request images only (queries, regions); never whole slides: the smaller request limit.
        self.max_pixels = DEFAULT_MAX_REQUEST_PIXELS
        self.max_embed_batch = 32

    def initialize(self, context: Any) -> None:
        """Load the preset named in the archive's ``setup_config.json`` with its weights file,
        on the worker's device (:func:`_worker_device`)."""
        torch.set_num_threads(int(os.environ.get("HISTOXPLAIN_TORCH_THREADS", "1")))
        model_dir = Path(context.system_properties["model_dir"])
        setup = json.loads((model_dir / SETUP_CONFIG).read_text())
        weights = setup.get("weights")
        self.max_pixels = int(setup.get("max_pixels", DEFAULT_MAX_REQUEST_PIXELS))
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
                mode = wire_inputs.decode_mode(request)
                if mode == wire_inputs.EMBED:
                    embed_items.append((position, wire_inputs.decode_embed_images(request, self.max_pixels)))
                elif mode == wire_inputs.EXPLAIN:
                    responses[position] = self._explain(request, len(data))
                else:
                    responses[position] = encode_info(self.encoder.model_info("torchserve"))
            except Exception as error:  # one bad request fails only itself
                responses[position] = self._failure(error)
        for position, response in self._embed(embed_items, len(data)):
            responses[position] = response
        if context is not None and getattr(context, "metrics", None) is not None:
            context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        return responses  # type: ignore[return-value]  # every slot is filled above

    # -- modes ---------------------------------------------------------------------------------

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
            results.append((position, encode_embeddings(embeddings[start:stop], batch)))
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
        explain_request = wire_inputs.decode_explain_request(request, self.max_pixels, int(self.encoder.embedding_dim))
        # Saliency needs autograd: leave any inference mode the caller may have entered.
        with torch.inference_mode(False), torch.enable_grad():
            explanation = explain_retrieval(self.encoder, explain_request, native_cams=True)
        return encode_explanation(explanation, explain_request.side, batch)

    @staticmethod
    def _failure(error: BaseException) -> bytes:
        if isinstance(error, errors.HistoxplainError):
            logger.info("request failed: %s: %s", type(error).__name__, error)
        else:
            logger.exception("request failed unexpectedly")
        return encode_error(error)
