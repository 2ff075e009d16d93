"""``histoxplain migrate``: local-mode indexes built by this version's ingest move to qdrant-edge
with every point, payload and id, the tiles still found, and nothing lost when a step fails."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoxplain_model.results import ModelInfo
from histoxplain_service.app.cli import main
from histoxplain_service.bootstrap import open_index_engine
from histoxplain_service.config import Settings
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.index import migrate
from histoxplain_service.index.edge import EdgeEngine, EdgeIndex
from histoxplain_service.index.qdrant import QdrantIndex

DIM = 8


class PixelBackend:
    """Embeds a tile as a few of its pixel values, centred and normalised (deterministic, no model,
    and far enough apart that no two tiles tie)."""

    def info(self) -> ModelInfo:
        return ModelInfo("pixels", "pixels", DIM, (64, 64), ("gradcam",), "test")

    def embed(self, images: Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        features = np.stack([image.reshape(-1)[: DIM * 97 : 97].astype(np.float32) - 150.0 for image in images])
        return features / np.linalg.norm(features, axis=1, keepdims=True)

    def close(self) -> None:
        pass


def tissue(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pink = np.array([200, 110, 170]) + rng.integers(-40, 40, (height, width, 3))
    return np.clip(pink, 0, 255).astype(np.uint8)


def settings_for(data: Path, engine: str) -> Settings:
    return Settings(data_dir=data, index_engine=engine, tile_size=64, min_tissue=0.0)  # type: ignore[arg-type]


@pytest.fixture
def old_folder(tmp_path: Path) -> Path:
    """A data folder whose indexes were built by today's ingest on qdrant-client local mode."""
    images = tmp_path / "images"
    for i, label in enumerate(["tumour", "tumour", "normal", "stroma", "normal"]):
        path = images / label / f"slide{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tissue(64 * (2 + i % 3), 64 * 2, i)).save(path)
    data = tmp_path / "data"
    retrieval = Retrieval(settings_for(data, "local"), PixelBackend(), open_index_engine(settings_for(data, "local")))
    try:
        retrieval.index_paths("cases", [images], show_progress=False)
        retrieval.index_paths("other", [images / "normal"], show_progress=False)
    finally:
        retrieval.index_engine.close()
    return data


def snapshot(data: Path, engine: str) -> dict[str, object]:
    """What a user sees of the indexes: descriptions, searches, tiles, vectors."""
    index_engine = open_index_engine(settings_for(data, engine))
    try:
        query = PixelBackend().embed([tissue(64, 64, 99)])[0]
        seen: dict[str, object] = {"infos": index_engine.list_indexes()}
        for name in ("cases", "other"):
            index = index_engine.open_index(name)
            hits = index.search(query, 100)
            seen[name] = [(h.point_id, h.image_id, h.label, h.source, h.box) for h in hits]
            seen[f"{name}-scores"] = np.array([h.score for h in hits])
            seen[f"{name}-tiles"] = [index.load_tile(h).tobytes() for h in hits[:3]]
            image = hits[0].image_id
            records, vectors = index.image_tiles(image)
            seen[f"{name}-records"], seen[f"{name}-vectors"] = records, vectors
        return seen
    finally:
        index_engine.close()


def assert_same_view(got: dict[str, object], want: dict[str, object]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, np.ndarray):  # scores and vectors: float32 copies, equal to rounding
            np.testing.assert_allclose(got[key], value, atol=1e-6, rtol=0)  # type: ignore[arg-type]
        else:
            assert got[key] == value, key


def test_migrate_moves_every_index_and_its_tiles_and_removes_the_source(old_folder: Path, capsys) -> None:
    before = snapshot(old_folder, "local")
    assert main(["migrate", "--data-dir", str(old_folder)]) == 0
    printed = capsys.readouterr().out
    assert "index cases: 28 tiles of 5 image(s)" in printed and "local-mode copy removed" in printed
    assert_same_view(snapshot(old_folder, "edge"), before)  # ids, payloads, order, scores, pixels, vectors
    assert not (old_folder / "qdrant" / "collection" / "cases").exists()
    assert not list((old_folder / "edge").glob(".migrating-*"))


