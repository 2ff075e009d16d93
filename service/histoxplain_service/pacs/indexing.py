"""Index DICOM whole-slide series from a PACS: one series, several, or every slide of a study.

Each series is one image of the index (id from its Study and Series Instance UIDs,
:func:`~.slides.dicom_image_id`), read at the chosen pyramid level over DICOMweb and cut with the
same tiling and tissue mask as slide files, through the same resumable loop
(:func:`~histoxplain_service.domain.ingest.index_sources`): indexing a series again updates its
points and never duplicates them, and a series already complete is not read again beyond its
thumbnail. Every tile's payload holds ``dicom`` (Study / Series / SOP Instance UIDs, Frame of
Reference UID, tile size) next to the usual level, box (level-0 pixels) and µm/px; the index
keeps no pixels of these tiles.

A study's series that are not slides (results written back, reports, other modalities) are
left out. A series given by UID that is not a slide is refused before anything is written; a
slide without the requested level is skipped with its reason, as a slide file would be.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from histoxplain_model.deadlines import time_left
from histoxplain_service.domain.ingest import ImageSource, IndexSummary, index_sources
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.pacs.dicomweb import DicomWeb
from histoxplain_service.pacs.slides import DicomWebSource, dicom_source

__all__ = ["index_dicom"]

log = logging.getLogger(__name__)


def index_dicom(
    retrieval: Retrieval,
    index_name: str,
    pacs: DicomWeb,
    study_uid: str,
    series_uids: Sequence[str] = (),
    *,
    level: int = 0,
    label: str | None = None,
    show_progress: bool = False,
) -> IndexSummary:
    """Index the slide series ``series_uids`` of a study (all its slide series when empty).

    Args:
        retrieval: the model and index engine (its settings give tile size, stride, min tissue,
            batch size).
        index_name: the index to write into (created for the model's encoder if missing).
        pacs: the PACS the slides are read from.
        study_uid, series_uids: what to index.
        level: the pyramid level to tile (0: full resolution).
        label: the label stored with every tile.

    Returns:
        The run's summary; a skipped slide is named by its DICOMweb path.

    Raises:
        NotFound: no such study, or a given series is not in it.
        InvalidRequest: a given series is not a slide, or a bad index name / level.
        DependencyUnavailable / PermissionDenied: the PACS or the index failed or refused.
    """
    series = pacs.slide_series(study_uid, series_uids)
    settings = retrieval.settings
    index = retrieval.index(index_name)

    def opener(series_uid: str) -> Callable[[], ImageSource]:
        def open_() -> ImageSource:
            slide = pacs.open_slide(study_uid, series_uid)
            try:
                return DicomWebSource(slide, level, settings.tile_size, label)
            except BaseException:
                slide.close()
                raise

        return open_

    def embed(tiles: Sequence[np.ndarray]) -> np.ndarray:
        return retrieval.backend.embed(tiles, timeout=time_left())

    log.info("indexing %d slide series into %s at level %d", len(series), index_name, level)
    summary = index_sources(
        [(dicom_source(study_uid, uid), opener(uid)) for uid in series], index, embed, settings,
        preset=retrieval.model.preset, dim=retrieval.model.embedding_dim, show_progress=show_progress,
    )
    if summary.tiles_indexed and summary.stopped is None:
        index.optimize()  # as after Retrieval's own runs: the engine makes the new tiles fast to search
    return summary
