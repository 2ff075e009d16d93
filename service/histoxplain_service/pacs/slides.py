"""A DICOM whole-slide series read over DICOMweb with wsidicom, and one level of it as an image source.

Reading
    :meth:`DicomSlide.open` asks the PACS which transfer syntax it stores the slide's frames in
    (one WADO-RS frame request with ``transfer-syntax=*``, whose answer names the stored syntax)
    and opens the series with wsidicom requesting exactly that syntax. Without it DICOMweb's
    default is lossless transcoding: Orthanc decodes and re-encodes every frame (100x the cost of
    sending the stored JPEG; ``docs/PACS.md``). wsidicom fetches only the frames a region needs
    (WADO-RS frame retrieval) and caches decoded frames.

Levels
    ``level`` is the index in the slide's pyramid, 0 the full resolution, as for slide files;
    coordinates given to :meth:`DicomSlide.read` are pixels of that level. The downsample of a
    level is the ratio of its pixel spacing to level 0's (the physical scale).

Identity
    A slide's image id is derived from its Study and Series Instance UIDs
    (:func:`dicom_image_id`), so indexing the series again updates its points, never duplicates
    them, and its ``source`` is the DICOMweb path ``dicomweb:studies/<uid>/series/<uid>`` (no host,
    so a PACS moved to another address keeps its indexes).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from typing import Any

import numpy as np

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.limits import check_mpp
from histoxplain_service.domain.types import DicomReference
from histoxplain_service.pacs.connection import pacs_errors

__all__ = [
    "WSI_SOP_CLASS_UID",
    "DicomSlide",
    "DicomWebSource",
    "dicom_image_id",
    "dicom_source",
]

log = logging.getLogger(__name__)

#: VL Whole Slide Microscopy Image Storage.
WSI_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"
_ID_HEX = 40  # as ingest's image ids (its module docstring says why not 32)


def dicom_image_id(study_uid: str, series_uid: str) -> str:
    """The image id of a slide series: the same UIDs give the same id on every machine."""
    return hashlib.sha256(f"dicom:{study_uid}/{series_uid}".encode()).hexdigest()[:_ID_HEX]


def dicom_source(study_uid: str, series_uid: str) -> str:
    """The ``source`` stored with a slide's tiles: its DICOMweb path, without the PACS's address."""
    return f"dicomweb:studies/{study_uid}/series/{series_uid}"


class DicomSlide:
    """One DICOM whole-slide series, opened over DICOMweb; reads are serialised by a lock.

    Open one with :meth:`histoxplain_service.pacs.dicomweb.DicomWeb.open_slide`; close it when done
    (or let :meth:`~histoxplain_service.pacs.dicomweb.DicomWeb.slide` keep it).
    """

    def __init__(self, wsi: Any, study_uid: str, series_uid: str) -> None:
        self._wsi = wsi
        self.study_uid = study_uid
        self.series_uid = series_uid
        self._lock = threading.Lock()
        self._levels = list(wsi.levels)
        self._base_spacing = self._levels[0].pixel_spacing

    @classmethod
    def open(
        cls, client: Any, study_uid: str, series_uid: str, transfer_syntax: str | None,
        frame_cache_bytes: int | None = None,
    ) -> DicomSlide:
        """Open a slide series over ``client`` (a ``DICOMwebClient``), asking for its frames in
        ``transfer_syntax`` (``None``: the first one wsidicom supports).

        ``frame_cache_bytes``: the budget of each of wsidicom's frame caches (decoded and
        encoded) for this slide; ``None``: wsidicom's default (100 MiB each).

        Raises:
            InvalidRequest: the series holds no readable pyramid.
            DependencyUnavailable / PermissionDenied: the PACS failed or refused.
        """
        from wsidicom import WsiDicom, WsiDicomWebClient
        from wsidicom.config import Settings as WsiSettings
        from wsidicom.errors import WsiDicomNotFoundError

        settings = None
        if frame_cache_bytes is not None:
            settings = WsiSettings(decoded_frame_cache_size=frame_cache_bytes, encoded_frame_cache_size=frame_cache_bytes)
        with pacs_errors("opening a slide", not_found="the slide is not in the PACS; check the study and series UIDs"):
            try:
                with warnings.catch_warnings():
                    # pydicom warns about each bulk-data element of the metadata (the ICC profile)
                    # that it is not fetching; nothing here needs them.
                    warnings.filterwarnings("ignore", message="No bulk data URI handler", category=UserWarning)
                    wsi = WsiDicom.open_web(
                        WsiDicomWebClient(client), study_uid, series_uid, transfer_syntax, settings=settings
                    )
            except WsiDicomNotFoundError:
                raise InvalidRequest(
                    "the series holds no whole-slide pyramid wsidicom can read; give a slide series"
                ) from None
        return cls(wsi, study_uid, series_uid)

    # -- geometry ----------------------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        return len(self._levels)

    def _level(self, level: int) -> Any:
        if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < len(self._levels):
            raise InvalidRequest(
                f"the slide has {len(self._levels)} level(s) (0..{len(self._levels) - 1}); choose a level in that range"
            )
        return self._levels[level]

    def size(self, level: int) -> tuple[int, int]:
        """(width, height) of a level in pixels."""
        size = self._level(level).size
        return int(size.width), int(size.height)

    def downsample(self, level: int) -> float:
        """Level-0 pixels per pixel of ``level`` (the ratio of pixel spacings)."""
        return float(self._level(level).pixel_spacing.width / self._base_spacing.width)

    def mpp(self, level: int) -> float | None:
        """µm per pixel at ``level``, or ``None`` when the slide declares none usable."""
        try:
            return check_mpp(float(self._level(level).mpp.width))
        except (InvalidRequest, ValueError, AttributeError):
            return None

    def dataset(self, level: int) -> Any:
        """The level's DICOM metadata (a pydicom Dataset without pixel data)."""
        return self._level(level).datasets[0].as_dataset()

    def instance_uid(self, level: int) -> str:
        return str(self.dataset(level).SOPInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str | None:
        value = self.dataset(0).get("FrameOfReferenceUID")
        return None if value is None else str(value)

    # -- pixels ------------------------------------------------------------------------------------

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels (h, w, 3) uint8 RGB of a rectangle in ``level``'s pixels.

        Raises:
            InvalidRequest: the rectangle is not inside the level.
        """
        from wsidicom.errors import WsiDicomOutOfBoundsError

        scale = self._level(level).level
        width, height = self.size(level)
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise InvalidRequest(
                f"a {w}x{h} px region at ({x}, {y}) is not inside level {level} ({width}x{height} px); "
                "give a region inside the slide"
            )
        gone = "the slide is no longer in the PACS; index it again (or delete it from the index)"
        with self._lock, pacs_errors("reading a slide region", not_found=gone):
            try:
                region = self._wsi.read_region((x, y), scale, (w, h))
            except WsiDicomOutOfBoundsError:
                raise InvalidRequest(f"the region is not inside level {level}; give a region inside the slide") from None
        return np.asarray(region.convert("RGB"), dtype=np.uint8)

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole slide (h, w, 3) uint8 RGB, its longer side at most ``max_side`` (and at most
        level 0's: wsidicom finds no level for a thumbnail larger than the slide)."""
        side = min(max_side, max(self.size(0)))
        with self._lock, pacs_errors("reading a slide thumbnail", not_found="the slide is no longer in the PACS"):
            image = self._wsi.read_thumbnail((side, side))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    def close(self) -> None:
        with self._lock:
            self._wsi.close()


class DicomWebSource:
    """One level of a :class:`DicomSlide` as an :class:`~histoxplain_service.domain.ingest.ImageSource`.

    Its tiles carry a :class:`~histoxplain_service.domain.types.DicomReference`, so the index
    keeps no copy of their pixels. ``owns_slide``: :meth:`close` closes the slide too.
    """

    def __init__(
        self, slide: DicomSlide, level: int, tile_size: int, label: str | None = None, owns_slide: bool = True
    ) -> None:
        self.slide = slide
        self.level = level
        self.width, self.height = slide.size(level)  # also checks the level
        self.downsample = slide.downsample(level)
        self.mpp = slide.mpp(level)
        self.label = label
        self.metadata: tuple[tuple[str, str], ...] = ()  # ingest's ImageSource field: none for DICOM series
        self.image_id = dicom_image_id(slide.study_uid, slide.series_uid)
        self.source = dicom_source(slide.study_uid, slide.series_uid)
        self.dicom: DicomReference | None = DicomReference(
            slide.study_uid, slide.series_uid, slide.instance_uid(level), slide.frame_of_reference_uid, tile_size
        )
        self._owns_slide = owns_slide

    def thumbnail(self, max_side: int) -> np.ndarray:
        return self.slide.thumbnail(max_side)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.slide.read(self.level, x, y, w, h)

    def close(self) -> None:
        if self._owns_slide:
            self.slide.close()

