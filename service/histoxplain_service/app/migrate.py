"""The ``histoxplain migrate`` command: local-mode indexes of earlier versions into qdrant-edge.

``histoxplain migrate [--index NAME]... [--keep-source] [--data-dir DIR]`` moves every index
(or the named ones) of ``<data_dir>/qdrant`` into the embedded engine under ``<data_dir>/edge``,
verifies each copy and only then removes the local-mode collection (kept with
``--keep-source``). How it never loses data: :mod:`histoxplain_service.index.migrate`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from histoxplain_service.config import Settings
from histoxplain_service.index.edge import EdgeEngine
from histoxplain_service.index.migrate import MigrationReport, migrate_local_indexes

__all__ = ["add_migrate_parser", "cmd_migrate"]


def add_migrate_parser(commands: argparse._SubParsersAction) -> None:
    migrate = commands.add_parser(
        "migrate", help="move indexes of the local-mode store (earlier versions) into the embedded engine"
    )
    migrate.add_argument("--index", action="append", metavar="NAME", dest="indexes",
                         help="only this index (repeat for several; default: every local-mode index)")
    migrate.add_argument("--keep-source", action="store_true",
                         help="keep the local-mode copy after the verified migration")
    migrate.add_argument("--data-dir", type=Path, help="where indexes live (default: $HISTOXPLAIN_DATA or ./histoxplain-data)")
    migrate.set_defaults(func=cmd_migrate)


def _line(report: MigrationReport) -> str:
    what = "verified again" if report.resumed else "copied and verified"
    source = "local-mode copy removed" if report.source_removed else "local-mode copy kept"
    line = (f"index {report.name}: {report.points} tiles of {report.images} image(s) ({report.preset}, "
            f"{report.dim}-d) {what}; {source}")
    if report.tiles_missing:
        line += f"; {report.tiles_missing} tile(s) had no stored pixels before the migration"
    return line


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = Settings.from_env(os.environ)
    if args.data_dir is not None:
        settings = settings.with_changes(data_dir=args.data_dir)
    engine = EdgeEngine(settings)
    try:
        reports = migrate_local_indexes(
            settings, engine, args.indexes, keep_source=args.keep_source, on_done=lambda r: print(_line(r))
        )
    finally:
        engine.close()
    if not reports:
        print("nothing to migrate: the local-mode store holds no index")
    return 0
