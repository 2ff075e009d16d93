"""The TorchServe request's input map: what the TorchServe backend writes, what the handler reads.

TorchServe's gRPC API passes no headers to the handler, so everything travels in the request's
``input`` map (``map<string, bytes>``; TorchServe runs with ``decode_input_request=false``, so
values arrive as the bytes sent). Both ends import the key names and the codecs from here, so
the two cannot drift apart:

    mode=embed     image.0, image.1, ...  images; at least one
    mode=explain   query                  the query image
                   reference.0, ...       reference images; at least one
                   method                 a method name (histoxplain_model.vocabulary)
                   polarity               similar (default) | dissimilar
                   side                   query | retrieved | both (default)
                   <option keys>          the method's options that differ from its defaults, as
                                          text (``OPTION_KEYS``); absent: the default
                   query_embedding        optional stored vector of the query: D raw float32 LE
                   reference_embeddings   optional stored vectors of the references: K*D raw
                                          float32 LE, row-major. Given, that side is not embedded
                                          again.
                   deadline               optional wall-clock time (seconds since the epoch, as
                                          text) after which the worker stops the explanation
                   target                 cosine (default) | projection
                   correspondences        optional: region pairs per reference, 1..16 as text
                   verify                 optional: "1" measures each map's faithfulness
    mode=info      (nothing else)         the served encoder's description

Text values are UTF-8. An image is an encoded file (PNG, JPEG, TIFF) or a pixel envelope
(``histoxplain_model.wire.envelope``); which one to send is the sender's choice. Any bad value
raises ``InvalidRequest`` (or a subclass), which fails only its own request.

Torch-free (numpy and Pillow): the gateway imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from types import MappingProxyType

import numpy as np

from histoxplain_model import errors
from histoxplain_model.options import (
    OPTIONS_TYPES,
    GradCAMOptions,
    GradCAMPlusPlusOptions,
    RiseOptions,
    SaliencyOptions,
    SimMapOptions,
    SmoothGradOptions,
)
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.vocabulary import DEFAULT_POLARITY, DEFAULT_SIDE, DEFAULT_TARGET, check_name
from histoxplain_model.wire.envelope import decode_request_image

__all__ = [
    "EMBED",
    "EXPLAIN",
    "INFO",
    "MODE",
    "MODES",
    "OPTION_KEYS",
    "decode_embed_images",
    "decode_explain_request",
    "decode_float32",
    "decode_mode",
    "embed_inputs",
    "encode_float32",
    "explain_inputs",
    "info_inputs",
    "options_from_inputs",
    "options_to_inputs",
]

MODE = "mode"
EMBED, EXPLAIN, INFO = "embed", "explain", "info"
MODES = (EMBED, EXPLAIN, INFO)
IMAGE = "image"  # numbered: image.0, image.1, ...
QUERY = "query"
REFERENCE = "reference"  # numbered: reference.0, reference.1, ...
METHOD, POLARITY, SIDE = "method", "polarity", "side"
QUERY_EMBEDDING, REFERENCE_EMBEDDINGS = "query_embedding", "reference_embeddings"
DEADLINE = "deadline"
TARGET, CORRESPONDENCES = "target", "correspondences"
VERIFY = "verify"

#: Options type -> {field name: input key}. The keys name their method, so a request's options
#: read on their own say what they configure.
OPTION_KEYS: Mapping[type[SaliencyOptions], Mapping[str, str]] = MappingProxyType({
    GradCAMOptions: {},
    GradCAMPlusPlusOptions: {"gradient_scale": "gradcampp_gradient_scale", "eps": "gradcampp_eps"},
    SmoothGradOptions: {
        "n_samples": "smoothgrad_samples",
        "sigma": "smoothgrad_sigma",
        "chunk_size": "smoothgrad_chunk_size",
        "seed": "smoothgrad_seed",
    },
    SimMapOptions: {},
    RiseOptions: {
        "n_masks": "rise_masks",
        "grid": "rise_grid",
        "keep_probability": "rise_keep_probability",
        "fill": "rise_fill",
        "seed": "rise_seed",
        "batch_size": "rise_batch_size",
    },
})


# -- the TorchServe backend's side -----------------------------------------------------------


def encode_float32(array: np.ndarray) -> bytes:
    """An array's values as raw little-endian float32, row-major (4 bytes a value, no header)."""
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def options_to_inputs(options: SaliencyOptions | None) -> dict[str, bytes]:
    """The options that differ from their type's defaults, as UTF-8 text keyed by ``OPTION_KEYS``
    (``None``, the defaults: nothing).

    Floats are written with ``repr`` (shortest exact round trip), so the handler rebuilds the
    very same values.
    """
    if options is None:
        return {}
    defaults = type(options)()
    inputs = {}
    for name, key in OPTION_KEYS[type(options)].items():
        value = getattr(options, name)
        if value != getattr(defaults, name):
            text = value if isinstance(value, str) else repr(value)
            inputs[key] = text.encode("utf-8")
    return inputs


