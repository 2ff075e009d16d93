"""histoxplain-client against an in-process gRPC server (port 0) running a fake servicer.

The fake implements the generated RetrievalService interface with a tiny in-memory index:
an image's "embedding" is its mean RGB colour, scores are cosine similarities, heatmaps are
fixed ramps scaled per reference, so every decoded value is known in advance.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent import futures
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import grpc
import numpy as np
import pytest
from PIL import Image

from histoxplain_client import (
    ApiError,
    AsyncClient,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    IndexImage,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
    images_from_folder,
)
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_client.arrays import decode_array, encode_array

HEATMAP_SHAPE = (4, 6)
RAMP = np.linspace(0.0, 1.0, HEATMAP_SHAPE[0] * HEATMAP_SHAPE[1], dtype=np.float32).reshape(HEATMAP_SHAPE)
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)


# -- fake server ------------------------------------------------------------------------------


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def embedding(content: bytes) -> np.ndarray:
    pixels = np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.float64)
    mean = pixels.reshape(-1, 3).mean(axis=0) + 1.0
    return mean / np.linalg.norm(mean)


class FakeRetrievalService(pb_grpc.RetrievalServiceServicer):
    """In-memory stand-in for the gateway; records what it receives."""

    def __init__(self) -> None:
        self.indexes: dict[str, dict[str, types_pb2.ImageRecord]] = {}
        self.calls: Counter[str] = Counter()
        self.fail_with: dict[str, list[grpc.StatusCode]] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.requests: dict[str, object] = {}
        self.stream_outcomes: list[str] = []  # per IndexImages handler run: "completed" | "cancelled"

    def _enter(self, rpc: str, context: grpc.ServicerContext) -> None:
        self.calls[rpc] += 1
        self.metadata[rpc] = dict(context.invocation_metadata())
        pending = self.fail_with.get(rpc)
        if pending:
            code = pending.pop(0)
            context.abort(code, f"injected {code.name} on attempt {self.calls[rpc]}")

    def _index(self, name: str, context: grpc.ServicerContext) -> dict[str, types_pb2.ImageRecord]:
        if name == "other-encoder":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "index 'other-encoder' was built with 'uni'")
        if name not in self.indexes:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown index {name!r}; known: {sorted(self.indexes)}")
        return self.indexes[name]

    def IndexImages(self, request_iterator, context):
        outcome = "cancelled"
        try:
            response = self._index_images(request_iterator, context)
            if context.is_active():
                outcome = "completed"
            return response
        finally:
            self.stream_outcomes.append(outcome)

    def wait_for_streams(self, timeout: float = 5.0) -> list[str]:
        """Outcomes of every IndexImages call that reached the handler, once all have ended."""
        deadline = time.monotonic() + timeout
        while len(self.stream_outcomes) < self.calls["IndexImages"] and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.stream_outcomes)

    def _index_images(self, request_iterator, context):
        self._enter("IndexImages", context)
        first = next(request_iterator)
        if first.WhichOneof("content") != "config":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be the config")
        self.requests["IndexImages.config"] = first.config
        index = self.indexes.setdefault(first.config.index, {})
        summary = pb.IndexImagesResponse(index=first.config.index)
        seen: set[str] = set()
        for position, message in enumerate(request_iterator):
            record = message.image
            summary.images_received += 1
            image_id = record.image_id or hashlib.sha256(record.content).hexdigest()
            reason, detail = self._check(record.content, image_id, seen)
            if reason:
                summary.skipped.add(position=position, image_id=record.image_id, reason=reason, message=detail)
                continue
            seen.add(image_id)
            stored = types_pb2.ImageRecord()
            stored.CopyFrom(record)
            stored.image_id = image_id
            index[image_id] = stored
            summary.images_indexed += 1
            summary.tiles_indexed += 1
        return summary

    @staticmethod
    def _check(content: bytes, image_id: str, seen: set[str]) -> tuple[int, str]:
        if image_id in seen:
            return types_pb2.SKIP_REASON_DUPLICATE_IMAGE_ID, f"{image_id} came twice"
        try:
            Image.open(io.BytesIO(content)).load()
        except Exception as error:  # the fake reports any decoder failure as the real one does
            return types_pb2.SKIP_REASON_UNREADABLE_IMAGE, f"cannot decode: {error}"
        return 0, ""

    def _hits(self, index: dict[str, types_pb2.ImageRecord], query: bytes, k: int) -> list[types_pb2.SearchHit]:
        query_vector = embedding(query)
        hits = []
        for image_id, record in index.items():
            hit = types_pb2.SearchHit(
                score=float(query_vector @ embedding(record.content)),
                image_id=image_id,
                point_id=f"point-{image_id}",
                label=record.label,
                source=record.source,
                box=types_pb2.Box(x=0, y=0, width=8, height=8),
                level=0,
            )
            if record.HasField("mpp"):
                hit.mpp = record.mpp
            hits.append(hit)
        return sorted(hits, key=lambda hit: -hit.score)[:k]

    def Search(self, request, context):
        self._enter("Search", context)
        self.requests["Search"] = request
        if request.index == "slow":
            deadline = time.monotonic() + 5
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return pb.SearchResponse()
        if not 1 <= request.k <= 1000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be 1 to 1000, got {request.k}")
        index = self._index(request.index, context)
        return pb.SearchResponse(hits=self._hits(index, request.image, request.k))

    @staticmethod
    def _resolved(options: types_pb2.ExplainOptions) -> types_pb2.ExplainOptions:
        resolved = types_pb2.ExplainOptions()
        resolved.CopyFrom(options)
        resolved.method = options.method or types_pb2.EXPLANATION_METHOD_GRADCAM
        resolved.polarity = options.polarity or types_pb2.POLARITY_SIMILAR
        resolved.side = options.side or types_pb2.EXPLANATION_SIDE_BOTH
        resolved.heatmap_dtype = options.heatmap_dtype or types_pb2.ARRAY_DTYPE_FLOAT16
        return resolved

    @staticmethod
    def _explained(position: int, similarity: float, options, hit=None) -> types_pb2.ExplainedReference:
        """Query heatmap = RAMP * (position + 1) / 10, reference heatmap = its flip."""
        reference = types_pb2.ExplainedReference(reference_index=position, similarity=similarity)
        if hit is not None:
            reference.hit.CopyFrom(hit)
        query_map = RAMP * (position + 1) / 10
        overlay = png((position * 10, 0, 0), size=(12, 9))
        if options.side in (types_pb2.EXPLANATION_SIDE_QUERY, types_pb2.EXPLANATION_SIDE_BOTH):
            reference.query_heatmap.CopyFrom(
                types_pb2.Heatmap(values=encode_array(query_map, options.heatmap_dtype), overlay_png=overlay)
            )
        if options.side in (types_pb2.EXPLANATION_SIDE_RETRIEVED, types_pb2.EXPLANATION_SIDE_BOTH):
            reference.reference_heatmap.CopyFrom(
                types_pb2.Heatmap(values=encode_array(query_map[::-1], options.heatmap_dtype), overlay_png=overlay)
            )
        return reference

    def Explain(self, request, context):
        self._enter("Explain", context)
        self.requests["Explain"] = request
        options = self._resolved(request.options)
        query = embedding(request.query_image)
        kind = request.WhichOneof("references")
        if kind == "images":
            pairs = [(float(query @ embedding(image)), None) for image in request.images.images]
        elif kind == "indexed":
            index = self._index(request.indexed.index, context)
            wanted = list(request.indexed.image_ids) + [p.removeprefix("point-") for p in request.indexed.point_ids]
            missing = [image_id for image_id in wanted if image_id not in index]
            if missing:
                context.abort(grpc.StatusCode.NOT_FOUND, f"not in index: {missing}")
            hits = {hit.image_id: hit for hit in self._hits(index, request.query_image, len(index))}
            pairs = [(hits[image_id].score, hits[image_id]) for image_id in wanted]
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no references")
        order = sorted(range(len(pairs)), key=lambda i: -pairs[i][0])
        if request.k:
            order = order[: request.k]
        references = [self._explained(i, pairs[i][0], options, pairs[i][1]) for i in order]
        return pb.ExplainResponse(options=options, references=references)

    def SearchAndExplain(self, request, context):
        self._enter("SearchAndExplain", context)
        self.requests["SearchAndExplain"] = request
        options = self._resolved(request.options)
        index = self._index(request.index, context)
        hits = self._hits(index, request.image, request.k)
        results = [self._explained(rank, hit.score, options, hit) for rank, hit in enumerate(hits)]
        return pb.SearchAndExplainResponse(options=options, results=results)

    def DeleteImages(self, request, context):
        self._enter("DeleteImages", context)
        index = self._index(request.index, context)
        response = pb.DeleteImagesResponse()
        for image_id in request.image_ids:
            if index.pop(image_id, None) is None:
                response.missing_image_ids.append(image_id)
            else:
                response.images_deleted += 1
                response.tiles_deleted += 1
        return response

    def _info(self, name: str) -> types_pb2.IndexInfo:
        count = len(self.indexes[name])
        return types_pb2.IndexInfo(
            name=name, encoder_preset="efficientnet-lite0-imagenet", embedding_dim=3, tile_count=count, image_count=count
        )

    def DescribeIndex(self, request, context):
        self._enter("DescribeIndex", context)
        self._index(request.index, context)
        return pb.DescribeIndexResponse(index=self._info(request.index))

    def ListIndexes(self, request, context):
        self._enter("ListIndexes", context)
        return pb.ListIndexesResponse(indexes=[self._info(name) for name in sorted(self.indexes)])

    def GetModelInfo(self, request, context):
        self._enter("GetModelInfo", context)
        model = types_pb2.ModelInfo(
            preset="efficientnet-lite0-imagenet",
            architecture="tf_efficientnet_lite0",
            embedding_dim=1280,
            input_height=HEATMAP_SHAPE[0],
            input_width=HEATMAP_SHAPE[1],
            methods=[
                types_pb2.EXPLANATION_METHOD_GRADCAM,
                types_pb2.EXPLANATION_METHOD_GRADCAM_PLUS_PLUS,
                types_pb2.EXPLANATION_METHOD_SMOOTHGRAD,
                types_pb2.EXPLANATION_METHOD_SIMMAP,
            ],
            backend="embedded",
        )
        return pb.GetModelInfoResponse(model=model, server_version="0.1.0-fake")


def start_server(servicer: FakeRetrievalService, credentials: grpc.ServerCredentials | None = None):
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 1 << 20), ("grpc.max_send_message_length", 1 << 20)],
    )
    pb_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("localhost:0", credentials)
    server.start()
    return server, port


@pytest.fixture
def fake() -> FakeRetrievalService:
    return FakeRetrievalService()


@pytest.fixture
def address(fake: FakeRetrievalService):
    server, port = start_server(fake)
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def client(address: str):
    with Client(address, timeout=10.0, retry=FAST_RETRY) as sdk:
        yield sdk


RED, GREEN, DARK_RED = (200, 20, 20), (20, 200, 20), (120, 10, 10)


def seed(client: Client) -> None:
    client.index_images(
        "crc",
        [
            IndexImage(png(RED), image_id="red", label="tumour", source="a/red.png", mpp=0.5),
            IndexImage(png(GREEN), image_id="green", label="stroma"),
            IndexImage(png(DARK_RED), image_id="dark-red", label="tumour"),
        ],
    )


# -- the package stays light ------------------------------------------------------------------


def test_sdk_import_never_loads_torch():
    code = "import sys, histoxplain_client, histoxplain_client.aio; print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'histoxplain_model', 'histoxplain_service'}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


# -- round trips of every RPC (sync) ----------------------------------------------------------


def test_index_images_accepts_every_input_kind_and_reports_skips(client, fake, tmp_path):
    path = tmp_path / "green.png"
    path.write_bytes(png(GREEN))
    array = np.zeros((8, 8, 3), dtype=np.uint8)
    array[..., 2] = 250
    summary = client.index_images(
        "mixed",
        [
            path,
            png(RED),
            array,
            Image.new("RGBA", (5, 7), (1, 2, 3, 255)),
            IndexImage(b"not an image", image_id="broken"),
            IndexImage(png(RED), image_id="labelled", label="tumour", mpp=0.25),
            IndexImage(png(GREEN), image_id="labelled"),
        ],
        tile_size=256,
        stride=128,
        min_tissue_fraction=0.3,
    )
    assert summary.index == "mixed"
    assert (summary.images_received, summary.images_indexed, summary.tiles_indexed) == (7, 5, 5)
    assert [(s.position, s.image_id, s.reason) for s in summary.skipped] == [
        (4, "broken", "unreadable_image"),
        (6, "labelled", "duplicate_image_id"),
    ]
    assert "cannot decode" in summary.skipped[0].message
    config = fake.requests["IndexImages.config"]
    assert (config.tiling.tile_size, config.tiling.stride) == (256, 128)
    assert config.tiling.min_tissue_fraction == pytest.approx(0.3)
    stored = fake.indexes["mixed"]
    by_source = {record.source: record for record in stored.values()}
    assert by_source[str(path)].content == path.read_bytes()  # paths travel as the file's bytes
    blue = next(r for r in stored.values() if np.asarray(Image.open(io.BytesIO(r.content)))[0, 0, 2] == 250)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(blue.content))), array)
    assert stored["labelled"].label == "tumour" and stored["labelled"].mpp == 0.25
    assert hashlib.sha256(png(RED)).hexdigest() in stored  # empty id -> server-side content hash


def test_images_from_folder_labels_from_subfolders(client, fake, tmp_path):
    for label, color in (("tumour", RED), ("stroma", GREEN)):
        (tmp_path / label).mkdir()
        (tmp_path / label / "x.png").write_bytes(png(color))
    (tmp_path / "notes.txt").write_text("ignored")
    summary = client.index_images("folder", images_from_folder(tmp_path))
    assert summary.images_indexed == 2
    assert {i: r.label for i, r in fake.indexes["folder"].items()} == {"stroma/x.png": "stroma", "tumour/x.png": "tumour"}


def test_search_returns_typed_hits_best_first(client, fake):
    seed(client)
    hits = client.search("crc", png(RED), k=2, ranking="image")
    assert [hit.image_id for hit in hits] == ["red", "dark-red"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-6) and hits[0].score >= hits[1].score
    assert (hits[0].label, hits[0].source, hits[0].mpp, hits[0].point_id) == ("tumour", "a/red.png", 0.5, "point-red")
    assert (hits[0].box.width, hits[0].box.height, hits[0].level) == (8, 8, 0)
    assert hits[1].mpp is None
    assert fake.requests["Search"].ranking == types_pb2.RANKING_LEVEL_IMAGE
    assert fake.requests["Search"].k == 2


@pytest.mark.parametrize("heatmap_dtype", ["float16", "float32"])
def test_explain_indexed_references_decodes_heatmaps_and_overlays(client, fake, heatmap_dtype):
    seed(client)
    explanation = client.explain(
        png(RED), index="crc", image_ids=["green"], point_ids=["point-red"], method="gradcampp",
        polarity="dissimilar", side="both", heatmap_dtype=heatmap_dtype,
    )
    request = fake.requests["Explain"]
    assert request.options.method == types_pb2.EXPLANATION_METHOD_GRADCAM_PLUS_PLUS
    assert request.options.polarity == types_pb2.POLARITY_DISSIMILAR
    assert list(request.indexed.image_ids) == ["green"] and list(request.indexed.point_ids) == ["point-red"]
    assert (explanation.method, explanation.polarity, explanation.side) == ("gradcampp", "dissimilar", "both")
    assert [ref.hit.image_id for ref in explanation.references] == ["red", "green"]
    assert explanation.scores[0] > explanation.scores[1]
    tolerance = 1e-3 if heatmap_dtype == "float16" else 0.0
    for ref in explanation.references:
        expected = RAMP * (ref.reference_index + 1) / 10
        assert ref.query_heatmap.values.dtype == np.float32 and ref.query_heatmap.values.shape == HEATMAP_SHAPE
        np.testing.assert_allclose(ref.query_heatmap.values, expected, atol=tolerance, rtol=0)
        np.testing.assert_allclose(ref.reference_heatmap.values, expected[::-1], atol=tolerance, rtol=0)
        overlay = ref.query_heatmap.overlay
        assert isinstance(overlay, Image.Image) and overlay.size == (12, 9)
        assert overlay.getpixel((0, 0))[0] == ref.reference_index * 10
    assert explanation.query_heatmaps.shape == (2, *HEATMAP_SHAPE)


def test_the_similarity_decomposition_is_asked_for_by_name(client, fake):
    seed(client)
    explanation = client.search_and_explain("crc", png(RED), k=2, method="simmap", polarity="dissimilar")
    request = fake.requests["SearchAndExplain"]
    assert request.options.method == types_pb2.EXPLANATION_METHOD_SIMMAP
    assert request.options.polarity == types_pb2.POLARITY_DISSIMILAR
    assert (explanation.method, explanation.polarity) == ("simmap", "dissimilar")


def test_explain_against_inline_references_keeps_the_k_most_similar(client, fake):
    explanation = client.explain(
        np.full((8, 8, 3), RED, dtype=np.uint8), references=[png(GREEN), png(DARK_RED), png(RED)], k=2, side="query"
    )
    assert len(fake.requests["Explain"].images.images) == 3
    assert [ref.reference_index for ref in explanation.references] == [2, 1]
    assert all(ref.hit is None for ref in explanation.references) and explanation.hits == ()
    assert all(ref.reference_heatmap is None for ref in explanation.references)
    assert explanation.reference_heatmaps is None and explanation.query_heatmaps.shape == (2, *HEATMAP_SHAPE)


def test_search_and_explain_one_call(client, fake):
    seed(client)
    explanation = client.search_and_explain(
        "crc", png(RED), k=3, method="smoothgrad", side="retrieved", smoothgrad_samples=8, smoothgrad_noise=0.1
    )
    request = fake.requests["SearchAndExplain"]
    assert request.options.smoothgrad_samples == 8 and request.options.smoothgrad_noise == pytest.approx(0.1)
    assert request.options.heatmap_dtype == types_pb2.ARRAY_DTYPE_FLOAT16
    assert explanation.method == "smoothgrad" and explanation.side == "retrieved"
    assert [hit.image_id for hit in explanation.hits] == ["red", "dark-red", "green"]
    assert [ref.reference_index for ref in explanation.references] == [0, 1, 2]
    assert all(ref.query_heatmap is None and ref.reference_heatmap is not None for ref in explanation.references)
    np.testing.assert_allclose(explanation.scores, [hit.score for hit in explanation.hits], rtol=1e-6)


def test_delete_describe_list_and_info(client, fake):
    seed(client)
    assert [info.name for info in client.list_indexes()] == ["crc"]
    before = client.describe_index("crc")
    assert (before.tile_count, before.image_count, before.encoder_preset) == (3, 3, "efficientnet-lite0-imagenet")
    result = client.delete("crc", ["red", "nope"])
    assert (result.images_deleted, result.tiles_deleted, result.missing_image_ids) == (1, 1, ("nope",))
    assert client.describe_index("crc").tile_count == 2
    info = client.info()
    assert info.methods == ("gradcam", "gradcampp", "smoothgrad", "simmap")
    assert (info.input_size, info.embedding_dim, info.backend) == (HEATMAP_SHAPE, 1280, "embedded")
    assert info.server_version == "0.1.0-fake"


# -- errors, retries, deadlines, credentials --------------------------------------------------


@pytest.mark.parametrize(
    ("rpc", "call", "error_class", "code", "message"),
    [
        ("Search", lambda c: c.search("missing", png(RED)), NotFound, grpc.StatusCode.NOT_FOUND, "unknown index 'missing'"),
        ("DescribeIndex", lambda c: c.describe_index("other-encoder"), FailedPrecondition,
         grpc.StatusCode.FAILED_PRECONDITION, "built with 'uni'"),
        ("Explain", lambda c: c.explain(png(RED), index="crc", image_ids=["ghost"]), NotFound,
         grpc.StatusCode.NOT_FOUND, "ghost"),
    ],
)
def test_server_errors_become_sdk_exceptions_with_code_and_message(client, fake, rpc, call, error_class, code, message):
    seed(client)
    with pytest.raises(error_class) as raised:
        call(client)
    assert isinstance(raised.value, ApiError)
    assert raised.value.code == code and message in raised.value.details
    assert message in str(raised.value) and code.name in str(raised.value)
    assert fake.calls[rpc] == 1  # not retried


def test_unavailable_is_retried_until_success(client, fake):
    fake.fail_with["GetModelInfo"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    assert client.info().preset == "efficientnet-lite0-imagenet"
    assert fake.calls["GetModelInfo"] == 3


def test_unavailable_gives_up_after_max_attempts(address, fake):
    fake.fail_with["ListIndexes"] = [grpc.StatusCode.UNAVAILABLE] * 5
    with Client(address, retry=RetryPolicy(max_attempts=2, initial_backoff=0.01)) as sdk:
        with pytest.raises(Unavailable) as raised:
            sdk.list_indexes()
    assert fake.calls["ListIndexes"] == 2
    assert "injected UNAVAILABLE on attempt 2" in raised.value.details


def test_invalid_argument_is_not_retried(client, fake):
    seed(client)
    fake.fail_with["Search"] = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT]
    with pytest.raises(InvalidArgument) as raised:
        client.search("crc", png(RED))
    assert fake.calls["Search"] == 1 and raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_index_images_retries_a_list_but_not_a_generator(client, fake):
    fake.fail_with["IndexImages"] = [grpc.StatusCode.UNAVAILABLE]
    summary = client.index_images("crc", [png(RED), png(GREEN)])
    assert fake.calls["IndexImages"] == 2 and summary.images_indexed == 2

    fake.fail_with["IndexImages"] = [grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(Unavailable):
        client.index_images("crc", (image for image in [png(RED)]))
    assert fake.calls["IndexImages"] == 3


def test_deadline_becomes_deadline_exceeded(client, fake):
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as raised:
        client.search("slow", png(RED), timeout=0.3)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0
    assert fake.calls["Search"] == 1


def test_bearer_token_arrives_as_metadata(address, fake):
    with Client(address, token="s3cret") as sdk:
        sdk.info()
    assert fake.metadata["GetModelInfo"]["authorization"] == "Bearer s3cret"
    with Client(address) as sdk:
        sdk.info()
    assert "authorization" not in fake.metadata["GetModelInfo"]


def test_message_size_limit_is_enforced_client_side(address, fake):
    big = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # ~197 kB PNG
    with Client(address, max_message_bytes=64 * 1024) as sdk:
        with pytest.raises(ResourceExhausted):
            sdk.search("crc", big)
    assert fake.calls["Search"] == 0


def test_unreadable_input_file_raises_the_local_error(client, fake, tmp_path):
    with pytest.raises(FileNotFoundError):
        client.index_images("crc", [png(RED), tmp_path / "missing.png"])
    # The client cancels the call, but the server may see that as an ordinary end of stream (a
    # gRPC race; see test_async_index_images_retries_a_list_and_stops_on_bad_input): certain is
    # that nothing after the unreadable file was sent, and that the call was not retried.
    outcomes = fake.wait_for_streams()
    assert len(outcomes) == fake.calls["IndexImages"] <= 1
    assert len(fake.indexes.get("crc", {})) <= 1  # at most the one image before it


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.search("crc", np.zeros((8, 8), np.uint8)), ValueError, r"\(H, W, 3\) uint8"),
        (lambda c: c.search("crc", png(RED), k=0), ValueError, "k must be >= 1"),
        (lambda c: c.search("crc", png(RED), ranking="slide"), ValueError, "known: tile, image"),
        (lambda c: c.search("crc", 42), TypeError, "image must be"),
        (lambda c: c.search_and_explain("crc", png(RED), method="lime"), ValueError, "known: gradcam, gradcampp, smoothgrad"),
        (lambda c: c.explain(png(RED)), ValueError, "nothing to explain"),
        (lambda c: c.explain(png(RED), image_ids=["a"]), ValueError, "need the index"),
        (lambda c: c.explain(png(RED), index="crc", image_ids=["a"], references=[png(RED)]), ValueError, "not both"),
        (lambda c: c.delete("crc", "red"), TypeError, "not one string"),
        (lambda c: c.search("crc", b""), ValueError, "empty"),
    ],
)
def test_bad_input_is_refused_before_the_call(client, fake, call, error, match):
    with pytest.raises(error, match=match):
        call(client)
    assert sum(fake.calls.values()) == 0


def test_tls_with_root_certificate(fake, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, port = start_server(fake, credentials)
    try:
        with Client(f"localhost:{port}", root_certificates=cert, token="t") as sdk:
            assert sdk.info().backend == "embedded"
        assert fake.metadata["GetModelInfo"]["authorization"] == "Bearer t"
        with Client(f"localhost:{port}", retry=RetryPolicy(max_attempts=1), timeout=5) as plaintext:
            with pytest.raises(Unavailable):
                plaintext.info()
    finally:
        server.stop(grace=None)


# -- async client -----------------------------------------------------------------------------


def test_async_client_round_trips_every_rpc(address, fake):
    async def scenario():
        async with AsyncClient(address, token="abc", retry=FAST_RETRY) as sdk:
            await sdk.wait_until_ready(5)

            async def images():
                yield IndexImage(png(RED), image_id="red", label="tumour")
                yield IndexImage(png(GREEN), image_id="green")

            summary = await sdk.index_images("crc", images())
            hits = await sdk.search("crc", png(RED), k=1)
            explanation = await sdk.explain(png(RED), index="crc", image_ids=["green", "red"], heatmap_dtype="float32")
            combined = await sdk.search_and_explain("crc", png(GREEN), k=2, side="query")
            listed = await sdk.list_indexes()
            described = await sdk.describe_index("crc")
            info = await sdk.info()
            deleted = await sdk.delete("crc", ["red"])
            return summary, hits, explanation, combined, listed, described, info, deleted

    summary, hits, explanation, combined, listed, described, info, deleted = asyncio.run(scenario())
    assert summary.images_indexed == 2 and [hit.image_id for hit in hits] == ["red"]
    assert [ref.hit.image_id for ref in explanation.references] == ["red", "green"]
    assert [ref.reference_index for ref in explanation.references] == [1, 0]  # positions in image_ids
    np.testing.assert_array_equal(explanation.references[1].query_heatmap.values, RAMP * 1 / 10)  # float32: exact
    assert [hit.image_id for hit in combined.hits] == ["green", "red"] and combined.side == "query"
    assert combined.references[0].reference_heatmap is None
    assert [index.name for index in listed] == ["crc"] and described.tile_count == 2
    assert info.input_size == HEATMAP_SHAPE and deleted.images_deleted == 1
    assert fake.metadata["IndexImages"]["authorization"] == "Bearer abc"
    assert fake.metadata["DeleteImages"]["authorization"] == "Bearer abc"


def test_async_client_retries_only_unavailable_and_maps_deadlines(address, fake):
    fake.fail_with["GetModelInfo"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    fake.fail_with["ListIndexes"] = [grpc.StatusCode.INVALID_ARGUMENT]

    async def scenario():
        async with AsyncClient(address, retry=FAST_RETRY) as sdk:
            info = await sdk.info()
            with pytest.raises(InvalidArgument):
                await sdk.list_indexes()
            with pytest.raises(DeadlineExceeded):
                await sdk.search("slow", png(RED), timeout=0.3)
            with pytest.raises(NotFound, match="unknown index 'missing'"):
                await sdk.search("missing", png(RED))
            return info

    assert asyncio.run(scenario()).preset == "efficientnet-lite0-imagenet"
    assert (fake.calls["GetModelInfo"], fake.calls["ListIndexes"]) == (3, 1)


def test_async_index_images_retries_a_list_and_stops_on_bad_input(address, fake, tmp_path):
    fake.fail_with["IndexImages"] = [grpc.StatusCode.UNAVAILABLE]

    async def scenario():
        async with AsyncClient(address, retry=FAST_RETRY) as sdk:
            summary = await sdk.index_images("crc", [png(RED)])
            with pytest.raises(FileNotFoundError):
                await sdk.index_images("crc", [png(GREEN), tmp_path / "missing.png"])
            return summary

    assert asyncio.run(scenario()).images_indexed == 1
    assert fake.calls["IndexImages"] in (2, 3)  # the cancelled call may end before reaching the handler
    # The UNAVAILABLE attempt is aborted, the retry completes. The bad stream was cancelled by
    # the client, but the server may see that as an ordinary end of stream (a gRPC race), so
    # only the retried stream is certain to have completed.
    outcomes = fake.wait_for_streams()
    assert outcomes.count("completed") in (1, 2) and len(outcomes) == fake.calls["IndexImages"]


# -- codecs and policy ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [types_pb2.ARRAY_DTYPE_FLOAT16, types_pb2.ARRAY_DTYPE_FLOAT32, types_pb2.ARRAY_DTYPE_UINT8])
def test_raw_array_round_trip_is_little_endian_c_order(dtype):
    values = (np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 23 * 200).astype(np.float32)
    message = encode_array(values, dtype)
    assert list(message.shape) == [2, 3, 4] and message.dtype == dtype
    expected = values.astype({1: "<f2", 2: "<f4", 3: "u1"}[dtype])
    assert message.data == expected.tobytes(order="C")
    np.testing.assert_array_equal(decode_array(message), expected.astype(np.float32))


def test_raw_array_with_wrong_byte_count_is_rejected():
    message = types_pb2.RawArray(shape=[2, 2], dtype=types_pb2.ARRAY_DTYPE_FLOAT32, data=b"\0" * 12)
    with pytest.raises(ValueError, match="needs 16 bytes, got 12"):
        decode_array(message)
    with pytest.raises(ValueError, match="unsupported dtype"):
        decode_array(types_pb2.RawArray(shape=[1], data=b"\0"))


def test_backoff_is_exponential_capped_and_jittered():
    import random

    policy = RetryPolicy(max_attempts=6, initial_backoff=0.1, max_backoff=0.5, multiplier=2.0)
    rng = random.Random(0)
    delays = {attempt: [policy.backoff(attempt, rng) for _ in range(200)] for attempt in (1, 2, 3, 5)}
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (5, 0.5)):
        assert 0.0 <= min(delays[attempt]) and max(delays[attempt]) <= ceiling
        assert max(delays[attempt]) > 0.8 * ceiling and len(set(delays[attempt])) > 100  # jittered
    assert policy.should_retry(grpc.StatusCode.UNAVAILABLE, 5)
    assert not policy.should_retry(grpc.StatusCode.UNAVAILABLE, 6)
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL):
        assert not policy.should_retry(code, 1)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_readme_examples_run_as_written(address, fake, tmp_path, monkeypatch, capsys):
    """Every python block of client/README.md, against the fake on a free port instead of 50051."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    blocks = [block.split("```")[0] for block in readme.read_text().split("```python")[1:]]
    assert len(blocks) >= 4
    for label, color in (("tumour", RED), ("stroma", GREEN)):
        (tmp_path / "tiles" / label).mkdir(parents=True)
        (tmp_path / "tiles" / label / f"{label}.png").write_bytes(png(color))
    (tmp_path / "query.png").write_bytes(png(DARK_RED))
    (tmp_path / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    for placeholder in ("client.pem", "client-key.pem"):  # read when the client is built, never used
        (tmp_path / placeholder).write_bytes(b"-----BEGIN PLACEHOLDER-----\n-----END PLACEHOLDER-----\n")
    monkeypatch.chdir(tmp_path)
    for number, block in enumerate(blocks):
        code = compile(block.replace("127.0.0.1:50051", address), f"README block {number}", "exec")
        exec(code, {"__name__": f"readme_{number}"})
    printed = capsys.readouterr().out
    assert "indexed 2 images as 2 tiles" in printed and "NOT_FOUND" in printed
    assert (tmp_path / "query-vs-0.png").is_file() and (tmp_path / "hit-1.png").is_file()
    assert {"IndexImages", "Search", "Explain", "SearchAndExplain", "ListIndexes", "GetModelInfo"} <= set(fake.calls)


def test_wait_until_ready_raises_unavailable_when_nothing_listens(address):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with Client(address) as sdk:
        sdk.wait_until_ready(5)
    with Client(f"127.0.0.1:{closed_port}") as sdk:
        with pytest.raises(Unavailable, match="no connection"):
            sdk.wait_until_ready(0.3)

    async def scenario():
        async with AsyncClient(f"127.0.0.1:{closed_port}") as sdk:
            with pytest.raises(Unavailable, match="no connection"):
                await sdk.wait_until_ready(0.3)

    asyncio.run(scenario())


def test_timeout_none_means_no_deadline_and_bad_timeouts_are_refused(client, fake, address):
    seed(client)
    assert len(client.search("crc", png(RED), timeout=None)) == 3
    with pytest.raises(ValueError, match="timeout must be > 0"):
        client.search("crc", png(RED), timeout=0)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Client(address, timeout=-1)


def test_search_filter_becomes_one_condition_per_key():
    from histoxplain_client import _convert

    request = _convert.search_request("idx", png((1, 2, 3)), 3, "tile", {"label": "TUM", "organ": ["skin", "colon"], "level": 0})
    assert [(c.key, list(c.values)) for c in request.filter.conditions] == [
        ("label", ["TUM"]), ("organ", ["skin", "colon"]), ("level", ["0"])
    ]
    assert not _convert.search_request("idx", png((1, 2, 3)), 3, "tile").HasField("filter")
    explain = _convert.search_and_explain_request(
        "idx", png((1, 2, 3)), 3, "tile", types_pb2.ExplainOptions(), {"source": ("a", "b")}
    )
    assert [(c.key, list(c.values)) for c in explain.filter.conditions] == [("source", ["a", "b"])]


@pytest.mark.parametrize(("bad", "error"), [({"label": []}, ValueError), ({"label": [1.5]}, TypeError), ({1: "x"}, TypeError), (["label"], TypeError)])
def test_bad_search_filters_are_refused_before_sending(bad, error):
    from histoxplain_client import _convert

    with pytest.raises(error):
        _convert.search_request("idx", png((1, 2, 3)), 3, "tile", bad)


def test_rise_options_travel_typed(client, fake):
    from histoxplain_client import RiseOptions

    seed(client)
    explanation = client.search_and_explain(
        "crc", png(RED), k=2, method="rise", side="query", rise=RiseOptions(masks=200, grid=5, fill="mean", seed=4)
    )
    sent = fake.requests["SearchAndExplain"].options
    assert sent.method == types_pb2.EXPLANATION_METHOD_RISE and explanation.method == "rise"
    assert (sent.rise.masks, sent.rise.grid, sent.rise.fill, sent.rise.seed) == (200, 5, types_pb2.RiseOptions.FILL_MEAN, 4)
    assert not sent.rise.HasField("keep_probability")  # unset: the server's default
    client.search_and_explain("crc", png(RED), k=1, method="rise")
    assert not fake.requests["SearchAndExplain"].options.HasField("rise")
    with pytest.raises(ValueError, match="unknown RISE fill 'zero'; known: blur, mean"):
        client.search_and_explain("crc", png(RED), k=1, method="rise", rise=RiseOptions(fill="zero"))  # type: ignore[arg-type]
