"""Malformed requests against a running gateway: each gets its client-error status, never
INTERNAL or UNKNOWN, and leaves the gateway serving and its index as it was.

One gateway (embedded backend, Qdrant local mode) holds one index of three real tiles for the
whole module. Named cases cover broken and hostile images (truncated, corrupt, decompression
bombs declared in PNG, JPEG and TIFF headers, zero-size, other formats), out-of-range numbers,
unknown enum values, text one character over its limit (``histoxplain_model.limits``), broken
IndexImages streams, Explain without or with unknown references, and bytes that are no protobuf
at all, sent with a raw channel. Hypothesis then sends random Search, SearchAndExplain and
Explain messages (derandomised, so CI sees the same ones every run).

After every request: health is SERVING, a valid Search answers with the right tile, and the
index holds the same points and image ids (read from the gateway's own index engine).

The gateway's explanation budget is small (``max_explain_cost``) so that a random request that
happens to be valid explains a few references at most: the module stays within about 90 s on
2 cores.
"""

from __future__ import annotations

import hashlib
import io
import math
import string
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from grpc_helpers import IndexedGateway, indexed_gateway
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model.limits import IMAGE_ID, INDEX_NAME, LABEL, MAX_K, MAX_N_SAMPLES, POINT_ID, SOURCE, TextLimit
from test_gateway import SERVING, embedded_backend, tiles  # noqa: F401 -- module fixtures used here

pytestmark = pytest.mark.integration

Code = grpc.StatusCode
INDEX = "fuzz"
INDEXED = ("ihc-0-0", "ihc-0-1", "ihc-1-2")
QUERY = "ihc-0-1"  # indexed: the liveness Search must find it first
OUTSIDE = "ihc-1-1"  # not indexed: were it indexed by mistake, the index would change
TIMEOUT_S = 30.0
#: Explanation work units in flight (gateway/admission.py): GradCAM of 3 references on both
#: sides costs 6; anything over 24 units is refused with INVALID_ARGUMENT before any work.
MAX_EXPLAIN_COST = 24
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
SERVICE_PATH = "/histoxplain.v1.RetrievalService/"
CLIENT_ERRORS = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED}


# -- hostile images -------------------------------------------------------------------------


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int, idat: bytes = zlib.compress(b"\x00" * 64)) -> bytes:
    """A PNG whose header says ``width`` x ``height`` RGB, with a few bytes of pixel data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _jpeg_declaring(width: int, height: int) -> bytes:
    """An 8x8 baseline JPEG whose frame header (SOF0) is rewritten to ``width`` x ``height``."""
    data = bytearray(_encode(np.full((8, 8, 3), 128, np.uint8), "JPEG"))
    frame = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    struct.pack_into(">HH", data, frame + 5, height, width)
    return bytes(data)


def _tiff_declaring(width: int, height: int, *, compression: int = 1, strip_offset: int | None = None) -> bytes:
    """A little-endian 8-bit greyscale TIFF declaring ``width`` x ``height`` over 64 bytes of
    pixel data in one strip."""
    entry_count = 9
    data_offset = 8 + 2 + 12 * entry_count + 4
    entries = [  # (tag, type: 3 SHORT / 4 LONG, value)
        (256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, compression), (262, 3, 1),
        (273, 4, data_offset if strip_offset is None else strip_offset), (277, 3, 1), (278, 4, max(height, 1)),
        (279, 4, 64),
    ]
    fields = b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in entries)
    ifd = struct.pack("<H", entry_count) + fields
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(range(64))


def _noise_image(size: int = 224) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png_bomb(side: int) -> bytes:
    """A valid 1-bit ``side`` x ``side`` PNG: a few kB that decode to ``3 * side**2`` bytes of RGB."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _with_bad_ihdr_crc(png: bytes) -> bytes:
    data = bytearray(png)
    data[29] ^= 0xFF  # signature (8) + length (4) + "IHDR" (4) + header (13) -> the CRC
    return bytes(data)


NOISE_PNG = _encode(_noise_image(), "PNG")
NOISE_JPEG = _encode(_noise_image(), "JPEG")
BOMB_SIDE = 10_000  # 100 Mpx, six times the default request limit of 4096 x 4096

