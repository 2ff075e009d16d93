"""Ingest: discovery, tiling, the tissue mask on the real slide, bad files, re-runs and resuming."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from PIL import Image
from qdrant_client import QdrantClient

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.limits import MAX_IMAGE_ID_CHARS
from histoxplain_service.index.qdrant import QdrantIndex
from histoxplain_service.domain.ingest import (
    ArraySource,
    SlideSource,
    bytes_id,
    content_id,
    discover_inputs,
    index_images,
    index_paths,
    iter_tiles,
    plan_tiles,
)
from histoxplain_service.app.samples import he_slide_path, ihc_image_path
from histoxplain_service.config import Settings
from histoxplain_service.index.tile_store import TileStore
from histoxplain_service.domain.tiling import otsu_threshold, pad_tile, saturation, tile_grid

DIM = 24


def histogram_embed(tiles: Sequence[np.ndarray]) -> np.ndarray:
    """Deterministic stand-in encoder: 8-bin colour histograms, L2-normalised (B, 24)."""
    features = np.stack(
        [np.concatenate([np.histogram(t[..., c], bins=8, range=(0, 256))[0] for c in range(3)]) for t in tiles]
    ).astype(np.float32) + 1e-3
    return features / np.linalg.norm(features, axis=1, keepdims=True)


class FailingEmbed:
    """Embeds ``fail_after`` batches, then raises (an interrupted run)."""

    def __init__(self, fail_after: int) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, tiles: Sequence[np.ndarray]) -> np.ndarray:
        if self.calls >= self.fail_after:
            raise RuntimeError("embedder interrupted")
        self.calls += 1
        return histogram_embed(tiles)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", tile_size=64, batch_size=4, min_tissue=0.25)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[QdrantClient]:
    qdrant = QdrantClient(path=str(tmp_path / "qdrant"))
    yield qdrant
    qdrant.close()


@pytest.fixture
def index(client: QdrantClient, settings: Settings) -> QdrantIndex:
    return QdrantIndex(client, "test", TileStore(settings.tiles_dir("test")))


def tissue_image(width: int, height: int, seed: int, blob: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """White glass with a pink, textured 'tissue' rectangle (x, y, w, h); all tissue by default."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 245, np.uint8)
    x, y, w, h = blob or (0, 0, width, height)
    pink = np.array([200, 110, 170]) + rng.integers(-30, 30, (h, w, 3))
    image[y : y + h, x : x + w] = np.clip(pink, 0, 255).astype(np.uint8)
    return image


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def make_dataset(root: Path) -> Path:
    write_png(root / "tumour" / "a.png", tissue_image(150, 130, 1))
    write_png(root / "tumour" / "deeper" / "b.png", tissue_image(100, 100, 2))
    write_png(root / "normal" / "c.png", tissue_image(64, 64, 3))
    write_png(root / "d.png", tissue_image(70, 64, 4))
    (root / "notes.txt").write_text("not an image")
    write_png(root / ".hidden" / "e.png", tissue_image(64, 64, 5))
    return root


# -- tiling --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "tile", "stride"), [(512, 512, 224, 224), (500, 300, 64, 48), (100, 60, 224, 224), (224, 225, 224, 100)])
def test_tile_grid_covers_every_pixel_within_bounds(width: int, height: int, tile: int, stride: int) -> None:
    covered = np.zeros((height, width), bool)
    boxes = tile_grid(width, height, tile, stride)
    for x, y, w, h in boxes:
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        assert w == min(tile, width) and h == min(tile, height)
        covered[y : y + h, x : x + w] = True
    assert covered.all()
    assert len(set(boxes)) == len(boxes)


def test_tile_grid_steps_by_stride() -> None:
    assert [b[0] for b in tile_grid(512, 224, 224, 224)] == [0, 224, 288]
    assert [b[0] for b in tile_grid(448, 224, 224, 112)] == [0, 112, 224]


def test_a_tiny_image_is_one_tile_padded_with_white() -> None:
    image = tissue_image(100, 60, 0)
    source = ArraySource(image, "tiny", "tiny.png")
    (record,) = plan_tiles(source, 224, 224, min_tissue=0.9)
    assert (record.box.w, record.box.h, record.tiles_in_image) == (100, 60, 1)
    (tile,) = iter_tiles(source, [record], 224)
    assert tile.shape == (224, 224, 3)
    np.testing.assert_array_equal(tile[:60, :100], image)
    assert (tile[60:] == 255).all() and (tile[:, 100:] == 255).all()
    np.testing.assert_array_equal(pad_tile(tile, 224), tile)


