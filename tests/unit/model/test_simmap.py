"""The similarity decomposition (simmap): exact shares of the cosine, by hand and on every CNN preset."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from histoxplain_model.ctranspath import create_ctranspath
from histoxplain_model.encoders import PRESETS, get_preset, load_encoder, nhwc_reshape_transform
from histoxplain_model.errors import FailedPrecondition, InvalidRequest
from histoxplain_model.options import SimMapOptions, SmoothGradOptions
from histoxplain_model.saliency import GradCAM, SimilarityMap, get_explainer

torch.set_num_threads(1)

# Sums to the cosine "within float tolerance": float32 sums of a few hundred terms.
SUM_RTOL, SUM_ATOL = 1e-5, 1e-7


# --------------------------------------------------------------------------------------------
# Hand-built models, values worked out by hand

# A0 = [[2, 4], [2, 4]], A1 = [[8, 0], [4, 4]] at the target layer (an identity 1x1 conv).
TINY_X = torch.tensor([[[[2.0, 4.0], [2.0, 4.0]], [[8.0, 0.0], [4.0, 4.0]]]])
REFERENCE = torch.tensor([[1.0, 0.0]])


class MeanPooled(nn.Module):
    """x (B, 2, 2, 2) -> identity 1x1 conv (the target layer, A = x) -> mean -> optional head."""

    def __init__(self, head: nn.Linear | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        self.head = head if head is not None else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def hand_set_head() -> nn.Linear:
    """W = [[1, 1], [0, 1]], b = (-4, 0): e = W (3, 4) + b = (3, 4) again."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        head.bias.copy_(torch.tensor([-4.0, 0.0]))
    return head


def test_shares_by_hand_without_a_head():
    model = MeanPooled().eval()
    explainer = SimilarityMap(model, model.conv)
    # e = (3, 4), |e| = 5, r_hat = (1, 0): m(i) = A0(i) / (4 * 5); cos = 3/5.
    decomposition = explainer.decompose(TINY_X, REFERENCE)
    torch.testing.assert_close(decomposition.shares[0, 0], torch.tensor([[0.1, 0.2], [0.1, 0.2]]))
    torch.testing.assert_close(decomposition.cosines, torch.tensor([[0.6]]))
    # similar: ReLU(m) -> min-max [[0, 1], [0, 1]]; dissimilar: ReLU(0.6/4 - m) =
    # ReLU([[0.05, -0.05], [0.05, -0.05]]) -> [[1, 0], [1, 0]].
    np.testing.assert_allclose(explainer.explain(TINY_X, REFERENCE).heatmaps[0, 0], [[0, 1], [0, 1]], atol=1e-6)
    dissimilar = explainer.explain(TINY_X, REFERENCE, "dissimilar")
    np.testing.assert_allclose(dissimilar.heatmaps[0, 0], [[1, 0], [1, 0]], atol=1e-6)
    np.testing.assert_allclose(dissimilar.scores, [[0.6]], atol=1e-6)


def test_shares_by_hand_with_a_linear_head_share_its_bias_equally():
    model = MeanPooled(hand_set_head()).eval()
    explainer = SimilarityMap(model, model.conv)
    # z(i) = W A(i) + b: (2, 8) -> (6, 8); (4, 0) -> (0, 0); (2, 4) -> (2, 4); (4, 4) -> (4, 4);
    # mean (3, 4) = e. m(i) = z0(i) / (4 * 5) = [[0.3, 0.0], [0.1, 0.2]], sum 0.6 = cos.
    decomposition = explainer.decompose(TINY_X, REFERENCE)
    torch.testing.assert_close(decomposition.shares[0, 0], torch.tensor([[0.3, 0.0], [0.1, 0.2]]))
    assert float(decomposition.shares.sum()) == pytest.approx(0.6, abs=1e-6)
    # similar: [[0.3, 0], [0.1, 0.2]] / 0.3; dissimilar: ReLU(0.15 - m) = [[0, 0.15], [0.05, 0]] / 0.15.
    np.testing.assert_allclose(explainer.explain(TINY_X, REFERENCE).heatmaps[0, 0], [[1, 0], [1 / 3, 2 / 3]], atol=1e-6)
    dissimilar = explainer.explain(TINY_X, REFERENCE, "dissimilar").heatmaps[0, 0]
    np.testing.assert_allclose(dissimilar, [[0, 1], [1 / 3, 0]], atol=1e-6)


def test_native_maps_are_the_polarity_maps_on_the_target_grid():
    model = MeanPooled(hand_set_head()).eval()
    native = SimilarityMap(model, model.conv).explain(TINY_X, REFERENCE, "dissimilar", native=True)
    assert native.native
    np.testing.assert_allclose(native.heatmaps[0, 0], [[0, 0.15], [0.05, 0]], atol=1e-6)


