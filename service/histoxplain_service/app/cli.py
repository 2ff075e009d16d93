"""The ``histoxplain`` command line: index, search, explain, demo, evaluate.

Errors the user can fix print one line (``histoxplain: error: ...``) and exit non-zero:
2 for bad input, 3 for a missing index or image, 4 for a refused operation (e.g. another
encoder), 5 for an unavailable dependency. Nothing is half-written: reports are assembled
aside and moved into place, and indexing can be re-run to finish an interrupted job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from histoxplain_model.errors import HistoxplainError, InvalidRequest
from histoxplain_model.imageio import read_image
from histoxplain_model.options import SmoothGradOptions
from histoxplain_model.vocabulary import (
    DEFAULT_POLARITY,
    DEFAULT_PRESET,
    DEFAULT_SIDE,
    METHOD_NAMES,
    POLARITIES,
    SIDES,
    check_name,
)
from histoxplain_service.app.demo import run_demo
from histoxplain_service.app.dicom_cli import add_dicom_arguments, cmd_explain_dicom, cmd_index_dicom, dicom_requested
from histoxplain_service.app.migrate import add_migrate_parser
from histoxplain_service.app.pacs_watch import add_pacs_watch_parser
from histoxplain_service.app.report import write_report
from histoxplain_service.app.rise_args import add_rise_arguments, rise_options_from_args
from histoxplain_service.app.correspondence_args import add_correspondence_arguments, print_correspondences
from histoxplain_service.app.verify_args import add_verify_argument, print_faithfulness
from histoxplain_service.bootstrap import open_index_engine, opened_retrieval
from histoxplain_service.config import Settings
from histoxplain_service.domain.retrieval import check_k
from histoxplain_service.domain.types import INTEGER_FILTER_KEYS, TileFilter
from histoxplain_service.evaluation.command import add_evaluate_parser

log = logging.getLogger("histoxplain")



def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where indexes live (default: $HISTOXPLAIN_DATA or ./histoxplain-data)")
    parser.add_argument("--model", help=f"encoder preset (default: $HISTOXPLAIN_MODEL or {DEFAULT_PRESET})")
    parser.add_argument("--weights", type=Path, help="local weights file for presets that need one")


def _index_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, metavar="NAME", help="index name (letters, digits, - and _)")


def _explain_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--polarity", choices=POLARITIES, default=DEFAULT_POLARITY,
                        help="explain what makes the images similar (default) or dissimilar")
    parser.add_argument("--side", choices=SIDES, default=DEFAULT_SIDE,
                        help="explain the query, the retrieved images, or both (default)")


def _filter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                        help="search only tiles whose payload KEY (label, source, image_id, level, or a key the "
                             "ingest stored) equals VALUE; repeatable: different keys must all match, the same "
                             "key twice accepts either value")


def tile_filter_from_args(items: Sequence[str]) -> TileFilter | None:
    """``["label=TUM", "organ=skin", "organ=colon"]`` -> label TUM and organ skin or colon."""
    values: dict[str, list[str | int]] = {}
    for position, item in enumerate(items, start=1):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            # named by position only: the value may carry patient data
            raise InvalidRequest(f"--filter number {position} is not KEY=VALUE (e.g. --filter label=TUM)")
        if key in INTEGER_FILTER_KEYS:
            try:
                values.setdefault(key, []).append(int(value))
            except ValueError:
                raise InvalidRequest(f"--filter number {position}: {key!r} holds integers; give one") from None
        else:
            values.setdefault(key, []).append(value)
    return TileFilter.from_mapping(values) if values else None


def metadata_from_args(items: Sequence[str]) -> dict[str, str]:
    """``["organ=colon", "stain=HE"]`` -> ``{"organ": "colon", "stain": "HE"}`` (checked when indexing)."""
    metadata: dict[str, str] = {}
    for position, item in enumerate(items, start=1):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or key.strip() in metadata:
            # named by position only: the value may carry patient data
            raise InvalidRequest(f"--metadata number {position} is not KEY=VALUE with a new KEY (e.g. --metadata organ=colon)")
        metadata[key.strip()] = value
    return metadata


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="histoxplain",
        description="Find similar histopathology images and show why they are similar.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    index = commands.add_parser("index", help="index images, folders and whole-slide files")
    index.add_argument("paths", nargs="*", metavar="PATH",
                       help="image files, folders (labels from sub-folder names) or slides; or a DICOM study below")
    _index_option(index)
    _common(index)
    index.add_argument("--label", help="label for files named directly (folders use sub-folder names)")
    index.add_argument("--tile-size", type=_positive_int, help="tile edge in pixels (default 224)")
    index.add_argument("--stride", type=_positive_int, help="step between tiles (default: the tile size)")
    index.add_argument("--level", type=int, help="pyramid level read from whole-slide files (default 0)")
    index.add_argument("--min-tissue", type=float, help="fraction of tissue a tile needs (default 0.25)")
    index.add_argument("--no-progress", action="store_true", help="no progress bars")
    index.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                       help="a descriptive field stored with every tile of these images (e.g. organ=colon, "
                            "stain=HE), returned on hits and searchable with --filter KEY=VALUE; repeatable, "
                            "at most 16")
    add_dicom_arguments(index, region=False)
    index.set_defaults(func=cmd_index)

    search = commands.add_parser("search", help="find the indexed tiles (or images) most similar to an image")
    search.add_argument("image", type=Path, metavar="IMAGE")
    _index_option(search)
    search.add_argument("-k", type=int, default=5, help="number of hits (default 5)")
    search.add_argument("--images", action="store_true", help="rank whole images (tiles combined) instead of tiles")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    _filter_option(search)
    _common(search)
    search.set_defaults(func=cmd_search)

    explain = commands.add_parser("explain", help="search, then write heatmaps of why each hit matches")
    explain.add_argument("image", type=Path, nargs="?", metavar="IMAGE", help="the query image (or a DICOM region below)")
    _index_option(explain)
    explain.add_argument("-k", type=int, default=5, help="number of hits (default 5)")
    _filter_option(explain)
    explain.add_argument("--method", required=True, help=f"one of {', '.join(METHOD_NAMES)}")
    _explain_options(explain)
    explain.add_argument("--samples", type=int, metavar="N",
                         help="SmoothGrad only: noisy copies per image, 1 to 256 (default 25)")
    explain.add_argument("--noise", type=float, metavar="SIGMA",
                         help="SmoothGrad only: noise std as a fraction of the image's value range, "
                              "in (0, 1] (default 0.15)")
    add_rise_arguments(explain)
    add_correspondence_arguments(explain)
    add_verify_argument(explain)
    explain.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for overlay PNGs and index.html")
    _common(explain)
    add_dicom_arguments(explain, region=True)
    explain.set_defaults(func=cmd_explain)

    info = commands.add_parser("info", help="describe the indexes and the model")
    info.add_argument("--index", metavar="NAME", help="only this index")
    _common(info)
    info.set_defaults(func=cmd_info)

    delete = commands.add_parser("delete", help="delete images (all their tiles) from an index")
    delete.add_argument("image_ids", nargs="+", metavar="IMAGE_ID")
    _index_option(delete)
    _common(delete)
    delete.set_defaults(func=cmd_delete)

    demo = commands.add_parser("demo", help="index, search and explain the real sample histology; write a report")
    demo.add_argument("--out", type=Path, required=True, metavar="DIR")
    demo.add_argument("--server", metavar="ADDRESS", help="run through a running gateway (host:port) instead of in-process")
    _common(demo)
    demo.set_defaults(func=cmd_demo)

    add_evaluate_parser(commands)
    add_migrate_parser(commands)
    add_pacs_watch_parser(commands)
    return parser


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Environment first, then flags (flags win)."""
    settings = Settings.from_env(os.environ if environ is None else environ)
    overrides = {
        "data_dir": getattr(args, "data_dir", None),
        "model": getattr(args, "model", None),
        "weights": getattr(args, "weights", None),
        "tile_size": getattr(args, "tile_size", None),
        "stride": getattr(args, "stride", None),
        "slide_level": getattr(args, "level", None),
        "min_tissue": getattr(args, "min_tissue", None),
    }
    changes = {key: value for key, value in overrides.items() if value is not None}
    return settings.with_changes(**changes) if changes else settings