def test_otsu_matches_scikit_image_on_the_real_ihc_image() -> None:
    from skimage.filters import threshold_otsu

    sat = saturation(np.asarray(Image.open(ihc_image_path()).convert("RGB")))
    assert otsu_threshold(sat) == pytest.approx(threshold_otsu(sat), abs=1 / 128)


def test_background_tiles_are_dropped_on_a_synthetic_image() -> None:
    image = tissue_image(256, 256, 0, blob=(0, 0, 128, 64))  # tissue in the top-left 128x64 only
    records = plan_tiles(ArraySource(image, "x", "x.png"), 64, 64, min_tissue=0.5)
    assert sorted((r.box.x, r.box.y) for r in records) == [(0, 0), (64, 0)]
    assert all(r.tiles_in_image == 2 for r in records) and [r.tile_index for r in records] == [0, 1]
    assert plan_tiles(ArraySource(image, "x", "x.png"), 64, 64, min_tissue=0.0).__len__() == 16


def test_tissue_mask_on_the_real_slide_keeps_tissue_and_drops_glass() -> None:
    source = SlideSource(he_slide_path(), 0, "slide")
    try:
        kept = {(r.box.x, r.box.y) for r in plan_tiles(source, 224, 224, min_tissue=0.25)}
        full = source.read(0, 0, source.width, source.height)
    finally:
        source.close()
    # judged independently of the mask: the fraction of near-white (glass) pixels in each tile
    glass = {
        (x, y): float((full[y : y + h, x : x + w].min(axis=2) > 200).mean())
        for x, y, w, h in tile_grid(full.shape[1], full.shape[0], 224, 224)
    }
    tissue_tiles = {box for box, g in glass.items() if g < 0.5}
    blank_tiles = {box for box, g in glass.items() if g > 0.9}
    assert len(tissue_tiles) >= 40 and len(blank_tiles) >= 40  # the slide has plenty of both
    assert tissue_tiles <= kept  # every clearly-tissue tile is kept
    assert not (blank_tiles & kept)  # no blank tile is
    assert 0.3 < len(kept) / len(glass) < 0.6


# -- discovery and ids ---------------------------------------------------------------------------


def test_discover_labels_from_the_enclosing_folder(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds")
    found = {item.path.relative_to(root).as_posix(): item.label for item in discover_inputs([root])}
    assert found == {"tumour/a.png": "tumour", "tumour/deeper/b.png": "deeper", "normal/c.png": "normal", "d.png": None}
    (single,) = discover_inputs([root / "normal" / "c.png"], label="given")
    assert single.label == "given"


def test_missing_paths_and_unsupported_files_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="does not exist"):
        discover_inputs([tmp_path / "nope"])
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(InvalidRequest, match="unsupported file type '.gif'"):
        discover_inputs([tmp_path / "x.gif"])


def test_image_ids_come_from_content(tmp_path: Path) -> None:
    a = write_png(tmp_path / "a.png", tissue_image(64, 64, 0))
    b = tmp_path / "elsewhere" / "b.png"
    b.parent.mkdir()
    shutil.copy(a, b)
    c = write_png(tmp_path / "c.png", tissue_image(64, 64, 1))
    assert content_id(a) == content_id(b) == bytes_id(a.read_bytes()) != content_id(c)
    assert len(content_id(a)) == 40


# -- indexing ------------------------------------------------------------------------------------


def test_index_a_folder_then_rerun_changes_nothing(tmp_path: Path, index: QdrantIndex, settings: Settings) -> None:
    root = make_dataset(tmp_path / "ds")
    summary = index_paths([root], index, histogram_embed, settings, preset="hist", dim=DIM, show_progress=False)
    # 150x130 -> 3x3 tiles, 100x100 -> 2x2, 64x64 -> 1, 70x64 -> 2x1 (all tissue)
    assert sorted(i.tiles for i in summary.images) == [1, 2, 4, 9]
    assert (summary.images_indexed, summary.tiles_indexed, summary.skipped) == (4, 16, ())
    info = index.describe()
    assert (info.preset, info.dim, info.n_points, info.n_images) == ("hist", DIM, 16, 4)
    hit = index.search(histogram_embed([tissue_image(64, 64, 3)])[0], k=1)[0]
    assert hit.label == "normal" and hit.source == str(root / "normal" / "c.png") and hit.mpp is None
    np.testing.assert_array_equal(index.load_tile(hit), tissue_image(64, 64, 3))

    again = index_paths([root], index, FailingEmbed(0), settings, preset="hist", dim=DIM, show_progress=False)
    assert (again.images_indexed, again.images_unchanged, again.tiles_indexed) == (0, 4, 0)
    assert index.describe().n_points == 16


