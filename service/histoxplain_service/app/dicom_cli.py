"""DICOM slides on the command line: ``histoxplain index`` and ``histoxplain explain`` with ``--dicomweb``.

    histoxplain index --dicomweb URL --study UID [--series UID ...] --index NAME [--level N] [--label L]
    histoxplain explain --dicomweb URL --study UID --series UID (--region x,y,w,h | --region-mm x,y,w,h)
                        --index NAME --method M --out DIR [--level N] [-k K] [--store] ...

Both run the library in this process (this machine's model and index) against the PACS at
``URL`` (its DICOMweb root), with the credentials of ``HISTOXPLAIN_DICOMWEB_USER`` and
``HISTOXPLAIN_DICOMWEB_PASSWORD_FILE`` (or ``HISTOXPLAIN_DICOMWEB_PASSWORD``): credentials never
go on the command line, where other users of the machine can read them. ``--region`` is in
level-0 pixels, ``--region-mm`` in slide millimetres; ``--store`` writes the Parametric Map, SR
and Key Object Selection into the study (``--store-background``: on a background thread, the
command waiting for it, at most :data:`BACKGROUND_DRAIN_S`, before it ends). The gateway offers the same as the IndexDicom and
ExplainDicomRegion RPCs (``docs/PACS.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from histoxplain_model.errors import DependencyUnavailable, InvalidRequest
from histoxplain_model.limits import check_pyramid_level, check_uid
from histoxplain_service.bootstrap import embedded_backend, open_index_engine
from histoxplain_service.config import Settings
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.domain.types import TileFilter

if TYPE_CHECKING:
    from histoxplain_service.pacs.dicomweb import DicomWeb

__all__ = ["add_dicom_arguments", "cmd_explain_dicom", "cmd_index_dicom", "dicom_requested"]

#: The most seconds ``--store-background`` waits, before the command ends, for the objects to be stored.
BACKGROUND_DRAIN_S = 120.0


def add_dicom_arguments(parser: argparse.ArgumentParser, *, region: bool) -> None:
    """The DICOM options of ``index`` (``region=False``) or ``explain`` (``region=True``)."""
    group = parser.add_argument_group(
        "DICOM slides in a PACS (credentials from HISTOXPLAIN_DICOMWEB_USER and HISTOXPLAIN_DICOMWEB_PASSWORD_FILE)"
    )
    group.add_argument("--dicomweb", metavar="URL", help="the PACS's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    group.add_argument("--study", metavar="UID", help="Study Instance UID of the slide(s)")
    if not region:
        group.add_argument("--series", action="append", default=[], metavar="UID",
                           help="Series Instance UID of a slide to index; repeatable (default: every slide of the study)")
        return
    group.add_argument("--series", metavar="UID", help="Series Instance UID of the query slide")
    group.add_argument("--region", metavar="X,Y,W,H", help="the query region in level-0 pixels")
    group.add_argument("--region-mm", metavar="X,Y,W,H", help="the query region in slide millimetres")
    group.add_argument("--level", type=int, help="pyramid level to read the region at (default 0)")
    group.add_argument("--ranking", choices=("image", "tile"), default="image",
                       help="one case per slide (default) or the best tiles")
    group.add_argument("--store", action="store_true",
                       help="write a Parametric Map, an SR and a Key Object Selection into the study")
    group.add_argument("--store-background", action="store_true",
                       help="like --store, but write them on a background thread while the report is written "
                            "(the command waits for it before it ends)")


def dicom_requested(args: argparse.Namespace) -> bool:
    """Whether the command names a DICOM slide (``--dicomweb`` or ``--study``) rather than files."""
    return bool(getattr(args, "dicomweb", None) or getattr(args, "study", None))


def _pacs_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    if not args.dicomweb or not args.study:
        raise InvalidRequest("a DICOM slide needs both --dicomweb URL and --study UID")
    if not args.dicomweb.startswith(("http://", "https://")):
        raise InvalidRequest("--dicomweb must be the http:// or https:// URL of the PACS's DICOMweb root")
    check_uid(args.study, "--study")
    return settings.with_changes(dicomweb_url=args.dicomweb.rstrip("/"))


@contextlib.contextmanager
def _opened(settings: Settings) -> Iterator[tuple[Retrieval, DicomWeb]]:
    """The PACS of ``settings`` and the in-process model and index engine, hits re-read from it;
    all closed when the command ends."""
    from histoxplain_service.pacs.dicomweb import DicomWeb

    pacs = DicomWeb.from_settings(settings)
    try:
        engine = open_index_engine(settings)
        try:
            yield Retrieval(settings, embedded_backend(settings), engine, dicom_tiles=pacs.read_tile), pacs
        finally:
            engine.close()
    finally:
        pacs.close()


def cmd_index_dicom(args: argparse.Namespace, settings: Settings) -> int:
    """``histoxplain index --dicomweb URL --study UID [--series UID ...]``."""
    from histoxplain_service.pacs.indexing import index_dicom

    if args.paths:
        raise InvalidRequest("give either files (PATH ...) or a DICOM study (--dicomweb, --study), not both")
    settings = _pacs_settings(args, settings)
    series = [check_uid(uid, f"--series number {position}") for position, uid in enumerate(args.series, start=1)]
    level = check_pyramid_level(args.level or 0, "--level")
    with _opened(settings) as (retrieval, pacs):
        summary = index_dicom(
            retrieval, args.index, pacs, args.study, series, level=level, label=args.label,
            show_progress=not args.no_progress,
        )
    print(
        f"index {summary.index}: {summary.images_indexed} slide series indexed ({summary.tiles_indexed} tiles) "
        f"at level {level}, {summary.images_unchanged} already indexed, {len(summary.skipped)} skipped"
    )
    for skipped in summary.skipped:
        print(f"  skipped {skipped.source}: {skipped.reason}", file=sys.stderr)
    if summary.stopped is not None:
        raise summary.stopped
    return 2 if summary.skipped and not summary.images else 0


def _region(text: str, flag: str, integers: bool) -> tuple[float, float, float, float]:
    parts = text.split(",")
    try:
        values = [int(part) if integers else float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or values[2] <= 0 or values[3] <= 0:
        kind = "whole level-0 pixels" if integers else "millimetres"
        raise InvalidRequest(f"{flag} is X,Y,W,H in {kind}, with W and H > 0 (e.g. {flag} 1000,2000,448,448)")
    return values[0], values[1], values[2], values[3]


def cmd_explain_dicom(
    args: argparse.Namespace, settings: Settings, options: object, tile_filter: TileFilter | None
) -> int:
    """``histoxplain explain --dicomweb URL --study UID --series UID --region x,y,w,h ...``;
    ``options`` (the method's) and ``tile_filter`` come from the flags, checked by the caller."""
    from histoxplain_service.app.report import write_report
    from histoxplain_service.pacs.explain import Region, explain_region
    from histoxplain_service.pacs.writeback import BackgroundWriter

    if args.image is not None:
        raise InvalidRequest("give either a query IMAGE or a DICOM region (--dicomweb, --study, --series, --region)")
    settings = _pacs_settings(args, settings)
    if not args.series:
        raise InvalidRequest("a DICOM region needs --series UID (the query slide)")
    check_uid(args.series, "--series")
    if (args.region is None) == (args.region_mm is None):
        raise InvalidRequest("give exactly one of --region X,Y,W,H (level-0 pixels) and --region-mm X,Y,W,H")
    if args.region is not None:
        region = Region(*_region(args.region, "--region", integers=True), unit="px")
    else:
        region = Region(*_region(args.region_mm, "--region-mm", integers=False), unit="mm")
    if args.side not in ("query", "both"):
        raise InvalidRequest("a DICOM region is explained on its own side: --side query or both")
    writer = BackgroundWriter() if args.store_background else None
    with _opened(settings) as (retrieval, pacs):
        result = explain_region(
            retrieval, args.index, pacs, args.study, args.series, region, level=check_pyramid_level(args.level or 0, "--level"),
            k=args.k, method=args.method, side=args.side, store=args.store or args.store_background,
            polarity=args.polarity, ranking=args.ranking, options=options, tile_filter=tile_filter,  # type: ignore[arg-type]
            writer=writer,
        )
        box = result.box
        page = write_report(
            [result.explanation], args.out, title=f"histoxplain: a region of a DICOM slide against index {args.index}",
            notes=[f"encoder: {retrieval.model.preset}", f"index: {args.index}",
                   f"region: {box.w}x{box.h} level-0 px at {box.x},{box.y}, read at level {result.level}"],
        )
        print(f"{len(result.explanation.hits)} similar case(s); the stored objects reference {result.referenced}")
        for item in result.stored:
            print(f"  {item.state} {item.kind}: series {item.series_uid} instance {item.instance_uid}")
        print(f"wrote {page}")
        if writer is not None and writer.close(BACKGROUND_DRAIN_S).failed:
            raise DependencyUnavailable("the results could not be stored in the PACS in the background; see the log")
    return 0
