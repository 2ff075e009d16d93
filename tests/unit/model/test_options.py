"""Per-method options: ranges checked at construction, and each method takes only its own type."""

from __future__ import annotations

import pytest

from histoxplain_model.errors import InvalidRequest, UnknownNameError
from histoxplain_model.limits import MAX_N_SAMPLES
from histoxplain_model.options import (
    OPTIONS_TYPES,
    GradCAMOptions,
    GradCAMPlusPlusOptions,
    RiseOptions,
    SimMapOptions,
    SmoothGradOptions,
    check_options,
    default_options,
)


def test_defaults_and_bounds_are_accepted() -> None:
    assert SmoothGradOptions() == SmoothGradOptions(n_samples=25, sigma=0.15, chunk_size=5, seed=0)
    SmoothGradOptions(n_samples=1, sigma=1.0, chunk_size=1)
    SmoothGradOptions(n_samples=MAX_N_SAMPLES, sigma=1e-6)
    GradCAMPlusPlusOptions(gradient_scale="raw", eps=0.0)
    assert MAX_N_SAMPLES == 256


@pytest.mark.parametrize(
    ("options_type", "fields", "message"),
    [
        (SmoothGradOptions, {"n_samples": 0}, "n_samples .* from 1 to 256, got 0"),
        (SmoothGradOptions, {"n_samples": 257}, "from 1 to 256, got 257"),
        (SmoothGradOptions, {"n_samples": 2.0}, "n_samples"),
        (SmoothGradOptions, {"n_samples": True}, "n_samples"),
        (SmoothGradOptions, {"sigma": 0.0}, r"sigma .* in \(0, 1\]"),
        (SmoothGradOptions, {"sigma": -0.1}, r"\(0, 1\]"),
        (SmoothGradOptions, {"sigma": 1.5}, r"\(0, 1\]"),
        (SmoothGradOptions, {"sigma": float("nan")}, r"\(0, 1\]"),
        (SmoothGradOptions, {"sigma": "0.1"}, "sigma"),
        (SmoothGradOptions, {"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        (SmoothGradOptions, {"seed": -1}, "seed"),
        (GradCAMPlusPlusOptions, {"gradient_scale": "log"}, "'unit' or 'raw'"),
        (GradCAMPlusPlusOptions, {"eps": -1e-9}, "eps"),
        (GradCAMPlusPlusOptions, {"eps": float("inf")}, "eps"),
    ],
)
def test_out_of_range_values_raise_invalid_request(options_type: type, fields: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        options_type(**fields)


def test_options_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SmoothGradOptions().n_samples = 3  # type: ignore[misc]


def test_every_registered_method_has_an_options_type() -> None:
    from histoxplain_model.saliency import METHODS

    assert set(OPTIONS_TYPES) == set(METHODS)
    assert default_options("gradcam") == GradCAMOptions()
    assert default_options("gradcampp") == GradCAMPlusPlusOptions()
    assert default_options("smoothgrad") == SmoothGradOptions()
    assert default_options("simmap") == SimMapOptions()
    assert default_options("rise") == RiseOptions()


def test_a_method_takes_only_its_own_options() -> None:
    chosen = SmoothGradOptions(n_samples=3)
    assert check_options("smoothgrad", chosen) is chosen
    assert check_options("gradcampp", None) == GradCAMPlusPlusOptions()
    with pytest.raises(InvalidRequest, match="method 'gradcam' takes GradCAMOptions, not SmoothGradOptions"):
        check_options("gradcam", chosen)
    with pytest.raises(UnknownNameError, match="gradcam, gradcampp, smoothgrad"):
        check_options("lime", None)

