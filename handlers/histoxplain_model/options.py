"""The options of each saliency method: one frozen type per method, checked when it is built.

A method's settings belong to that method (as Captum's ``NoiseTunnel`` takes its own on its own
``attribute``), so GradCAM++'s eps cannot be set on a SmoothGrad request and SmoothGrad's noise
cannot reach GradCAM. ``OPTIONS_TYPES`` says which type belongs to which method; each explainer
in ``histoxplain_model.saliency`` takes only its own.

This module must not import torch: the gateway, the CLI and the TorchServe backend build and
check options without loading a model (``histoxplain_model.wire.inputs`` carries them to the
TorchServe handler).

    options = SmoothGradOptions(n_samples=50, sigma=0.1)     # InvalidRequest if out of range
    check_options("smoothgrad", options) is options          # another method's type: InvalidRequest
    check_options("gradcampp", None) == GradCAMPlusPlusOptions()
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from types import MappingProxyType
from typing import Literal, TypeVar

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.limits import MAX_N_SAMPLES, MAX_RISE_BATCH, MAX_RISE_GRID, MAX_RISE_MASKS, MIN_RISE_GRID
from histoxplain_model.vocabulary import GRADCAM, GRADCAM_PLUS_PLUS, RISE, SIMMAP, SMOOTHGRAD, check_name

__all__ = [
    "GRADCAMPP_GRADIENT_SCALES",
    "OPTIONS_TYPES",
    "OptionsT",
    "GradCAMOptions",
    "GradCAMPlusPlusOptions",
    "RISE_FILLS",
    "RiseOptions",
    "SaliencyOptions",
    "SimMapOptions",
    "SmoothGradOptions",
    "check_options",
    "default_options",
    "options_or_defaults",
]

GRADCAMPP_GRADIENT_SCALES = ("unit", "raw")
#: What RISE puts where a mask hides the image: a blurred copy of it, or its mean colour.
RISE_FILLS = ("blur", "mean")


@dataclass(frozen=True)
class GradCAMOptions:
    """GradCAM's options: none (eq. 1-2 of Selvaraju et al. leave nothing to choose).

    The type exists so that every method is called the same way and another method's options
    are refused rather than silently ignored.
    """


@dataclass(frozen=True)
class GradCAMPlusPlusOptions:
    """GradCAM++'s options (see ``histoxplain_model.saliency.gradcam.GradCAMPlusPlus``).

    gradient_scale: "unit" (default) evaluates eq. 19 on gradients rescaled so that
        max |dS/dA| = 1 per map, which makes the map independent of the target's scale; "raw"
        uses the raw gradients exactly as pytorch-grad-cam does.
    eps: eps in the denominator of eq. 19 (in the units chosen above), a finite number >= 0.
    """

    gradient_scale: Literal["unit", "raw"] = "unit"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.gradient_scale not in GRADCAMPP_GRADIENT_SCALES:
            raise InvalidRequest(
                f"gradient_scale (GradCAM++) must be 'unit' or 'raw', got {self.gradient_scale!r}"
            )
        if not (_is_real(self.eps) and self.eps >= 0):
            raise InvalidRequest(
                f"eps (GradCAM++ denominator) must be a finite number >= 0, got {self.eps!r}"
            )


@dataclass(frozen=True)
class SmoothGradOptions:
    """SmoothGrad's options (Smilkov et al. 2017; see ``histoxplain_model.saliency.smoothgrad``).

    n_samples: n noisy copies, 1 to ``MAX_N_SAMPLES`` (Smilkov et al. section 4.1 see
        diminishing returns beyond 50; 25 halves the cost).
    sigma: noise standard deviation as a fraction of the image's value range
        (max - min), in (0, 1] (Smilkov et al. section 4.1: 10-20% works best).
    chunk_size: noisy copies per forward pass (>= 1); bounds peak memory.
    seed: seed of the noise generator, >= 0 (same seed, same maps).
    """

    n_samples: int = 25
    sigma: float = 0.15
    chunk_size: int = 5
    seed: int = 0

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


@dataclass(frozen=True)
class SimMapOptions:
    """The similarity decomposition's options: none (m(i) = A(i).r_hat / (HW |e|) leaves nothing
    to choose; see ``histoxplain_model.saliency.simmap``).

    The type exists so that every method is called the same way and another method's options
    are refused rather than silently ignored.
    """


@dataclass(frozen=True)
class RiseOptions:
    """RISE's options (Petsiuk et al. 2018; see ``histoxplain_model.saliency.rise``).

    n_masks: N random masks, 1 to ``MAX_RISE_MASKS``; each costs one forward pass of each
        explained image. Default 200: on the sample data (benchmarks/RESULTS.md, "RISE
        faithfulness against N") N = 100 to 800 all beat smooth random maps on deletion and
        insertion, and beyond 200 the paired differences do not improve beyond their intervals
        while the cost doubles with each step; 100 won fewer pairs on both curves.
    grid: s, the mask grid's cells per side (s x s), ``MIN_RISE_GRID`` to ``MAX_RISE_GRID``.
    keep_probability: p, the chance that a cell shows the image, in (0, 1).
    fill: what hidden cells show: "blur" (the image blurred with a Gaussian of sigma = 1/10
        of its shorter side) or "mean" (the image's mean colour).
    seed: seed of the mask generator, >= 0 (same seed, same masks, same maps).
    batch_size: masked images per forward pass, 1 to ``MAX_RISE_BATCH``; bounds memory,
        never changes the maps.
    """

    n_masks: int = 200
    grid: int = 7
    keep_probability: float = 0.5
    fill: Literal["blur", "mean"] = "blur"
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not (_is_integer(self.n_masks) and 1 <= self.n_masks <= MAX_RISE_MASKS):
            raise InvalidRequest(
                f"n_masks (RISE masks) must be an integer from 1 to {MAX_RISE_MASKS}, got {self.n_masks!r}"
            )
        if not (_is_integer(self.grid) and MIN_RISE_GRID <= self.grid <= MAX_RISE_GRID):
            raise InvalidRequest(
                f"grid (RISE mask cells per side) must be an integer from {MIN_RISE_GRID} to "
                f"{MAX_RISE_GRID}, got {self.grid!r}"
            )
        if not (_is_real(self.keep_probability) and 0.0 < self.keep_probability < 1.0):
            raise InvalidRequest(
                f"keep_probability (RISE) must be a number in (0, 1), e.g. 0.5; got {self.keep_probability!r}"
            )
        if self.fill not in RISE_FILLS:
            raise InvalidRequest(f"fill (RISE) must be 'blur' or 'mean', got {self.fill!r}")
        if not (_is_integer(self.seed) and 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        if not (_is_integer(self.batch_size) and 1 <= self.batch_size <= MAX_RISE_BATCH):
            raise InvalidRequest(
                f"batch_size (RISE masked images per forward pass) must be an integer from 1 to "
                f"{MAX_RISE_BATCH}, got {self.batch_size!r}"
            )


def _is_integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


#: The options of any one method.
SaliencyOptions = GradCAMOptions | GradCAMPlusPlusOptions | SmoothGradOptions | SimMapOptions | RiseOptions
#: One method's options type, for code generic over the methods (``saliency.base.BaseCAM``).
OptionsT = TypeVar("OptionsT", GradCAMOptions, GradCAMPlusPlusOptions, SmoothGradOptions, SimMapOptions, RiseOptions)

#: Method name -> its options type (the same names as ``histoxplain_model.saliency.METHODS``).
OPTIONS_TYPES: Mapping[str, type[SaliencyOptions]] = MappingProxyType({
    GRADCAM: GradCAMOptions,
    GRADCAM_PLUS_PLUS: GradCAMPlusPlusOptions,
    SMOOTHGRAD: SmoothGradOptions,
    SIMMAP: SimMapOptions,
    RISE: RiseOptions,
})


def options_or_defaults(expected: type[OptionsT], options: object, owner: str) -> OptionsT:
    """``options`` if it is an ``expected``, the defaults if it is ``None``.

    ``owner`` names who takes them in the message (``"method 'gradcam'"``, ``"SmoothGrad"``).

    Raises:
        InvalidRequest: options of another type (another method's options).
    """
    if options is None:
        return expected()
    if not isinstance(options, expected):
        raise InvalidRequest(
            f"{owner} takes {expected.__name__}, not {type(options).__name__}; pass "
            f"{expected.__name__}(...) or None for its defaults"
        )
    return options


def default_options(method: str) -> SaliencyOptions:
    """The default options of ``method``; an unknown method raises ``UnknownNameError``."""
    return check_options(method, None)


def check_options(method: str, options: SaliencyOptions | None) -> SaliencyOptions:
    """``options`` if they are ``method``'s own type, its defaults if ``None``.

    Raises:
        UnknownNameError: an unknown method (the message lists the known ones).
        InvalidRequest: options of another method.
    """
    expected = OPTIONS_TYPES[check_name("method", method, OPTIONS_TYPES)]
    return options_or_defaults(expected, options, f"method {method!r}")
