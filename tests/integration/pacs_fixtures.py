"""Fixtures for the PACS tests: a real Orthanc, and the demo's CC0 H&E slide stored in it as DICOM.

Import them into a test module (``from pacs_fixtures import orthanc, stored_slides  # noqa: F401``).

``orthanc`` (module) -> RunningOrthanc
    Orthanc (Debian, DICOMweb + whole-slide plugins) on free loopback ports, authentication on,
    storage in a temporary folder, stopped after the module. As root (this project's test
    machines) it runs in a private network namespace with only loopback, and the module's tests
    run inside it (the main thread joins it for the module: see
    :meth:`~histoxplain_service.pacs.orthanc.OrthancProcess.network`), so nothing else on the
    machine can reach it; without ``unshare -n`` it runs on the host's loopback, where
    ``RemoteAccessAllowed: false`` and the credentials keep others out.

``pacs`` (module) -> DicomWeb
    The DICOMweb client of ``orthanc`` (closed after the module).

``stored_slides`` (module) -> dict[str, StoredSlide]
    The demo slide converted to DICOM twice (:func:`~histoxplain_service.pacs.dicomize.dicomize`)
    and stored by STOW-RS as two studies of two patients: ``"query"`` and ``"case"``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from histoxplain_service.pacs.connection import PacsConnection
from histoxplain_service.pacs.dicomweb import DicomWeb
from histoxplain_service.pacs.orthanc import OrthancConfig, OrthancProcess, private_network_available

log = logging.getLogger(__name__)

PATIENTS = {"query": ("HX-TEST-PATIENT-A", "Test^PatientA"), "case": ("HX-TEST-PATIENT-B", "Test^PatientB")}


@dataclass(frozen=True)
class RunningOrthanc:
    process: OrthancProcess
    connection: PacsConnection
    private_network: bool


@dataclass(frozen=True)
class StoredSlide:
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_id: str
    files: tuple[Path, ...]


def require_orthanc() -> None:
    """.ci/run installs Orthanc (.ci/apt-packages.txt), so its absence is a set-up error, not a skip."""
    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        pytest.fail("the PACS tests need Orthanc: apt-get install orthanc orthanc-dicomweb orthanc-wsi (.ci/run does this)")


@contextmanager
def running_orthanc(
    work_dir: Path, config: OrthancConfig | None = None, *, private_network: bool = True
) -> Iterator[RunningOrthanc]:
    """Orthanc started in ``work_dir`` (with ``config``, default: OrthancProcess's), the calling
    thread in its network namespace until the block ends; stopped afterwards.

    ``private_network=False``: on the host's loopback even where a private namespace exists
    (``RemoteAccessAllowed: false`` and HTTP authentication still on). The modules that talk to
    an in-process gRPC gateway need it: gRPC makes its connections from its own threads, which
    stay in whatever namespace they were created in (often before the module, by an earlier
    test), so a gateway inside the namespace is unreachable from them at random.
    """
    require_orthanc()
    private = private_network and private_network_available()
    if private_network and not private:
        log.warning("no private network namespace here (needs root and unshare): Orthanc runs on loopback")
    process = OrthancProcess(work_dir, config, private_network=private)
    process.start()
    try:
        connection = PacsConnection(process.dicomweb_url, process.config.user, process.config.password, 30.0)
        with process.network():
            yield RunningOrthanc(process, connection, private)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOrthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as running:
        yield running


@pytest.fixture(scope="module")
def loopback_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOrthanc]:
    """The module's Orthanc on the host's loopback, for modules with an in-process gRPC gateway
    (see :func:`running_orthanc`)."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), private_network=False) as running:
        yield running


@pytest.fixture(scope="module")
def pacs(orthanc: RunningOrthanc) -> Iterator[DicomWeb]:
    """The module's Orthanc as a :class:`~histoxplain_service.pacs.dicomweb.DicomWeb`."""
    connection = DicomWeb(orthanc.connection)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def stored_slides(orthanc: RunningOrthanc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, StoredSlide]:
    import pydicom

    from histoxplain_service.app.samples import he_slide_path
    from histoxplain_service.pacs.dicomize import dicomize

    slides = {}
    pacs = DicomWeb(orthanc.connection)
    try:
        for role, (patient_id, patient_name) in PATIENTS.items():
            written = dicomize(
                he_slide_path(), tmp_path_factory.mktemp(f"dicom-{role}"), patient_id=patient_id,
                patient_name=patient_name,
            )
            pacs.store([pydicom.dcmread(path) for path in written.files], written.study_uid)
            slides[role] = StoredSlide(
                written.study_uid, written.series_uid, written.frame_of_reference_uid, patient_id, written.files
            )
    finally:
        pacs.close()
    return slides