def embed_inputs(images: Sequence[bytes]) -> dict[str, bytes]:
    """The input map of an embed request; ``images`` already encoded (pixel envelope or file)."""
    return {MODE: EMBED.encode("utf-8"), **_numbered_inputs(IMAGE, images)}


def explain_inputs(request: ExplainRequest, query: bytes, references: Sequence[bytes]) -> dict[str, bytes]:
    """The input map of ``request``; ``query`` and ``references`` are its images, already
    encoded (pixel envelope or file). Given embeddings travel as raw float32."""
    inputs = {
        MODE: EXPLAIN.encode("utf-8"),
        METHOD: request.method.encode("utf-8"),
        POLARITY: request.polarity.encode("utf-8"),
        SIDE: request.side.encode("utf-8"),
        **options_to_inputs(request.options),
        QUERY: query,
        **_numbered_inputs(REFERENCE, references),
    }
    if request.query_embedding is not None:
        inputs[QUERY_EMBEDDING] = encode_float32(request.query_embedding)
    if request.reference_embeddings is not None:
        inputs[REFERENCE_EMBEDDINGS] = encode_float32(request.reference_embeddings)
    if request.deadline is not None:
        inputs[DEADLINE] = repr(request.deadline).encode("utf-8")
    if request.target != DEFAULT_TARGET:
        inputs[TARGET] = request.target.encode("utf-8")
    if request.correspondences:
        inputs[CORRESPONDENCES] = str(request.correspondences).encode("utf-8")
    if request.verify:
        inputs[VERIFY] = b"1"
    return inputs


def info_inputs() -> dict[str, bytes]:
    """The input map of an info request."""
    return {MODE: INFO.encode("utf-8")}


def _numbered_inputs(prefix: str, values: Sequence[bytes]) -> dict[str, bytes]:
    return {f"{prefix}.{index}": value for index, value in enumerate(values)}


# -- the handler's side ----------------------------------------------------------------------


def decode_mode(inputs: Mapping[str, object]) -> str:
    """The request's mode; missing or unknown raises ``InvalidRequest`` / ``UnknownNameError``."""
    return check_name(MODE, _text(inputs, MODE), MODES)


def decode_embed_images(inputs: Mapping[str, object], max_pixels: int) -> list[np.ndarray]:
    """The images of an embed request, (H, W, 3) uint8 RGB each."""
    return [
        decode_request_image(data, max_pixels, source=key)
        for key, data in _numbered(inputs, IMAGE)
    ]


def decode_explain_request(inputs: Mapping[str, object], max_pixels: int, dim: int) -> ExplainRequest:
    """The explain request in ``inputs``; ``dim`` is the served encoder's embedding size, which
    given embeddings must have."""
    method = _text(inputs, METHOD)
    options = options_from_inputs(method, inputs)
    query = decode_request_image(_image_bytes(inputs, QUERY), max_pixels, source=QUERY)
    references = [decode_request_image(data, max_pixels, source=key) for key, data in _numbered(inputs, REFERENCE)]
    return ExplainRequest(
        query, references, method,
        polarity=_text(inputs, POLARITY, DEFAULT_POLARITY),
        side=_text(inputs, SIDE, DEFAULT_SIDE),
        options=options,
        query_embedding=decode_float32(inputs, QUERY_EMBEDDING, None, dim),
        reference_embeddings=decode_float32(inputs, REFERENCE_EMBEDDINGS, len(references), dim),
        deadline=_deadline(inputs),
        target=_text(inputs, TARGET, DEFAULT_TARGET),
        correspondences=_correspondences(inputs),
        verify=_verify(inputs),
    )


def _verify(inputs: Mapping[str, object]) -> bool:
    text = _text(inputs, VERIFY, "0")
    if text not in ("0", "1"):
        raise errors.InvalidRequest(f"input {VERIFY!r} must be 0 or 1")
    return text == "1"


