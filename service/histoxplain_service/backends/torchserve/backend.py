"""The ``torchserve`` model backend: TorchServe's gRPC inference API with token authorization.

Requests and responses follow the wire contract the handler (``handlers/retrieval_handler.py``)
imports too, documented in ``model_store/README.md``: ``histoxplain_model.wire.inputs`` builds
the ``PredictionsRequest.input`` map, the answer is an ``HXP1`` envelope
(``histoxplain_model.wire.envelope``) whose contents ``histoxplain_model.wire.outputs`` reads. Images travel as pixel envelopes (raw RGB; PNG only where
the raw pixels would take over half of the message limit), so TorchServe sees exactly the pixels the embedded backend would, and neither side
spends time on PNG. Every call carries ``authorization: Bearer <inference key>``
from TorchServe's ``key_file.json``; the file is re-read when it changes and once more after a
PERMISSION_DENIED (TorchServe rewrites it when keys are regenerated).

Error messages reach gateway clients (and the gateway logs them), so they say "the model
server" and name neither TorchServe's internal address nor the key file's path; the gateway
log gets those with gRPC's own details, which can name addresses too.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import empty_pb2

from histoxplain_model import errors
from histoxplain_model.deadlines import check_deadline, stop_requested, time_left
from histoxplain_model.limits import MAX_MESSAGE_BYTES
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import ModelInfo, RetrievalExplanation
from histoxplain_model.wire.envelope import decode_envelope, encode_request_image
from histoxplain_model.wire.inputs import embed_inputs, explain_inputs, info_inputs
from histoxplain_model.wire.outputs import decode_embeddings, decode_explanation, decode_info
from histoxplain_service.backends.torchserve._proto import inference_pb2, inference_pb2_grpc

__all__ = ["TorchServeBackend", "TorchServeConfig"]

logger = logging.getLogger(__name__)

_Response = TypeVar("_Response")


#: What TorchServe says when the worker serving a call died.
_WORKER_LOST = "Worker died"


@dataclass(frozen=True)
class TorchServeConfig:
    """Where TorchServe's gRPC inference API is and how to authenticate.

    Attributes:
        target: ``host:port`` of the gRPC inference API (``grpc_inference_port``).
        model_name: the name the model is registered under.
        key_file: TorchServe's ``key_file.json`` (in its working directory); ``None`` when
            token authorization is off.
        max_message_bytes: largest request/response message (TorchServe's
            ``max_request_size`` / ``max_response_size`` must be at least as large).
    """

    target: str = "127.0.0.1:7070"
    model_name: str = "histoxplain"
    key_file: Path | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES


class _KeyFile:
    """The inference key from ``key_file.json``, re-read when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._key: str | None = None

    def key(self, force: bool = False) -> str | None:
        if self._path is None:
            return None
        with self._lock:
            try:
                stat = self._path.stat()
            except FileNotFoundError:
                logger.warning("TorchServe key file %s does not exist", self._path)
                raise errors.DependencyUnavailable(
                    "the model server's key file (HISTOXPLAIN_TORCHSERVE_KEY_FILE) does not exist; "
                    "is TorchServe running?"
                ) from None
            stamp = (stat.st_mtime_ns, stat.st_size)
            if force or stamp != self._stamp or self._key is None:
                try:
                    self._key = json.loads(self._path.read_text())["inference"]["key"]
                except (KeyError, TypeError, json.JSONDecodeError) as error:
                    logger.warning("TorchServe key file %s has no inference key: %s", self._path, error)
                    raise errors.DependencyUnavailable(
                        "the model server's key file has no inference key (HISTOXPLAIN_TORCHSERVE_KEY_FILE)"
                    ) from None
                self._stamp = stamp
            return self._key


