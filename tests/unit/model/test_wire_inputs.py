"""The TorchServe input map and answers (``histoxplain_model.wire.inputs`` / ``outputs``): what
the backend writes, the handler reads back exactly; bad values fail with the key named."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from histoxplain_model.errors import ImageDecodeError, InvalidRequest, UnknownNameError
from histoxplain_model.options import GradCAMOptions, GradCAMPlusPlusOptions, SimMapOptions, SmoothGradOptions
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import ModelInfo, RetrievalExplanation
from histoxplain_model.vocabulary import METHOD_NAMES
from histoxplain_model.wire.envelope import decode_envelope, encode_request_image
from histoxplain_model.wire.inputs import (
    INFO,
    decode_embed_images,
    decode_explain_request,
    decode_mode,
    embed_inputs,
    encode_float32,
    explain_inputs,
    info_inputs,
    options_from_inputs,
    options_to_inputs,
)
from histoxplain_model.wire.outputs import (
    decode_embeddings,
    decode_explanation,
    decode_info,
    encode_embeddings,
    encode_explanation,
    encode_info,
)

MAX_PIXELS = 10_000


def test_inputs_carry_only_non_defaults_and_round_trip_exactly() -> None:
    assert options_to_inputs(None) == {} and options_to_inputs(SmoothGradOptions()) == {}
    assert options_to_inputs(GradCAMOptions()) == {}
    assert options_from_inputs("smoothgrad", {}) == SmoothGradOptions()
    # A float32 value from the wire survives the text round trip bit for bit.
    options = SmoothGradOptions(n_samples=3, sigma=0.10000000149011612, seed=7)
    inputs = options_to_inputs(options)
    assert inputs == {
        "smoothgrad_samples": b"3",
        "smoothgrad_sigma": b"0.10000000149011612",
        "smoothgrad_seed": b"7",
    }
    assert options_from_inputs("smoothgrad", inputs) == options
    assert options_from_inputs("smoothgrad", {"smoothgrad_samples": "4", "mode": b"explain"}) == SmoothGradOptions(n_samples=4)
    raw = GradCAMPlusPlusOptions(gradient_scale="raw", eps=1e-9)
    assert options_to_inputs(raw) == {"gradcampp_gradient_scale": b"raw", "gradcampp_eps": b"1e-09"}
    assert options_from_inputs("gradcampp", options_to_inputs(raw)) == raw
    assert options_to_inputs(SimMapOptions()) == {} and options_from_inputs("simmap", {}) == SimMapOptions()
    with pytest.raises(InvalidRequest, match="'smoothgrad_samples' is an option of another method, not of 'simmap'"):
        options_from_inputs("simmap", {"smoothgrad_samples": b"3"})


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"smoothgrad_samples": b"three"}, "'smoothgrad_samples' must be an integer"),
        ({"smoothgrad_samples": b"2.5"}, "must be an integer"),
        ({"smoothgrad_sigma": b"lots"}, "'smoothgrad_sigma' must be a number"),
        ({"smoothgrad_samples": b"100000"}, "from 1 to 256"),
        ({"smoothgrad_sigma": b"0"}, r"\(0, 1\]"),
        ({"smoothgrad_sigma": b"\xff"}, "not UTF-8"),
        ({"gradcampp_eps": b"0.1"}, "'gradcampp_eps' is an option of another method, not of 'smoothgrad'"),
    ],
)
def test_bad_inputs_raise_invalid_request(inputs: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        options_from_inputs("smoothgrad", inputs)


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(count)
    return [rng.integers(0, 256, (8, 6, 3), dtype=np.uint8) for _ in range(count)]


def test_an_explain_request_round_trips() -> None:
    query, *references = _images(3)
    vectors = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    request = ExplainRequest(
        query, references, "smoothgrad", "dissimilar", "query", SmoothGradOptions(n_samples=3),
        query_embedding=vectors[0], reference_embeddings=vectors[1:], deadline=1_790_000_000.125,
    )
    encoded = [encode_request_image(image) for image in (query, *references)]
    inputs = explain_inputs(request, encoded[0], encoded[1:])
    assert decode_mode(inputs) == "explain"
    assert inputs["query_embedding"] == encode_float32(vectors[0]) and len(inputs["reference_embeddings"]) == 2 * 4 * 4
    again = decode_explain_request(inputs, MAX_PIXELS, dim=4)
    assert (again.method, again.polarity, again.side, again.options) == ("smoothgrad", "dissimilar", "query", request.options)
    np.testing.assert_array_equal(again.query, query)
    for got, sent in zip(again.references, references, strict=True):
        np.testing.assert_array_equal(got, sent)
    np.testing.assert_array_equal(again.query_embedding, vectors[0])
    np.testing.assert_array_equal(again.reference_embeddings, vectors[1:])
    assert again.deadline == request.deadline
    optional = ("polarity", "side", "smoothgrad_samples", "query_embedding", "reference_embeddings", "deadline")
    defaults = decode_explain_request(
        {key: value for key, value in inputs.items() if key not in optional}, MAX_PIXELS, dim=4
    )
    assert (defaults.polarity, defaults.side, defaults.options) == ("similar", "both", SmoothGradOptions())
    assert defaults.query_embedding is None and defaults.reference_embeddings is None
    assert defaults.deadline is None
    with pytest.raises(InvalidRequest, match="deadline"):
        decode_explain_request({**inputs, "deadline": b"soon"}, MAX_PIXELS, dim=4)


def test_embed_and_info_inputs() -> None:
    images = _images(2)
    inputs = embed_inputs([encode_request_image(image) for image in images])
    assert decode_mode(inputs) == "embed" and decode_mode(info_inputs()) == "info"
    for got, sent in zip(decode_embed_images(inputs, MAX_PIXELS), images, strict=True):
        np.testing.assert_array_equal(got, sent)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"mode": b"train"}, UnknownNameError, "unknown mode 'train'; known: embed, explain, info"),
        ({"method": None}, InvalidRequest, "no 'method' input"),
        ({"method": b"lime"}, UnknownNameError, "gradcam"),
        ({"side": b"left"}, UnknownNameError, "retrieved"),
        ({"query": None}, InvalidRequest, "no 'query' image"),
        ({"query": "text"}, ImageDecodeError, "is text"),
        ({"reference.0": None}, InvalidRequest, "no reference inputs"),
        ({"reference.2": b"x"}, InvalidRequest, "without gaps"),
        ({"reference.x": b"x"}, InvalidRequest, "not numbered"),
        ({"query_embedding": encode_float32(np.zeros(3))}, InvalidRequest, "'query_embedding' has 12 bytes; expected 4"),
        ({"query_embedding": "0.1,0.2"}, InvalidRequest, "is text"),
        ({"query_embedding": encode_float32(np.full(4, np.nan))}, InvalidRequest, "NaN"),
    ],
)
def test_a_bad_explain_request_names_what_is_wrong(change: dict, error: type, message: str) -> None:
    query, reference = _images(2)
    inputs = explain_inputs(ExplainRequest(query, [reference], "gradcam"), encode_request_image(query),
                            [encode_request_image(reference)])
    inputs = {key: value for key, value in {**inputs, **change}.items() if value is not None}
    with pytest.raises(error, match=message):
        decode_mode(inputs)
        decode_explain_request(inputs, MAX_PIXELS, dim=4)


def test_answers_round_trip() -> None:
    embeddings = np.eye(3, 4, dtype=np.float32)
    _, arrays = decode_envelope(encode_embeddings(embeddings, batch=2))
    np.testing.assert_array_equal(decode_embeddings(arrays, 3), embeddings)
    with pytest.raises(RuntimeError, match="2 images"):
        decode_embeddings(arrays, 2)
    cams = np.random.default_rng(2).random((2, 3, 3), dtype=np.float32)
    raw = RetrievalExplanation("gradcam", "similar", np.array([0.5, 0.25], np.float32), cams, None, map_size=(6, 6))
    meta, arrays = decode_envelope(encode_explanation(raw, "query", batch=1))
    assert (meta["side"], meta["batch"], arrays["query_heatmaps"].dtype) == ("query", 1, np.float32)
    finished = decode_explanation(meta, arrays)
    np.testing.assert_allclose(finished.query_heatmaps, raw.finished().query_heatmaps, atol=1e-7)
    assert finished.reference_heatmaps is None and finished.map_size is None
    maps = RetrievalExplanation("smoothgrad", "similar", np.zeros(2, np.float32), None, cams)
    meta, arrays = decode_envelope(encode_explanation(maps, "retrieved", batch=1))
    assert arrays["reference_heatmaps"].dtype == np.float16
    np.testing.assert_allclose(decode_explanation(meta, arrays).reference_heatmaps, cams, atol=2.5e-4)


def test_request_and_wire_modules_do_not_import_torch() -> None:
    """The gateway in front of TorchServe builds requests and reads answers without torch."""
    modules = "histoxplain_model.options, histoxplain_model.requests, histoxplain_model.results, " \
              "histoxplain_model.wire.inputs, histoxplain_model.wire.outputs"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_model_info_round_trips_through_the_info_envelope() -> None:
    info = ModelInfo("efficientnet-lite0-imagenet", "tf_efficientnet_lite0", 1280, (224, 224), METHOD_NAMES, "embedded")
    meta, arrays = decode_envelope(encode_info(info))
    assert arrays == {} and meta["mode"] == INFO
    assert decode_info(meta, "torchserve") == replace(info, backend="torchserve")


def test_rise_options_round_trip_and_bad_values_name_their_key() -> None:
    from histoxplain_model.options import RiseOptions

    assert options_to_inputs(RiseOptions()) == {} and options_from_inputs("rise", {}) == RiseOptions()
    chosen = RiseOptions(n_masks=100, grid=5, keep_probability=0.30000001192092896, fill="mean", seed=3, batch_size=8)
    inputs = options_to_inputs(chosen)
    assert inputs == {
        "rise_masks": b"100", "rise_grid": b"5", "rise_keep_probability": b"0.30000001192092896",
        "rise_fill": b"mean", "rise_seed": b"3", "rise_batch_size": b"8",
    }
    assert options_from_inputs("rise", inputs) == chosen
    with pytest.raises(InvalidRequest, match="'rise_masks' must be an integer"):
        options_from_inputs("rise", {"rise_masks": b"many"})
    with pytest.raises(InvalidRequest, match="^n_masks .* 1 to 2000"):
        options_from_inputs("rise", {"rise_masks": b"5000"})
    with pytest.raises(InvalidRequest, match="'rise_grid' is an option of another method, not of 'gradcam'"):
        options_from_inputs("gradcam", {"rise_grid": b"4"})
