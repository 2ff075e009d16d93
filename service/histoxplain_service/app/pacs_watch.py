"""The ``histoxplain pacs-watch`` command: index new slides of a PACS by polling QIDO-RS.

    histoxplain pacs-watch --index NAME --state FILE [--server HOST:PORT] [--level N]
                           [--interval SECONDS] [--max-studies N] [--max-series N] [--since YYYYMMDD] [--once]

The PACS is the one of ``HISTOXPLAIN_DICOMWEB_URL`` and its credentials. With ``--server`` the
series go to that gateway's ``IndexDicom`` (``--token-file``, ``--root-certificates`` or ``--tls``
as for any client); without it they are indexed in this process, with this machine's model and
index. SIGTERM or Ctrl-C stops it between series (an indexing run in this process stops within
one embedding batch and keeps what it finished). How a poll works: :mod:`histoxplain_service.pacs.watch`.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

from histoxplain_model.deadlines import deadline
from histoxplain_model.errors import (
    DependencyUnavailable,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from histoxplain_service.bootstrap import open_pacs, open_retrieval
from histoxplain_service.config import Settings
from histoxplain_service.domain.retrieval import Retrieval
from histoxplain_service.pacs.dicomweb import DicomWeb
from histoxplain_service.pacs.indexing import index_dicom
from histoxplain_service.pacs.watch import Indexer, PollResult, WatchState, poll_once, watch

__all__ = ["add_pacs_watch_parser", "cmd_pacs_watch", "gateway_indexer", "local_indexer"]


def _date(text: str) -> str:
    if len(text) != 8 or not text.isdigit():
        raise argparse.ArgumentTypeError("give a date as YYYYMMDD")
    return text


def add_pacs_watch_parser(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "pacs-watch", help="index new whole-slide series of a PACS by polling QIDO-RS (HISTOXPLAIN_DICOMWEB_URL)"
    )
    command.add_argument("--index", required=True, metavar="NAME", help="index name (letters, digits, - and _)")
    command.add_argument("--state", type=Path, required=True, metavar="FILE",
                         help="where what was indexed is remembered (created; keep it between runs)")
    command.add_argument("--server", metavar="ADDRESS", help="hand series to this gateway (host:port) instead of in-process")
    command.add_argument("--token-file", type=Path, help="file holding the gateway's bearer token")
    command.add_argument("--root-certificates", type=Path, metavar="PEM", help="CA of the gateway's certificate (TLS)")
    command.add_argument("--tls", action="store_true", help="TLS with the system's trusted CAs")
    command.add_argument("--level", type=int, default=0, help="pyramid level to index (default 0)")
    command.add_argument("--interval", type=float, default=60.0, metavar="SECONDS", help="between polls (default 60)")
    command.add_argument("--max-studies", type=int, default=200, help="studies examined per poll (default 200)")
    command.add_argument("--max-series", type=int, default=16, help="series indexed per poll (default 16)")
    command.add_argument("--since", type=_date, metavar="YYYYMMDD", help="only studies dated from this day on")
    command.add_argument("--once", action="store_true", help="poll once and exit")
    command.add_argument("--data-dir", type=Path, help="in-process only: where indexes live")
    command.set_defaults(func=cmd_pacs_watch)


def gateway_indexer(client: object, index: str, level: int) -> Indexer:
    """Series handed to the gateway's ``IndexDicom`` through the SDK ``client``; its errors become
    the histoxplain errors :func:`~histoxplain_service.pacs.watch.poll_once` sorts by."""
    import histoxplain_client as hc

    def index_series(study_uid: str, series_uids: Sequence[str]) -> None:
        try:
            client.index_dicom(index, study_uid, list(series_uids), level=level)  # type: ignore[attr-defined]
        except (hc.InvalidArgument, hc.NotFound) as error:
            raise (InvalidRequest if isinstance(error, hc.InvalidArgument) else NotFound)(error.details) from None
        except (hc.PermissionDenied, hc.Unauthenticated) as error:
            raise PermissionDenied(f"the gateway refused the watcher ({error.details}); check --token-file") from None
        except hc.FailedPrecondition as error:
            raise FailedPrecondition(error.details) from None
        except hc.ApiError as error:
            raise DependencyUnavailable(f"the gateway failed ({type(error).__name__}); check --server") from None

    return index_series


def local_indexer(retrieval: Retrieval, pacs: DicomWeb, index: str, level: int, stop: threading.Event) -> Indexer:
    """Series read from ``pacs`` and indexed in this process by ``retrieval``, stopping within
    one embedding batch once ``stop`` is set (Cancelled: the series is offered again)."""

    def index_series(study_uid: str, series_uids: Sequence[str]) -> None:
        with deadline(None, stop):
            summary = index_dicom(retrieval, index, pacs, study_uid, series_uids, level=level)
        if summary.stopped is not None:
            raise summary.stopped

    return index_series


def _print(result: PollResult) -> None:
    print(f"poll: {result.studies} studies examined, {result.series_indexed} series indexed, "
          f"{result.series_refused} refused, {result.series_waiting} waiting", flush=True)


def cmd_pacs_watch(args: argparse.Namespace) -> int:
    settings = Settings.from_env(os.environ)
    if args.data_dir is not None:
        settings = settings.with_changes(data_dir=args.data_dir)
    if args.level < 0 or args.max_studies < 1 or args.max_series < 1 or args.interval <= 0:
        raise InvalidRequest("--level must be >= 0, --max-studies and --max-series >= 1, --interval > 0")
    pacs = open_pacs(settings)
    if pacs is None:
        raise FailedPrecondition("no PACS is configured; set HISTOXPLAIN_DICOMWEB_URL to its DICOMweb URL")
    stop = threading.Event()
    client = None
    retrieval: Retrieval | None = None

    def on_signal(*_: object) -> None:
        stop.set()
        if client is not None:
            client.close()  # cancels a call in flight: the gateway keeps the series it finished

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        state = WatchState.load(args.state, args.since)
        if args.server:
            import histoxplain_client as hc

            token_file = args.token_file
            client = hc.Client(
                args.server, timeout=None, tls=args.tls, root_certificates=args.root_certificates,
                token_provider=None if token_file is None else lambda: token_file.read_text().strip(),
            )
            indexer = gateway_indexer(client, args.index, args.level)
        else:
            retrieval = open_retrieval(settings)
            indexer = local_indexer(retrieval, pacs, args.index, args.level, stop)
        if args.once:
            _print(poll_once(pacs, state, indexer, max_studies=args.max_studies, max_series=args.max_series, stop=stop))
        else:
            watch(pacs, state, indexer, stop, interval_s=args.interval, max_studies=args.max_studies,
                  max_series=args.max_series, on_poll=_print)
    finally:
        if client is not None:
            client.close()
        if retrieval is not None:
            retrieval.index_engine.close()
        pacs.close()
    return 0
