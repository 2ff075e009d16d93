"""One PACS over DICOMweb: look-ups (QIDO-RS), slides opened for reading (WADO-RS), results stored
(STOW-RS), and the pixels of indexed DICOM tiles re-read for explanations.

Look-ups
    QIDO-RS answers an unknown UID with an empty list, so "not found" is decided here: an unknown
    study or series is ``NotFound``, a series without a VL Whole Slide Microscopy image is
    ``InvalidRequest`` (it is not a slide). Messages name the argument (``series_uids[1]``), never
    the UID.

Open slides
    Opening a slide costs a few requests (about 60-130 ms on loopback), so :meth:`DicomWeb.slide`
    keeps the most recently used ones open; explanations re-read their hits' tiles through it
    (:meth:`DicomWeb.read_tile`, the ``dicom_tiles`` of
    :class:`~histoxplain_service.domain.retrieval.Retrieval`).
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from histoxplain_model.errors import DependencyUnavailable, InvalidRequest, NotFound
from histoxplain_service.config import Settings
from histoxplain_service.domain.ingest import iter_tiles
from histoxplain_service.domain.types import SearchHit, TileRecord
from histoxplain_service.pacs.connection import PacsConnection, pacs_errors
from histoxplain_service.pacs.slides import WSI_SOP_CLASS_UID, DicomSlide, DicomWebSource

__all__ = ["DicomWeb", "PatientKey", "encode"]

log = logging.getLogger(__name__)

_SOP_CLASS = "00080016"
_SOP_INSTANCE = "00080018"
_SERIES = "0020000E"
_PATIENT_ID = "00100020"
_ISSUER_OF_PATIENT_ID = "00100021"
_TRANSFER_SYNTAX = re.compile(r"transfer-syntax=\"?([0-9.]+)")
_ANY_TRANSFER_SYNTAX = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'

#: Who a study belongs to, for comparing patients: (Patient ID, Issuer of Patient ID).
PatientKey = tuple[str, str]


def _value(item: dict[str, Any], tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


class DicomWeb:
    """One PACS: its DICOMweb client and the slides kept open on it. Safe to share between threads.

    Args:
        connection: where the PACS is and its credentials.
        max_open_slides: slides kept open for re-reading tiles (least recently used dropped
            first); at least k + 1 for an explanation of k cases, or slides are opened again.
        kept_frame_cache_bytes: each kept slide's budget for wsidicom's frame caches (decoded and
            encoded each): a hit's tile needs one to four frames, so a few MiB is plenty, and a
            slide kept for long must not grow to wsidicom's default of 100 MiB.
    """

    def __init__(
        self, connection: PacsConnection, max_open_slides: int = 16, kept_frame_cache_bytes: int = 8 * 1024 * 1024
    ) -> None:
        self.connection = connection
        self._session = connection.session()
        self.client = connection.client(self._session)
        self._max_open = max_open_slides
        self._kept_cache_bytes = kept_frame_cache_bytes
        self._open: OrderedDict[tuple[str, str], DicomSlide] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> DicomWeb:
        """The PACS of ``HISTOXPLAIN_DICOMWEB_URL`` and its credentials (see :mod:`.connection`)."""
        return cls(PacsConnection.from_settings(settings))

    # -- look-ups ----------------------------------------------------------------------------------

    def _instances(self, study_uid: str, series_uid: str | None, action: str) -> list[dict[str, Any]]:
        with pacs_errors(action, not_found="the study is not in the PACS; check the study UID"):
            return list(
                self.client.search_for_instances(
                    study_instance_uid=study_uid, series_instance_uid=series_uid, fields=[_SOP_CLASS, _SERIES]
                )
            )

    def _study_exists(self, study_uid: str) -> bool:
        with pacs_errors("looking up a study"):
            return bool(self.client.search_for_studies(search_filters={"StudyInstanceUID": study_uid}))

    def slide_instances(self, study_uid: str, series_uid: str, what: str = "the series") -> list[str]:
        """SOP Instance UIDs of the series' whole-slide images (the pyramid levels and any label
        or overview), in the PACS's order.

        Raises:
            NotFound: no such study, or no such series in it (``what`` names the series).
            InvalidRequest: the series is not a slide.
        """
        instances = self._instances(study_uid, series_uid, "looking up a slide series")
        if not instances:
            if not self._study_exists(study_uid):
                raise NotFound("the study is not in the PACS; check the study UID")
            raise NotFound(f"{what} is not in the study; check the series UID")
        slides = [_value(item, _SOP_INSTANCE) for item in instances if _value(item, _SOP_CLASS) == WSI_SOP_CLASS_UID]
        if not slides:
            raise InvalidRequest(
                f"{what} is not a whole-slide image series (it has no VL Whole Slide Microscopy image); "
                "give the series of a slide"
            )
        return [uid for uid in slides if uid]

    def slide_series(self, study_uid: str, series_uids: Sequence[str] = ()) -> list[str]:
        """The slide series to index: each of ``series_uids`` (checked), or every slide series of
        the study when none is given (other series, e.g. results written back, are left out).

        Raises:
            NotFound: no such study or series.  InvalidRequest: a given series is not a slide.
        """
        if series_uids:
            for position, series_uid in enumerate(series_uids):
                self.slide_instances(study_uid, series_uid, f"series_uids[{position}]")
            return list(dict.fromkeys(series_uids))
        instances = self._instances(study_uid, None, "listing the series of a study")
        if not instances:
            raise NotFound("the study is not in the PACS; check the study UID")
        found = [_value(item, _SERIES) for item in instances if _value(item, _SOP_CLASS) == WSI_SOP_CLASS_UID]
        series = [uid for uid in dict.fromkeys(found) if uid]
        log.info("a study holds %d slide series among %d instances", len(series), len(instances))
        return series

    def patient_of(self, study_uid: str) -> PatientKey | None:
        """Whom a study belongs to, or ``None`` when the PACS does not know the study.

        Used only to compare patients (``HISTOXPLAIN_DICOM_CROSS_PATIENT=0``); never stored or logged.
        """
        with pacs_errors("looking up a study's patient"):
            studies = self.client.search_for_studies(
                search_filters={"StudyInstanceUID": study_uid}, fields=[_PATIENT_ID, _ISSUER_OF_PATIENT_ID]
            )
        if not studies:
            return None
        return _value(studies[0], _PATIENT_ID) or "", _value(studies[0], _ISSUER_OF_PATIENT_ID) or ""

    def stored_transfer_syntax(self, study_uid: str, series_uid: str, instance_uid: str) -> str | None:
        """The transfer syntax the PACS stores an instance's frames in, or ``None`` if it does not say.

        Asks for frame 1 in any syntax (``transfer-syntax=*``, PS3.18 8.7.3.5.2): the server
        answers in the stored one and names it in the media type. Only the headers are read.
        """
        url = f"{self.connection.url}/studies/{study_uid}/series/{series_uid}/instances/{instance_uid}/frames/1"
        with pacs_errors("asking which transfer syntax a slide is stored in", not_found="the slide is not in the PACS"):
            with self._session.get(url, headers={"Accept": _ANY_TRANSFER_SYNTAX}, stream=True) as response:
                if response.status_code == 406:  # the server does not take '*': wsidicom chooses
                    return None
                response.raise_for_status()
                found = _TRANSFER_SYNTAX.search(response.headers.get("Content-Type", ""))
        return found.group(1) if found else None

    # -- slides ------------------------------------------------------------------------------------

    def open_slide(
        self, study_uid: str, series_uid: str, what: str = "the series", frame_cache_bytes: int | None = None
    ) -> DicomSlide:
        """Open a slide series for reading; the caller closes it.

        Raises:
            NotFound: no such study or series.  InvalidRequest: not a slide.
        """
        instances = self.slide_instances(study_uid, series_uid, what)
        transfer_syntax = self.stored_transfer_syntax(study_uid, series_uid, instances[0])
        return DicomSlide.open(self.client, study_uid, series_uid, transfer_syntax, frame_cache_bytes)

    def slide(self, study_uid: str, series_uid: str) -> DicomSlide:
        """A slide kept open by this object (opened on first use)."""
        key = (study_uid, series_uid)
        with self._lock:
            slide = self._open.get(key)
            if slide is not None:
                self._open.move_to_end(key)
                return slide
        slide = self.open_slide(study_uid, series_uid, frame_cache_bytes=self._kept_cache_bytes)
        with self._lock:
            self._open[key] = slide
            while len(self._open) > self._max_open:
                # Not closed: another thread may still be reading it. wsidicom over the web holds
                # no file or socket of its own, so dropping the reference frees it.
                self._open.popitem(last=False)
        return slide

    def read_tile(self, hit: SearchHit) -> np.ndarray:
        """A DICOM hit's pixels (tile_size, tile_size, 3) uint8, exactly as they were embedded
        (the same region of the same level, padded the same way by
        :func:`~histoxplain_service.domain.ingest.iter_tiles`).

        Raises:
            InvalidRequest: ``hit`` is not a tile of a DICOM slide.
            NotFound: its slide is no longer in the PACS, or that level now holds another image.
        """
        reference = hit.dicom
        if reference is None:
            raise InvalidRequest("the hit is not a tile of a DICOM slide; load it from its index")
        slide = self.slide(reference.study_uid, reference.series_uid)
        if slide.level_count <= hit.level or slide.instance_uid(hit.level) != reference.instance_uid:
            raise NotFound("a hit's slide changed in the PACS after it was indexed; index the slide again")
        source = DicomWebSource(slide, hit.level, reference.tile_size, hit.label, owns_slide=False)
        record = TileRecord(
            hit.image_id, hit.source, hit.label, hit.box, hit.level, hit.mpp, hit.tile_index, 1, reference
        )
        return next(iter_tiles(source, [record], reference.tile_size))

    # -- writing -----------------------------------------------------------------------------------

    def store(self, datasets: Sequence[Any], study_uid: str) -> None:
        """STOW-RS ``datasets`` (pydicom Datasets, or the bytes :func:`encode` makes of
        them) into ``study_uid`` in one request.

        Raises:
            DependencyUnavailable: the PACS failed or refused some of them.
            PermissionDenied: the PACS refused the credentials.
        """
        from dicomweb_client.web import _Transaction

        with pacs_errors("storing DICOM objects", not_found="the study is not in the PACS; check the study UID"):
            # dicomweb-client's own store_instances encodes each dataset (again) and logs the study UID
            url = self.client._get_studies_url(_Transaction.STORE, study_uid)  # noqa: SLF001
            parts = [item if isinstance(item, bytes) else encode(item) for item in datasets]
            response = self.client._http_post_multipart_application_dicom(url, parts)  # noqa: SLF001
        failed = len(getattr(response, "FailedSOPSequence", None) or [])
        if failed:
            log.warning("the PACS refused %d of %d objects", failed, len(datasets))
            raise DependencyUnavailable(
                f"the PACS refused {failed} of the {len(datasets)} result objects; check the PACS log"
            )

    def close(self) -> None:
        """Close the slides kept open and the HTTP session."""
        with self._lock:
            slides, self._open = list(self._open.values()), OrderedDict()
        for slide in slides:
            slide.close()
        self._session.close()


def encode(dataset: Any) -> bytes:
    """A pydicom Dataset as the DICOM file bytes a STOW-RS request carries (:meth:`DicomWeb.store`)."""
    import pydicom

    with io.BytesIO() as buffer:
        pydicom.dcmwrite(buffer, dataset)
        return buffer.getvalue()
