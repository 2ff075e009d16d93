"""Core settings of histoxplain, read from the environment once at start-up.

One frozen :class:`Settings` object is built by :meth:`Settings.from_env` and passed down; no
module reads ``os.environ`` on its own. Every field has one environment variable:

===========================  ==================  ===============================  ==================================
variable                     field               default                          allowed
===========================  ==================  ===============================  ==================================
``HISTOXPLAIN_DATA``         ``data_dir``        ``./histoxplain-data``           a folder path (created on use)
``QDRANT_URL``               ``qdrant_url``      unset: embedded local mode       an ``http://`` or ``https://`` URL
``QDRANT_API_KEY``           ``qdrant_api_key``  unset                            any string (server mode only)
``HISTOXPLAIN_MAX_PIXELS``   ``max_pixels``      20000 * 20000                    integer >= 1 (width * height)
``HISTOXPLAIN_MODEL``        ``model``           ``efficientnet-lite0-imagenet``  an encoder preset name
``HISTOXPLAIN_WEIGHTS``      ``weights``         unset: the preset's own          path to a local state-dict file
``HISTOXPLAIN_TILE_SIZE``    ``tile_size``       224                              integer 16..8192 (pixels)
``HISTOXPLAIN_STRIDE``       ``stride``          unset: the tile size             integer 1..8192 (pixels)
``HISTOXPLAIN_MIN_TISSUE``   ``min_tissue``      0.25                             number 0..1 (0 keeps every tile)
``HISTOXPLAIN_SLIDE_LEVEL``  ``slide_level``     0                                integer >= 0 (pyramid level)
``HISTOXPLAIN_BATCH_SIZE``   ``batch_size``      64                               integer 1..4096 (tiles per upsert)
``HISTOXPLAIN_DEVICE``       ``device``          ``auto``: GPU 0, else the CPU    ``cpu``, ``cuda``, ``cuda:N``, ``auto``
===========================  ==================  ===============================  ==================================

``device`` is where the in-process (embedded) encoder runs; its spelling is checked here,
whether that GPU exists when the encoder is loaded. An empty value counts as unset. A bad value raises
:class:`~histoxplain_model.errors.InvalidRequest` naming the variable and what it allows.
To add a setting: add a field (with its default) and one ``_Var`` line to ``_VARIABLES``;
``from_env`` and the checks pick it up.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from histoxplain_model.devices import check_device_name
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.imageio import DEFAULT_MAX_PIXELS

__all__ = ["DEFAULT_MODEL", "Settings"]

DEFAULT_MODEL = "efficientnet-lite0-imagenet"


@dataclass(frozen=True)
class _Var:
    """How one environment variable becomes one field: parse the text, then check the value."""

    field: str
    env: str
    parse: Callable[[str], Any]
    check: Callable[[Any], bool] | None = None
    allowed: str = ""


def _optional_str(text: str) -> str | None:
    return text or None


def _optional_path(text: str) -> Path | None:
    return Path(text).expanduser() if text else None


def _int(text: str) -> int:
    return int(text.replace("_", ""), 10)


def _url(text: str) -> str | None:
    if not text:
        return None
    if not text.startswith(("http://", "https://")):
        raise ValueError(text)
    return text.rstrip("/")


def _device_name(value: object) -> bool:
    try:
        check_device_name(str(value))
    except InvalidRequest:
        return False
    return True


_VARIABLES: tuple[_Var, ...] = (
    _Var("data_dir", "HISTOXPLAIN_DATA", lambda t: Path(t).expanduser(), lambda v: str(v) != "", "a folder path"),
    _Var("qdrant_url", "QDRANT_URL", _url, None, "an http:// or https:// URL of a Qdrant server, or unset"),
    _Var("qdrant_api_key", "QDRANT_API_KEY", _optional_str),
    _Var("max_pixels", "HISTOXPLAIN_MAX_PIXELS", _int, lambda v: v >= 1, "an integer >= 1 (width * height)"),
    _Var("model", "HISTOXPLAIN_MODEL", str.strip, lambda v: v != "", "an encoder preset name"),
    _Var("weights", "HISTOXPLAIN_WEIGHTS", _optional_path, None, "a path to a weights file, or unset"),
    _Var("tile_size", "HISTOXPLAIN_TILE_SIZE", _int, lambda v: 16 <= v <= 8192, "an integer from 16 to 8192"),
    _Var("stride", "HISTOXPLAIN_STRIDE", lambda t: _int(t) if t else None,
         lambda v: v is None or 1 <= v <= 8192, "an integer from 1 to 8192, or unset (= tile size)"),
    _Var("min_tissue", "HISTOXPLAIN_MIN_TISSUE", float, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1"),
    _Var("slide_level", "HISTOXPLAIN_SLIDE_LEVEL", _int, lambda v: v >= 0, "an integer >= 0"),
    _Var("batch_size", "HISTOXPLAIN_BATCH_SIZE", _int, lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    _Var("device", "HISTOXPLAIN_DEVICE", str.lower, _device_name,
         "cpu, cuda, cuda:N (N = GPU index) or auto (cuda:0 when there is a GPU, else cpu)"),
)


@dataclass(frozen=True)
class Settings:
    """Validated core settings (see the module docstring for the variables and defaults).

    Attributes:
        data_dir: where local-mode Qdrant (``<data_dir>/qdrant``) and tile PNGs
            (``<data_dir>/tiles/<index>/``) live.
        qdrant_url: a Qdrant server; ``None`` uses embedded local mode under ``data_dir``.
        qdrant_api_key: API key sent to the Qdrant server.
        max_pixels: largest plain image (width * height) decoded, a decompression-bomb guard.
        model: encoder preset name.
        weights: local weights file for presets that need one.
        tile_size: tile edge in pixels at the read level.
        stride: step between tiles in pixels; ``None`` means ``tile_size`` (no overlap).
        min_tissue: fraction of a tile that must be tissue for it to be indexed.
        slide_level: pyramid level read from whole-slide files.
        batch_size: tiles embedded and upserted per batch.
        device: torch device of the in-process encoder: ``cpu``, ``cuda``, ``cuda:N`` or
            ``auto`` (``histoxplain_model.devices.resolve_device``).
    """

    data_dir: Path = Path("./histoxplain-data")
    qdrant_url: str | None = None
    qdrant_api_key: str | None = field(default=None, repr=False)  # a secret: kept out of logs
    max_pixels: int = DEFAULT_MAX_PIXELS
    model: str = DEFAULT_MODEL
    weights: Path | None = None
    tile_size: int = 224
    stride: int | None = None
    min_tissue: float = 0.25
    slide_level: int = 0
    batch_size: int = 64
    device: str = "auto"

    def __post_init__(self) -> None:
        # Accept str paths from callers (tests, flags); the fields are always Path afterwards.
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.weights is not None:
            object.__setattr__(self, "weights", Path(self.weights))
        for var in _VARIABLES:
            value = getattr(self, var.field)
            if var.check is not None and not var.check(value):
                raise InvalidRequest(f"{var.env} ({var.field}) = {value!r} is not allowed; use {var.allowed}")

    @property
    def tile_stride(self) -> int:
        """The effective stride: ``stride`` or, when unset, ``tile_size``."""
        return self.stride if self.stride is not None else self.tile_size

    @property
    def qdrant_path(self) -> Path:
        """Folder of the embedded (local-mode) Qdrant storage."""
        return self.data_dir / "qdrant"

    def tiles_dir(self, index_name: str) -> Path:
        """Folder of the tile PNGs of one index."""
        return self.data_dir / "tiles" / index_name

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (e.g. from command-line flags), validated again."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read every variable in the table above; unset or empty ones keep their defaults.

        Raises:
            InvalidRequest: a value that does not parse or is out of range; the message names
                the variable and what it allows.
        """
        values: dict[str, Any] = {}
        for var in _VARIABLES:
            text = environ.get(var.env)
            if text is None:
                continue
            text = text.strip()
            if text == "":
                continue
            try:
                values[var.field] = var.parse(text)
            except ValueError:
                raise InvalidRequest(
                    f"{var.env}={text!r} is not allowed; use {var.allowed or 'a valid value'}"
                ) from None
        return cls(**values)

