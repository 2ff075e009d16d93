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

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import SaliencyOptions
from histoxplain_service.domain.ranking import rank_images
from histoxplain_service.domain.retrieval import Retrieval, check_k
from histoxplain_service.domain.types import Box, ExplainedSearch, ImageHit
from histoxplain_service.pacs.dicomweb import DicomWeb
from histoxplain_service.pacs.results import (
    RegionOnLevel,
    SimilarCase,
    heatmap_map,
    similar_cases_report,
    similar_cases_selection,
)
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
    """One object written into the query's study: ``kind`` is ``map``, ``report`` or ``selection``."""

    kind: str
    series_uid: str
    instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class RegionExplanation:
    """What :func:`explain_region` found.

    Attributes:
        box: the region in level-0 pixels (cut to the slide).
        level: the pyramid level it was read at.
        image: its pixels (h, w, 3) uint8 at that level.
        cases: the similar slides, best first (the query's own slide left out).
        explanation: the region explained against each case's best tile (hit ``i`` is case ``i``).
        heatmap: (h, w) float32 in [0, 1], the mean of the region's maps, at the level's pixels.
        referenced: how many cases the objects reference (fewer than ``cases`` when only DICOM
            cases, or only the same patient's, may be referenced).
        stored: the objects written into the study (empty unless ``store``): the map, and the
            report and selection when at least one case may be referenced.
        objects: those objects as pydicom Datasets (built only with ``store``).
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
    cross_patient: bool | None = None,
    options: SaliencyOptions | None = None,
    timeout: float | None = None,
) -> RegionExplanation:
    """Search the index for the slides most similar to a region, explain them, optionally store
    the results in the region's study (see the module docstring).

    Args:
        retrieval: the model and index engine; its ``dicom_tiles`` is replaced by ``pacs``'s reader.
        index_name: the index to search.
        pacs: the PACS holding the slide (and the cases' slides).
        study_uid, series_uid: the query slide.
        region: the region of the slide (level-0 pixels or slide millimetres).
        level: the pyramid level to read the region at (0: full resolution; the index's level
            is usually the right one).
        k: how many similar slides.
        method: the saliency method (``gradcam``, ``gradcampp``, ``smoothgrad``).
        side: ``query`` (the region's heatmaps) or ``both`` (the cases' too, for the caller).
        store: write the Parametric Map, SR and KOS into the study.
        cross_patient: may the stored objects reference other patients' slides (default: the
            ``dicom_cross_patient`` setting).
        options: the method's own options (e.g. SmoothGrad's samples).
        timeout: seconds the caller has left.

    Raises:
        InvalidRequest: a region off the slide or over the pixel limit, a bad level, k or
            method, or no other slide to compare with.
        NotFound: no such study or series, or no such index.  InvalidRequest: the series is not a slide.
        DependencyUnavailable / PermissionDenied: the PACS or the model failed or refused.
        FailedPrecondition: storing results on a slide without a Frame of Reference UID.
    """
    check_k(k)
    if side not in ("query", "both"):
        raise InvalidRequest(f"side must be 'query' or 'both' (the stored heatmap is the query's), got {side!r}")
    slide = pacs.slide(study_uid, series_uid)
    box = _level0_box(slide, region)
    x, y, w, h = _on_level(slide, box, level, retrieval.settings.max_request_pixels)
    image = slide.read(level, x, y, w, h)
    if retrieval.dicom_tiles != pacs.read_tile:  # bound methods: equal when of the same object
        retrieval = Retrieval(retrieval.settings, retrieval.backend, retrieval.index_engine, dicom_tiles=pacs.read_tile)

    index = retrieval.searchable(index_name)
    vectors = retrieval.backend.embed(retrieval.query_tiles(image), timeout=timeout)
    query_image_id = dicom_image_id(study_uid, series_uid)
    # one more than asked: the query's own slide, when indexed, takes at most one place
    ranked = rank_images(index, vectors, k + 1, timeout=timeout)
    cases = tuple(hit for hit in ranked if hit.image_id != query_image_id)[:k]
    if not cases:
        raise InvalidRequest(f"index {index_name!r} holds no other slide to compare the region with; index more slides")
    tiles = [max(case.tiles, key=lambda tile: tile.score) for case in cases]
    explanation = retrieval.explain_hits(index_name, image, tiles, method, "similar", side, timeout, options)
    heatmap = _mean_heatmap(explanation, w, h)

    similar = [
        SimilarCase(position + 1, explained.similarity, hit.dicom.study_uid, hit.dicom.series_uid, hit.dicom.instance_uid)
        for position, explained in enumerate(explanation.hits)
        if (hit := explained.hit) is not None and hit.dicom is not None
    ]
    allowed = retrieval.settings.dicom_cross_patient if cross_patient is None else cross_patient
    similar = _referable(pacs, study_uid, similar, allowed)
    result = RegionExplanation(box, level, image, cases, explanation, heatmap, len(similar))
    if not store:
        return result
    on_level = RegionOnLevel(slide.dataset(level), x, y, w, h)
    objects = [("map", heatmap_map(on_level, heatmap, method, f"{method} heatmap, mean over {len(cases)} cases"))]
    if similar:  # the SR and the KOS list cases: with none that may be referenced, neither is written
        objects.append(("report", similar_cases_report(on_level, similar, method)))
        objects.append(("selection", similar_cases_selection(on_level, similar, method)))
    pacs.store([dataset for _, dataset in objects], study_uid)
    log.info("stored %d result objects referencing %d cases", len(objects), len(similar))
    stored = tuple(
        StoredObject(kind, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID))
        for kind, ds in objects
    )
    return RegionExplanation(
        box, level, image, cases, explanation, heatmap, len(similar), stored, tuple(ds for _, ds in objects)
    )