def test_bad_files_in_a_folder_are_skipped_with_their_reason(tmp_path: Path, index: QdrantIndex, settings: Settings) -> None:
    root = make_dataset(tmp_path / "ds")
    (root / "normal" / "empty.png").write_bytes(b"")
    good = (root / "normal" / "c.png").read_bytes()
    (root / "normal" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "normal" / "fake.jpg").write_bytes(b"this is text")
    write_png(root / "normal" / "huge.png", tissue_image(300, 300, 9))
    limited = settings.with_changes(max_pixels=200 * 200)
    summary = index_paths([root], index, histogram_embed, limited, preset="hist", dim=DIM, show_progress=False)
    reasons = {Path(s.source).name: s.reason for s in summary.skipped}
    assert set(reasons) == {"empty.png", "truncated.png", "fake.jpg", "huge.png"}
    assert "empty" in reasons["empty.png"]
    assert "truncated" in reasons["truncated.png"] or "corrupt" in reasons["truncated.png"]
    assert "HISTOXPLAIN_MAX_PIXELS" in reasons["huge.png"]
    assert summary.images_indexed == 4  # the good ones are all there
    assert index.describe().n_images == 4


def test_another_encoder_is_refused_before_anything_is_written(tmp_path: Path, index: QdrantIndex, settings: Settings) -> None:
    from histoxplain_model.errors import FailedPrecondition

    root = make_dataset(tmp_path / "ds")
    index_paths([root / "normal"], index, histogram_embed, settings, preset="hist", dim=DIM, show_progress=False)
    with pytest.raises(FailedPrecondition, match="was built with encoder 'hist'"):
        index_paths([root], index, histogram_embed, settings, preset="other", dim=DIM, show_progress=False)
    assert index.describe().n_points == 1


def test_an_interrupted_run_resumes_with_nothing_lost_or_doubled(tmp_path: Path, client: QdrantClient, settings: Settings) -> None:
    root = make_dataset(tmp_path / "ds")
    reference = QdrantIndex(client, "reference", TileStore(settings.tiles_dir("reference")))
    index_paths([root], reference, histogram_embed, settings, preset="hist", dim=DIM, show_progress=False)
    expected_records, expected_vectors = {}, {}
    for image_id in reference.image_ids():
        records, vectors = reference.image_tiles(image_id)
        expected_records[image_id], expected_vectors[image_id] = records, vectors

    index = QdrantIndex(client, "resumed", TileStore(settings.tiles_dir("resumed")))
    interrupted = FailingEmbed(fail_after=2)  # 2 batches of 4 tiles, then the "crash"
    with pytest.raises(RuntimeError, match="interrupted"):
        index_paths([root], index, interrupted, settings, preset="hist", dim=DIM, show_progress=False)
    assert 0 < index.describe().n_points < 16  # partial

    resumed = FailingEmbed(fail_after=100)
    summary = index_paths([root], index, resumed, settings, preset="hist", dim=DIM, show_progress=False)
    assert summary.images_unchanged >= 1  # what finished before the crash is not embedded again
    assert summary.tiles_indexed < 16
    info = index.describe()
    assert (info.n_points, info.n_images) == (16, 4)
    for image_id, records in expected_records.items():
        got_records, got_vectors = index.image_tiles(image_id)
        assert got_records == records
        np.testing.assert_allclose(got_vectors, expected_vectors[image_id], atol=1e-6)
    stored = sorted(p.name for p in settings.tiles_dir("resumed").iterdir())
    assert stored == sorted(f"{r.point_id}.png" for rs in expected_records.values() for r in rs)


def test_reindexing_with_another_tiling_replaces_the_old_tiles(tmp_path: Path, index: QdrantIndex, settings: Settings) -> None:
    path = write_png(tmp_path / "one" / "a.png", tissue_image(150, 130, 1))
    index_paths([path], index, histogram_embed, settings, preset="hist", dim=DIM, show_progress=False)
    old_ids = {f.name for f in settings.tiles_dir("test").iterdir()}
    assert index.describe().n_points == 9
    bigger = settings.with_changes(tile_size=128)
    summary = index_paths([path], index, histogram_embed, bigger, preset="hist", dim=DIM, show_progress=False)
    assert summary.tiles_indexed == 4
    assert index.describe().n_points == 4
    new_ids = {f.name for f in settings.tiles_dir("test").iterdir()}
    assert len(new_ids) == 4 and not (new_ids & old_ids)


