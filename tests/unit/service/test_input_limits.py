"""The domain enforces the limits table for every entry point: images sent as bytes (the gateway),
paths (the CLI), deletions and indexed references; refusals name field, position and limit,
never the value, and an image over the request pixel limit is refused from its header."""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from PIL import Image
from qdrant_client import QdrantClient

from histoxplain_model.errors import ImageTooLargeError, InvalidRequest, NotFound
from histoxplain_model.imageio import MAX_PIXELS_ENV, MAX_REQUEST_PIXELS_ENV
from histoxplain_model.limits import IMAGE_ID, LABEL, MAX_MPP, POINT_ID, SOURCE
from histoxplain_model.results import ModelInfo
from histoxplain_service.config import Settings
from histoxplain_service.domain.checks import (
    REQUEST_PIXEL_BUDGET,
    EncodedImage,
    decode_request_image,
    decode_request_images,
    request_pixel_limit,
)
from histoxplain_service.domain.ingest import discover_inputs, index_images
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.index.qdrant import QdrantEngine, QdrantIndex
from histoxplain_service.index.tile_store import TileStore

DIM = 3
PHI = "PATIENT=Jane Doe"


def mean_colour_embed(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """Stand-in encoder: each tile's mean colour, L2-normalised (B, 3)."""
    means = np.stack([tile.reshape(-1, 3).mean(axis=0) for tile in tiles]).astype(np.float32) + 1.0
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array([200, 110, 170]) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", tile_size=48, min_tissue=0.0)


@pytest.fixture
def client() -> Iterator[QdrantClient]:
    qdrant = QdrantClient(":memory:")
    yield qdrant
    qdrant.close()


@pytest.fixture
def index(client: QdrantClient, settings: Settings) -> QdrantIndex:
    return QdrantIndex(client, "limits", TileStore(settings.tiles_dir("limits")))


def _index(images: list[EncodedImage], index: QdrantIndex, settings: Settings):
    return index_images(images, index, mean_colour_embed, settings, preset="mean", dim=DIM)


def test_each_text_field_is_accepted_at_its_limit_and_refused_one_over(index: QdrantIndex, settings: Settings) -> None:
    at_limit = EncodedImage(png(0), "s" * SOURCE.max_chars, "l" * LABEL.max_chars, "i" * IMAGE_ID.max_chars, 0.5)
    summary = _index([
        at_limit,
        EncodedImage(png(1), PHI + "s" * SOURCE.max_chars),
        EncodedImage(png(2), "b", PHI + "l" * LABEL.max_chars),
        EncodedImage(png(3), "c", None, PHI + "i" * IMAGE_ID.max_chars),
    ], index, settings)
    assert [image.image_id for image in summary.images] == [at_limit.image_id]
    assert [(s.kind, s.position) for s in summary.skipped] == [("invalid_metadata", p) for p in (1, 2, 3)]
    for skipped, limit in zip(summary.skipped, (SOURCE, LABEL, IMAGE_ID)):
        assert f"the {limit.field} of image {skipped.position}" in skipped.reason
        assert f"the limit is {limit.max_chars:,}" in skipped.reason and PHI not in skipped.reason
    (hit,) = index.search(mean_colour_embed([np.full((4, 4, 3), 150, np.uint8)])[0], k=1)
    assert (hit.label, hit.source, hit.mpp) == (at_limit.label, at_limit.source, 0.5)


@pytest.mark.parametrize("mpp", [math.nan, -math.inf, math.inf, 0.0, -1.0, MAX_MPP * 2])
def test_an_mpp_that_is_not_finite_or_in_range_never_reaches_the_index(
    mpp: float, index: QdrantIndex, settings: Settings
) -> None:
    summary = _index([EncodedImage(png(0), "a", mpp=mpp), EncodedImage(png(1), "b", mpp=MAX_MPP)], index, settings)
    assert [(s.kind, s.position) for s in summary.skipped] == [("invalid_metadata", 0)]
    assert "finite number" in summary.skipped[0].reason
    stored = [record.mpp for record in index.image_tiles(summary.images[0].image_id)[0]]
    assert stored == [MAX_MPP]


def test_skip_reasons_and_logs_name_bytes_by_position_never_by_source(
    index: QdrantIndex, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    images = [
        EncodedImage(png(0), f"/pacs/{PHI}/a.png", PHI, "case-1"),
        EncodedImage(png(7)[:80], f"/pacs/{PHI}/broken.png", PHI),  # truncated
        EncodedImage(png(0), f"/pacs/{PHI}/copy.png", PHI),  # same bytes under another id: indexed
        EncodedImage(png(5), f"/pacs/{PHI}/again.png", PHI, "case-1"),
    ]
    summary = _index(images, index, settings)
    assert [(s.kind, s.position) for s in summary.skipped] == [("unreadable", 1), ("duplicate", 3)]
    assert summary.skipped[0].reason.startswith("image 1 ")
    assert all(PHI not in s.reason for s in summary.skipped)
    assert PHI not in caplog.text


def test_images_sent_as_bytes_get_the_smaller_request_pixel_limit(settings: Settings) -> None:
    assert request_pixel_limit(settings) == (settings.max_request_pixels, MAX_REQUEST_PIXELS_ENV)
    data = png(0, size=64)
    small = settings.with_changes(max_request_pixels=64 * 64 - 1)
    with pytest.raises(ImageTooLargeError, match=f"image 0 is 64x64 .*{MAX_REQUEST_PIXELS_ENV}"):
        decode_request_image(data, small, "image 0")
    lowered = settings.with_changes(max_pixels=100)
    assert request_pixel_limit(lowered) == (100, MAX_PIXELS_ENV)
    with pytest.raises(ImageTooLargeError, match=MAX_PIXELS_ENV):
        decode_request_image(data, lowered, "query image")
    with pytest.raises(InvalidRequest, match="the query image is empty"):
        decode_request_image(b"", settings, "query image")


def test_the_images_of_one_request_share_a_pixel_budget(settings: Settings) -> None:
    small = settings.with_changes(max_request_pixels=64 * 64)  # budget: 2 x 4096 pixels
    assert REQUEST_PIXEL_BUDGET == 2
    tiles = [png(seed) for seed in range(4)]  # 48 x 48 = 2304 pixels each
    assert len(decode_request_images(tiles[:3], small, "reference image")) == 3
    with pytest.raises(ImageTooLargeError, match=f"first 4 reference images hold 9,216 pixels.*{MAX_REQUEST_PIXELS_ENV}"):
        decode_request_images(tiles, small, "reference image")


def test_an_explicit_label_over_the_limit_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png(0))
    assert discover_inputs([path], label="l" * LABEL.max_chars)[0].label == "l" * LABEL.max_chars
    with pytest.raises(InvalidRequest, match=f"the label of --label is {LABEL.max_chars + 1} characters"):
        discover_inputs([path], label="l" * (LABEL.max_chars + 1))


class MeanColourBackend:
    """The model side of :class:`Retrieval` for these tests: embeds only."""

    def info(self) -> ModelInfo:
        return ModelInfo("mean", "none", DIM, (48, 48), ("gradcam",), "scripted")

    def embed(self, images: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        return mean_colour_embed(images)


def test_ids_of_deletions_and_references_are_limited_and_unknown_ones_named_by_position(
    client: QdrantClient, settings: Settings
) -> None:
    retrieval = Retrieval(settings, MeanColourBackend(), QdrantEngine(settings, client))  # type: ignore[arg-type]
    retrieval.index_encoded("refs", [EncodedImage(png(0), "a", image_id="known")])
    with pytest.raises(InvalidRequest, match=rf"image_ids\[1\] is {IMAGE_ID.max_chars + 16} characters"):
        retrieval.delete_images("refs", ["known", PHI + "x" * IMAGE_ID.max_chars])
    query = np.full((48, 48, 3), 120, np.uint8)
    with pytest.raises(NotFound) as unknown:
        retrieval.indexed_hits("refs", query, image_ids=["known", PHI])
    assert "image_ids[1] is not in index 'refs'" in str(unknown.value) and PHI not in str(unknown.value)
    too_long = rf"point_ids\[0\] is 37 characters long; the limit is {POINT_ID.max_chars}"
    with pytest.raises(InvalidRequest, match=too_long):
        retrieval.indexed_hits("refs", query, point_ids=["0" * 37])
    assert retrieval.delete_images("refs", ["known"]).images_deleted == 1
