"""Protobuf <-> domain conversions of the gateway."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from histoxplain_client._proto.histoxplain.v1 import types_pb2
from histoxplain_client.arrays import decode_array
from histoxplain_model.errors import InvalidRequest, UnknownNameError
from histoxplain_model.options import SmoothGradOptions
from histoxplain_service.gateway import converters
from histoxplain_service.domain.types import Box, ExplainedHit, ExplainedSearch, ImageHit, IndexInfo, SearchHit
from histoxplain_service.config import Settings


def _hit(score: float, point_id: str, image_id: str = "img") -> SearchHit:
    return SearchHit(score, point_id, image_id, "tumour", "slide.svs", Box(10, 20, 224, 224), 1, 0.5, 3)


def test_unspecified_options_take_the_documented_defaults() -> None:
    choice = converters.explain_choice_from_proto(types_pb2.ExplainOptions())
    assert (choice.method, choice.polarity, choice.side) == ("gradcam", "similar", "both")
    assert choice.heatmap_dtype == types_pb2.ARRAY_DTYPE_FLOAT16
    echoed = converters.explain_choice_to_proto(choice)
    assert echoed.method == types_pb2.EXPLANATION_METHOD_GRADCAM and echoed.side == types_pb2.EXPLANATION_SIDE_BOTH


@pytest.mark.parametrize(
    ("enum", "name"),
    [
        (types_pb2.EXPLANATION_METHOD_GRADCAM, "gradcam"),
        (types_pb2.EXPLANATION_METHOD_GRADCAM_PLUS_PLUS, "gradcampp"),
        (types_pb2.EXPLANATION_METHOD_SMOOTHGRAD, "smoothgrad"),
        (types_pb2.EXPLANATION_METHOD_SIMMAP, "simmap"),
        (types_pb2.EXPLANATION_METHOD_RISE, "rise"),
    ],
)
def test_methods_map_to_library_names_and_back(enum: int, name: str) -> None:
    choice = converters.explain_choice_from_proto(types_pb2.ExplainOptions(method=enum, polarity=2, side=1))
    assert (choice.method, choice.polarity, choice.side) == (name, "dissimilar", "query")
    assert converters.explain_choice_to_proto(choice).method == enum


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"method": 42}, UnknownNameError, "EXPLANATION_METHOD_GRADCAM"),
        ({"polarity": 9}, UnknownNameError, "POLARITY_SIMILAR"),
        ({"side": 7}, UnknownNameError, "EXPLANATION_SIDE_BOTH"),
        ({"heatmap_dtype": types_pb2.ARRAY_DTYPE_UINT8}, UnknownNameError, "ARRAY_DTYPE_FLOAT32"),
        ({"smoothgrad_samples": 500}, InvalidRequest, "smoothgrad_samples=500 is out of range; use 1 to 256"),
        ({"smoothgrad_noise": 1.5}, InvalidRequest, "(0, 1]"),
        ({"smoothgrad_noise": 0.0}, InvalidRequest, "(0, 1]"),
    ],
)
def test_bad_options_are_invalid_with_the_allowed_values(options: dict, error: type, text: str) -> None:
    with pytest.raises(error, match=text.replace("(", r"\(").replace("]", r"\]")):
        converters.explain_choice_from_proto(types_pb2.ExplainOptions(**options))


def test_smoothgrad_options_become_method_options_and_are_echoed_as_used() -> None:
    default = converters.explain_choice_from_proto(types_pb2.ExplainOptions(method=types_pb2.EXPLANATION_METHOD_SMOOTHGRAD))
    assert default.method_options is None
    echoed = converters.explain_choice_to_proto(default)
    assert (echoed.smoothgrad_samples, echoed.smoothgrad_noise) == (25, pytest.approx(0.15))
    chosen = converters.explain_choice_from_proto(
        types_pb2.ExplainOptions(method=types_pb2.EXPLANATION_METHOD_SMOOTHGRAD, smoothgrad_samples=3)
    )
    assert chosen.method_options == SmoothGradOptions(n_samples=3)
    smoothgrad = types_pb2.EXPLANATION_METHOD_SMOOTHGRAD
    noisy = converters.explain_choice_from_proto(types_pb2.ExplainOptions(method=smoothgrad, smoothgrad_noise=0.25))
    assert noisy.method_options == SmoothGradOptions(sigma=0.25)
    # GradCAM ignores SmoothGrad's options (checked, not passed on: options belong to their
    # method), and the echo does not claim they were used.
    gradcam = converters.explain_choice_from_proto(types_pb2.ExplainOptions(smoothgrad_noise=0.25))
    assert gradcam.method_options is None
    assert not converters.explain_choice_to_proto(gradcam).HasField("smoothgrad_noise")
    largest = types_pb2.ExplainOptions(method=smoothgrad, smoothgrad_samples=256, smoothgrad_noise=1.0)
    assert converters.explain_choice_from_proto(largest).method_options == SmoothGradOptions(n_samples=256, sigma=1.0)


def test_simmap_takes_no_options_and_costs_one_unit_per_reference_and_side() -> None:
    simmap = types_pb2.EXPLANATION_METHOD_SIMMAP
    # SmoothGrad's fields are range-checked for every method but never reach another method.
    choice = converters.explain_choice_from_proto(types_pb2.ExplainOptions(method=simmap, smoothgrad_samples=8))
    assert (choice.method, choice.method_options) == ("simmap", None)
    echoed = converters.explain_choice_to_proto(choice)
    assert echoed.method == simmap and echoed.smoothgrad_samples == 0 and not echoed.HasField("smoothgrad_noise")
    assert choice.cost(10) == 20  # side both: k per side, like GradCAM
    smoothgrad = converters.explain_choice_from_proto(types_pb2.ExplainOptions(method=types_pb2.EXPLANATION_METHOD_SMOOTHGRAD))
    assert smoothgrad.cost(10) > 10 * choice.cost(10)


@pytest.mark.parametrize("dtype", [types_pb2.ARRAY_DTYPE_FLOAT16, types_pb2.ARRAY_DTYPE_FLOAT32])
def test_heatmap_travels_as_raw_array_and_overlay_at_image_size(dtype: int) -> None:
    values = np.linspace(0, 1, 16 * 12, dtype=np.float32).reshape(16, 12)
    image = np.full((40, 30, 3), 200, np.uint8)
    message = converters.heatmap_to_proto(values, image, dtype)
    decoded = decode_array(message.values)
    assert decoded.shape == (16, 12)
    np.testing.assert_allclose(decoded, values, atol=1e-3 if dtype == types_pb2.ARRAY_DTYPE_FLOAT16 else 0)
    with Image.open(io.BytesIO(message.overlay_png)) as overlay:
        assert overlay.size == (30, 40)


def test_tile_hit_fields() -> None:
    message = converters.search_hit_to_proto(_hit(0.9, "p1"))
    assert (message.image_id, message.point_id, message.label, message.source) == ("img", "p1", "tumour", "slide.svs")
    assert (message.box.x, message.box.y, message.box.width, message.box.height, message.level) == (10, 20, 224, 224, 1)
    assert message.mpp == pytest.approx(0.5) and message.score == pytest.approx(0.9)


def test_image_hit_carries_its_score_and_its_best_tile() -> None:
    image_hit = ImageHit(0.7, "img", "tumour", "slide.svs", (_hit(0.6, "p1"), _hit(0.8, "p2"), _hit(0.8, "p2")))
    message = converters.search_hit_to_proto(image_hit)
    assert message.point_id == "p2" and message.score == pytest.approx(0.7) and message.matched_tiles == 2


def test_index_info() -> None:
    message = converters.index_info_to_proto(IndexInfo("demo", "efficientnet-lite0-imagenet", 1280, 10, 3))
    assert (message.name, message.encoder_preset, message.embedding_dim, message.tile_count, message.image_count) == (
        "demo", "efficientnet-lite0-imagenet", 1280, 10, 3
    )


def test_tiling_options_override_only_what_is_set() -> None:
    core = Settings(tile_size=224, min_tissue=0.25)
    assert converters.tiling_settings(core, types_pb2.TilingOptions()) is core
    changed = converters.tiling_settings(core, types_pb2.TilingOptions(tile_size=256, min_tissue_fraction=0.0))
    assert (changed.tile_size, changed.stride, changed.min_tissue) == (256, None, 0.0)
    with pytest.raises(InvalidRequest, match=r"^tiling.tile_size must be from 16 to 8192 pixels"):
        converters.tiling_settings(core, types_pb2.TilingOptions(tile_size=15))
    assert converters.tiling_settings(core, types_pb2.TilingOptions(tile_size=16)).tile_size == 16
    # Overlap is bounded: a stride of at least a quarter tile (at most 16x the tiles of no overlap).
    assert converters.tiling_settings(core, types_pb2.TilingOptions(stride=56)).stride == 56
    with pytest.raises(InvalidRequest, match=r"^tiling.stride must be from a quarter of the tile size \(56 px\)"):
        converters.tiling_settings(core, types_pb2.TilingOptions(stride=55))


@pytest.mark.parametrize("fraction", [float("nan"), float("inf"), -0.1, 1.5])
def test_a_min_tissue_fraction_out_of_range_is_refused_by_its_field_name(fraction: float) -> None:
    with pytest.raises(InvalidRequest, match="min_tissue_fraction=.* use a number from 0 to 1"):
        converters.tiling_settings(Settings(), types_pb2.TilingOptions(min_tissue_fraction=fraction))


def test_explanations_stop_at_the_message_limit_instead_of_drawing_every_overlay() -> None:
    query = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    heatmap = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    hits = tuple(ExplainedHit(None, 0.5, query[:64, :64], heatmap, None, position) for position in range(8))
    explained = ExplainedSearch("gradcam", "similar", "query", query, hits)
    choice = converters.ExplainChoice(side="query")
    assert len(converters.explained_references(explained, choice)) == 8
    one_overlay = len(converters.heatmap_to_proto(heatmap, query, choice.heatmap_dtype).SerializeToString())
    assert len(converters.explained_references(explained, choice, max_bytes=8 * one_overlay + 1000)) == 8
    with pytest.raises(InvalidRequest, match=r"larger than the message limit .* 512x512 px"):
        converters.explained_references(explained, choice, max_bytes=3 * one_overlay)


# -- filters ------------------------------------------------------------------------------------


def _filter(**conditions: list[str]) -> types_pb2.TileFilter:
    return types_pb2.TileFilter(
        conditions=[types_pb2.FieldCondition(key=key, values=values) for key, values in conditions.items()]
    )


def test_an_empty_filter_is_no_filter() -> None:
    assert converters.tile_filter_from_proto(types_pb2.TileFilter()) is None


def test_filter_conditions_become_field_matches_with_integer_keys_as_integers() -> None:
    tile_filter = converters.tile_filter_from_proto(_filter(label=["TUM"], organ=["skin", "colon"], level=["0", "2"]))
    assert tile_filter is not None and not tile_filter.must_not
    assert [(m.key, m.values) for m in tile_filter.must] == [
        ("label", ("TUM",)), ("organ", ("skin", "colon")), ("level", (0, 2))
    ]


SECRET = "PATIENT=Jane Doe;"


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (_filter(label=[]), r"filter.conditions\[0\].values has 0 values; give 1 to 1024"),
        (_filter(label=[SECRET] * 1025), r"filter.conditions\[0\].values has 1,025 values; give 1 to 1024"),
        (_filter(label=[SECRET * 300]), r"filter value of filter.conditions\[0\].values\[0\] is 5,100 characters long; the limit is 4,096"),
        (_filter(**{"k" * 65: ["x"]}), r"filter key of filter.conditions\[0\] is 65 characters long; the limit is 64"),
        (_filter(level=[SECRET]), r"filter.conditions\[0\].values: 'level' holds integers"),
        (types_pb2.TileFilter(conditions=[types_pb2.FieldCondition(key=f"k{i}", values=["x"]) for i in range(33)]),
         r"filter.conditions has 33 conditions; the limit is 32"),
        (types_pb2.TileFilter(conditions=[types_pb2.FieldCondition(key="label", values=[SECRET])] * 2),
         r"filter.conditions\[1\].key repeats the key 'label'"),
        (_filter(**{"": ["x"]}), r"filter.conditions\[0\].key is empty"),
        (_filter(**{"bad key!": [SECRET]}), r"filter key 'bad key!' is not a payload key"),
    ],
)
def test_bad_filters_are_invalid_naming_field_and_limit_never_the_value(message: types_pb2.TileFilter, text: str) -> None:
    with pytest.raises(InvalidRequest, match=text) as caught:
        converters.tile_filter_from_proto(message)
    assert "Jane" not in str(caught.value)


def test_filter_limits_are_at_exactly_their_values() -> None:
    tile_filter = converters.tile_filter_from_proto(_filter(**{"k" * 64: ["é" * 4096] * 1024}))
    assert tile_filter is not None and len(tile_filter.must[0].values) == 1024


def test_rise_options_from_the_wire_are_checked_echoed_and_priced() -> None:
    from histoxplain_model.options import RiseOptions
    from histoxplain_service.gateway.admission import Admission

    rise = types_pb2.EXPLANATION_METHOD_RISE
    default = converters.explain_choice_from_proto(types_pb2.ExplainOptions(method=rise))
    assert (default.method, default.method_options) == ("rise", None)
    echoed = converters.explain_choice_to_proto(default).rise
    assert (echoed.masks, echoed.grid, echoed.fill, echoed.seed) == (200, 7, types_pb2.RiseOptions.FILL_BLUR, 0)
    assert echoed.keep_probability == pytest.approx(0.5)
    sent = types_pb2.RiseOptions(masks=100, grid=4, keep_probability=0.25, fill=types_pb2.RiseOptions.FILL_MEAN, seed=9)
    chosen = converters.explain_choice_from_proto(types_pb2.ExplainOptions(method=rise, rise=sent))
    assert chosen.method_options == RiseOptions(n_masks=100, grid=4, keep_probability=0.25, fill="mean", seed=9)
    assert converters.explain_choice_to_proto(chosen).rise == sent
    # The query side's masks serve every reference; the retrieved side needs them per reference.
    for side, cost in (("query", 100), ("retrieved", 1000), ("both", 1100)):
        assert converters.ExplainChoice(method="rise", side=side, rise=chosen.rise).cost(10) == cost
    with pytest.raises(InvalidRequest, match=r"rise\.masks"):
        Admission(2000).take(converters.ExplainChoice(method="rise", rise=RiseOptions(n_masks=2000)).cost(10))
    # RISE's options never reach another method, and are not echoed for it.
    gradcam = converters.explain_choice_from_proto(types_pb2.ExplainOptions(rise=sent))
    assert gradcam.method_options is None and not converters.explain_choice_to_proto(gradcam).HasField("rise")


@pytest.mark.parametrize(
    ("rise", "error", "text"),
    [
        ({"masks": 2001}, InvalidRequest, "n_masks (RISE masks) must be an integer from 1 to 2000"),
        ({"grid": 1}, InvalidRequest, "grid (RISE mask cells per side)"),
        ({"keep_probability": 1.0}, InvalidRequest, "keep_probability (RISE)"),
        ({"seed": 2**63}, InvalidRequest, "seed must be"),
        ({"fill": 7}, UnknownNameError, "FILL_MEAN"),
    ],
)
def test_bad_rise_options_name_the_field(rise: dict, error: type, text: str) -> None:
    options = types_pb2.ExplainOptions(method=types_pb2.EXPLANATION_METHOD_RISE, rise=types_pb2.RiseOptions(**rise))
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        converters.explain_choice_from_proto(options)
