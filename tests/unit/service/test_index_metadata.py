"""Image metadata (organ, stain, ...): checked, stored with every tile, indexed, filtered on, and
returned on hits through the engines, the gateway's converters and the SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from histoxplain_client import IndexImage
from histoxplain_client import _convert as sdk
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.limits import MAX_METADATA_ENTRIES
from histoxplain_service.bootstrap import open_index_engine
from histoxplain_service.config import Settings
from histoxplain_service.domain.checks import EncodedImage, check_image_metadata
from histoxplain_service.domain.types import Box, SearchHit, TileFilter, TileRecord, check_metadata, payload_key
from histoxplain_service.gateway import converters
from histoxplain_service.index.base import VectorIndex

DIM = 8


@pytest.fixture(params=["edge", "local"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VectorIndex]:
    engine = open_index_engine(Settings(data_dir=tmp_path, index_engine=request.param))
    try:
        opened = engine.open_index("cases")
        opened.ensure("pixels", DIM)
        opened.tile_store = None  # pixels are not what this is about
        yield opened
    finally:
        engine.close()


def records(image: str, metadata: dict[str, str], n: int = 3) -> list[TileRecord]:
    checked = check_metadata(metadata)
    return [TileRecord(image, f"/slides/{image}", "tumour", Box(i * 8, 0, 8, 8), 0, None, i, n, metadata=checked)
            for i in range(n)]


def vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_metadata_is_stored_filtered_on_and_returned(index: VectorIndex) -> None:
    colon = records("a", {"organ": "colon", "stain": "HE"})
    skin = records("b", {"organ": "skin", "stain": "HE"})
    plain = records("c", {})
    for seed, batch in enumerate((colon, skin, plain)):
        index.upsert(batch, vectors(3, seed))
    query = vectors(1, 9)[0]
    hits = index.search(query, 9, tile_filter=TileFilter.where(organ="colon"))
    assert {h.image_id for h in hits} == {"a"} and len(hits) == 3
    assert dict(hits[0].metadata) == {"organ": "colon", "stain": "HE"}
    assert {h.image_id for h in index.search(query, 9, tile_filter=TileFilter.where(stain="HE"))} == {"a", "b"}
    assert {h.image_id for h in index.search(query, 9, tile_filter=TileFilter((), TileFilter.where(organ="colon").must))} == {"b", "c"}
    assert [h.metadata for h in index.search(query, 9, tile_filter=TileFilter.where(image_id="c"))] == [(), (), ()]
    grouped = index.best_tile_per_image(vectors(1, 9), 5, tile_filter=TileFilter.where(organ=["skin", "colon"]))
    assert set(grouped[0]) == {"a", "b"}
    assert index.points([colon[0].point_id])[0][0].metadata == (("organ", "colon"), ("stain", "HE"))


def test_changed_metadata_is_updated_without_re_embedding(index: VectorIndex) -> None:
    tiles = records("a", {"organ": "colon"})
    index.upsert(tiles, vectors(3, 0))
    assert index.image_state(tiles) == "complete"
    moved = records("a", {"organ": "rectum", "block": "A2"})
    assert index.image_state(moved) == "metadata"
    index.set_image_metadata("a", "tumour", "/slides/a", moved[0].metadata)
    assert index.image_state(moved) == "complete"
    hits = index.search(vectors(1, 5)[0], 3, tile_filter=TileFilter.where(block="A2"))
    assert len(hits) == 3 and dict(hits[0].metadata) == {"block": "A2", "organ": "rectum"}
    index.set_image_metadata("a", "tumour", "/slides/a", ())
    assert index.image_state(records("a", {})) == "complete"


def test_every_metadata_field_gets_a_keyword_index(tmp_path: Path) -> None:
    engine = open_index_engine(Settings(data_dir=tmp_path))  # edge: its payload schema is readable
    try:
        index = engine.open_index("cases")
        index.ensure("pixels", DIM)
        index.tile_store = None
        index.upsert(records("a", {"organ": "colon", "stain": "HE"}), vectors(3, 0))
        schema = engine.shard("cases").info().payload_schema
        assert {"metadata.organ", "metadata.stain", "image_id", "label"} <= set(schema)
        assert str(schema["metadata.organ"].data_type).endswith("Keyword")
    finally:
        engine.close()


def test_filter_keys_map_to_the_payload() -> None:
    assert payload_key("organ") == "metadata.organ"
    assert payload_key("label") == "label" and payload_key("box.w") == "box.w" and payload_key("image_id") == "image_id"


@pytest.mark.parametrize(
    ("metadata", "needle"),
    [
        ({f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)}, "the limit is 16"),
        ({"organ name": "colon"}, "letters, digits and '_'"),
        ({"9organ": "colon"}, "letters, digits and '_'"),
        ({"label": "colon"}, "not one of"),
        ({"metadata": "colon"}, "not one of"),
        ({"k" * 65: "colon"}, "the limit is 64"),
        ({"organ": "c" * 257}, "the limit is 256"),
    ],
)
def test_metadata_out_of_bounds_is_refused_without_echoing_values(metadata: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle) as refused:
        check_image_metadata(EncodedImage(b"", "s", metadata=metadata), "image 3")
    assert "image 3" in str(refused.value)
    assert not any(len(value) > 1 and value in str(refused.value) for value in metadata.values())


def test_metadata_travels_through_the_gateway_and_the_sdk() -> None:
    message = sdk.image_record(IndexImage(image=np.zeros((4, 4, 3), np.uint8), metadata={"organ": "colon"}))
    encoded = converters.encoded_image(0, message)
    assert encoded.metadata == {"organ": "colon"}
    assert converters.encoded_image(0, types_pb2.ImageRecord(content=b"x")).metadata is None
    record = records("a", {"organ": "colon", "stain": "HE"})[0]
    proto = converters.search_hit_to_proto(SearchHit.from_record(record, 0.5))
    assert dict(proto.metadata) == {"organ": "colon", "stain": "HE"}
    hit = sdk.decode_hit(proto)
    assert hit.metadata == {"organ": "colon", "stain": "HE"}
    assert sdk.decode_hit(types_pb2.SearchHit()).metadata == {}