# --------------------------------------------------------------------------------------------
# timm models, random weights: the sum is exact, no gradient, one forward pass for k references


def realistic_inputs(model: nn.Module, size: int = 64, batch: int = 2, refs: int = 4):
    """Random pixels, and references that are embeddings of other random images (positive cosines, as in a search)."""
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    with torch.no_grad():
        references = model(torch.randn(refs, 3, size, size, generator=generator))
    return pixels, references


def model_cosines(model: nn.Module, pixels: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model(pixels), dim=1) @ F.normalize(references, dim=1).T


@pytest.mark.parametrize("num_classes", [0, 7], ids=["no-head", "linear-head"])
def test_shares_sum_to_the_cosine_on_a_timm_cnn(num_classes):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes).eval()
    pixels, references = realistic_inputs(model)
    decomposition = SimilarityMap(model, model.layer4).decompose(pixels, references)
    assert decomposition.shares.shape == (2, 4, 2, 2)
    expected = model_cosines(model, pixels, references)
    torch.testing.assert_close(decomposition.shares.sum(dim=(-2, -1)), expected, rtol=SUM_RTOL, atol=SUM_ATOL)
    torch.testing.assert_close(decomposition.cosines, expected, rtol=SUM_RTOL, atol=SUM_ATOL)


def test_no_autograd_graph_and_one_forward_pass_for_k_references():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()  # a head with weights
    pixels, references = realistic_inputs(model, batch=1, refs=10)
    forwards: list[int] = []
    handle = model.register_forward_hook(lambda module, inputs, output: forwards.append(inputs[0].shape[0]))
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(1)
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            SimilarityMap(model, model.layer4).explain(pixels, references)
            assert forwards == [1] and saved == []  # one forward of the one image, nothing kept for a backward
            GradCAM(model, model.layer4).explain(pixels, references)
            assert saved  # the control: GradCAM records a graph above its layer
    finally:
        handle.remove()
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize(
    ("build", "layer", "reshape", "why"),
    [
        (lambda: timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="max"),
         "layer4", None, "misses the embedding"),
        (lambda: create_ctranspath(num_classes=0), "layers.3", nhwc_reshape_transform, "misses the embedding"),
        (lambda: MeanPooled(nn.Linear(2, 3)), "conv", None, None),
    ],
    ids=["max-pooled-cnn", "swin-layernorm-after-the-layer", "head-not-found"],
)
def test_not_available_where_the_embedding_is_not_the_mean(build, layer, reshape, why):
    torch.manual_seed(0)
    model = build().eval()
    if isinstance(model, MeanPooled):  # a head get_classifier() does not name: caught by the check
        model.get_classifier = lambda: nn.Identity()  # type: ignore[method-assign]
        pixels, references = TINY_X, torch.randn(1, 3)
        why = "2 channels, the embedding 3"
    else:
        pixels, references = realistic_inputs(model, size=224 if "swin" in type(model).__name__.lower() else 64,
                                              batch=1, refs=1)
    explainer = SimilarityMap(model, model.get_submodule(layer), reshape)
    with pytest.raises(FailedPrecondition, match="'simmap' is not available for this encoder") as error:
        explainer.explain(pixels, references)
    assert why in str(error.value) and "use gradcam, gradcampp, smoothgrad" in str(error.value)


def test_registry_options_and_bad_targets():
    model = MeanPooled().eval()
    assert isinstance(get_explainer("simmap", model, model.conv), SimilarityMap)
    assert isinstance(get_explainer("simmap", model, model.conv, options=SimMapOptions()), SimilarityMap)
    with pytest.raises(InvalidRequest, match="SimMapOptions, not SmoothGradOptions"):
        get_explainer("simmap", model, model.conv, options=SmoothGradOptions())
    with pytest.raises(InvalidRequest, match="target layer"):
        get_explainer("simmap", model, None)
    with pytest.raises(InvalidRequest, match="references are 3-d"):
        SimilarityMap(model, model.conv).explain(TINY_X, torch.ones(1, 3))


# --------------------------------------------------------------------------------------------
# Every CNN preset through its own loader and weights, on real histology


CNN_PRESETS = [name for name, preset in PRESETS.items() if preset.layout == "nchw"]