def test_same_content_is_indexed_once_and_a_new_label_is_applied_without_reembedding(
    tmp_path: Path, index: QdrantIndex, settings: Settings
) -> None:
    a = write_png(tmp_path / "x" / "a.png", tissue_image(64, 64, 0))
    copy = tmp_path / "y" / "a_copy.png"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    summary = index_paths([a, copy], index, histogram_embed, settings, preset="hist", dim=DIM, label="L1", show_progress=False)
    assert summary.images_indexed == 1
    assert [(s.reason, s.kind, s.position) for s in summary.skipped] == [
        (f"same image as {a} (same content or image id)", "duplicate", 1)
    ]
    relabel = index_paths([copy], index, FailingEmbed(0), settings, preset="hist", dim=DIM, label="L2", show_progress=False)
    assert [i.status for i in relabel.images] == ["relabelled"]
    (hit,) = index.search(histogram_embed([tissue_image(64, 64, 0)])[0], k=1)
    assert (hit.label, hit.source, index.describe().n_points) == ("L2", str(copy), 1)


def test_the_real_slide_is_indexed_with_level0_boxes_and_mpp(tmp_path: Path, index: QdrantIndex, settings: Settings) -> None:
    slide_settings = settings.with_changes(tile_size=224, batch_size=32)
    summary = index_paths([he_slide_path()], index, histogram_embed, slide_settings, preset="hist", dim=DIM,
                          label="skin", show_progress=False)
    (image,) = summary.images
    assert 40 < image.tiles < 90
    records, _ = index.image_tiles(image.image_id)
    assert {r.mpp for r in records} == {0.499} and {r.level for r in records} == {0}
    import tiffslide

    with tiffslide.TiffSlide(he_slide_path()) as slide:
        box = records[len(records) // 2].box
        region = np.asarray(slide.read_region((box.x, box.y), 0, (box.w, box.h)).convert("RGB"))
    np.testing.assert_array_equal(index.load_tile(records[len(records) // 2].point_id)[: box.h, : box.w], region)


def test_a_missing_slide_level_is_a_skip_reason(index: QdrantIndex, settings: Settings) -> None:
    summary = index_paths([he_slide_path()], index, histogram_embed, settings.with_changes(slide_level=3),
                          preset="hist", dim=DIM, show_progress=False)
    (skip,) = summary.skipped
    assert "has 1 level(s)" in skip.reason and summary.images == ()


def test_index_images_from_bytes(index: QdrantIndex, settings: Settings, tmp_path: Path) -> None:
    path = write_png(tmp_path / "a.png", tissue_image(64, 64, 0))
    data = path.read_bytes()
    summary = index_images([(data, "upload-1", "tumour", None), (b"junk", "upload-2", None, None)], index,
                           histogram_embed, settings, preset="hist", dim=DIM)
    assert [i.image_id for i in summary.images] == [bytes_id(data)]
    assert [(s.source, s.kind, s.position) for s in summary.skipped] == [("upload-2", "unreadable", 1)]
    # the same bytes from a file path resolve to the same image
    again = index_paths([path], index, FailingEmbed(0), settings, preset="hist", dim=DIM, label="tumour", show_progress=False)
    assert [i.status for i in again.images] == ["relabelled"]


def test_index_images_with_caller_ids_and_skip_kinds(index: QdrantIndex, settings: Settings, tmp_path: Path) -> None:
    data = write_png(tmp_path / "a.png", tissue_image(64, 64, 0)).read_bytes()
    blank = write_png(tmp_path / "blank.png", np.full((600, 600, 3), 255, np.uint8)).read_bytes()
    big = write_png(tmp_path / "big.png", tissue_image(100, 100, 1)).read_bytes()
    summary = index_images(
        [(data, "a", None, "case-17/a"), (blank, "blank", None, None), (big, "big", None, None)],
        index, histogram_embed, settings.with_changes(max_pixels=5000), preset="hist", dim=DIM,
    )
    assert [i.image_id for i in summary.images] == ["case-17/a"]
    assert [(s.kind, s.position) for s in summary.skipped] == [("too_large", 1), ("too_large", 2)]
    summary = index_images([(blank, "blank", None, None)], index, histogram_embed, settings.with_changes(tile_size=128),
                           preset="hist", dim=DIM)
    assert [(s.kind, s.position) for s in summary.skipped] == [("no_tissue", 0)]
    assert index.image_tiles("case-17/a")[0][0].source == "a"


def test_caller_ids_over_the_limit_or_repeated_are_refused_before_decoding(
    index: QdrantIndex, settings: Settings, tmp_path: Path
) -> None:
    data = write_png(tmp_path / "a.png", tissue_image(64, 64, 0)).read_bytes()
    other = write_png(tmp_path / "b.png", tissue_image(64, 64, 1)).read_bytes()
    long_id = "x" * (MAX_IMAGE_ID_CHARS + 1)
    summary = index_images(
        [(b"junk", "bad", None, None), (data, "a", None, "case-1"), (other, "b", None, "case-1"),
         (data, "c", None, long_id), (b"junk", "d", None, "case-2")],
        index, histogram_embed, settings, preset="hist", dim=DIM,
    )
    assert [i.image_id for i in summary.images] == ["case-1"]
    assert [(s.kind, s.position) for s in summary.skipped] == [
        ("unreadable", 0), ("duplicate", 2), ("invalid_metadata", 3), ("unreadable", 4),
    ]
    assert str(MAX_IMAGE_ID_CHARS) in summary.skipped[2].reason and long_id not in summary.skipped[2].reason


def test_a_run_with_every_image_refused_leaves_the_index_alone(
    client: QdrantClient, settings: Settings, tmp_path: Path
) -> None:
    untouched = QdrantIndex(client, "untouched", TileStore(settings.tiles_dir("untouched")))
    data = write_png(tmp_path / "a.png", tissue_image(64, 64, 0)).read_bytes()
    summary = index_images([(data, "a", None, "x" * (MAX_IMAGE_ID_CHARS + 1))], untouched, FailingEmbed(0), settings,
                           preset="hist", dim=DIM)
    assert summary.images == () and [s.kind for s in summary.skipped] == ["invalid_metadata"]
    assert not client.collection_exists("untouched")


@pytest.mark.slow
def test_real_encoder_end_to_end_retrieves_the_same_stain(tmp_path: Path, index: QdrantIndex, settings: Settings) -> None:
    torch = pytest.importorskip("torch")
    from histoxplain_model.encoders import load_encoder
    from histoxplain_service.app.samples import write_sample_dataset

    torch.set_num_threads(1)
    encoder = load_encoder("efficientnet-lite0-imagenet")
    dataset = write_sample_dataset(tmp_path / "samples", per_class=4)
    held_out = {label: files.pop() for label, files in dataset.files.items()}
    for label, path in held_out.items():
        path.rename(tmp_path / f"query_{label}.png")
    real = settings.with_changes(tile_size=224)
    summary = index_paths([dataset.root], index, encoder.embed_images, real, preset=encoder.preset.name,
                          dim=encoder.preset.embedding_dim, show_progress=False)
    assert summary.images_indexed == 6 and not summary.skipped
    for label in held_out:
        query = np.asarray(Image.open(tmp_path / f"query_{label}.png").convert("RGB"))
        hits = index.search(encoder.embed_images([query])[0], k=3)
        assert [h.label for h in hits] == [label] * 3


def test_an_image_that_fails_mid_way_leaves_no_partial_tiles(
    tmp_path: Path, index: QdrantIndex, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histoxplain_model.errors import ImageDecodeError

    root = make_dataset(tmp_path / "ds")
    real_read = ArraySource.read
    calls = {"n": 0}

    def flaky_read(self: ArraySource, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self.source.endswith("a.png"):
            calls["n"] += 1
            if calls["n"] == 6:  # after one full batch of a.png's 9 tiles was written
                raise ImageDecodeError("unreadable region")
        return real_read(self, x, y, w, h)

    monkeypatch.setattr(ArraySource, "read", flaky_read)
    summary = index_paths([root], index, histogram_embed, settings, preset="hist", dim=DIM, show_progress=False)
    assert [Path(s.source).name for s in summary.skipped] == ["a.png"]
    assert summary.images_indexed == 3
    info = index.describe()
    assert (info.n_points, info.n_images) == (7, 3)
    assert len(list(settings.tiles_dir("test").iterdir())) == 7
