"""Options of the saliency methods, and how they travel in a TorchServe input map.

This module must not import torch: the gateway and the TorchServe backend build and check
options without loading a model.

    options = MethodOptions(n_samples=50, sigma=0.1)    # InvalidRequest if out of range
    inputs = options_to_inputs(options)                 # {"smoothgrad_samples": b"50", ...}
    options_from_inputs(inputs) == options              # the handler's side
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Literal

from histoxplain_model.errors import InvalidRequest

__all__ = [
    "INPUT_KEYS",
    "MAX_N_SAMPLES",
    "MethodOptions",
    "options_from_inputs",
    "options_to_inputs",
]

#: The most noisy copies one SmoothGrad request may ask for (cost grows linearly with n).
MAX_N_SAMPLES = 256
GRADCAMPP_GRADIENT_SCALES = ("unit", "raw")


@dataclass(frozen=True)
class MethodOptions:
    """Options of the saliency methods (all have defaults; each method reads its own).

    n_samples: n noisy copies, 1 to ``MAX_N_SAMPLES`` (Smilkov et al. section 4.1 see
        diminishing returns beyond 50; 25 halves the cost).
    sigma: noise standard deviation as a fraction of the image's value range
        (max - min), in (0, 1] (Smilkov et al. section 4.1: 10-20% works best).
    chunk_size: noisy copies per SmoothGrad forward pass (>= 1); bounds peak memory.
    seed: seed of the SmoothGrad noise generator, >= 0 (same seed, same maps).
    gradcampp_gradient_scale: "unit" (default) evaluates GradCAM++ eq. 19 on gradients rescaled
        so that max |dS/dA| = 1 per map, which makes the map independent of the target's scale;
        "raw" uses the raw gradients exactly as pytorch-grad-cam does (see GradCAMPlusPlus).
    gradcampp_eps: eps in the denominator of eq. 19 (in the units chosen above), >= 0.
    """

    n_samples: int = 25
    sigma: float = 0.15
    chunk_size: int = 5
    seed: int = 0
    gradcampp_gradient_scale: Literal["unit", "raw"] = "unit"
    gradcampp_eps: float = 1e-6

    def __post_init__(self) -> None:
        if not (_is_integer(self.n_samples) and 1 <= self.n_samples <= MAX_N_SAMPLES):
            raise InvalidRequest(
                f"n_samples (SmoothGrad noisy copies) must be an integer from 1 to "
                f"{MAX_N_SAMPLES}, got {self.n_samples!r}"
            )
        if not (_is_real(self.sigma) and 0.0 < self.sigma <= 1.0):
            raise InvalidRequest(
                f"sigma (SmoothGrad noise) must be a fraction of the image's value range in "
                f"(0, 1], e.g. 0.15; got {self.sigma!r}"
            )
        if not (_is_integer(self.chunk_size) and self.chunk_size >= 1):
            raise InvalidRequest(
                f"chunk_size must be an integer >= 1 (noisy copies per forward pass), "
                f"got {self.chunk_size!r}"
            )
        if not (_is_integer(self.seed) and 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        if self.gradcampp_gradient_scale not in GRADCAMPP_GRADIENT_SCALES:
            raise InvalidRequest(
                f"gradcampp_gradient_scale must be 'unit' or 'raw', got "
                f"{self.gradcampp_gradient_scale!r}"
            )
        if not (_is_real(self.gradcampp_eps) and self.gradcampp_eps >= 0):
            raise InvalidRequest(
                f"gradcampp_eps must be a finite number >= 0, got {self.gradcampp_eps!r}"
            )


def _is_integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


#: Input-map key of each option in a TorchServe explain request (``handlers/retrieval_handler.py``).
INPUT_KEYS: dict[str, str] = {
    "n_samples": "smoothgrad_samples",
    "sigma": "smoothgrad_sigma",
    "chunk_size": "smoothgrad_chunk_size",
    "seed": "smoothgrad_seed",
    "gradcampp_gradient_scale": "gradcampp_gradient_scale",
    "gradcampp_eps": "gradcampp_eps",
}
_DEFAULTS = {field.name: field.default for field in fields(MethodOptions)}


def options_to_inputs(options: MethodOptions | None) -> dict[str, bytes]:
    """The options that differ from the defaults, as UTF-8 text values keyed by ``INPUT_KEYS``.

    Floats are written with ``repr`` (shortest exact round trip), so the handler rebuilds the
    very same values.
    """
    if options is None:
        return {}
    inputs = {}
    for name, key in INPUT_KEYS.items():
        value = getattr(options, name)
        if value != _DEFAULTS[name]:
            text = value if isinstance(value, str) else repr(value)
            inputs[key] = text.encode("utf-8")
    return inputs


def options_from_inputs(inputs: Mapping[str, object]) -> MethodOptions | None:
    """Options from a request's input map (``bytes`` or ``str`` values); ``None`` if it has none.

    Raises :class:`InvalidRequest` for a value that is not a number of the right kind or is out
    of range.
    """
    values: dict[str, object] = {}
    for name, key in INPUT_KEYS.items():
        raw = inputs.get(key)
        if raw is None:
            continue
        text = _text(raw, key)
        default = _DEFAULTS[name]
        try:
            if isinstance(default, int):
                values[name] = int(text)
            elif isinstance(default, float):
                values[name] = float(text)
            else:
                values[name] = text
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise InvalidRequest(f"input {key!r} must be {kind}, got {text!r}") from None
    return MethodOptions(**values) if values else None  # type: ignore[arg-type]


def _text(value: object, key: str) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidRequest(f"input {key!r} is not UTF-8 text") from None
    return str(value).strip()
