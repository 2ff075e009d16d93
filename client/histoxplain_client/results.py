"""Typed results of the SDK: frozen dataclasses decoded from the API's messages.

Method, polarity, side and ranking names are the library's strings (``"gradcam"``,
``"similar"``, ``"both"``, ``"tile"``), not protobuf enum numbers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "Box",
    "DeleteResult",
    "DicomReference",
    "ExplainedReference",
    "Explanation",
    "Faithfulness",
    "Heatmap",
    "MapFaithfulness",
    "RegionCorrespondence",
    "Hit",
    "IndexInfo",
    "IndexSummary",
    "ModelInfo",
    "SkippedImage",
]


@dataclass(frozen=True)
class Box:
    """A tile's rectangle in pixels of its source image (at the hit's pyramid level)."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class DicomReference:
    """Where a tile of a DICOM slide lives in the gateway's PACS (its hit's box is then in
    level-0 pixels): Study, Series and SOP Instance UIDs of the level read, and the slide's
    Frame of Reference UID (empty when it declares none)."""

    study_uid: str
    series_uid: str
    instance_uid: str
    frame_of_reference_uid: str


@dataclass(frozen=True)
class Hit:
    """One retrieved tile (or, ranking images, one image and its best tile); ``dicom`` for a
    tile of a DICOM slide indexed from a PACS; ``metadata``: the image's descriptive fields as
    indexed (``IndexImage.metadata``)."""

    score: float
    image_id: str
    point_id: str
    label: str
    source: str
    box: Box
    level: int
    mpp: float | None
    matched_tiles: int = 0
    dicom: DicomReference | None = None
    metadata: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, eq=False)
class Heatmap:
    """A heatmap over one image.

    ``values``: (H, W) float32 in [0, 1] at the model input resolution (widened from the wire's
    float16 when that was requested). ``overlay_png``: the map drawn over the image, PNG bytes.
    """

    values: np.ndarray
    overlay_png: bytes

    @property
    def overlay(self) -> Image.Image:
        """The overlay as a PIL image (RGB or RGBA), decoded on each access."""
        image = Image.open(io.BytesIO(self.overlay_png))
        image.load()
        return image


@dataclass(frozen=True)
class RegionCorrespondence:
    """A query region matched to a region of the reference (``correspondences=`` on explain /
    search_and_explain): the query cell and the reference cell of the encoder's target-layer grid,
    each as a :class:`Box` in pixels of that image as sent or stored; ``share``: this pair's exact
    share of the cosine similarity (all pairs of cells sum to it); ``rank``: 1 for the best."""

    query_box: Box
    reference_box: Box
    share: float
    rank: int


@dataclass(frozen=True)
class MapFaithfulness:
    """One map's deletion and insertion AUC on this pair, and a smooth random map's on the same
    image (the chance level). Deletion: lower is more faithful; insertion: higher."""

    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float

    @property
    def deletion_difference(self) -> float:
        """Below 0: the map beat chance on deletion for this pair."""
        return self.deletion_auc - self.random_deletion_auc

    @property
    def insertion_difference(self) -> float:
        """Above 0: the map beat chance on insertion for this pair."""
        return self.insertion_auc - self.random_insertion_auc

    @property
    def beats_random(self) -> bool:
        """Better than the random map on both curves."""
        return self.deletion_difference < 0 < self.insertion_difference


@dataclass(frozen=True)
class Faithfulness:
    """``verify=True``: how faithful each map of one pair is (``steps`` deletion/insertion steps,
    blur baseline); ``query`` / ``reference``: None for a side that was not explained."""

    steps: int
    query: MapFaithfulness | None
    reference: MapFaithfulness | None


@dataclass(frozen=True, eq=False)
class ExplainedReference:
    """The explanation of the query against one reference.

    ``reference_index``: the hit's rank (search_and_explain) or the reference's position in the
    request (explain). ``hit``: the indexed tile, None for references sent as images.
    ``query_heatmap`` / ``reference_heatmap``: None when the requested side excluded them.
    ``correspondences``: matched region pairs, best first (empty unless asked).
    ``faithfulness``: each map's deletion/insertion against a random map (None unless ``verify``).
    """

    reference_index: int
    hit: Hit | None
    similarity: float
    query_heatmap: Heatmap | None
    reference_heatmap: Heatmap | None
    correspondences: tuple[RegionCorrespondence, ...] = ()
    faithfulness: Faithfulness | None = None


@dataclass(frozen=True, eq=False)
class Explanation:
    """Result of explain / search_and_explain: the options the server used and one entry per
    reference, most similar first."""

    method: str
    polarity: str
    side: str
    references: tuple[ExplainedReference, ...]

    @property
    def hits(self) -> tuple[Hit, ...]:
        """The indexed hits among the references, in order."""
        return tuple(ref.hit for ref in self.references if ref.hit is not None)

    @property
    def scores(self) -> np.ndarray:
        """(K,) float32 cosine similarity of the query to each reference."""
        return np.array([ref.similarity for ref in self.references], dtype=np.float32)

    @property
    def query_heatmaps(self) -> np.ndarray | None:
        """(K, H, W) float32 stack of the query's heatmaps, None when the side excluded them."""
        maps = [ref.query_heatmap for ref in self.references]
        if not maps or any(heatmap is None for heatmap in maps):
            return None
        return np.stack([heatmap.values for heatmap in maps])

    @property
    def reference_heatmaps(self) -> np.ndarray | None:
        """(K, H, W) float32 stack of each reference's heatmap, None when excluded."""
        maps = [ref.reference_heatmap for ref in self.references]
        if not maps or any(heatmap is None for heatmap in maps):
            return None
        return np.stack([heatmap.values for heatmap in maps])


@dataclass(frozen=True)
class SkippedImage:
    """An image index_images did not index: its stream position, id, reason name and detail."""

    position: int
    image_id: str
    reason: str
    message: str


@dataclass(frozen=True)
class IndexSummary:
    """What index_images did."""

    index: str
    images_received: int
    images_indexed: int
    tiles_indexed: int
    background_tiles_skipped: int
    skipped: tuple[SkippedImage, ...]


@dataclass(frozen=True)
class DeleteResult:
    """What delete did; ``missing_image_ids`` were not in the index (not an error)."""

    images_deleted: int
    tiles_deleted: int
    missing_image_ids: tuple[str, ...]


@dataclass(frozen=True)
class IndexInfo:
    """An index on the server."""

    name: str
    encoder_preset: str
    embedding_dim: int
    tile_count: int
    image_count: int


@dataclass(frozen=True)
class ModelInfo:
    """The model the server runs; heatmap arrays are ``input_size`` (height, width)."""

    preset: str
    architecture: str
    embedding_dim: int
    input_size: tuple[int, int]
    methods: tuple[str, ...]
    backend: str
    server_version: str
