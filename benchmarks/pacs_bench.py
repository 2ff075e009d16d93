"""PACS benchmark (issue 11, requirement 7): reading tiles over DICOMweb, and a region search +
explanation + storing the results, against the same work on local files, in one run.

Set-up: a real Orthanc (DICOMweb + whole-slide plugins, authentication on; in a private network
namespace when run as root), the demo's CC0 H&E slide converted to DICOM 11 times (a query slide
and 10 cases, each its own study and patient) and stored by STOW-RS, indexed at pyramid level 1
with the default preset in-process (1 torch thread). The local twin of that index holds the same
tiles with their pixels copied (PNG tile store), and the local query is read from the DICOM
files on disk with wsidicom: the two ways differ only in where pixels come from and in the
results being stored.

Measured (rounds interleaved, local then PACS, so a change in the machine's speed hits both):
  tile read        one 224 px region at level 0 at a new place: over DICOMweb (WADO-RS frames in
                   the stored transfer syntax, wsidicom's frame caches cleared before each read),
                   from the local DICOM files (wsidicom, caches cleared) and from the SVS (tiffslide)
  region search    explain_region: read a 224 px region at level 1 (another tissue tile each
                   round), rank the indexed slides (k = 10 cases), Grad-CAM of the region against
                   each case's best tile (the hits' tiles re-read from the PACS); "+ store":
                   also build the Parametric Map, SR and KOS and STOW-RS them, synchronously (built
                   once the heatmap is there, one STOW-RS request), or in the background (a BackgroundWriter:
                   "response" is the call's latency, the objects' UIDs queued; "in the PACS" is
                   the time from the call until the writer has stored them; the next round
                   starts after that). Local: the same read, ranking and explanation with local
                   pixels, nothing stored. Before each of these ways wsidicom's frame caches are
                   emptied, so each reads the region's frames and the cases' tiles from the PACS
                   (a viewer's first question about a region). "frames cached": the same region
                   asked again right after, reading only and with a background store.

    .venv/bin/python benchmarks/pacs_bench.py [--rounds 10] [--reads 200] [--no-write]

Prints a table (p50 and p90, ms) and the ratios PACS / local for the region search (target
<= 1.3), and writes them under "## PACS (DICOMweb)" in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch

torch.set_num_threads(1)

from histoxplain_model.encoders import load_encoder  # noqa: E402
from histoxplain_service.app.samples import he_slide_path  # noqa: E402
from histoxplain_service.backends.embedded import EmbeddedBackend  # noqa: E402
from histoxplain_service.bootstrap import open_index_engine  # noqa: E402
from histoxplain_service.config import Settings  # noqa: E402
from histoxplain_service.domain.ingest import ImageSource, index_sources  # noqa: E402
from histoxplain_service.domain.ranking import rank_images  # noqa: E402
from histoxplain_service.domain.retrieval import Retrieval  # noqa: E402
from histoxplain_service.domain.types import DicomReference  # noqa: E402
from histoxplain_service.pacs.connection import PacsConnection  # noqa: E402
from histoxplain_service.pacs.dicomize import DicomizedSlide, dicomize  # noqa: E402
from histoxplain_service.pacs.dicomweb import DicomWeb  # noqa: E402
from histoxplain_service.pacs.explain import Region, explain_region  # noqa: E402
from histoxplain_service.pacs.indexing import index_dicom  # noqa: E402
from histoxplain_service.pacs.orthanc import OrthancProcess, private_network_available  # noqa: E402
from histoxplain_service.pacs.results import warm_up  # noqa: E402
from histoxplain_service.pacs.slides import DicomWebSource, dicom_image_id, dicom_source  # noqa: E402
from histoxplain_service.pacs.writeback import BackgroundWriter  # noqa: E402
from results_md import write_section  # noqa: E402

K = 10
LEVEL = 1
TILE = 224
SYNCHRONOUS = "PACS + store 3 objects, synchronous"
BACKGROUND = "PACS + store 3 objects in the background: response"
IN_PACS = "PACS + store 3 objects in the background: in the PACS"
CACHED = "PACS, frames cached"
BACKGROUND_CACHED = "PACS + store in the background: response, frames cached"
WAYS = ("local", "PACS", SYNCHRONOUS, BACKGROUND, IN_PACS, CACHED, BACKGROUND_CACHED)


class _LocalCopy:
    """A DICOM slide level whose tiles the index copies (no ``dicom`` reference): the local twin."""

    def __init__(self, source: DicomWebSource) -> None:
        self._source = source
        self.image_id, self.source, self.label = source.image_id, source.source, source.label
        self.level, self.mpp, self.downsample = source.level, source.mpp, source.downsample
        self.width, self.height, self.metadata = source.width, source.height, source.metadata
        self.dicom: DicomReference | None = None

    def thumbnail(self, max_side: int) -> np.ndarray:
        return self._source.thumbnail(max_side)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._source.read(x, y, w, h)

    def close(self) -> None:
        self._source.close()


def _percentiles(samples: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1000, ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000


def _timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _setup_slides(pacs: DicomWeb, work: Path, count: int) -> list[DicomizedSlide]:
    slides = []
    for number in range(count):
        slide = dicomize(
            he_slide_path(), work / f"slide-{number}", patient_id=f"BENCH-{number:02d}", patient_name=f"Bench^P{number:02d}"
        )
        pacs.store([pydicom.dcmread(path) for path in slide.files], slide.study_uid)
        slides.append(slide)
    return slides


def _tile_reads(pacs: DicomWeb, slide: DicomizedSlide, reads: int) -> dict[str, list[float]]:
    import tiffslide
    from wsidicom import WsiDicom

    rng = np.random.default_rng(0)
    web = pacs.open_slide(slide.study_uid, slide.series_uid)
    local = WsiDicom.open(slide.files[0].parent)
    svs = tiffslide.TiffSlide(he_slide_path())
    width, height = web.size(0)
    times: dict[str, list[float]] = {"DICOMweb": [], "local DICOM": [], "local SVS": []}
    try:
        for _ in range(reads):
            x, y = int(rng.integers(0, width - TILE)), int(rng.integers(0, height - TILE))
            local.clear_cache()
            times["local DICOM"].append(_timed(lambda: local.read_region((x, y), 0, (TILE, TILE))))
            times["local SVS"].append(_timed(lambda: svs.read_region((x, y), 0, (TILE, TILE))))
            web._wsi.clear_cache()  # noqa: SLF001 -- a new place each time: nothing cached
            times["DICOMweb"].append(_timed(lambda: web.read(0, x, y, TILE, TILE)))
    finally:
        web.close()
        local.close()
        svs.close()
    return times


def _drop_frame_caches(pacs: DicomWeb) -> None:
    """Empty wsidicom's frame caches of the slides ``pacs`` keeps open (the query's and the cases')."""
    for slide in list(pacs._open.values()):  # noqa: SLF001 -- a benchmark's reach into the reader
        slide._wsi.clear_cache()  # noqa: SLF001


