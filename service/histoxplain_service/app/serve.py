"""``make serve``: TorchServe and the gateway on loopback, with the embedded Qdrant.

    python -m histoxplain_service.app.serve [--rebuild-mar] [--batch-size N] [--max-batch-delay-ms MS]

With ``HISTOXPLAIN_BACKEND=torchserve`` (the default) it builds ``<data>/model-store/<model>.mar``
for ``HISTOXPLAIN_MODEL`` when missing, starts a TorchServe of its own on free loopback ports
(token authorization on, working folder ``<data>/torchserve``), registers the model, and points
the gateway at it. With ``HISTOXPLAIN_BACKEND=embedded`` the model runs in the gateway. The
gateway listens on ``HISTOXPLAIN_HOST:HISTOXPLAIN_PORT`` (127.0.0.1:50051). SIGTERM or Ctrl-C
drains the gateway, then stops TorchServe; everything started here is stopped here, and
TorchServe stops with this process even when it is SIGKILLed (``backends/torchserve/guard.py``).
A TorchServe that dies while serve runs is restarted with backoff
(``backends/torchserve/supervisor.py``); health says NOT_SERVING until it answers again.
One serve per data folder: a second one exits with status 3 before touching the folder.
"""

from __future__ import annotations

import argparse
import fcntl
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from histoxplain_model.errors import HistoxplainError
from histoxplain_service.backends.torchserve.mar import ensure_mar
from histoxplain_service.backends.torchserve.process import TorchServeProcess
from histoxplain_service.backends.torchserve.supervisor import TorchServeSupervisor
from histoxplain_service.config import GatewaySettings
from histoxplain_service.domain.checks import request_pixel_limit
from histoxplain_service.gateway.server import serve

__all__ = ["SERVE_LOCK", "main"]

#: File in the data folder that one running serve holds an exclusive lock on.
SERVE_LOCK = "serve.lock"

logger = logging.getLogger("histoxplain_service.app.serve")

class _Stop(Exception):
    """SIGTERM during start-up (before the gateway's own handlers are installed)."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="histoxplain-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild-mar", action="store_true", help="rebuild the model archive even if it exists")
    parser.add_argument(
        "--batch-size", type=int, default=1,
        help="TorchServe batchSize (default %(default)s: off; see docs/SERVING.md, 'Batching')",
    )
    parser.add_argument("--max-batch-delay-ms", type=int, default=20, help="TorchServe maxBatchDelay (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = GatewaySettings.from_env()
    except HistoxplainError as error:
        print(f"histoxplain serve: {error}", file=sys.stderr)
        return 2
    data_dir = settings.core.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Held until this process exits (the kernel releases it even after SIGKILL). Taken before
    # anything in the folder is touched: a second serve must not rewrite a running one's
    # TorchServe configuration or remove its key file.
    lock = (data_dir / SERVE_LOCK).open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(
            "histoxplain serve: another serve is running on this data folder (HISTOXPLAIN_DATA); "
            "stop it first, or give this one another folder",
            file=sys.stderr,
        )
        return 3

    # Until the gateway's asyncio handlers take over, SIGTERM unwinds like Ctrl-C so that a
    # TorchServe that is still starting is stopped too.
    signal.signal(signal.SIGTERM, _raise_stop)
    torchserve = None
    supervisor = None
    try:
        if settings.backend == "torchserve":
            model_store = data_dir / "model-store"
            mar_name = ensure_mar(
                model_store, settings.core.model, settings.core.weights, settings.torchserve_model,
                max_pixels=request_pixel_limit(settings.core)[0], rebuild=args.rebuild_mar,
            )
            torchserve = TorchServeProcess(model_store, data_dir / "torchserve")
            logger.info("starting TorchServe (log: %s)", torchserve.log_file)
            torchserve.start()

            def register(process: TorchServeProcess = torchserve) -> None:
                process.register_model(
                    mar_name, settings.torchserve_model,
                    batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
                )

            register()
            supervisor = TorchServeSupervisor(torchserve, register)
            supervisor.start()
            settings = dataclasses.replace(
                settings, torchserve_address=torchserve.grpc_target, torchserve_key_file=torchserve.key_file
            )
        asyncio.run(serve(settings, ready=lambda gateway: print(
            f"histoxplain gateway ready on {settings.host}:{gateway.port} (backend {settings.backend}); "
            "Ctrl-C to stop", flush=True)))
    except (KeyboardInterrupt, _Stop):
        logger.info("interrupted during start-up")
    except HistoxplainError as error:
        print(f"histoxplain serve: {error}", file=sys.stderr)
        return 1
    finally:
        if supervisor is not None:
            supervisor.stop()
        if torchserve is not None:
            logger.info("stopping TorchServe")
            torchserve.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