def _correspondences(inputs: Mapping[str, object]) -> int:
    text = _text(inputs, CORRESPONDENCES, "0")
    if not text.isdigit():
        raise errors.InvalidRequest(f"input {CORRESPONDENCES!r} must be a whole number of region pairs")
    return int(text)  # its range is checked by ExplainRequest


def _deadline(inputs: Mapping[str, object]) -> float | None:
    if DEADLINE not in inputs:
        return None
    text = _text(inputs, DEADLINE)
    try:
        return float(text)
    except ValueError:
        raise errors.InvalidRequest(f"input {DEADLINE!r} must be a number of seconds since the epoch") from None


def options_from_inputs(method: str, inputs: Mapping[str, object]) -> SaliencyOptions:
    """``method``'s options from a request's input map (``bytes`` or ``str`` values); absent
    keys keep their defaults.

    Raises:
        UnknownNameError: an unknown method.
        InvalidRequest: a value that is not a number of the right kind or is out of range, or
            an option key of another method (it would be silently ignored).
    """
    options_type = OPTIONS_TYPES[check_name("method", method, OPTIONS_TYPES)]
    own_keys = OPTION_KEYS[options_type]
    foreign = sorted(
        key for other_type, keys in OPTION_KEYS.items() if other_type is not options_type
        for key in keys.values() if key in inputs
    )
    if foreign:
        raise errors.InvalidRequest(f"input {foreign[0]!r} is an option of another method, not of {method!r}; drop it")
    defaults = options_type()
    values: dict[str, object] = {}
    for field in fields(options_type):
        key = own_keys[field.name]
        if key not in inputs:
            continue
        text = _text(inputs, key)
        default = getattr(defaults, field.name)
        try:
            values[field.name] = type(default)(text)
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise errors.InvalidRequest(f"input {key!r} must be {kind}, got {text!r}") from None
    return options_type(**values)


def decode_float32(inputs: Mapping[str, object], key: str, rows: int | None, dim: int) -> np.ndarray | None:
    """Raw little-endian float32 under ``key`` -> (dim,) (``rows`` None) or (rows, dim); absent: None.

    The values' finiteness is checked by :class:`ExplainRequest`.
    """
    value = inputs.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        raise errors.InvalidRequest(f"input {key!r} is text; send raw little-endian float32 bytes")
    data = bytes(value)  # type: ignore[call-overload]  # bytes or bytearray from TorchServe
    expected = (1 if rows is None else rows) * dim
    if len(data) != 4 * expected:
        raise errors.InvalidRequest(
            f"input {key!r} has {len(data)} bytes; expected {expected} float32 values ({4 * expected} bytes) "
            f"for a {dim}-d encoder; send embeddings from the served encoder"
        )
    vectors = np.frombuffer(data, dtype="<f4").astype(np.float32)
    return vectors if rows is None else vectors.reshape(rows, dim)


def _text(inputs: Mapping[str, object], key: str, default: str | None = None) -> str:
    value = inputs.get(key)
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


def _numbered(inputs: Mapping[str, object], prefix: str) -> list[tuple[str, bytes]]:
    """``(key, image bytes)`` of ``prefix.0``, ``prefix.1``, ... in order; at least one, and
    the numbering must have no gaps."""
    indices = []
    for key in inputs:
        head, _, tail = key.rpartition(".")
        if head == prefix:
            if not tail.isdigit():
                raise errors.InvalidRequest(f"input {key!r} is not numbered; use {prefix}.0, {prefix}.1, ...")
            indices.append(int(tail))
    indices.sort()
    if not indices:
        raise errors.InvalidRequest(f"no {prefix} inputs; send {prefix}.0, {prefix}.1, ...")
    if indices != list(range(len(indices))):
        raise errors.InvalidRequest(f"inputs {prefix}.N must be numbered 0..{len(indices) - 1} without gaps")
    return [(f"{prefix}.{index}", _image_bytes(inputs, f"{prefix}.{index}")) for index in indices]


def _image_bytes(inputs: Mapping[str, object], key: str) -> bytes:
    value = inputs.get(key)
    if value is None:
        raise errors.InvalidRequest(f"the request has no {key!r} image")
    if isinstance(value, str):
        raise errors.ImageDecodeError(f"input {key!r} is text; send the encoded image bytes")
    return bytes(value)  # type: ignore[call-overload]  # bytes or bytearray from TorchServe