def _local_search(retrieval: Retrieval, index: str, wsi: Any, query_id: str, box: tuple[int, int, int, int]) -> Any:
    """What explain_region does, with local pixels and nothing stored."""
    x, y, w, h = box
    image = np.asarray(wsi.read_region((x, y), LEVEL, (w, h)).convert("RGB"), dtype=np.uint8)
    vectors = retrieval.backend.embed(retrieval.query_tiles(image))
    ranked = rank_images(retrieval.searchable(index), vectors, K + 1)
    cases = [hit for hit in ranked if hit.image_id != query_id][:K]
    tiles = [max(case.tiles, key=lambda tile: tile.score) for case in cases]
    return retrieval.explain_hits(index, image, tiles, "gradcam", "similar", "query")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed region searches per way (after 2 warm-ups)")
    parser.add_argument("--reads", type=int, default=200, help="timed tile reads per way")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md as it is")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pacs-bench-"))
    private = private_network_available()
    orthanc = OrthancProcess(work / "orthanc", private_network=private)
    orthanc.start()
    backend = EmbeddedBackend(load_encoder("efficientnet-lite0-imagenet"))
    try:
        with orthanc.network():
            connection = PacsConnection(orthanc.dicomweb_url, orthanc.config.user, orthanc.config.password)
            pacs = DicomWeb(connection)
            settings = Settings.from_env().with_changes(data_dir=work / "data", min_tissue=0.25)
            engine = open_index_engine(settings)
            retrieval = Retrieval(settings, backend, engine, dicom_tiles=pacs.read_tile)
            started = time.perf_counter()
            slides = _setup_slides(pacs, work / "dicom", K + 1)
            setup_s = time.perf_counter() - started
            started = time.perf_counter()
            for slide in slides:
                index_dicom(retrieval, "pacs", pacs, slide.study_uid, level=LEVEL)
            index_s = time.perf_counter() - started

            def local_opener(slide: DicomizedSlide) -> Callable[[], ImageSource]:
                return lambda: _LocalCopy(
                    DicomWebSource(pacs.open_slide(slide.study_uid, slide.series_uid), LEVEL, settings.tile_size)
                )

            index_sources(
                [(dicom_source(s.study_uid, s.series_uid), local_opener(s)) for s in slides], retrieval.index("local"),
                retrieval.backend.embed, settings, preset=retrieval.model.preset, dim=retrieval.model.embedding_dim,
            )
            query = slides[0]
            query_id = dicom_image_id(query.study_uid, query.series_uid)
            records, _ = retrieval.index("pacs").image_tiles(query_id)
            # a different tissue tile of the query slide each round (the same one for every way)
            boxes = [records[i].box for i in np.linspace(0, len(records) - 1, args.rounds + 2).round().astype(int)]
            from wsidicom import WsiDicom

            local_query = WsiDicom.open(query.files[0].parent)

            reads = _tile_reads(pacs, query, args.reads)
            warm_up()  # as the gateway does at start
            writer = BackgroundWriter()
            searches: dict[str, list[float]] = {way: [] for way in WAYS}
            for round_number, box in enumerate(boxes):
                region = Region(box.x, box.y, box.w, box.h)
                level_box = (box.x // 2, box.y // 2, TILE, TILE)  # level 1 is level 0 halved
                local_query.clear_cache()
                times = {"local": _timed(lambda: _local_search(retrieval, "local", local_query, query_id, level_box))}

                def background(response: str = BACKGROUND, in_pacs: str | None = IN_PACS) -> None:
                    started = time.perf_counter()
                    explain_region(
                        retrieval, "pacs", pacs, query.study_uid, query.series_uid, region, level=LEVEL, k=K,
                        store=True, writer=writer,
                    )
                    times[response] = time.perf_counter() - started
                    if not writer.wait_idle(60):
                        raise RuntimeError("the background store did not finish within 60 s")
                    if in_pacs is not None:
                        times[in_pacs] = time.perf_counter() - started

                pacs_ways: list[tuple[str, Callable[[], Any]]] = [
                    ("PACS", lambda: explain_region(
                        retrieval, "pacs", pacs, query.study_uid, query.series_uid, region, level=LEVEL, k=K
                    )),
                    (SYNCHRONOUS, lambda: explain_region(
                        retrieval, "pacs", pacs, query.study_uid, query.series_uid, region, level=LEVEL, k=K, store=True
                    )),
                    (BACKGROUND, background),
                ]
                for way, run in pacs_ways:
                    _drop_frame_caches(pacs)  # each way reads the region and the cases' tiles from the PACS
                    if way == BACKGROUND:
                        run()
                    else:
                        times[way] = _timed(run)
                # the region asked about again: its frames and the cases' tiles are in wsidicom's caches
                times[CACHED] = _timed(pacs_ways[0][1])
                background(BACKGROUND_CACHED, None)
                if round_number >= 2:
                    for way, seconds in times.items():
                        searches[way].append(seconds)
            local_query.close()
            counts = writer.close(10.0)
            if counts.failed or counts.stored != 2 * len(boxes):
                raise RuntimeError(f"background stores: {counts}")
            engine.close()
            pacs.close()
    finally:
        backend.close()
        orthanc.stop()

    lines = [
        "## PACS (DICOMweb)",
        "",
        f"`benchmarks/pacs_bench.py`: Orthanc 1.10 (Debian) on loopback{' in a private network namespace' if private else ''}, "
        f"{platform.machine()}, {os.cpu_count()} cores, 1 torch thread, efficientnet-lite0-imagenet in-process; "
        f"{K + 1} DICOM copies of the demo slide (set up {setup_s:.1f} s, indexed at level {LEVEL} in {index_s:.1f} s).",
        "",
        "| what | way | p50 ms | p90 ms | n |",
        "|---|---|---:|---:|---:|",
    ]
    for way, samples in reads.items():
        p50, p90 = _percentiles(samples)
        lines.append(f"| 224 px tile read, new place | {way} | {p50:.1f} | {p90:.1f} | {len(samples)} |")
    for way, samples in searches.items():
        p50, p90 = _percentiles(samples)
        lines.append(f"| region search + Grad-CAM k={K} | {way} | {p50:.0f} | {p90:.0f} | {len(samples)} |")
    local = statistics.median(searches["local"])

    def ratio(way: str) -> str:
        return f"{statistics.median(searches[way]) / local:.2f}x"

    lines += [
        "",
        f"PACS / local (region search, p50; target <= 1.3x): {ratio('PACS')} reading only; with the 3 objects "
        f"built and stored synchronously {ratio(SYNCHRONOUS)}; stored in the background {ratio(BACKGROUND)} "
        f"for the response, {ratio(IN_PACS)} until they are in the PACS. With the frames cached: "
        f"{ratio(CACHED)} reading only, {ratio(BACKGROUND_CACHED)} for the background store's response.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        print(f"written to {write_section(text)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