#: name -> (bytes, whether IndexImages skips it as too large rather than as unreadable).
BAD_IMAGES: dict[str, tuple[bytes, bool]] = {
    "empty": (b"", False),
    "garbage": (bytes(range(256)) * 8, False),
    "text": (b"not an image, just some words\n", False),
    "pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", False),
    "zip": (b"PK\x03\x04" + bytes(60), False),
    "gif": (_encode(_noise_image(16), "GIF"), False),
    "bmp": (_encode(_noise_image(16), "BMP"), False),
    "png-signature-only": (b"\x89PNG\r\n\x1a\n", False),
    "png-truncated": (NOISE_PNG[: len(NOISE_PNG) // 2], False),
    "png-bad-header-crc": (_with_bad_ihdr_crc(NOISE_PNG), False),
    "png-corrupt-pixel-data": (_png_declaring(224, 224, idat=b"\x78\x9c" + bytes(range(200))), False),
    "png-zero-width": (_png_declaring(0, 224), False),
    "png-zero-height": (_png_declaring(224, 0), False),
    "png-bomb-declared": (_png_declaring(BOMB_SIDE, BOMB_SIDE), True),
    "png-bomb-real": (_png_bomb(BOMB_SIDE), True),
    "jpeg-truncated": (NOISE_JPEG[: len(NOISE_JPEG) // 2], False),
    "jpeg-start-marker-only": (NOISE_JPEG[:2], False),
    "jpeg-zero-height": (_jpeg_declaring(224, 0), False),
    "jpeg-bomb-declared": (_jpeg_declaring(65_000, 65_000), True),
    "tiff-bomb-declared": (_tiff_declaring(100_000, 100_000), True),
    "tiff-zero-size": (_tiff_declaring(0, 0), False),
    "tiff-unknown-compression": (_tiff_declaring(8, 8, compression=50_000), False),
    "tiff-strip-outside-file": (_tiff_declaring(8, 8, strip_offset=2**31), False),
}


# -- the gateway under fuzz ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a case talks to: a stub and a raw channel to the gateway, and real inputs."""

    stub: pb_grpc.RetrievalServiceStub
    channel: grpc.Channel
    tiles: Mapping[str, bytes] = field(repr=False)
    point_ids: tuple[str, ...]

    @property
    def query(self) -> bytes:
        return self.tiles[QUERY]

    def raw(self, method: str, payload: bytes) -> bytes:
        """Send ``payload`` as the request of ``method`` without protobuf serialisation."""
        return self.channel.unary_unary(SERVICE_PATH + method)(payload, timeout=TIMEOUT_S)


@dataclass(frozen=True)
class Fuzzed:
    """The module's gateway, what cases send with, and the index as it was before any case."""

    served: IndexedGateway
    target: Target
    baseline: tuple[Any, ...]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """What Hypothesis prints for this fixture in a failing example (not the tiles' bytes)."""
        printer.text(f"Fuzzed(gateway={self.served.gateway.target}, index={self.served.index!r})")


def _snapshot(served: IndexedGateway) -> tuple[Any, ...]:
    """(index names, points of the fuzz index, its image ids), read from the index engine."""
    index = served.engine.open_index(served.index)
    names = sorted(info.name for info in served.engine.list_indexes())
    return tuple(names), index.describe().n_points, tuple(sorted(index.image_ids()))


@pytest.fixture(scope="module")
def fuzzed(
    embedded_backend: Any, tiles: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory  # noqa: F811
) -> Iterator[Fuzzed]:
    indexed = {name: tiles[name] for name in INDEXED}
    with indexed_gateway(
        tmp_path_factory.mktemp("fuzz"), embedded_backend, indexed, INDEX,
        max_explain_cost=MAX_EXPLAIN_COST, max_message_bytes=MAX_MESSAGE_BYTES,
    ) as served, grpc.insecure_channel(served.gateway.target) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        hits = stub.Search(pb.SearchRequest(index=INDEX, image=tiles[QUERY], k=len(INDEXED)), timeout=TIMEOUT_S).hits
        target = Target(stub, channel, tiles, tuple(hit.point_id for hit in hits))
        yield Fuzzed(served, target, _snapshot(served))


def _assert_still_serving(fuzzed: Fuzzed, after: str) -> None:
    assert fuzzed.served.gateway.health() == SERVING, f"health not SERVING after {after}"
    hits = fuzzed.target.stub.Search(pb.SearchRequest(index=INDEX, image=fuzzed.target.query, k=1), timeout=TIMEOUT_S).hits
    assert [hit.image_id for hit in hits] == [QUERY], f"Search answered wrongly after {after}"
    assert _snapshot(fuzzed.served) == fuzzed.baseline, f"the index changed after {after}"


def _outcome(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str, Any]:
    """(status code, details, response) of a call; the response is None when it failed."""
    try:
        return Code.OK, "", call()
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None


# -- named cases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A malformed request and the status it must get.

    ``skipped``: IndexImages only; the stream succeeds (OK) and reports its single image as
    skipped for this reason (one bad image must not fail the stream).
    """

    name: str
    send: Callable[[Target], Any]
    expected: grpc.StatusCode = Code.INVALID_ARGUMENT
    skipped: int | None = None


def _gradcam(**fields: Any) -> types_pb2.ExplainOptions:
    """Tiny explanation options (GradCAM, query side) with ``fields`` changed."""
    values = {"method": types_pb2.EXPLANATION_METHOD_GRADCAM, "side": types_pb2.EXPLANATION_SIDE_QUERY, **fields}
    return types_pb2.ExplainOptions(**values)


def _smoothgrad(**fields: Any) -> types_pb2.ExplainOptions:
    return _gradcam(**{"method": types_pb2.EXPLANATION_METHOD_SMOOTHGRAD, "smoothgrad_samples": 2, **fields})


def _search(t: Target, **fields: Any) -> Any:
    return t.stub.Search(pb.SearchRequest(**{"index": INDEX, "image": t.query, "k": 1, **fields}), timeout=TIMEOUT_S)


def _search_and_explain(t: Target, **fields: Any) -> Any:
    values = {"index": INDEX, "image": t.query, "k": 1, "options": _gradcam(), **fields}
    return t.stub.SearchAndExplain(pb.SearchAndExplainRequest(**values), timeout=TIMEOUT_S)


def _with_options(**fields: Any) -> Callable[[Target], Any]:
    """SearchAndExplain with GradCAM options changed by ``fields``."""
    return lambda t: _search_and_explain(t, options=_gradcam(**fields))


def _with_smoothgrad(**fields: Any) -> Callable[[Target], Any]:
    """SearchAndExplain with SmoothGrad options changed by ``fields``."""
    return lambda t: _search_and_explain(t, options=_smoothgrad(**fields))


def _explain_indexed(t: Target, image_ids: Sequence[str] = (), point_ids: Sequence[str] = (), **fields: Any) -> Any:
    references = pb.IndexedReferences(index=fields.pop("index", INDEX), image_ids=image_ids, point_ids=point_ids)
    values = {"query_image": t.query, "indexed": references, "options": _gradcam(), **fields}
    return t.stub.Explain(pb.ExplainRequest(**values), timeout=TIMEOUT_S)


def _explain_images(t: Target, images: Sequence[bytes], **fields: Any) -> Any:
    values = {"query_image": t.query, "images": pb.ReferenceImages(images=images), "options": _gradcam(), **fields}
    return t.stub.Explain(pb.ExplainRequest(**values), timeout=TIMEOUT_S)


def _describe(t: Target, index: str) -> Any:
    return t.stub.DescribeIndex(pb.DescribeIndexRequest(index=index), timeout=TIMEOUT_S)


def _delete(t: Target, index: str, image_ids: Sequence[str]) -> Any:
    return t.stub.DeleteImages(pb.DeleteImagesRequest(index=index, image_ids=image_ids), timeout=TIMEOUT_S)


def _config(index: str = INDEX, **tiling: Any) -> pb.IndexImagesRequest:
    return pb.IndexImagesRequest(config=pb.IndexImagesConfig(index=index, tiling=types_pb2.TilingOptions(**tiling)))


def _image(content: bytes, **fields: Any) -> pb.IndexImagesRequest:
    return pb.IndexImagesRequest(image=types_pb2.ImageRecord(content=content, **fields))


def _index_stream(t: Target, *messages: pb.IndexImagesRequest) -> Any:
    return t.stub.IndexImages(iter(messages), timeout=TIMEOUT_S)


def _index_one(content: Callable[[Target], bytes], **fields: Any) -> Callable[[Target], Any]:
    """IndexImages into the fuzz index: its config, then one image."""
    return lambda t: _index_stream(t, _config(), _image(content(t), **fields))


def _index_outside(**fields: Any) -> Callable[[Target], Any]:
    """IndexImages of a real tile that is not in the index, with ``fields`` of its ImageRecord."""
    return _index_one(lambda t: t.tiles[OUTSIDE], **fields)


def _index_config(config: pb.IndexImagesRequest) -> Callable[[Target], Any]:
    """IndexImages of ``config`` and one real tile that is not in the index."""
    return lambda t: _index_stream(t, config, _image(t.tiles[OUTSIDE]))


def _raw(method: str, payload: bytes) -> Callable[[Target], Any]:
    return lambda t: t.raw(method, payload)


def _first_unknown(enum: Any) -> int:
    """The value just past a proto enum's known values (the contract may grow; this stays unknown)."""
    return max(enum.values()) + 1


def _over(limit: TextLimit) -> str:
    """A valid-looking text one character over ``limit``."""
    return "a" * (limit.max_chars + 1)


METHODS, POLARITIES, SIDES = types_pb2.ExplanationMethod, types_pb2.Polarity, types_pb2.ExplanationSide
RANKINGS, DTYPES = types_pb2.RankingLevel, types_pb2.ArrayDtype
UNKNOWN_UUID = "00000000-0000-4000-8000-000000000000"
UINT32_MAX = 2**32 - 1  # what a client that sends -1 for an unsigned field puts on the wire
NOT_FOUND, OK, RESOURCE_EXHAUSTED = Code.NOT_FOUND, Code.OK, Code.RESOURCE_EXHAUSTED
UNREADABLE, TOO_LARGE = types_pb2.SKIP_REASON_UNREADABLE_IMAGE, types_pb2.SKIP_REASON_IMAGE_TOO_LARGE
INVALID_METADATA = types_pb2.SKIP_REASON_INVALID_METADATA

def _bad_image_cases() -> list[Case]:
    """Every hostile image as a Search query and as an indexed image; some as other RPCs' images."""
    cases = []
    for name, (data, too_large) in BAD_IMAGES.items():
        cases.append(Case(f"search-image-{name}", lambda t, data=data: _search(t, image=data)))
        reason = TOO_LARGE if too_large else UNREADABLE
        cases.append(Case(f"index-image-{name}", _index_one(lambda t, data=data: data), OK, reason))
    for name in ("garbage", "png-truncated", "png-bomb-real", "jpeg-bomb-declared", "tiff-zero-size"):
        data = BAD_IMAGES[name][0]
        cases += [
            Case(f"search-and-explain-image-{name}", lambda t, data=data: _search_and_explain(t, image=data)),
            Case(f"explain-query-{name}",
                 lambda t, data=data: _explain_images(t, [t.tiles[OUTSIDE]], query_image=data)),
            Case(f"explain-reference-{name}", lambda t, data=data: _explain_images(t, [t.tiles[OUTSIDE], data])),
        ]
    return cases


def _request_cases() -> list[Case]:
    long_index = _over(INDEX_NAME)
    return [
        # -- numbers out of range
        Case("search-k-zero", lambda t: _search(t, k=0)),
        Case("search-k-over-max", lambda t: _search(t, k=MAX_K + 1)),
        Case("search-k-minus-one-as-uint32", lambda t: _search(t, k=UINT32_MAX)),
        Case("search-and-explain-k-zero", lambda t: _search_and_explain(t, k=0)),
        Case("search-and-explain-k-over-max", lambda t: _search_and_explain(t, k=MAX_K + 1)),
        Case("search-and-explain-k-minus-one-as-uint32", lambda t: _search_and_explain(t, k=UINT32_MAX)),
        Case("search-and-explain-over-the-whole-budget", lambda t: _search_and_explain(t, k=MAX_EXPLAIN_COST + 1)),
        Case("smoothgrad-noise-nan", _with_smoothgrad(smoothgrad_noise=math.nan)),
        Case("smoothgrad-noise-inf", _with_smoothgrad(smoothgrad_noise=math.inf)),
        Case("smoothgrad-noise-minus-inf", _with_smoothgrad(smoothgrad_noise=-math.inf)),
        Case("smoothgrad-noise-negative", _with_smoothgrad(smoothgrad_noise=-0.1)),
        Case("smoothgrad-noise-zero", _with_smoothgrad(smoothgrad_noise=0.0)),
        Case("smoothgrad-noise-over-one", _with_smoothgrad(smoothgrad_noise=1.5)),
        Case("smoothgrad-samples-over-max", _with_smoothgrad(smoothgrad_samples=MAX_N_SAMPLES + 1)),
        Case("smoothgrad-samples-minus-one-as-uint32", _with_smoothgrad(smoothgrad_samples=UINT32_MAX)),
        Case("explain-smoothgrad-noise-nan",
             lambda t: _explain_images(t, [t.query], options=_smoothgrad(smoothgrad_noise=math.nan))),
        Case("index-min-tissue-nan", _index_config(_config(min_tissue_fraction=math.nan))),
        Case("index-min-tissue-over-one", _index_config(_config(min_tissue_fraction=1.5))),
        Case("index-tile-size-too-small", _index_config(_config(tile_size=1))),
        Case("index-tile-size-minus-one-as-uint32", _index_config(_config(tile_size=UINT32_MAX))),
        Case("index-mpp-nan", _index_outside(mpp=math.nan), OK, INVALID_METADATA),
        Case("index-mpp-negative", _index_outside(mpp=-1.0), OK, INVALID_METADATA),
        # -- unknown enum values (proto3 enums are open: any int32 arrives)
        Case("search-ranking-unknown", lambda t: _search(t, ranking=_first_unknown(RANKINGS))),
        Case("search-ranking-negative", lambda t: _search(t, ranking=-1)),
        Case("search-and-explain-ranking-unknown", lambda t: _search_and_explain(t, ranking=2**31 - 1)),
        Case("method-unknown", _with_options(method=_first_unknown(METHODS))),
        Case("method-negative", _with_options(method=-7)),
        Case("polarity-unknown", _with_options(polarity=_first_unknown(POLARITIES))),
        Case("side-unknown", _with_options(side=_first_unknown(SIDES))),
        Case("heatmap-dtype-uint8", _with_options(heatmap_dtype=types_pb2.ARRAY_DTYPE_UINT8)),
        Case("heatmap-dtype-unknown", _with_options(heatmap_dtype=_first_unknown(DTYPES))),
        Case("explain-method-unknown", lambda t: _explain_images(t, [t.query], options=_gradcam(method=99))),
        # -- text one character over its limit, and names that are no index name
        Case("search-index-name-over-limit", lambda t: _search(t, index=long_index)),
        Case("search-and-explain-index-name-over-limit", lambda t: _search_and_explain(t, index=long_index)),
        Case("describe-index-name-over-limit", lambda t: _describe(t, long_index)),
        Case("delete-index-name-over-limit", lambda t: _delete(t, long_index, [QUERY])),
        Case("index-config-name-over-limit", _index_config(_config(long_index))),
        Case("explain-index-name-over-limit", lambda t: _explain_indexed(t, [QUERY], index=long_index)),
        Case("search-index-name-path-traversal", lambda t: _search(t, index="../../etc")),
        Case("search-index-name-unicode", lambda t: _search(t, index="índex")),
        Case("search-index-name-empty", lambda t: _search(t, index="")),
        Case("delete-image-id-over-limit", lambda t: _delete(t, INDEX, [_over(IMAGE_ID)])),
        Case("explain-image-id-over-limit", lambda t: _explain_indexed(t, [_over(IMAGE_ID)])),
        Case("explain-point-id-over-limit", lambda t: _explain_indexed(t, point_ids=[_over(POINT_ID)])),
        Case("index-image-id-over-limit", _index_outside(image_id=_over(IMAGE_ID)), OK, INVALID_METADATA),
        Case("index-label-over-limit", _index_outside(label=_over(LABEL)), OK, INVALID_METADATA),
        Case("index-source-over-limit", _index_outside(source=_over(SOURCE)), OK, INVALID_METADATA),
        # -- broken IndexImages streams
        Case("index-stream-empty", lambda t: _index_stream(t)),
        Case("index-stream-image-before-config", lambda t: _index_stream(t, _image(t.tiles[OUTSIDE]), _config())),
        Case("index-stream-config-twice", lambda t: _index_stream(t, _config(), _config(), _image(t.tiles[OUTSIDE]))),
        # No image after the config is no error (Retrieval.index_encoded): OK, and no index is created.
        Case("index-stream-config-only", lambda t: _index_stream(t, _config("fuzz-config-only")), OK),
        Case("index-stream-config-without-index", _index_config(_config(""))),
        Case("index-stream-empty-message", lambda t: _index_stream(t, _config(), pb.IndexImagesRequest())),
        # -- Explain references
        Case("explain-no-references",
             lambda t: t.stub.Explain(pb.ExplainRequest(query_image=t.query, options=_gradcam()), timeout=TIMEOUT_S)),
        Case("explain-indexed-no-ids", lambda t: _explain_indexed(t)),
        Case("explain-images-none", lambda t: _explain_images(t, [])),
        Case("explain-k-over-references", lambda t: _explain_indexed(t, [QUERY], k=2)),
        Case("explain-k-over-images", lambda t: _explain_images(t, [t.query], k=2)),
        Case("explain-references-over-max", lambda t: _explain_images(t, [b"x"] * (MAX_K + 1))),
        Case("explain-unknown-image-id", lambda t: _explain_indexed(t, ["never-indexed"]), NOT_FOUND),
        Case("explain-unknown-point-id", lambda t: _explain_indexed(t, point_ids=[UNKNOWN_UUID]), NOT_FOUND),
        Case("explain-point-id-not-a-uuid", lambda t: _explain_indexed(t, point_ids=["not-a-uuid"])),
        Case("explain-unknown-index", lambda t: _explain_indexed(t, [QUERY], index="no-such-index"), NOT_FOUND),
        # three images of exactly the request pixel limit: each passes, together they are over the budget
        Case("explain-references-over-pixel-budget", lambda t: _explain_images(t, [_png_bomb(4096)] * 3)),
        # -- unknown index, nothing to delete
        Case("search-unknown-index", lambda t: _search(t, index="no-such-index"), NOT_FOUND),
        Case("search-and-explain-unknown-index", lambda t: _search_and_explain(t, index="no-such-index"), NOT_FOUND),
        Case("describe-unknown-index", lambda t: _describe(t, "no-such-index"), NOT_FOUND),
        Case("delete-unknown-index", lambda t: _delete(t, "no-such-index", [QUERY]), NOT_FOUND),
        Case("delete-no-image-ids", lambda t: _delete(t, INDEX, [])),
        # -- over the message limit (gRPC's own check)
        Case("search-message-over-limit", lambda t: _search(t, image=bytes(MAX_MESSAGE_BYTES + 1)), RESOURCE_EXHAUSTED),
        # -- bytes that are no protobuf message of the method
        Case("raw-search-invalid-tag", _raw("Search", b"\xff\xff\xff\xff")),
        Case("raw-search-truncated-bytes-field", _raw("Search", b"\x12\x64abc")),
        Case("raw-search-index-not-utf8", _raw("Search", b"\x0a\x02\xff\xfe")),
        Case("raw-search-k-varint-overlong", _raw("Search", b"\x18" + b"\xff" * 10 + b"\x01")),
        Case("raw-search-nested-groups", _raw("Search", b"\x9b\x06" * 1000 + b"\x9c\x06" * 1000)),
        # well-formed bytes: a wrong wire type or an unknown field is skipped, leaving no index
        Case("raw-search-index-as-varint", _raw("Search", b"\x08\x01")),
        Case("raw-search-unknown-field-only", _raw("Search", b"\xf8\x06\x01")),
        Case("raw-search-empty-message", _raw("Search", b"")),
        Case("raw-search-and-explain-garbage", _raw("SearchAndExplain", bytes(range(255, 0, -1)))),
        Case("raw-explain-garbage", _raw("Explain", b"\x2a\x05\xff\xff\xff\xff\xff")),
        Case("raw-describe-index-garbage", _raw("DescribeIndex", b"\x0a\xff")),
        Case("raw-delete-images-garbage", _raw("DeleteImages", b"\x12\x02\xc3\x28")),
        Case("raw-index-images-garbage",
             lambda t: t.channel.stream_unary(SERVICE_PATH + "IndexImages")(iter([b"\xff\xff"]), timeout=TIMEOUT_S),),
        Case("raw-unknown-method", _raw("Train", b""), Code.UNIMPLEMENTED),
    ]


CASES = _bad_image_cases() + _request_cases()


def test_the_catalogue_is_large_and_uniquely_named() -> None:
    assert len(CASES) >= 50
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_malformed_request_gets_its_client_error(fuzzed: Fuzzed, case: Case) -> None:
    code, details, response = _outcome(lambda: case.send(fuzzed.target))
    _assert_still_serving(fuzzed, case.name)
    assert code == case.expected, f"{case.name}: {code.name} {details!r}, expected {case.expected.name}"
    if code == Code.OK:  # an IndexImages stream
        assert response.images_indexed == 0, f"{case.name}: {response}"
        expected = [] if case.skipped is None else [(0, case.skipped)]
        assert [(item.position, item.reason) for item in response.skipped] == expected, f"{case.name}: {response}"
    else:
        assert details, f"{case.name}: {code.name} without a message"


# -- random messages -------------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T = TypeVar("T")


class Drawn:
    """A generated request whose repr, also what Hypothesis prints for a failing example, gives
    each bytes field as its length and digest: the images would make it megabytes long."""

    def __init__(self, message: Message) -> None:
        self.message = message

    def __repr__(self) -> str:
        summary = type(self.message)()
        summary.CopyFrom(self.message)
        _summarise_bytes(summary)
        return f"{type(self.message).__name__}({text_format.MessageToString(summary, as_one_line=True)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' pretty-printer protocol
        printer.text(repr(self))


def _summarise_bytes(message: Message) -> None:
    """Replace, in place, every bytes value in ``message`` by ``<length bytes, sha256 prefix>``."""

    def summary(value: bytes) -> bytes:
        return f"<{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()[:12]}>".encode()

    for descriptor, value in message.ListFields():
        repeated = descriptor.is_repeated
        if descriptor.type == descriptor.TYPE_BYTES and repeated:
            value[:] = [summary(item) for item in value]
        elif descriptor.type == descriptor.TYPE_BYTES:
            setattr(message, descriptor.name, summary(value))
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            for child in value if repeated else [value]:
                _summarise_bytes(child)


def _mostly(valid: st.SearchStrategy[T], wild: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``valid`` about nine times in ten, else ``wild``: with every field drawn so, about half of
    the random requests pass the first checks and reach decoding, the index and the model (the
    named cases above already send each wild field alone). Hypothesis shrinks towards 0: valid."""
    return st.integers(0, 9).flatmap(lambda pick: wild if pick == 5 else valid)


def _enum(enum: Any) -> st.SearchStrategy[int]:
    """A known value of a proto enum (0, unspecified, included), or any int32."""
    return _mostly(st.sampled_from(sorted(enum.values())), st.integers(-(2**31), 2**31 - 1))


UINT32 = st.integers(0, UINT32_MAX)
INDEX_NAMES = _mostly(st.just(INDEX), st.one_of(
    st.just("no-such-index"), st.text(max_size=70),
    st.text(string.ascii_letters + string.digits + "-_", min_size=INDEX_NAME.max_chars, max_size=INDEX_NAME.max_chars + 2),
))


def _images(target: Target) -> st.SearchStrategy[bytes]:
    """Real tiles; else hostile images, random bytes, or real tiles cut short or with one byte changed."""
    real = st.sampled_from([target.tiles[name] for name in sorted(target.tiles)])

    def truncate(data: bytes, fraction: float) -> bytes:
        return data[: int(len(data) * fraction)]

    def flip(data: bytes, position: int, value: int) -> bytes:
        position %= len(data)
        return data[:position] + bytes([value]) + data[position + 1 :]

    return _mostly(real, st.one_of(
        st.sampled_from([data for data, _ in BAD_IMAGES.values()]),
        st.binary(max_size=1024),
        st.builds(truncate, real, st.floats(0.0, 1.0)),
        st.builds(flip, real, st.integers(0, 2**20), st.integers(0, 255)),
    ))


@st.composite
def _options(draw: st.DrawFn) -> types_pb2.ExplainOptions:
    options = types_pb2.ExplainOptions(
        method=draw(_enum(METHODS)), polarity=draw(_enum(POLARITIES)), side=draw(_enum(SIDES)),
        heatmap_dtype=draw(_enum(DTYPES)),
        smoothgrad_samples=draw(_mostly(st.integers(0, 3), UINT32)),
    )
    # NaN, infinities, zero, negative and huge values among the wild ones
    noise = draw(_mostly(st.none() | st.floats(float(np.float32(0.05)), 1.0, width=32), st.floats(width=32)))
    if noise is not None:
        options.smoothgrad_noise = noise
    return options


@st.composite
def _search_requests(draw: st.DrawFn, target: Target) -> Drawn:
    return Drawn(pb.SearchRequest(
        index=draw(INDEX_NAMES), image=draw(_images(target)), k=draw(_mostly(st.integers(1, MAX_K), UINT32)),
        ranking=draw(_enum(RANKINGS)),
    ))


@st.composite
def _search_and_explain_requests(draw: st.DrawFn, target: Target) -> Drawn:
    return Drawn(pb.SearchAndExplainRequest(
        index=draw(INDEX_NAMES), image=draw(_images(target)), k=draw(_mostly(st.integers(1, 4), UINT32)),
        ranking=draw(_enum(RANKINGS)), options=draw(_options()),
    ))


@st.composite
def _explain_requests(draw: st.DrawFn, target: Target) -> Drawn:
    images = _images(target)
    request = pb.ExplainRequest(
        query_image=draw(images), k=draw(_mostly(st.integers(0, 1), UINT32)), options=draw(_options())
    )
    kind = draw(_mostly(st.sampled_from(["indexed", "images"]), st.just("none")))
    # at least one reference unless wild (k = 1 then fits)
    at_least = draw(_mostly(st.just(1), st.just(0)))
    if kind == "indexed":
        request.indexed.SetInParent()
        request.indexed.index = draw(INDEX_NAMES)
        image_ids = _mostly(st.sampled_from(INDEXED), st.text(max_size=IMAGE_ID.max_chars + 2))
        request.indexed.image_ids.extend(draw(st.lists(image_ids, max_size=2)))
        ids = _mostly(st.sampled_from(target.point_ids), st.uuids().map(str) | st.text(max_size=POINT_ID.max_chars + 2))
        request.indexed.point_ids.extend(draw(st.lists(ids, min_size=at_least, max_size=2)))
    elif kind == "images":
        request.images.SetInParent()
        request.images.images.extend(draw(st.lists(images, min_size=at_least, max_size=2)))
    return Drawn(request)


def _assert_no_server_error(fuzzed: Fuzzed, rpc: str, request: Drawn) -> None:
    call = getattr(fuzzed.target.stub, rpc)
    code, details, _ = _outcome(lambda: call(request.message, timeout=TIMEOUT_S))
    event(f"{rpc}: {code.name}")  # pytest --hypothesis-show-statistics counts the statuses
    assert code == Code.OK or code in CLIENT_ERRORS, f"{rpc}: {code.name} {details!r} for {request!r}"
    _assert_still_serving(fuzzed, f"a random {rpc}")


@FUZZ_SETTINGS
@given(data=st.data())
def test_random_search_requests(fuzzed: Fuzzed, data: st.DataObject) -> None:
    _assert_no_server_error(fuzzed, "Search", data.draw(_search_requests(fuzzed.target)))


@FUZZ_SETTINGS
@given(data=st.data())
def test_random_search_and_explain_requests(fuzzed: Fuzzed, data: st.DataObject) -> None:
    _assert_no_server_error(fuzzed, "SearchAndExplain", data.draw(_search_and_explain_requests(fuzzed.target)))


@FUZZ_SETTINGS
@given(data=st.data())
def test_random_explain_requests(fuzzed: Fuzzed, data: st.DataObject) -> None:
    _assert_no_server_error(fuzzed, "Explain", data.draw(_explain_requests(fuzzed.target)))