def _weights_file(preset_name: str, tmp_path) -> object:
    """None for the shipped ImageNet weights, else a local file in the preset's checkpoint format
    (seeded random weights: no pathology weights can be installed here, PLATFORM.md)."""
    preset = get_preset(preset_name)
    if preset.weights_source != "file":
        return None
    torch.manual_seed(0)
    state_dict = timm.create_model(preset.architecture, pretrained=False, num_classes=0).state_dict()
    path = tmp_path / f"{preset_name}.pth"
    wrapped = {f"{preset.key_prefix}{key}": value for key, value in state_dict.items()}
    torch.save({"state_dict": wrapped} if preset.key_prefix else wrapped, path)
    return path


@pytest.fixture(scope="module")
def ihc_tiles() -> list[np.ndarray]:
    from skimage import data

    ihc = data.immunohistochemistry()  # (512, 512, 3) uint8, real IHC of colonic glands
    return [np.ascontiguousarray(ihc[y : y + 224, x : x + 224]) for y, x in ((0, 0), (256, 256), (40, 300), (288, 16))]


def test_the_cnn_presets_are_the_expected_ones():
    assert set(CNN_PRESETS) == {"efficientnet-lite0-imagenet", "retccl", "solo-learn-resnet18", "solo-learn-resnet50"}


@pytest.mark.parametrize("preset_name", CNN_PRESETS)
def test_shares_sum_to_the_cosine_on_every_cnn_preset(preset_name, ihc_tiles, tmp_path):
    encoder = load_encoder(preset_name, _weights_file(preset_name, tmp_path))
    explainer = get_explainer("simmap", encoder.model, encoder.target_layer, encoder.reshape_transform)
    query = encoder.preprocess(ihc_tiles[:1])
    references = encoder.preprocess(ihc_tiles[1:])
    query_vector, reference_vectors = encoder.embed(query), encoder.embed(references)
    expected = (reference_vectors @ query_vector.T)[:, 0]  # (K,) the search's cosines
    # Query side: the query against the K hits; retrieved side: each hit against the query
    # (m(j) = A_r(j) . q_hat / (HW |r|)).
    query_side = explainer.decompose(query, reference_vectors)
    retrieved_side = explainer.decompose(references, query_vector)
    torch.testing.assert_close(query_side.shares.sum(dim=(-2, -1))[0], expected, rtol=SUM_RTOL, atol=SUM_ATOL)
    torch.testing.assert_close(retrieved_side.shares.sum(dim=(-2, -1))[:, 0], expected, rtol=SUM_RTOL, atol=SUM_ATOL)
    assert query_side.shares.shape[-2:] == (7, 7)
    assert float(expected.min()) > 0.1  # tiles of one slide: a real, non-trivial similarity
    maps = explainer.explain(query, reference_vectors).heatmaps
    assert maps.shape == (1, 3, 224, 224) and np.isfinite(maps).all()
    assert (maps.reshape(3, -1).max(axis=1) == pytest.approx(1.0))


def test_projection_shares_by_hand_are_gradcams_map_for_the_projection():
    """target="projection": m(i) = A(i) . r_hat / HW sums to e . r_hat, and is GradCAM's map
    for that target before its ReLU (the gradient of e . r_hat is r_hat / HW at every location)."""
    from histoxplain_model.saliency import gradient_mode, similarity_target

    model = MeanPooled().eval()
    # e = (3, 4), r_hat = (1, 0): m(i) = A0(i) / 4; e . r_hat = 3.
    decomposition = SimilarityMap(model, model.conv).decompose(TINY_X, REFERENCE, target="projection")
    torch.testing.assert_close(decomposition.shares[0, 0], torch.tensor([[0.5, 1.0], [0.5, 1.0]]))
    torch.testing.assert_close(decomposition.totals, torch.tensor([[3.0]]))
    torch.testing.assert_close(decomposition.cosines, torch.tensor([[0.6]]))
    with gradient_mode():
        signed, _ = GradCAM(model, model.conv).signed_maps(TINY_X, similarity_target(REFERENCE, target="projection"))
    torch.testing.assert_close(signed[0, 0], decomposition.shares[0, 0])
    # dissimilar: ReLU(3/4 - m) = [[0.25, 0], [0.25, 0]] -> min-max [[1, 0], [1, 0]]; scores stay the cosine.
    dissimilar = SimilarityMap(model, model.conv).explain(TINY_X, REFERENCE, "dissimilar", target="projection")
    np.testing.assert_allclose(dissimilar.heatmaps[0, 0], [[1, 0], [1, 0]], atol=1e-6)
    np.testing.assert_allclose(dissimilar.scores, [[0.6]], atol=1e-6)
    with pytest.raises(InvalidRequest, match="unknown target 'dot'"):
        similarity_target(REFERENCE, target="dot")
