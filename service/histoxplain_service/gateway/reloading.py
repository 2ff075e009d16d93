"""Files the gateway re-reads when they change: certificates, token hashes, JWKS.

Secrets are rotated by replacing files (Kubernetes swaps a Secret volume's ``..data`` link
atomically; cert-manager and Vault agents rewrite them), so a gateway that read them once would
need a restart per rotation. :class:`ReloadingFiles` compares each file's stat stamp and parses
the files again only when one changed. A parse that fails (a half-written file, a certificate
without its new key yet) keeps the last good value and is logged once per set of stamps, so a
broken rotation never takes the gateway's credentials away.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["ReloadingFiles", "file_stamps"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Stamp = tuple[int, int, int, int] | None


def file_stamps(paths: Sequence[Path]) -> tuple[Stamp, ...]:
    """(device, inode, size, mtime ns) of each file after following links; None if missing.

    The inode catches Kubernetes' link swap even when the new file has the same size and
    modification time as the old one.
    """
    stamps: list[Stamp] = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            stamps.append(None)
            continue
        stamps.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(stamps)


class ReloadingFiles(Generic[T]):
    """The value parsed from ``paths``, parsed again when any of the files changes.

    Args:
        paths: the files read together (e.g. certificate, key and CA bundle).
        load: parses the files; raises on bad content (the message must not hold secrets).
        what: how log lines name the files, e.g. ``"TLS certificate (HISTOXPLAIN_TLS_CERT)"``.
        check_interval_s: the files are stat'ed at most this often (0: on every call).

    The first :meth:`load_now` raises, so that a gateway with bad files does not start.
    Thread-safe: grpc calls certificate fetchers from its own threads.
    """

    def __init__(
        self, paths: Sequence[Path], load: Callable[[], T], what: str, check_interval_s: float = 0.0
    ) -> None:
        self._paths = tuple(paths)
        self._load = load
        self._what = what
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._value: T | None = None
        self._stamps: tuple[Stamp, ...] = ()
        self._failed_stamps: tuple[Stamp, ...] | None = None
        self._checked_at = float("-inf")

    def load_now(self) -> T:
        """Read the files now; errors propagate (start-up)."""
        with self._lock:
            stamps = file_stamps(self._paths)
            self._value = self._load()
            self._stamps = stamps
            self._checked_at = time.monotonic()
            return self._value

    def current(self) -> tuple[T, bool]:
        """The current value and whether it was (re)loaded by this call."""
        with self._lock:
            if self._value is None:
                raise RuntimeError(f"{self._what}: load_now() must run before current()")
            now = time.monotonic()
            if now - self._checked_at < self._check_interval_s:
                return self._value, False
            self._checked_at = now
            stamps = file_stamps(self._paths)
            if stamps == self._stamps or stamps == self._failed_stamps:
                return self._value, False
            try:
                value = self._load()
            except Exception as error:  # noqa: BLE001 -- keep serving the last good value; logged
                self._failed_stamps = stamps
                logger.warning("%s changed but could not be loaded (%s); still using the previous one",
                               self._what, error)
                return self._value, False
            self._value, self._stamps, self._failed_stamps = value, stamps, None
            logger.info("%s reloaded", self._what)
            return value, True

    def get(self) -> T:
        """The current value, reloaded first if a file changed."""
        return self.current()[0]
