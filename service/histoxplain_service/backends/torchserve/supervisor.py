"""Restart a TorchServe that died: what ``make serve`` does outside Kubernetes.

In a Kubernetes pod the kubelet restarts a TorchServe container that exits. ``make serve`` has
no kubelet, so a TorchServe that crashed (its Java frontend killed, out of memory) used to stay
down until someone restarted ``serve``. :class:`TorchServeSupervisor` watches the process it was
given and, when it is gone, starts it again on the same ports and registers the model again,
waiting 1 s before the first attempt and doubling the wait after each failed or short-lived
start, up to 60 s (the kubelet's CrashLoopBackOff habit, on a smaller scale). Every exit and
restart is logged. The gateway's health follows by itself: its probe pings TorchServe, so it
reports NOT_SERVING while TorchServe is down and SERVING once a worker answers again; calls in
that window get UNAVAILABLE, which the SDK retries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from histoxplain_model.errors import HistoxplainError
from histoxplain_service.backends.torchserve.process import TorchServeProcess

__all__ = ["TorchServeSupervisor"]

logger = logging.getLogger(__name__)


class TorchServeSupervisor:
    """Keeps ``process`` running: restarts it, then ``register()`` s the model, with backoff.

    Args:
        process: a started :class:`TorchServeProcess` (ports stay the same across restarts, so
            the gateway's address stays valid; the key file is re-read by the backend).
        register: registers the model on a freshly started TorchServe and waits for a worker.
        check_interval_s: how often the process is looked at.
        first_delay_s, max_delay_s: the backoff before a restart, doubled after each restart
            that fails or does not stay up for ``stable_s``.
        stable_s: up this long, a restarted TorchServe resets the backoff.
    """

    def __init__(
        self,
        process: TorchServeProcess,
        register: Callable[[], None],
        check_interval_s: float = 1.0,
        first_delay_s: float = 1.0,
        max_delay_s: float = 60.0,
        stable_s: float = 60.0,
    ) -> None:
        self.process = process
        self.register = register
        self.check_interval_s = check_interval_s
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.stable_s = stable_s
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._watch, name="torchserve-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop watching (before stopping TorchServe itself, so it is not restarted)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _watch(self) -> None:
        delay = self.first_delay_s
        up_since = time.monotonic()
        while not self._stopping.wait(self.check_interval_s):
            if self.process.running:
                if time.monotonic() - up_since >= self.stable_s:
                    delay = self.first_delay_s
                continue
            logger.warning(
                "TorchServe exited (status %s); restarting it in %.0f s (see %s)",
                self.process.exit_code, delay, self.process.log_file,
            )
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.max_delay_s)
            try:
                self.process.start()
                self.register()
            except (HistoxplainError, OSError, RuntimeError) as error:
                logger.error("TorchServe did not restart: %s; trying again", error)
                self.process.stop()
                continue
            self.restarts += 1
            up_since = time.monotonic()
            logger.info("TorchServe restarted (%d restart(s) so far)", self.restarts)
