"""Run TorchServe so that it cannot outlive the process that started it.

    python -m histoxplain_service.backends.torchserve.guard GRACE_S torchserve --start --foreground ...

TorchServe's launcher starts a Java frontend, which starts Python workers; none of them learns
when ``make serve`` dies, so a SIGKILLed ``serve`` used to leave 1.4 GB of TorchServe running,
holding its ports and its data folder. This guard sits between the two: the kernel sends it
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), and on SIGTERM or SIGINT it stops the
launcher's whole process group, SIGTERM first (Java drains and stops its workers), SIGKILL
after ``GRACE_S`` seconds. :class:`.process.TorchServeProcess` stops
TorchServe by sending SIGTERM to this guard, so only the instance it started is stopped, by
process id (``torchserve --stop`` would stop whichever instance a shared pid file names).
Linux only, as the rest of the deployment.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1
_USAGE = "usage: python -m histoxplain_service.backends.torchserve.guard GRACE_S COMMAND [ARG...]"


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _stop_group(launcher: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM to the launcher's process group, then SIGKILL to what is left after ``grace_s``."""
    group = launcher.pid
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        launcher.poll()  # reap the launcher: as a zombie it would keep the group alive for killpg
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        grace_s, command = float(args[0]), args[1:]
    except (IndexError, ValueError):
        command = []
    if not command:
        print(_USAGE, file=sys.stderr)
        return 2
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 1
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Its own session: the launcher, Java and the workers share one process group to stop.
    launcher = subprocess.Popen(command, start_new_session=True)
    while launcher.poll() is None and not stopping:
        time.sleep(0.2)
    if launcher.poll() is None:
        _stop_group(launcher, grace_s)
    else:
        _stop_group(launcher, 0.0)  # workers the launcher left behind
    launcher.wait()
    return 0 if stopping else launcher.returncode


if __name__ == "__main__":
    sys.exit(main())