def cmd_index(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if dicom_requested(args):
        return cmd_index_dicom(args, settings)
    if not args.paths:
        raise InvalidRequest("give the files or folders to index (PATH ...), or a DICOM study (--dicomweb URL --study UID)")
    metadata = metadata_from_args(args.metadata)
    with opened_retrieval(settings) as retrieval:
        summary = retrieval.index_paths(
            args.index, args.paths, label=args.label, show_progress=not args.no_progress, metadata=metadata
        )
    print(
        f"index {summary.index}: {summary.images_indexed} image(s) indexed ({summary.tiles_indexed} tiles), "
        f"{summary.images_unchanged} already indexed, {len(summary.skipped)} skipped"
    )
    for skipped in summary.skipped:
        print(f"  skipped {skipped.source}: {skipped.reason}", file=sys.stderr)
    if summary.skipped and not summary.images:
        return 2
    return 0


def _read_query(path: Path, settings: Settings) -> np.ndarray:
    return read_image(path, settings.max_pixels)


def _hit_json(hit) -> dict:
    return {
        "score": round(float(hit.score), 6),
        "image_id": hit.image_id,
        "point_id": hit.point_id,
        "label": hit.label,
        "source": hit.source,
        "box": asdict(hit.box),
        "level": hit.level,
        "mpp": hit.mpp,
        "metadata": dict(hit.metadata),
    }


def cmd_search(args: argparse.Namespace) -> int:
    check_k(args.k)
    tile_filter = tile_filter_from_args(args.filter)
    settings = settings_from_args(args)
    image = _read_query(args.image, settings)
    with opened_retrieval(settings) as retrieval:
        if args.images:
            image_hits = retrieval.search_images(args.index, image, args.k, tile_filter=tile_filter)
            rows = [
                {"score": round(hit.score, 6), "image_id": hit.image_id, "label": hit.label, "source": hit.source,
                 "box": asdict(hit.tiles[0].box), "tiles": [_hit_json(tile) for tile in hit.tiles]}
                for hit in image_hits
            ]
        else:
            rows = [_hit_json(hit) for hit in retrieval.search(args.index, image, args.k, tile_filter=tile_filter)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for rank, row in enumerate(rows, start=1):
            box = row["box"]
            print(f"{rank:3d}  {row['score']:.4f}  {row['label'] or '-':<20} {row['source']} "
                  f"[{box['x']},{box['y']} {box['w']}x{box['h']}]")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    check_k(args.k)
    check_name("method", args.method, METHOD_NAMES)
    rise_options = rise_options_from_args(args.method, args)  # both checked: a flag of another method fails
    options = smoothgrad_options(args.method, args.samples, args.noise) or rise_options
    tile_filter = tile_filter_from_args(args.filter)
    settings = settings_from_args(args)
    if dicom_requested(args):
        return cmd_explain_dicom(args, settings, options, tile_filter)
    if args.image is None:
        raise InvalidRequest("give a query IMAGE, or a DICOM region (--dicomweb URL --study UID --series UID --region X,Y,W,H)")
    image = _read_query(args.image, settings)
    with opened_retrieval(settings) as retrieval:
        explained = retrieval.search_and_explain(
            args.index, image, args.k, args.method, args.polarity, args.side, options=options, tile_filter=tile_filter,
            target=args.target, correspondences=args.correspondences, verify=args.verify,
        )
    page = write_report(
        [explained], args.out, title=f"histoxplain: {args.image.name} against index {args.index}",
        notes=[f"encoder: {retrieval.model.preset}", f"index: {args.index}", f"query: {args.image}"],
    )
    print_correspondences(explained, as_json=args.json)
    print_faithfulness(explained, as_json=args.json)
    print(f"wrote {page}")
    return 0


def smoothgrad_options(method: str, samples: int | None, noise: float | None) -> SmoothGradOptions | None:
    """``--samples`` / ``--noise`` as method options; refused for any method but SmoothGrad
    (the flags would otherwise be silently ignored)."""
    if samples is None and noise is None:
        return None
    if method != "smoothgrad":
        raise InvalidRequest(f"--samples and --noise apply to --method smoothgrad only, not {method}; drop them")
    defaults = SmoothGradOptions()
    try:
        return SmoothGradOptions(
            n_samples=defaults.n_samples if samples is None else samples,
            sigma=defaults.sigma if noise is None else noise,
        )
    except InvalidRequest as error:
        flag = "--samples" if samples is not None and "n_samples" in str(error) else "--noise"
        raise InvalidRequest(f"{flag}: {error}") from None


def cmd_info(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    with contextlib.closing(open_index_engine(settings)) as engine:
        infos = [engine.open_index(args.index).describe()] if args.index else engine.list_indexes()
    print(json.dumps([asdict(info) for info in infos], indent=2))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    with contextlib.closing(open_index_engine(settings)) as engine:
        removed = engine.open_index(args.index).delete(args.image_ids)
    print(f"deleted {removed} tile(s) of {len(args.image_ids)} image(s) from {args.index}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    page = run_demo(settings, args.out, server=args.server)
    print(f"wrote {page}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ImportError:
        pass
    try:
        return int(args.func(args))
    except HistoxplainError as exc:
        print(f"histoxplain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("histoxplain: interrupted; re-run the same command to finish (indexing resumes)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
