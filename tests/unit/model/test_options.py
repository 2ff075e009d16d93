"""MethodOptions: ranges checked at construction, and the TorchServe input-map round trip."""

from __future__ import annotations

import pytest

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import (
    MAX_N_SAMPLES,
    MethodOptions,
    options_from_inputs,
    options_to_inputs,
)


def test_defaults_and_bounds_are_accepted() -> None:
    assert MethodOptions() == MethodOptions(n_samples=25, sigma=0.15, chunk_size=5, seed=0)
    MethodOptions(n_samples=1, sigma=1.0, chunk_size=1)
    MethodOptions(n_samples=MAX_N_SAMPLES, sigma=1e-6, gradcampp_gradient_scale="raw", gradcampp_eps=0.0)
    assert MAX_N_SAMPLES == 256


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_samples": 0}, "n_samples .* from 1 to 256, got 0"),
        ({"n_samples": 257}, "from 1 to 256, got 257"),
        ({"n_samples": 2.0}, "n_samples"),
        ({"n_samples": True}, "n_samples"),
        ({"sigma": 0.0}, r"sigma .* in \(0, 1\]"),
        ({"sigma": -0.1}, r"\(0, 1\]"),
        ({"sigma": 1.5}, r"\(0, 1\]"),
        ({"sigma": float("nan")}, r"\(0, 1\]"),
        ({"sigma": "0.1"}, "sigma"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"seed": -1}, "seed"),
        ({"gradcampp_gradient_scale": "log"}, "'unit' or 'raw'"),
        ({"gradcampp_eps": -1e-9}, "gradcampp_eps"),
        ({"gradcampp_eps": float("inf")}, "gradcampp_eps"),
    ],
)
def test_out_of_range_values_raise_invalid_request(fields: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        MethodOptions(**fields)


def test_options_are_frozen() -> None:
    with pytest.raises(AttributeError):
        MethodOptions().n_samples = 3  # type: ignore[misc]


def test_inputs_carry_only_non_defaults_and_round_trip_exactly() -> None:
    assert options_to_inputs(None) == {} and options_to_inputs(MethodOptions()) == {}
    assert options_from_inputs({}) is None
    # A float32 value from the wire survives the text round trip bit for bit.
    options = MethodOptions(n_samples=3, sigma=0.10000000149011612, seed=7, gradcampp_gradient_scale="raw")
    inputs = options_to_inputs(options)
    assert inputs == {
        "smoothgrad_samples": b"3",
        "smoothgrad_sigma": b"0.10000000149011612",
        "smoothgrad_seed": b"7",
        "gradcampp_gradient_scale": b"raw",
    }
    assert options_from_inputs(inputs) == options
    assert options_from_inputs({"smoothgrad_samples": "4", "mode": b"explain"}) == MethodOptions(n_samples=4)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"smoothgrad_samples": b"three"}, "'smoothgrad_samples' must be an integer"),
        ({"smoothgrad_samples": b"2.5"}, "must be an integer"),
        ({"smoothgrad_sigma": b"lots"}, "'smoothgrad_sigma' must be a number"),
        ({"smoothgrad_samples": b"100000"}, "from 1 to 256"),
        ({"smoothgrad_sigma": b"0"}, r"\(0, 1\]"),
        ({"smoothgrad_sigma": b"\xff"}, "not UTF-8"),
    ],
)
def test_bad_inputs_raise_invalid_request(inputs: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        options_from_inputs(inputs)
