"""Region-to-region correspondences: the pairwise decomposition C(i, j) of the cosine, by hand, on
every CNN preset and on real tissue, its boxes, its bound and its cost in forward passes."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from histoxplain_model.encoders import DEFAULT_PRESET, load_encoder
from histoxplain_model.errors import FailedPrecondition, InvalidRequest
from histoxplain_model.explain import explain_retrieval
from histoxplain_model.limits import MAX_CORRESPONDENCES
from histoxplain_model.options import SmoothGradOptions
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.saliency.correspondences import cell_box, pairwise_shares, region_correspondences
from histoxplain_model.saliency.locations import check_mean_pooled, forward_locations
from test_simmap import CNN_PRESETS, TINY_X, MeanPooled, _weights_file  # the same hand-built model and presets

torch.set_num_threads(1)

SUM_RTOL, SUM_ATOL = 1e-5, 1e-7


# TINY_X: A(i) at the four cells, row-major: (2, 8), (4, 0), (2, 4), (4, 4); e = (3, 4), |e| = 5.


def test_pairwise_shares_by_hand_on_a_self_match():
    model = MeanPooled().eval()
    locations, embeddings = forward_locations(model, model.conv, None, TINY_X)
    shares = pairwise_shares(locations[0], locations)  # the image against itself
    # C(i, j) = A(i) . A(j) / (4 * 4 * 5 * 5): A0 . A0 = 68 -> 0.17, A0 . A3 = 40 -> 0.1, ...
    assert shares.shape == (1, 4, 4)
    assert float(shares[0, 0, 0]) == pytest.approx(68 / 400)
    assert float(shares[0, 0, 3]) == pytest.approx(40 / 400)
    assert float(shares[0, 1, 2]) == pytest.approx(8 / 400)
    assert float(shares.sum()) == pytest.approx(1.0)  # the cosine of an image with itself
    # The best pair of the self-match is cell 0 with itself (the mutual best match of largest share).
    (best, *_), = region_correspondences(locations[0], locations, 1, (30, 50), [(30, 50)])
    assert (best.query_box, best.reference_box, best.rank) == ((0, 0, 25, 15), (0, 0, 25, 15), 1)
    assert best.share == pytest.approx(0.17)


def test_pairwise_shares_sum_to_the_cosine_through_a_linear_head():
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        head.bias.copy_(torch.tensor([-4.0, 0.5]))
    model = MeanPooled(head).eval()
    reference_x = torch.tensor([[[[1.0, 0.0], [3.0, 2.0]], [[0.0, 5.0], [1.0, 2.0]]]])
    query_locations, query_embedding = forward_locations(model, model.conv, None, TINY_X)
    reference_locations, reference_embedding = forward_locations(model, model.conv, None, reference_x)
    check_mean_pooled(model, query_locations, query_embedding, "correspondences")  # the bias shared b/HW
    shares = pairwise_shares(query_locations[0], reference_locations)
    cosine = F.cosine_similarity(query_embedding, reference_embedding)
    torch.testing.assert_close(shares.sum(dim=(1, 2)), cosine, rtol=SUM_RTOL, atol=SUM_ATOL)


def test_a_cls_pooled_vit_has_no_correspondences():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64).eval()
    prefix, (grid_h, grid_w) = model.num_prefix_tokens, model.patch_embed.grid_size

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, prefix:].reshape(tokens.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)

    locations, embeddings = forward_locations(model, model.blocks[-1].norm1, reshape, torch.randn(1, 3, 64, 64))
    with pytest.raises(FailedPrecondition, match=r"correspondences is not available for this encoder \(vit_tiny"):
        check_mean_pooled(model, locations, embeddings, "correspondences")


# --------------------------------------------------------------------------------------------
# Boxes in the image's own pixels


def test_cell_boxes_tile_a_non_square_image_and_map_back_through_the_resize():
    grid, size = (7, 7), (300, 200)  # (H, W): a 200 px wide, 300 px high image resized to 224x224
    boxes = [cell_box(cell, grid, size) for cell in range(49)]
    covered = np.zeros(size, dtype=int)
    for x, y, width, height in boxes:
        assert 0 <= x and 0 <= y and width >= 1 and height >= 1 and x + width <= 200 and y + height <= 300
        covered[y : y + height, x : x + width] += 1
    assert (covered == 1).all()  # every pixel in exactly one cell
    # Cell (row 3, column 5) is model-input pixels [160, 192) x [96, 128), i.e. image columns
    # 5/7 .. 6/7 of 200 and rows 3/7 .. 4/7 of 300.
    assert cell_box(3 * 7 + 5, grid, size) == (142, 128, 171 - 142, 171 - 128)
    assert cell_box(48, grid, size)[:2] == (171, 257) and sum(cell_box(48, grid, size)[::2]) == 200


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(DEFAULT_PRESET)


@pytest.fixture(scope="module")
def ihc() -> np.ndarray:
    from skimage import data

    return data.immunohistochemistry()  # (512, 512, 3) uint8, real IHC of colonic glands


def test_explained_boxes_lie_in_each_image_and_come_best_first(encoder, ihc):
    query = np.ascontiguousarray(ihc[:300, :200])  # non-square: boxes in its own pixels
    references = [np.ascontiguousarray(ihc[256:480, 256:480]), np.ascontiguousarray(ihc[100:260, 300:512])]
    explanation = explain_retrieval(encoder, ExplainRequest(query, references, "gradcam", correspondences=6))
    assert explanation.correspondences is not None and len(explanation.correspondences) == 2
    query_boxes = {cell_box(cell, (7, 7), (300, 200)) for cell in range(49)}
    for pairs, reference in zip(explanation.correspondences, references):
        assert [pair.rank for pair in pairs] == list(range(1, len(pairs) + 1)) and 1 <= len(pairs) <= 6
        shares = [pair.share for pair in pairs]
        assert shares == sorted(shares, reverse=True)
        reference_boxes = {cell_box(cell, (7, 7), reference.shape[:2]) for cell in range(49)}
        for pair in pairs:
            assert pair.query_box in query_boxes and pair.reference_box in reference_boxes


def test_the_top_pairs_are_the_largest_shares_of_the_mutual_matches(encoder, ihc):
    pixels = encoder.preprocess([ihc[:224, :224], ihc[200:424, 200:424]])
    locations, _ = forward_locations(encoder.model, encoder.target_layer, None, pixels)
    shares = pairwise_shares(locations[0], locations[1:])[0]
    pairs, = region_correspondences(locations[0], locations[1:], 16, (224, 224), [(224, 224)])
    matched = [pair.share for pair in pairs]
    assert matched == sorted(matched, reverse=True)
    # Each reported share is one exact C(i, j) of its two cells.
    for pair in pairs:
        i = (pair.query_box[1] // 32) * 7 + pair.query_box[0] // 32
        j = (pair.reference_box[1] // 32) * 7 + pair.reference_box[0] // 32
        assert pair.share == pytest.approx(float(shares[i, j]), rel=1e-6)
    # One-to-one: no cell appears twice on either side.
    assert len({pair.query_box for pair in pairs}) == len({pair.reference_box for pair in pairs}) == len(pairs)


def test_a_tile_matches_a_shifted_crop_of_itself_cell_for_cell(encoder, ihc):
    """The shifted gland matches the gland: against a copy shifted by one cell (32 px), the
    matched pairs are the corresponding cells (measured: 19 of the 24 exact, all 24 within a cell)."""
    exact = 0
    for y, x in ((0, 0), (200, 200), (100, 256)):
        query = np.ascontiguousarray(ihc[y : y + 224, x : x + 224])
        shifted = np.ascontiguousarray(ihc[y + 32 : y + 256, x + 32 : x + 256])
        explanation = explain_retrieval(encoder, ExplainRequest(query, [shifted], "simmap", side="query", correspondences=8))
        pairs = explanation.correspondences[0]
        assert len(pairs) == 8
        offsets = [(q[0] - 32 - r[0], q[1] - 32 - r[1]) for q, r in ((p.query_box, p.reference_box) for p in pairs)]
        assert all(abs(dx) <= 32 and abs(dy) <= 32 for dx, dy in offsets)
        exact += sum(offset == (0, 0) for offset in offsets)
    assert exact >= 14


# --------------------------------------------------------------------------------------------
# Every CNN preset: all C(i, j) sum to the cosine


@pytest.mark.parametrize("preset_name", CNN_PRESETS)
def test_all_pairwise_shares_sum_to_the_cosine_on_every_cnn_preset(preset_name, ihc, tmp_path):
    preset_encoder = load_encoder(preset_name, _weights_file(preset_name, tmp_path))
    tiles = [ihc[y : y + 224, x : x + 224] for y, x in ((0, 0), (256, 256), (40, 300), (288, 16))]
    pixels = preset_encoder.preprocess(tiles)
    locations, embeddings = forward_locations(
        preset_encoder.model, preset_encoder.target_layer, preset_encoder.reshape_transform, pixels
    )
    check_mean_pooled(preset_encoder.model, locations, embeddings, "correspondences")
    shares = pairwise_shares(locations[0], locations[1:])  # (3, HW, HW), every pair of cells
    expected = F.cosine_similarity(embeddings[:1], embeddings[1:])
    torch.testing.assert_close(shares.sum(dim=(1, 2)), expected, rtol=SUM_RTOL, atol=SUM_ATOL)


# --------------------------------------------------------------------------------------------
# The request: bounded, and at most one forward pass of each image


@pytest.mark.parametrize("bad", [-1, MAX_CORRESPONDENCES + 1, 2.0, True])
def test_the_bound_is_refused_by_field_name(bad):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(InvalidRequest, match=rf"correspondences must be an integer from 0 to {MAX_CORRESPONDENCES}"):
        ExplainRequest(image, [image], "gradcam", correspondences=bad)
    with pytest.raises(InvalidRequest, match="correspondences must be from 1 to"):
        region_correspondences(torch.ones(2, 2, 3), torch.ones(1, 2, 2, 3), 0, (8, 8), [(8, 8)])


def _forward_passes(encoder, request: ExplainRequest) -> tuple[int, object]:
    """(images the model ran on, the explanation)."""
    seen: list[int] = []
    handle = encoder.model.register_forward_hook(lambda module, inputs, output: seen.append(int(inputs[0].shape[0])))
    try:
        explanation = explain_retrieval(encoder, request)
    finally:
        handle.remove()
    return sum(seen), explanation


@pytest.mark.parametrize(
    ("method", "stored", "extra"),
    [
        ("gradcam", True, 0),  # the explainer's own passes of the query and the hits are reused
        ("simmap", True, 0),
        ("gradcam", False, 0),  # embedding the images gives their locations
        ("smoothgrad", True, 4),  # noisy copies only: one clean pass of each image (1 + 3)
    ],
)
def test_correspondences_cost_at_most_one_forward_pass_of_each_image(encoder, ihc, method, stored, extra):
    tiles = [np.ascontiguousarray(ihc[y : y + 224, x : x + 224]) for y, x in ((0, 0), (256, 256), (40, 300), (288, 16))]
    vectors = encoder.embed_images(tiles) if stored else None
    options = SmoothGradOptions(n_samples=2, chunk_size=2) if method == "smoothgrad" else None

    def request(top: int) -> ExplainRequest:
        return ExplainRequest(
            tiles[0], tiles[1:], method, options=options, correspondences=top,
            query_embedding=None if vectors is None else vectors[0],
            reference_embeddings=None if vectors is None else vectors[1:],
        )

    plain, _ = _forward_passes(encoder, request(0))
    with_pairs, explanation = _forward_passes(encoder, request(4))
    assert with_pairs - plain == extra
    # The same pairs whichever pass they came from.
    _, reference = _forward_passes(encoder, ExplainRequest(tiles[0], tiles[1:], "simmap", correspondences=4))
    for ours, theirs in zip(explanation.correspondences, reference.correspondences):
        assert [(p.query_box, p.reference_box) for p in ours] == [(p.query_box, p.reference_box) for p in theirs]
        np.testing.assert_allclose([p.share for p in ours], [p.share for p in theirs], rtol=1e-4)