class TorchServeBackend:
    """A :class:`~histoxplain_service.backends.base.ModelBackend` over TorchServe's gRPC API.

    Thread-safe: one channel, no per-call state on the instance (the gateway calls it from
    worker threads). ``timeout`` becomes the gRPC deadline of the call.
    """

    def __init__(self, config: TorchServeConfig) -> None:
        self.config = config
        self._keys = _KeyFile(config.key_file)
        options = [
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
        ]
        self._channel = grpc.insecure_channel(config.target, options=options)  # loopback only
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)
        self._info: ModelInfo | None = None
        self._info_lock = threading.Lock()

    # -- ModelBackend --------------------------------------------------------------------------

    def info(self, timeout: float | None = 30.0) -> ModelInfo:
        with self._info_lock:
            if self._info is None:
                meta, _ = self.predict(info_inputs(), timeout=timeout)
                self._info = decode_info(meta, "torchserve")
            return self._info

    def embed(self, images: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        """One request per call: TorchServe batches concurrent calls (``batch_size``)."""
        if len(images) == 0:
            raise errors.InvalidRequest("no images to embed; send at least one image")
        _, arrays = self.predict(embed_inputs(self._encode_images(images)), timeout)
        return decode_embeddings(arrays, len(images))

    def explain(self, request: ExplainRequest, timeout: float | None = None) -> RetrievalExplanation:
        """The request's options that differ from the defaults travel as text and its stored
        embeddings as raw float32 (``histoxplain_model.wire.inputs``); the handler rebuilds the
        same request and skips embedding the sides whose vectors it got. Raw CAMs are finished
        here, with numpy."""
        query_data, *reference_data = self._encode_images([request.query, *request.references])
        meta, arrays = self.predict(explain_inputs(request, query_data, reference_data), timeout)
        return decode_explanation(meta, arrays)

    def ready(self) -> bool:
        """True once the model has answered (``info``) and TorchServe's Ping says Healthy.

        Ping is answered by the frontend, not the worker queue, so a worker busy with a long
        explanation does not make the backend look down; a lost worker makes Ping unhealthy.
        """
        try:
            self.info(timeout=5.0)
            health = self._authorised(
                lambda metadata: self._stub.Ping(empty_pb2.Empty(), timeout=5.0, metadata=metadata)
            ).health
        except (errors.HistoxplainError, RuntimeError) as error:
            logger.debug("TorchServe not ready: %s", error)
            return False
        try:
            return json.loads(health).get("status") == "Healthy"
        except (json.JSONDecodeError, AttributeError):
            return False

    def close(self) -> None:
        self._channel.close()

    # -- transport -----------------------------------------------------------------------------

    def _encode_images(self, images: Sequence[np.ndarray]) -> list[bytes]:
        """Raw pixels while they take at most half of the message limit, else PNG (smaller)."""
        raw = sum(image.nbytes for image in images) <= self.config.max_message_bytes // 2
        return [encode_request_image(image, raw) for image in images]

    def predict(
        self, inputs: Mapping[str, bytes], timeout: float | None = None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """One raw Predictions call: the handler's input map -> its decoded envelope ``(meta, arrays)``.

        The wire-level entry point under ``embed``/``explain``/``info`` (benchmarks and tests
        read ``meta["batch"]``, the number of requests TorchServe batched with this one).
        """
        request = inference_pb2.PredictionsRequest(model_name=self.config.model_name, input=inputs)
        if timeout is None:
            timeout = time_left()
        response = self._authorised(lambda metadata: _cancellable(self._stub.Predictions.future(
            request, timeout=timeout, metadata=metadata
        )))
        return decode_envelope(response.prediction)

    def _authorised(self, call: Callable[[tuple[tuple[str, str], ...] | None], _Response]) -> _Response:
        """``call(metadata)`` with the inference key; once more with a re-read key if refused."""
        try:
            return call(self._metadata(force_key=False))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.PERMISSION_DENIED or self.config.key_file is None:
                raise self._map_rpc_error(error) from None
        try:  # the keys may have been regenerated since we read the file
            return call(self._metadata(force_key=True))
        except grpc.RpcError as retry_error:
            raise self._map_rpc_error(retry_error) from None

    def _metadata(self, force_key: bool) -> tuple[tuple[str, str], ...] | None:
        key = self._keys.key(force=force_key)
        return (("authorization", f"Bearer {key}"),) if key is not None else None

    def _map_rpc_error(self, error: grpc.RpcError) -> Exception:
        """A TorchServe status as a histoxplain error whose message names no address or path
        (see the module docstring); the details go to the log with the address."""
        code, details = error.code(), error.details() or ""
        # A stopped TorchServe fails every health probe: those common cases are logged at DEBUG.
        routine = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        logger.log(
            logging.DEBUG if routine else logging.WARNING, "TorchServe at %s (model %s) answered %s: %s",
            self.config.target, self.config.model_name, code.name, details,
        )
        where = "the model server (TorchServe)"
        if _WORKER_LOST in details and code != grpc.StatusCode.DEADLINE_EXCEEDED:
            # A worker that died mid-call (killed, out of memory) comes back as RESOURCE_EXHAUSTED
            # or INTERNAL with this text; TorchServe restarts it, so the call is worth retrying.
            return errors.DependencyUnavailable(f"{where} lost its worker; retry in a few seconds")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return errors.DeadlineExceeded(f"{where} did not answer before the deadline; retry with a longer one")
        if code == grpc.StatusCode.UNAVAILABLE:
            return errors.DependencyUnavailable(f"{where} is unavailable; retry later")
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return errors.DependencyUnavailable(
                f"{where} refused the inference key of the gateway; check HISTOXPLAIN_TORCHSERVE_KEY_FILE"
            )
        if code == grpc.StatusCode.NOT_FOUND:
            return errors.DependencyUnavailable(
                f"{where} does not serve model {self.config.model_name!r}; check HISTOXPLAIN_TORCHSERVE_MODEL"
            )
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return RuntimeError(f"{where} failed ({code.name}): {details}")  # INTERNAL to the caller, generic
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return errors.InvalidRequest(f"the request is too large for {where}; send a smaller image or fewer")
        return errors.DependencyUnavailable(f"{where} failed ({code.name}); the gateway log has the details")


#: How often a call waiting for TorchServe looks at its caller's stop signal.
_CANCEL_POLL_S = 0.1


def _cancellable(call: grpc.Future) -> Any:
    """The result of ``call``, cancelled as soon as this thread's caller cancels
    (``histoxplain_model.deadlines``): the gateway's worker thread is free at once, and TorchServe
    drops the request if it has not started it (a started explanation stops at its deadline)."""
    while True:
        try:
            return call.result(timeout=_CANCEL_POLL_S)
        except grpc.FutureTimeoutError:
            if stop_requested():
                call.cancel()
                check_deadline()
