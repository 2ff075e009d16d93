"""The PACS side of histoxplain: DICOM whole-slide images read over DICOMweb, results written back.

In a hospital the slides live in the PACS as DICOM VL Whole Slide Microscopy series (Supplement
145) and the PACS is the system of record for their pixels; results go back into the study as
DICOM, so the viewer the pathologist already uses shows them. The modules, bottom up:

* :mod:`.connection`: where the PACS is, its credentials (from settings or a secret file) and
  timeouts, and the one place PACS failures become histoxplain errors.
* :mod:`.slides`: a slide series opened with wsidicom over DICOMweb (WADO-RS frames in the
  transfer syntax the PACS stores), and one level of it as an
  :class:`~histoxplain_service.domain.ingest.ImageSource` for the indexing loop.
* :mod:`.dicomweb`: :class:`.dicomweb.DicomWeb`, one PACS: QIDO-RS look-ups, STOW-RS, the slides
  kept open, and the re-reading of hits' tiles for explanations (the index keeps no pixels of
  DICOM tiles).
* :mod:`.indexing`: index a series or a whole study at a chosen pyramid level.
* :mod:`.results`: the objects written back, built with highdicom: a Parametric Map of the
  query region's heatmap, a Comprehensive 3D SR (TID 1500) with one measurement group per
  similar case, a Key Object Selection of the similar slides, and optionally a Secondary
  Capture of the heatmap blended over the region.
* :mod:`.explain`: :func:`.explain.explain_region`, search and explain a region of a slide and
  optionally store the results in the query's study.
* :mod:`.orthanc` and :mod:`.dicomize`: a real Orthanc for tests and users, and the demo's
  slide converted to DICOM.
* :mod:`.orthanc_trigger`: the Orthanc Python-plugin script that indexes every study that becomes
  stable through the gateway's ``IndexDicom`` (stdlib and the SDK only: it runs in Orthanc).
* :mod:`.watch`: the same for other PACS, by polling QIDO-RS (``histoxplain pacs-watch``).

``docs/PACS.md`` describes the set-up, the objects and the settings. Modules here import
wsidicom, dicomweb-client and highdicom; nothing outside this package does, except the
composition root (:mod:`histoxplain_service.bootstrap`) when a PACS is configured.
"""
