"""Protobuf <-> domain conversions for the gateway (the only module besides the servicer and
the server that knows ``histoxplain.v1`` messages).

Requests become plain values (names, numbers, numpy arrays); domain results (frozen
dataclasses from :mod:`histoxplain_service.domain.retrieval` and :mod:`histoxplain_service.index.qdrant`)
become response messages. Heatmaps travel twice: as a compact ``RawArray`` (float16 unless the
caller asks for float32) and as an overlay PNG drawn over the image at the image's own size,
rendered within the message limit (:func:`_render_within`). About 340 lines: every message
type of the API passes through here, and splitting requests from responses would split pairs
that change together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as service_pb2
from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_client import enums
from histoxplain_client.arrays import encode_array
from histoxplain_model.errors import InvalidRequest, UnknownNameError
from histoxplain_model.limits import DETAIL, MAX_IMAGE_ID_CHARS, MAX_TILE_SIZE, MIN_TILE_SIZE
from histoxplain_model.vocabulary import DEFAULT_POLARITY, DEFAULT_SIDE, DEFAULT_TARGET, GRADCAM, RISE, SMOOTHGRAD
from histoxplain_model.limits import MAX_CORRESPONDENCES
from histoxplain_model.results import Faithfulness, RegionCorrespondence
from histoxplain_model.limits import MAX_N_SAMPLES
from histoxplain_model.options import RiseOptions, SmoothGradOptions
from histoxplain_client.options import RISE_FILLS
from histoxplain_model.limits import FILTER_KEY, FILTER_VALUE, shorten
from histoxplain_service.domain.types import (
    INTEGER_FILTER_KEYS, MAX_FILTER_CONDITIONS, MAX_FILTER_VALUES, DeleteSummary, ExplainedSearch, FieldMatch, ImageHit, IndexInfo,
    SearchHit, TileFilter,
)
from histoxplain_service.domain.checks import EncodedImage
from histoxplain_service.domain.ingest import IndexSummary
from histoxplain_service.config import Settings
from histoxplain_service.gateway.admission import explain_cost, verify_cost

_OVERLAY_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="overlay")

__all__ = [
    "ExplainChoice",
    "explain_choice_from_proto",
    "explain_choice_to_proto",
    "heatmap_to_proto",
    "index_info_to_proto",
    "model_info_to_proto",
    "search_hit_to_proto",
    "METHOD_NAMES",
]

# Wire enum value -> library name, from the SDK's tables (histoxplain_client.enums).
METHOD_NAMES: dict[int, str] = {value: name for name, value in enums.METHODS.items()}
POLARITY_NAMES: dict[int, str] = {value: name for name, value in enums.POLARITIES.items()}
SIDE_NAMES: dict[int, str] = {value: name for name, value in enums.SIDES.items()}
TARGET_NAMES: dict[int, str] = {value: name for name, value in enums.TARGETS.items()}
RISE_FILL_NAMES: dict[int, str] = {value: name for name, value in RISE_FILLS.items()}
HEATMAP_DTYPES = (types_pb2.ARRAY_DTYPE_FLOAT16, types_pb2.ARRAY_DTYPE_FLOAT32)


@dataclass(frozen=True)
class ExplainChoice:
    """``ExplainOptions`` with defaults filled in and values checked.

    Attributes:
        method: library method name (``gradcam``, ``gradcampp``, ``smoothgrad``, ``simmap``, ``rise``).
        polarity: ``similar`` or ``dissimilar``.
        side: ``query``, ``retrieved`` or ``both``.
        heatmap_dtype: ``ARRAY_DTYPE_FLOAT16`` or ``ARRAY_DTYPE_FLOAT32``.
        smoothgrad_samples: noisy samples for SmoothGrad; ``None`` = the library default.
        smoothgrad_noise: noise std as a fraction of the input range; ``None`` = the default.
        rise: RISE's masks as the caller set them (checked); ``None`` = the library defaults.
        target: ``cosine`` or ``projection`` (what the maps explain).
        correspondences: region pairs per reference, 0 (none) to ``MAX_CORRESPONDENCES``.
        verify: also measure each map's deletion/insertion against a random map.
    """

    method: str = GRADCAM
    polarity: str = DEFAULT_POLARITY
    side: str = DEFAULT_SIDE
    heatmap_dtype: int = types_pb2.ARRAY_DTYPE_FLOAT16
    smoothgrad_samples: int | None = None
    smoothgrad_noise: float | None = None
    rise: RiseOptions | None = None
    target: str = DEFAULT_TARGET
    correspondences: int = 0
    verify: bool = False

    @property
    def method_options(self) -> SmoothGradOptions | RiseOptions | None:
        """The library's options for this request's method; ``None``: the method's defaults.

        RISE's come from ``ExplainOptions.rise``; SmoothGrad's fields are range-checked for
        every method (:func:`explain_choice_from_proto`), but options belong to their method,
        so another method gets none (the library refuses another method's options).
        """
        if self.method == RISE:
            return self.rise
        if self.method != SMOOTHGRAD or (self.smoothgrad_samples is None and self.smoothgrad_noise is None):
            return None
        defaults = SmoothGradOptions()
        return SmoothGradOptions(
            n_samples=defaults.n_samples if self.smoothgrad_samples is None else self.smoothgrad_samples,
            sigma=defaults.sigma if self.smoothgrad_noise is None else self.smoothgrad_noise,
        )

    def cost(self, references: int) -> int:
        """Admission units of explaining against ``references`` (``gateway/admission.py``);
        correspondences add at most one forward pass of each image (``histoxplain_model.matching``)."""
        pairs = references + 1 if self.correspondences else 0
        if self.verify:
            pairs += verify_cost(references, self.side)
        if self.method == RISE:
            return pairs + explain_cost(self.method, references, self.side, (self.rise or RiseOptions()).n_masks)
        samples = (self.method_options or SmoothGradOptions()).n_samples
        return pairs + explain_cost(self.method, references, self.side, samples)


def _enum_name(enum_type: Any, value: int) -> str:
    try:
        return enum_type.Name(value)
    except ValueError:
        return str(value)


def explain_choice_from_proto(options: types_pb2.ExplainOptions) -> ExplainChoice:
    """Checked options; an unknown enum value (a newer client) raises ``UnknownNameError``."""
    method = _lookup("explanation method", options.method, METHOD_NAMES, types_pb2.ExplanationMethod, GRADCAM)
    polarity = _lookup("polarity", options.polarity, POLARITY_NAMES, types_pb2.Polarity, DEFAULT_POLARITY)
    side = _lookup("explanation side", options.side, SIDE_NAMES, types_pb2.ExplanationSide, DEFAULT_SIDE)
    dtype = options.heatmap_dtype or types_pb2.ARRAY_DTYPE_FLOAT16
    if dtype not in HEATMAP_DTYPES:
        raise UnknownNameError.for_name(
            "heatmap dtype",
            _enum_name(types_pb2.ArrayDtype, dtype),
            [types_pb2.ArrayDtype.Name(value) for value in HEATMAP_DTYPES],
        )
    samples = options.smoothgrad_samples or None
    if samples is not None and not 1 <= samples <= MAX_N_SAMPLES:
        raise InvalidRequest(
            f"smoothgrad_samples={samples} is out of range; use 1 to {MAX_N_SAMPLES} "
            "(0 for the server's default)"
        )
    noise = options.smoothgrad_noise if options.HasField("smoothgrad_noise") else None
    # The same bounds as SmoothGradOptions (n_samples, sigma), named as the caller sent them.
    if noise is not None and not (np.isfinite(noise) and 0.0 < noise <= 1.0):
        raise InvalidRequest(f"smoothgrad_noise={noise} is out of range; use a number in (0, 1]")
    rise = _rise_options_from_proto(options.rise) if options.HasField("rise") else None
    target = _lookup("explanation target", options.target, TARGET_NAMES, types_pb2.ExplanationTarget, DEFAULT_TARGET)
    if options.correspondences > MAX_CORRESPONDENCES:
        raise InvalidRequest(
            f"correspondences={options.correspondences} is out of range; use 1 to {MAX_CORRESPONDENCES} (0 for none)"
        )
    return ExplainChoice(
        method, polarity, side, dtype, samples, noise, rise, target=target, correspondences=options.correspondences,
        verify=options.verify,
    )


def _rise_options_from_proto(message: types_pb2.RiseOptions) -> RiseOptions:
    """``RiseOptions`` with the unset fields at the library defaults; out of range:
    ``InvalidRequest`` naming the field (the library's own check), an unknown fill
    ``UnknownNameError``."""
    defaults = RiseOptions()
    fill = _lookup("RISE fill", message.fill, RISE_FILL_NAMES, types_pb2.RiseOptions.Fill, defaults.fill)
    return RiseOptions(
        n_masks=message.masks or defaults.n_masks,
        grid=message.grid or defaults.grid,
        keep_probability=message.keep_probability if message.HasField("keep_probability") else defaults.keep_probability,
        fill=fill,  # type: ignore[arg-type]
        seed=message.seed if message.HasField("seed") else defaults.seed,
    )


def _lookup(kind: str, value: int, names: dict[int, str], enum_type: Any, default: str) -> str:
    if value == 0:
        return default
    if value not in names:
        raise UnknownNameError.for_name(
            kind, _enum_name(enum_type, value), [enum_type.Name(known) for known in names]
        )
    return names[value]


def explain_choice_to_proto(choice: ExplainChoice) -> types_pb2.ExplainOptions:
    """The options actually used, echoed in responses with defaults filled in.

    SmoothGrad's samples and noise are echoed for SmoothGrad only (the values it ran with,
    the defaults included), RISE's masks for RISE only; other methods do not use them, so they
    stay 0 / unset.
    """
    message = types_pb2.ExplainOptions(
        target=enums.TARGETS[choice.target],
        correspondences=choice.correspondences,
        verify=choice.verify,
        method=enums.METHODS[choice.method],
        polarity=enums.POLARITIES[choice.polarity],
        side=enums.SIDES[choice.side],
        heatmap_dtype=choice.heatmap_dtype,
    )
    if choice.method == SMOOTHGRAD:
        used = choice.method_options or SmoothGradOptions()
        message.smoothgrad_samples = used.n_samples
        message.smoothgrad_noise = used.sigma
    if choice.method == RISE:
        masks = choice.rise or RiseOptions()
        message.rise.CopyFrom(types_pb2.RiseOptions(
            masks=masks.n_masks, grid=masks.grid, keep_probability=masks.keep_probability,
            fill=RISE_FILLS[masks.fill], seed=masks.seed,
        ))
    return message


def heatmap_to_proto(values: np.ndarray, image: np.ndarray, dtype: int) -> types_pb2.Heatmap:
    """One heatmap: ``values`` (H, W) float32 in [0, 1] at the model input resolution, drawn
    over ``image`` (h, w, 3) uint8 at the image's own size."""
    from histoxplain_model.overlay import overlay_png

    return types_pb2.Heatmap(
        values=encode_array(np.clip(values, 0.0, 1.0), dtype), overlay_png=overlay_png(image, values)
    )


def tile_filter_from_proto(message: types_pb2.TileFilter) -> TileFilter | None:
    """The request's filter, or ``None`` when it has no condition.

    Raises:
        InvalidRequest: a limit of ``types.proto`` broken (naming the field, its position and the
            limit, never a value), a key given twice, or a non-integer value for an integer key.
    """
    conditions = message.conditions
    if not conditions:
        return None
    if len(conditions) > MAX_FILTER_CONDITIONS:
        raise InvalidRequest(
            f"filter.conditions has {len(conditions):,} conditions; the limit is {MAX_FILTER_CONDITIONS}"
        )
    matches: list[FieldMatch] = []
    seen: set[str] = set()
    for i, condition in enumerate(conditions):
        where = f"filter.conditions[{i}]"
        key = FILTER_KEY.check(condition.key, where)
        if not key:
            raise InvalidRequest(f"{where}.key is empty; name a payload key, e.g. label, source, image_id")
        if key in seen:
            raise InvalidRequest(
                f"{where}.key repeats the key {shorten(key)}; give all its accepted values in one condition"
            )
        seen.add(key)
        values = condition.values
        if not values or len(values) > MAX_FILTER_VALUES:
            raise InvalidRequest(f"{where}.values has {len(values):,} values; give 1 to {MAX_FILTER_VALUES}")
        for j, value in enumerate(values):
            FILTER_VALUE.check(value, f"{where}.values[{j}]")
        accepted: tuple[str, ...] | tuple[int, ...] = tuple(values)
        if key in INTEGER_FILTER_KEYS:
            try:
                accepted = tuple(int(value) for value in values)
            except ValueError:
                raise InvalidRequest(f"{where}.values: {key!r} holds integers; write each value as one") from None
        matches.append(FieldMatch(key, accepted))
    return TileFilter(tuple(matches))


def search_hit_to_proto(hit: SearchHit | ImageHit) -> types_pb2.SearchHit:
    """A tile hit as a message; an image hit as its combined score plus its best tile."""
    if isinstance(hit, ImageHit):
        best = max(hit.tiles, key=lambda tile: tile.score)
        message = search_hit_to_proto(best)
        message.score = float(hit.score)
        message.matched_tiles = len({tile.point_id for tile in hit.tiles})
        return message
    message = types_pb2.SearchHit(
        score=float(hit.score),
        image_id=hit.image_id,
        point_id=str(hit.point_id),
        label=hit.label or "",
        source=hit.source or "",
        box=types_pb2.Box(x=hit.box.x, y=hit.box.y, width=hit.box.w, height=hit.box.h),
        level=int(hit.level),
        metadata=dict(hit.metadata),
    )
    if hit.mpp is not None:
        message.mpp = float(hit.mpp)
    if hit.dicom is not None:
        message.dicom.CopyFrom(types_pb2.DicomReference(
            study_instance_uid=hit.dicom.study_uid, series_instance_uid=hit.dicom.series_uid,
            sop_instance_uid=hit.dicom.instance_uid, frame_of_reference_uid=hit.dicom.frame_of_reference_uid or "",
        ))
    return message


def model_info_to_proto(info: Any) -> types_pb2.ModelInfo:
    """A :class:`histoxplain_service.backends.ModelInfo` as a message."""
    height, width = info.input_size
    return types_pb2.ModelInfo(
        preset=info.preset,
        architecture=info.architecture,
        embedding_dim=int(info.embedding_dim),
        input_height=int(height),
        input_width=int(width),
        methods=[enums.METHODS[name] for name in info.methods if name in enums.METHODS],
        backend=info.backend,
    )


def index_info_to_proto(info: IndexInfo) -> types_pb2.IndexInfo:
    """An index description (``VectorIndex.describe()``) as a message."""
    return types_pb2.IndexInfo(
        name=info.name,
        encoder_preset=info.preset,
        embedding_dim=int(info.dim),
        tile_count=int(info.n_points),
        image_count=int(info.n_images),
    )


def explained_references(
    explained: ExplainedSearch,
    choice: ExplainChoice,
    image_hits: Sequence[ImageHit] | None = None,
    max_bytes: int | None = None,
) -> list[types_pb2.ExplainedReference]:
    """``explained.hits`` as messages, in their order; ``reference_index`` is each hit's
    ``position`` (rank in the search / position in the request). ``image_hits``: shown instead
    of the explained tiles (image ranking: image ``i`` was explained by its best tile ``i``)."""
    shown: Sequence[SearchHit | ImageHit | None] = (
        [item.hit for item in explained.hits] if image_hits is None else image_hits
    )
    if len(shown) != len(explained.hits):
        raise ValueError(f"{len(explained.hits)} references but {len(shown)} hits to show")
    # Drawing and PNG-encoding the overlays is most of the response's cost; numpy and zlib
    # release the GIL, so two threads render them side by side.
    jobs = [
        (explained.query_image if side == "query" else item.image, heatmap)
        for item in explained.hits
        for side, heatmap in (("query", item.query_heatmap), ("hit", item.hit_heatmap))
        if heatmap is not None
    ]
    rendered = iter(_render_within(jobs, choice.heatmap_dtype, max_bytes))
    references = []
    for item, hit in zip(explained.hits, shown):
        message = types_pb2.ExplainedReference(reference_index=item.position, similarity=float(item.similarity))
        if hit is not None:
            message.hit.CopyFrom(search_hit_to_proto(hit))
        if item.query_heatmap is not None:
            message.query_heatmap.CopyFrom(next(rendered))
        if item.hit_heatmap is not None:
            message.reference_heatmap.CopyFrom(next(rendered))
        message.correspondences.extend(region_correspondence_to_proto(pair) for pair in item.correspondences)
        if item.query_faithfulness is not None or item.hit_faithfulness is not None:
            message.faithfulness.CopyFrom(faithfulness_to_proto(item.query_faithfulness, item.hit_faithfulness))
        references.append(message)
    return references


def faithfulness_to_proto(query: Faithfulness | None, reference: Faithfulness | None) -> types_pb2.Faithfulness:
    """One pair's verify result: the curves of each side that was explained."""
    message = types_pb2.Faithfulness(steps=(query or reference).steps)  # type: ignore[union-attr]
    for field, verified in (("query", query), ("reference", reference)):
        if verified is not None:
            getattr(message, field).CopyFrom(types_pb2.Faithfulness.Curves(
                deletion_auc=verified.deletion_auc, insertion_auc=verified.insertion_auc,
                random_deletion_auc=verified.random_deletion_auc, random_insertion_auc=verified.random_insertion_auc,
                deletion_difference=verified.deletion_difference, insertion_difference=verified.insertion_difference,
            ))
    return message


def region_correspondence_to_proto(pair: RegionCorrespondence) -> types_pb2.RegionCorrespondence:
    """A matched pair of cells; boxes (x, y, width, height) in each image's own pixels."""
    (qx, qy, qw, qh), (rx, ry, rw, rh) = pair.query_box, pair.reference_box
    return types_pb2.RegionCorrespondence(
        query_box=types_pb2.Box(x=qx, y=qy, width=qw, height=qh),
        reference_box=types_pb2.Box(x=rx, y=ry, width=rw, height=rh),
        share=pair.share,
        rank=pair.rank,
    )


def _render_within(
    jobs: Sequence[tuple[np.ndarray, np.ndarray]], dtype: int, max_bytes: int | None
) -> list[types_pb2.Heatmap]:
    """The heatmaps of ``(image, heatmap)`` jobs, refused once they pass ``max_bytes``.

    Query overlays are drawn at the query's own size, once per reference: a 4096 px query at
    k=100 would be about 5 GB of PNG (49 MB each, measured) for a response the message limit
    refuses anyway. Stopping at the limit bounds a call's memory by the message size plus the
    two overlays in flight; closing the map's iterator cancels the overlays not yet started.
    """
    results = _OVERLAY_THREADS.map(lambda job: heatmap_to_proto(job[1], job[0], dtype), jobs)
    heatmaps: list[types_pb2.Heatmap] = []
    total = 0
    try:
        for heatmap in results:
            total += heatmap.ByteSize()
            if max_bytes is not None and total > max_bytes:
                height, width = jobs[0][0].shape[:2]
                raise InvalidRequest(
                    f"the explanation is larger than the message limit of {max_bytes:,} bytes (overlays are "
                    f"drawn at each image's size, {width}x{height} px for the first); lower k, explain one side, "
                    "or send a smaller query image"
                )
            heatmaps.append(heatmap)
    finally:
        results.close()  # type: ignore[attr-defined]  # Executor.map returns a generator
    return heatmaps


def tiling_settings(core: Settings, tiling: types_pb2.TilingOptions) -> Settings:
    """The core settings with a request's tiling options applied (0 / unset: the server's)."""
    changes: dict[str, Any] = {}
    if tiling.tile_size:
        if not MIN_TILE_SIZE <= tiling.tile_size <= MAX_TILE_SIZE:
            raise InvalidRequest(
                f"tiling.tile_size must be from {MIN_TILE_SIZE} to {MAX_TILE_SIZE} pixels (0: the server's)"
            )
        changes["tile_size"] = tiling.tile_size
    if tiling.stride:
        tile_size = changes.get("tile_size", core.tile_size)
        # Overlap is bounded so one image's tile count is at most 16x that of abutting tiles.
        if not max(1, tile_size // 4) <= tiling.stride <= MAX_TILE_SIZE:
            raise InvalidRequest(
                f"tiling.stride must be from a quarter of the tile size ({max(1, tile_size // 4)} px) "
                f"to {MAX_TILE_SIZE} pixels (0: the tile size)"
            )
        changes["stride"] = tiling.stride
    if tiling.HasField("min_tissue_fraction"):
        fraction = float(tiling.min_tissue_fraction)
        if not (np.isfinite(fraction) and 0.0 <= fraction <= 1.0):  # NaN fails every comparison
            raise InvalidRequest(f"min_tissue_fraction={fraction} is out of range; use a number from 0 to 1")
        changes["min_tissue"] = fraction
    return core.with_changes(**changes) if changes else core


_SKIP_REASONS = {
    "unreadable": types_pb2.SKIP_REASON_UNREADABLE_IMAGE,
    "too_large": types_pb2.SKIP_REASON_IMAGE_TOO_LARGE,
    "no_tissue": types_pb2.SKIP_REASON_NO_TISSUE,
    "duplicate": types_pb2.SKIP_REASON_DUPLICATE_IMAGE_ID,
    "invalid_metadata": types_pb2.SKIP_REASON_INVALID_METADATA,
}


def skip_reason(kind: str) -> int:
    """The ``SkipReason`` of a domain skip kind (``no_tissue`` -> ``SKIP_REASON_NO_TISSUE``)."""
    return _SKIP_REASONS[kind]


def encoded_image(position: int, record: types_pb2.ImageRecord) -> EncodedImage:
    """A streamed ``ImageRecord`` for the domain. A caller's ``image_id`` names the image in the
    index (empty: the SHA-256 of its bytes); an image without a source is named by its id or its
    position in the stream."""
    return EncodedImage(
        bytes(record.content), record.source or record.image_id or f"image {position}",
        record.label or None, record.image_id or None, record.mpp if record.HasField("mpp") else None,
        dict(record.metadata) or None,
    )


def index_response(
    name: str, received: int, image_ids: Mapping[int, str], summary: IndexSummary
) -> service_pb2.IndexImagesResponse:
    """An indexing run as an ``IndexImagesResponse``: skipped images are reported by their
    position in the stream (with the caller's image id, ``image_ids`` by position) and the
    domain's reason, which names the image by position, never by its source, cut to
    ``DETAIL.max_chars``."""
    return service_pb2.IndexImagesResponse(
        index=name,
        images_received=received,
        images_indexed=summary.images_indexed,
        tiles_indexed=summary.tiles_indexed,
        skipped=[
            service_pb2.SkippedImage(
                position=item.position, image_id=image_ids.get(item.position, "")[:MAX_IMAGE_ID_CHARS],
                reason=_SKIP_REASONS[item.kind], message=item.reason[: DETAIL.max_chars],
            )
            for item in summary.skipped
        ],
    )


def delete_summary_to_proto(summary: DeleteSummary) -> service_pb2.DeleteImagesResponse:
    """What a deletion did, as the RPC's response."""
    return service_pb2.DeleteImagesResponse(
        images_deleted=summary.images_deleted,
        tiles_deleted=summary.tiles_deleted,
        missing_image_ids=list(summary.missing_image_ids),
    )
