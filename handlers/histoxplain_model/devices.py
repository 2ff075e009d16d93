"""Which torch device the encoder runs on: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

``auto`` is ``cuda:0`` when torch sees a CUDA device, else ``cpu``. :func:`check_device_name`
checks the spelling without importing torch (settings use it when they are read);
:func:`resolve_device` also checks that the device exists on this machine.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import FailedPrecondition, InvalidRequest

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_NAMES", "check_device_name", "resolve_device"]

DEVICE_NAMES: tuple[str, ...] = ("cpu", "cuda", "cuda:N", "auto")
_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")
_FIX = "set HISTOXPLAIN_DEVICE=cpu or auto"


def check_device_name(name: str) -> str:
    """``name`` stripped and lower-cased if it is one of :data:`DEVICE_NAMES`, else
    :class:`InvalidRequest`. Does not look at the hardware (no torch import)."""
    text = str(name).strip().lower()
    if not _DEVICE.fullmatch(text):
        raise InvalidRequest(f"unknown device {name!r}; use cpu, cuda, cuda:N (N = GPU index) or auto ({_FIX})")
    return text


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` means on this machine.

    Raises:
        InvalidRequest: not a device name, or ``cuda:N`` with N past the last GPU.
        FailedPrecondition: ``cuda``/``cuda:N`` asked for, but torch sees no CUDA device (a
            CPU-only torch build, no GPU or no driver).
    """
    import torch

    text = check_device_name(name)
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise FailedPrecondition(
            f"device {text!r} was asked for but torch {torch.__version__} ({build}) sees no CUDA device; {_FIX}"
        )
    device = torch.device(text if ":" in text else "cuda:0")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InvalidRequest(
            f"device {text!r} does not exist: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}; "
            f"use one of those or {_FIX}"
        )
    return device
