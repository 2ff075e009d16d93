"""Find similar cases for a region of a DICOM slide, explain them, and write the results back.

:func:`explain_region` reads the region at the chosen pyramid level over DICOMweb, ranks the
indexed *slides* by how well their tiles match the region's tiles (the domain's image ranking,
:mod:`histoxplain_service.domain.ranking`: one case per slide, the query's own slide left out),
explains the region against each case's best tile with the existing
:class:`~histoxplain_service.domain.retrieval.Retrieval` (Grad-CAM by default; the cases' tiles
are re-read from the PACS, which keeps their pixels), and optionally stores the Parametric Map,
the SR and the KOS of :mod:`.results` in the query's study by STOW-RS.

Regions
    ``Region(x, y, width, height)`` in level-0 pixels (``unit="px"``), or in slide millimetres
    (``unit="mm"``: the corners ``(x, y)`` and ``(x + width, y + height)`` in the slide coordinate
    system, converted to the level-0 pixels they span). A region partly off the slide is cut to
    it (a selection dragged past the edge; the tiles of a level whose size is odd end half a
    level-0 pixel past it); one wholly off the slide is refused. The pixels read at ``level``
    are held to ``HISTOXPLAIN_MAX_REQUEST_PIXELS``.

Heatmap
    The map written back is the mean of the region's maps against the cases (each in [0, 1]), at
    the pixels of the level read: where the region drives its similarity to the cases.

Cross-patient references
    ``cross_patient`` (default ``HISTOXPLAIN_DICOM_CROSS_PATIENT``, on) lets the stored objects
    reference cases of other patients, by UID only. Off, cases whose study belongs to another
    patient (compared by Patient ID and issuer, asked of the PACS and kept nowhere) are left out
    of the stored objects; the caller still gets every case. ``docs/PACS.md`` says why one would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import SaliencyOptions
from histoxplain_model.vocabulary import DEFAULT_TARGET
from histoxplain_service.domain.ranking import rank_images
from histoxplain_service.domain.retrieval import Retrieval, check_k
from histoxplain_service.domain.types import Box, ExplainedSearch, ImageHit, SearchHit, TileFilter
from histoxplain_service.pacs.dicomweb import DicomWeb, encode
from histoxplain_service.pacs.results import (
    SOP_CLASSES,
    RegionOnLevel,
    SimilarCase,
    heatmap_map,
    heatmap_overlay,
    similar_cases_report,
    similar_cases_selection,
    warm_up,
)
from histoxplain_service.pacs.writeback import BackgroundWriter, Place
from histoxplain_service.pacs.slides import DicomSlide, dicom_image_id

__all__ = ["Region", "RegionExplanation", "StoredObject", "explain_region"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Region:
    """A rectangle of a slide: level-0 pixels (``px``) or slide millimetres (``mm``)."""

    x: float
    y: float
    width: float
    height: float
    unit: Literal["px", "mm"] = "px"


@dataclass(frozen=True)
class StoredObject:
    """One object written into the query's study: ``kind`` is ``map``, ``overlay``, ``report`` or
    ``selection``; ``state`` is ``stored`` (in the PACS when the call returned) or ``queued`` (its
    UIDs given out, stored by a :class:`~histoxplain_service.pacs.writeback.BackgroundWriter`)."""

    kind: str
    series_uid: str
    instance_uid: str
    sop_class_uid: str
    state: str = "stored"


@dataclass(frozen=True)
class RegionExplanation:
    """What :func:`explain_region` found.

    Attributes:
        box: the region in level-0 pixels (cut to the slide).
        level: the pyramid level it was read at.
        image: its pixels (h, w, 3) uint8 at that level.
        cases: the similar slides, best first (the query's own slide left out); empty with tile
            ranking, whose cases are the explanation's hits.
        explanation: the region explained against each case's best tile (hit ``i`` is case ``i``).
        heatmap: (h, w) float32 in [0, 1], the mean of the region's maps, at the level's pixels.
        referenced: how many cases the objects reference (fewer than ``cases`` when only DICOM
            cases, or only the same patient's, may be referenced).
        stored: the objects written into the study (empty unless ``store``): the map, and the
            report and selection when at least one case may be referenced.
        objects: those objects as pydicom Datasets (built only with a synchronous ``store``; a
            background one builds them after the call).
    """

    box: Box
    level: int
    image: np.ndarray
    cases: tuple[ImageHit, ...]
    explanation: ExplainedSearch
    heatmap: np.ndarray
    referenced: int
    stored: tuple[StoredObject, ...] = ()
    objects: tuple[object, ...] = ()


def _level0_box(slide: DicomSlide, region: Region) -> Box:
    """The region in level-0 pixels, cut to the slide; refused when nothing of it is on the slide."""
    values = (region.x, region.y, region.width, region.height)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or region.width <= 0 or region.height <= 0:
        raise InvalidRequest("a region needs finite x, y and a positive width and height")
    if region.unit == "mm":
        import highdicom as hd

        to_pixels = hd.spatial.ReferenceToPixelTransformer.for_image(
            slide.dataset(0), for_total_pixel_matrix=True, round_output=False
        )
        corners = np.array([[region.x, region.y, 0.0], [region.x + region.width, region.y + region.height, 0.0]])
        pixels = to_pixels(corners)[:, :2]
        # pixel indices address centres: the edges of the pixels spanned are half a pixel out
        left, top = np.floor(pixels.min(axis=0) + 0.5)
        right, bottom = np.ceil(pixels.max(axis=0) + 0.5)
        box = Box(int(left), int(top), int(right - left), int(bottom - top))
    elif region.unit == "px":
        box = Box(int(region.x), int(region.y), int(math.ceil(region.width)), int(math.ceil(region.height)))
    else:
        raise InvalidRequest(f"a region's unit is 'px' (level-0 pixels) or 'mm' (slide millimetres), got {region.unit!r}")
    width, height = slide.size(0)
    left, top = max(box.x, 0), max(box.y, 0)
    right, bottom = min(box.x + box.w, width), min(box.y + box.h, height)
    if right <= left or bottom <= top:
        raise InvalidRequest(
            f"the region ({box.w}x{box.h} px at {box.x}, {box.y} in level-0 pixels) is outside the slide "
            f"({width}x{height} px); give a region on it"
        )
    return Box(left, top, right - left, bottom - top)


def _on_level(slide: DicomSlide, box: Box, level: int, max_pixels: int) -> tuple[int, int, int, int]:
    """The level's pixels (x, y, w, h) that cover ``box`` (level-0 pixels), within the pixel limit."""
    downsample = slide.downsample(level)
    width, height = slide.size(level)
    left, top = int(box.x // downsample), int(box.y // downsample)
    right = min(width, max(left + 1, math.ceil((box.x + box.w) / downsample)))
    bottom = min(height, max(top + 1, math.ceil((box.y + box.h) / downsample)))
    w, h = right - left, bottom - top
    if w * h > max_pixels:
        raise InvalidRequest(
            f"the region is {w}x{h} px at level {level}; the limit is {max_pixels} pixels (choose a coarser level or "
            "a smaller region, or set HISTOXPLAIN_MAX_REQUEST_PIXELS)"
        )
    return left, top, w, h


def _best_tiles(search: Callable[[np.ndarray], list[SearchHit]], vectors: np.ndarray, k: int) -> list[SearchHit]:
    """The ``k`` tiles that best match any of the query tiles ``vectors`` (each tile once, at its
    best score), best first; ``search``: one query tile's best tiles."""
    best: dict[str, SearchHit] = {}
    for vector in vectors:
        for tile in search(vector):
            if tile.point_id not in best or tile.score > best[tile.point_id].score:
                best[tile.point_id] = tile
    return sorted(best.values(), key=lambda tile: tile.score, reverse=True)[:k]


def _mean_heatmap(explanation: ExplainedSearch, width: int, height: int) -> np.ndarray:
    maps = [hit.query_heatmap for hit in explanation.hits if hit.query_heatmap is not None]
    if not maps:
        raise InvalidRequest("the explanation has no heatmap of the query; explain side 'query' or 'both'")
    mean = np.mean(np.stack([np.asarray(m, dtype=np.float32) for m in maps]), axis=0)
    resized = np.asarray(Image.fromarray(mean).resize((width, height), Image.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def _referable(pacs: DicomWeb, study_uid: str, cases: list[SimilarCase], cross_patient: bool) -> list[SimilarCase]:
    if cross_patient or not cases:
        return cases
    patient = pacs.patient_of(study_uid)
    same = [case for case in cases if patient is not None and pacs.patient_of(case.study_uid) == patient]
    log.info("cross-patient references are off: %d of %d cases are the same patient's", len(same), len(cases))
    return same


def explain_region(
    retrieval: Retrieval,
    index_name: str,
    pacs: DicomWeb,
    study_uid: str,
    series_uid: str,
    region: Region,
    *,
    level: int = 0,
    k: int = 10,
    method: str = "gradcam",
    side: Literal["query", "both"] = "query",
    store: bool = False,
    store_overlay: bool = False,
    polarity: str = "similar",
    ranking: Literal["image", "tile"] = "image",
    tile_filter: TileFilter | None = None,
    cross_patient: bool | None = None,
    options: SaliencyOptions | None = None,
    target: str = DEFAULT_TARGET,
    correspondences: int = 0,
    verify: bool = False,
    timeout: float | None = None,
    writer: BackgroundWriter | None = None,
) -> RegionExplanation:
    """Search the index for the slides most similar to a region, explain them, optionally store
    the results in the region's study (see the module docstring).

    Args:
        retrieval: the model and index engine; the cases' tiles are read from ``pacs``, whatever
            its ``dicom_tiles``.
        index_name: the index to search.
        pacs: the PACS holding the slide (and the cases' slides).
        study_uid, series_uid: the query slide.
        region: the region of the slide (level-0 pixels or slide millimetres).
        level: the pyramid level to read the region at (0: full resolution; the index's level
            is usually the right one).
        k: how many similar slides (``ranking="image"``) or tiles (``"tile"``).
        method: the saliency method (``gradcam``, ``gradcampp``, ``smoothgrad``).
        side: ``query`` (the region's heatmaps) or ``both`` (the cases' too, for the caller).
        store: write the Parametric Map, SR and KOS into the study.
        store_overlay: with ``store``, also a Secondary Capture of the heatmap blended over the
            region, for viewers that show neither Parametric Maps nor SR.
        polarity: ``similar`` or ``dissimilar`` regions (the stored map is of that polarity).
        ranking: ``image``: one case per slide, explained through its best tile; ``tile``: the
            ``k`` tiles that best match any tile of the region, several of which may come from
            one slide (the stored SR and KOS list each slide once, at its best tile).
        tile_filter: search only among the tiles it keeps.
        cross_patient: may the stored objects reference other patients' slides (default: the
            ``dicom_cross_patient`` setting).
        options: the method's own options (e.g. SmoothGrad's samples).
        target, correspondences, verify: as :meth:`Retrieval.explain_hits` (the stored map is
            the mean of the maps of that target; pairs and faithfulness come back per case).
        timeout: seconds the caller has left.
        writer: with ``store``, store in the background: the objects' UIDs are made first and
            returned as ``queued``, ``writer`` builds and stores them after the call returns.
            Without it the objects are in the PACS when the call returns (built once the
            heatmap is there, all sent in one STOW-RS request).

    Raises:
        InvalidRequest: a region off the slide or over the pixel limit, a bad level, k or
            method, or no other slide to compare with.
        NotFound: no such study or series, or no such index.  InvalidRequest: the series is not a slide.
        DependencyUnavailable / PermissionDenied: the PACS or the model failed or refused.
        FailedPrecondition: storing results on a slide without a Frame of Reference UID.
        ResourceExhausted: ``writer`` holds its limit of results (refused before any work).
    """
    check_k(k)
    if ranking not in ("image", "tile"):
        raise InvalidRequest(f"ranking must be 'image' or 'tile', got {ranking!r}")
    if side not in ("query", "both"):
        raise InvalidRequest(f"side must be 'query' or 'both' (the stored heatmap is the query's), got {side!r}")
    place = writer.reserve() if store and writer is not None else None  # full: refused before any work
    try:
        slide = pacs.slide(study_uid, series_uid)
        box = _level0_box(slide, region)
        x, y, w, h = _on_level(slide, box, level, retrieval.settings.max_request_pixels)
        image = slide.read(level, x, y, w, h)

        index = retrieval.searchable(index_name)
        vectors = retrieval.backend.embed(retrieval.query_tiles(image), timeout=timeout)
        query_image_id = dicom_image_id(study_uid, series_uid)
        if ranking == "image":
            # one more than asked: the query's own slide, when indexed, takes at most one place
            ranked = rank_images(index, vectors, k + 1, timeout=timeout, tile_filter=tile_filter)
            cases = tuple(hit for hit in ranked if hit.image_id != query_image_id)[:k]
            tiles = [max(case.tiles, key=lambda tile: tile.score) for case in cases]
        else:
            cases = ()
            others = TileFilter.from_mapping(must_not={"image_id": query_image_id}).also(tile_filter)
            tiles = _best_tiles(lambda vector: index.search(vector, k, timeout=timeout, tile_filter=others), vectors, k)
        if not tiles:
            raise InvalidRequest(f"index {index_name!r} holds no other slide to compare the region with; index more slides")
        allowed = retrieval.settings.dicom_cross_patient if cross_patient is None else cross_patient
        on_level = RegionOnLevel(slide.dataset(level), x, y, w, h)
        if store:
            on_level.check_storable()  # results that cannot be placed: refused before the work
        similar = _referable(pacs, study_uid, _similar_cases(tiles), allowed)
        reader = Retrieval(retrieval.settings, retrieval.backend, retrieval.index_engine, dicom_tiles=pacs.read_tile)
        explanation = reader.explain_hits(
            index_name, image, tiles, method, polarity, side, timeout, options,
            target=target, correspondences=correspondences, verify=verify,
        )
        heatmap = _mean_heatmap(explanation, w, h)
        description = f"{method} heatmap, mean over {len(cases)} cases"
        result = RegionExplanation(box, level, image, cases, explanation, heatmap, len(similar))
        if not store:
            return result
        if place is not None:
            queued = _queue(place, pacs, study_uid, on_level, image, heatmap, similar, method, description, store_overlay)
            return dataclasses.replace(result, stored=queued)
        warm_up()  # once per process: the gateway warms it at start, a library caller's first store here
        objects = _map_objects(on_level, image, heatmap, method, description, store_overlay)
        objects += _case_objects(on_level, similar, method)
        check_deadline()  # a caller that gave up stores nothing
        pacs.store([encoded for _, _, encoded in objects], study_uid)
        log.info("stored %d result objects referencing %d cases", len(objects), len(similar))
        stored = tuple(
            StoredObject(kind, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID))
            for kind, ds, _ in objects
        )
        return dataclasses.replace(result, stored=stored, objects=tuple(ds for _, ds, _ in objects))
    finally:
        if place is not None:
            place.release()  # no-op once its result was queued


def _similar_cases(tiles: Sequence[SearchHit]) -> list[SimilarCase]:
    """The DICOM slides of ``tiles`` (best first), each once at its best tile, with its search
    score as the similarity (see :class:`~histoxplain_service.pacs.results.SimilarCase`)."""
    similar: list[SimilarCase] = []
    for hit in tiles:
        if hit.dicom is None or any(case.series_uid == hit.dicom.series_uid for case in similar):
            continue
        similar.append(SimilarCase(
            len(similar) + 1, float(hit.score), hit.dicom.study_uid, hit.dicom.series_uid, hit.dicom.instance_uid,
        ))
    return similar


def _encoded(kind: str, dataset: Any) -> tuple[str, Any, bytes]:
    return kind, dataset, encode(dataset)


def _map_objects(
    region: RegionOnLevel, image: np.ndarray, heatmap: np.ndarray, method: str, description: str, overlay: bool,
    uids: dict[str, tuple[str, str]] | None = None,
) -> list[tuple[str, Any, bytes]]:
    """The Parametric Map (and the overlay), encoded; ``uids``: (series, instance) by kind, else new."""
    uids = uids or {}
    objects = [_encoded("map", heatmap_map(region, heatmap, method, description, uids.get("map")))]
    if overlay:
        objects.append(_encoded(
            "overlay", heatmap_overlay(region, image, heatmap, method, description, uids=uids.get("overlay"))
        ))
    return objects


def _case_objects(
    region: RegionOnLevel, similar: list[SimilarCase], method: str, uids: dict[str, tuple[str, str]] | None = None
) -> list[tuple[str, Any, bytes]]:
    """The SR and the KOS of the cases, encoded; none without a case (they list cases)."""
    if not similar:
        return []
    uids = uids or {}
    check_deadline()
    report = _encoded("report", similar_cases_report(region, similar, method, uids.get("report")))
    check_deadline()
    return [report, _encoded("selection", similar_cases_selection(region, similar, method, uids.get("selection")))]


def _queue(
    place: Place, pacs: DicomWeb, study_uid: str, region: RegionOnLevel,
    image: np.ndarray, heatmap: np.ndarray, similar: list[SimilarCase], method: str, description: str, overlay: bool,
) -> tuple[StoredObject, ...]:
    """Queue the objects for the background writer; their UIDs, made now, are the answer."""
    import highdicom as hd

    kinds = ["map", *(["overlay"] if overlay else []), *(["report", "selection"] if similar else [])]
    uids = {kind: (str(hd.UID()), str(hd.UID())) for kind in kinds}

    def build() -> list[bytes]:
        warm_up()  # once per process (the gateway warms it at start)
        objects = _map_objects(region, image, heatmap, method, description, overlay, uids)
        objects += _case_objects(region, similar, method, uids)
        return [encoded for _, _, encoded in objects]

    check_deadline()  # a caller that gave up queues nothing
    place.submit(build, pacs, study_uid)
    log.info("queued %d result objects referencing %d cases for the background store", len(kinds), len(similar))
    return tuple(StoredObject(kind, *uids[kind], SOP_CLASSES[kind], state="queued") for kind in kinds)