def test_keep_source_then_a_second_run_verifies_again_and_finishes(old_folder: Path, capsys) -> None:
    assert main(["migrate", "--data-dir", str(old_folder), "--index", "cases", "--keep-source"]) == 0
    assert (old_folder / "qdrant" / "collection" / "cases").exists()
    assert (old_folder / "qdrant" / "collection" / "other").exists()  # not named: untouched
    assert main(["migrate", "--data-dir", str(old_folder), "--index", "cases"]) == 0
    assert "verified again; local-mode copy removed" in capsys.readouterr().out
    assert not (old_folder / "qdrant" / "collection" / "cases").exists()


def test_a_copy_that_does_not_verify_changes_nothing(old_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    before = snapshot(old_folder, "local")
    real_copy = migrate._copy

    def lossy_copy(client, name, shard) -> int:  # a copy that silently misses one point
        copied = real_copy(client, name, shard)
        first, _ = client.scroll(name, limit=1)
        from qdrant_edge import UpdateOperation

        shard.update(UpdateOperation.delete_points([str(first[0].id)]))
        return copied

    monkeypatch.setattr(migrate, "_copy", lossy_copy)
    assert main(["migrate", "--data-dir", str(old_folder)]) == 4
    assert "27 points copied but the source holds 28" in capsys.readouterr().err
    assert_same_view(snapshot(old_folder, "local"), before)  # the source is as it was
    assert not (old_folder / "edge" / "cases").exists()
    assert not list((old_folder / "edge").glob(".migrating-*"))


def test_a_leftover_of_an_interrupted_run_is_cleared(old_folder: Path) -> None:
    staging = old_folder / "edge" / ".migrating-cases" / "shard"
    staging.mkdir(parents=True)
    (staging / "junk").write_text("half-written")
    assert main(["migrate", "--data-dir", str(old_folder), "--index", "cases"]) == 0
    assert not (old_folder / "edge" / ".migrating-cases").exists()
    engine = EdgeEngine(settings_for(old_folder, "edge"))
    try:
        assert engine.open_index("cases").describe().n_points == 28
    finally:
        engine.close()


def test_an_edge_index_that_changed_since_is_not_overwritten_nor_its_source_deleted(old_folder: Path, capsys) -> None:
    assert main(["migrate", "--data-dir", str(old_folder), "--index", "other", "--keep-source"]) == 0
    engine = EdgeEngine(settings_for(old_folder, "edge"))
    try:
        index: EdgeIndex = engine.open_index("other")
        index.delete([index.image_ids()[0]])
        remaining = index.describe().n_points
    finally:
        engine.close()
    assert main(["migrate", "--data-dir", str(old_folder), "--index", "other"]) == 4
    assert "exists in both stores and they differ" in capsys.readouterr().err
    assert (old_folder / "qdrant" / "collection" / "other").exists()
    engine = EdgeEngine(settings_for(old_folder, "edge"))
    try:
        assert engine.open_index("other").describe().n_points == remaining
    finally:
        engine.close()


def test_unknown_names_and_folders_without_a_local_store_are_reported(tmp_path: Path, old_folder: Path, capsys) -> None:
    assert main(["migrate", "--data-dir", str(old_folder), "--index", "nope"]) == 3
    assert "'nope' not in the local-mode store" in capsys.readouterr().err
    assert main(["migrate", "--data-dir", str(tmp_path / "empty")]) == 3
    assert "no local-mode store" in capsys.readouterr().err


def test_the_source_collection_is_read_by_qdrant_client_local_mode(old_folder: Path) -> None:
    """The fixture really is a local-mode store (qdrant-client's own layout and API)."""
    engine = open_index_engine(settings_for(old_folder, "local"))
    try:
        index = engine.open_index("cases")
        assert isinstance(index, QdrantIndex) and index.describe().n_points == 28
    finally:
        engine.close()
