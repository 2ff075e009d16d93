"""Saliency maths: oracles (pytorch-grad-cam, Captum), a hand-worked model, and invariants."""

from __future__ import annotations

import os
import threading

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from histoxplain_model.errors import FailedPrecondition, InvalidRequest, UnknownNameError
from histoxplain_model.options import GradCAMPlusPlusOptions, RiseOptions, SmoothGradOptions
from histoxplain_model.saliency import (
    METHODS,
    GradCAM,
    GradCAMPlusPlus,
    InputGradient,
    SimilarityMap,
    SmoothGrad,
    get_explainer,
    gradient_mode,
    normalise_maps,
    similarity_target,
)

torch.set_num_threads(1)

SIZE = 64


def vit_reshape(model: nn.Module):
    """Tokens (B, N, C) -> (B, C, h, w), geometry read from the model (prefix tokens, grid)."""
    prefix = model.num_prefix_tokens
    grid_h, grid_w = model.patch_embed.grid_size

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, prefix:].reshape(tokens.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)

    return reshape


def build(arch: str):
    torch.manual_seed(0)
    if arch == "resnet18":
        model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
        return model, model.layer4, None
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE, global_pool="token"
    ).eval()
    # With CLS pooling a later layer gives zero gradients on the patch tokens (PLATFORM.md).
    return model, model.blocks[-1].norm1, vit_reshape(model)


@pytest.fixture(scope="module", params=["resnet18", "vit_tiny"])
def arch(request):
    return (request.param, *build(request.param))


def inputs(batch: int, refs: int, dim: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    references = torch.randn(refs, dim, generator=generator)
    return pixels, references


FAST = SmoothGradOptions(n_samples=4, chunk_size=3)
FAST_RISE = RiseOptions(n_masks=24, batch_size=10)
FAST_OPTIONS = {"smoothgrad": FAST, "rise": FAST_RISE}


def explainer(method: str, model, layer, reshape):
    return get_explainer(method, model, layer, reshape, FAST_OPTIONS.get(method))


# --------------------------------------------------------------------------------------------
# Oracles


class PgcCosineTarget:
    """pytorch-grad-cam target: called on one row of the model output (D,) -> scalar."""

    def __init__(self, reference: torch.Tensor, scale: float = 1.0) -> None:
        self.reference, self.scale = reference, scale

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return self.scale * F.cosine_similarity(output, self.reference, dim=0)


def pgc_maps(cam_class, model, layer, reshape, pixels, references, scales=None):
    """pytorch-grad-cam in batch mode: the query replicated, one cosine target per row."""
    k = references.shape[0]
    scales = scales if scales is not None else [1.0] * k
    targets = [PgcCosineTarget(references[i], scales[i]) for i in range(k)]
    with cam_class(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=pixels.repeat(k, 1, 1, 1), targets=targets)
    model.zero_grad(set_to_none=True)
    return maps  # (K, H, W), resized by cv2 and min-max normalised


# Tolerance: both pipelines are float32 with the same ReLU -> bilinear (half-pixel) resize ->
# min-max; they differ in summation order and pytorch-grad-cam's 1e-7 in the min-max.
ORACLE_ATOL = 1e-5


def test_gradcam_matches_pytorch_grad_cam(arch):
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    _, model, layer, reshape = arch
    pixels, references = inputs(1, 4, model.num_features)
    ours = GradCAM(model, layer, reshape).explain(pixels, references).heatmaps[0]
    theirs = pgc_maps(pytorch_grad_cam.GradCAM, model, layer, reshape, pixels, references)
    assert ours.shape == theirs.shape == (4, SIZE, SIZE)
    assert ours.max() == pytest.approx(1.0)
    np.testing.assert_allclose(ours, theirs, atol=ORACLE_ATOL)


def test_gradcampp_raw_gradients_match_pytorch_grad_cam(arch):
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    _, model, layer, reshape = arch
    pixels, references = inputs(1, 3, model.num_features)
    options = GradCAMPlusPlusOptions(gradient_scale="raw")
    ours = GradCAMPlusPlus(model, layer, reshape, options).explain(pixels, references).heatmaps[0]
    theirs = pgc_maps(pytorch_grad_cam.GradCAMPlusPlus, model, layer, reshape, pixels, references)
    np.testing.assert_allclose(ours, theirs, atol=ORACLE_ATOL)


class PgcProjectionTarget:
    """pytorch-grad-cam target for the projection e . r_hat (``target="projection"``)."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.direction = F.normalize(reference, dim=0)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output @ self.direction


@pytest.mark.parametrize("cam", ["GradCAM", "GradCAMPlusPlus"])
def test_the_projection_target_matches_pytorch_grad_cam(arch, cam):
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    arch_name, model, layer, reshape = arch
    pixels, references = inputs(1, 3, model.num_features)
    ours_class = GradCAM if cam == "GradCAM" else GradCAMPlusPlus
    options = None if cam == "GradCAM" else GradCAMPlusPlusOptions(gradient_scale="raw")
    ours = ours_class(model, layer, reshape, options).explain(pixels, references, target="projection")
    with getattr(pytorch_grad_cam, cam)(model=model, target_layers=[layer], reshape_transform=reshape) as pgc:
        theirs = pgc(input_tensor=pixels.repeat(3, 1, 1, 1), targets=[PgcProjectionTarget(r) for r in references])
    model.zero_grad(set_to_none=True)
    np.testing.assert_allclose(ours.heatmaps[0], theirs, atol=ORACLE_ATOL)
    cosine = GradCAM(model, layer, reshape).explain(pixels, references)
    np.testing.assert_array_equal(ours.scores, cosine.scores)  # the scores stay the cosine
    if cam == "GradCAM" and arch_name == "resnet18":  # mean-pooled: the cosine map sums to zero, this one does not
        assert np.abs(ours.heatmaps - cosine.heatmaps).max() > 0.05


def test_smoothgrad_explains_the_projection_it_is_given():
    """SmoothGrad differentiates whatever target it gets: the projection's input gradient is
    |e| times the cosine's plus a term along e_hat, so the maps differ (same noise, same seed)."""
    model, _, _ = build("resnet18")
    pixels, references = inputs(1, 2, model.num_features)
    smoothgrad = get_explainer("smoothgrad", model, options=FAST)
    for polarity in ("similar", "dissimilar"):
        cosine = smoothgrad.explain(pixels, references, polarity)
        projection = smoothgrad.explain(pixels, references, polarity, target="projection")
        np.testing.assert_array_equal(projection.scores, cosine.scores)
        assert np.abs(projection.heatmaps - cosine.heatmaps).max() > 0.05


def steepest_gradient(model, layer, reshape, pixels, reference) -> float:
    """max |d cos / dA| over the target layer's activations, computed independently."""
    stored = []
    handle = layer.register_forward_hook(lambda m, i, o: stored.append(o))
    try:
        score = F.cosine_similarity(model(pixels), reference[None], dim=1).sum()
    finally:
        handle.remove()
    grad = torch.autograd.grad(score, stored[0])[0]
    return float((reshape(grad) if reshape else grad).abs().max())


def test_gradcampp_unit_gradients_match_pytorch_grad_cam_on_rescaled_target():
    """Our default evaluates eq. 19 on g / max|g|. pytorch-grad-cam computes the same thing
    when its target is the cosine divided by max|g|: then eps = 1e-6 is negligible for both and
    the comparison checks eq. 19 itself, not which eps dominates. On a CNN layer after a ReLU
    (the ViT's signed tokens get a clamp pytorch-grad-cam does not have)."""
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    model, layer, reshape = build("resnet18")
    pixels, references = inputs(1, 3, model.num_features)
    with torch.no_grad():
        stored = []
        handle = layer.register_forward_hook(lambda m, i, o: stored.append(o))
        model(pixels)
        handle.remove()
    assert stored[0].min() >= 0  # post-ReLU: our clamp of sum A at 0 is inactive
    ours = GradCAMPlusPlus(model, layer, reshape).explain(pixels, references).heatmaps[0]
    scales = [1.0 / steepest_gradient(model, layer, reshape, pixels, r) for r in references]
    theirs = pgc_maps(
        pytorch_grad_cam.GradCAMPlusPlus, model, layer, reshape, pixels, references, scales
    )
    np.testing.assert_allclose(ours, theirs, atol=ORACLE_ATOL)


def scaled_maps(cam, pixels, references, scale):
    target = similarity_target(references)
    with gradient_mode():
        return cam._heatmaps(pixels, lambda e: scale * target(e))[0].numpy()


def test_gradcampp_is_invariant_to_the_target_scale(arch):
    _, model, layer, reshape = arch
    pixels, references = inputs(1, 3, model.num_features)
    unit = GradCAMPlusPlus(model, layer, reshape)
    np.testing.assert_allclose(
        scaled_maps(unit, pixels, references, 1e3),
        scaled_maps(unit, pixels, references, 1.0),
        atol=1e-5,
    )
    # The raw (pytorch-grad-cam) formula is not: the reason for the default.
    raw = GradCAMPlusPlus(model, layer, reshape, GradCAMPlusPlusOptions(gradient_scale="raw"))
    difference = np.abs(
        scaled_maps(raw, pixels, references, 1e3) - scaled_maps(raw, pixels, references, 1.0)
    )
    assert difference.max() > 0.05


SMOOTHGRAD_ORACLE = SmoothGradOptions(n_samples=5, sigma=0.15, chunk_size=2, seed=11)  # 2+2+1 chunks


def captum_smoothgrad(attribution: str, model, pixels, references, polarity: str) -> list[torch.Tensor]:
    """Captum's NoiseTunnel(<attribution>) of each reference's target, with our noise draws:
    (1, 3, H, W) attributions per reference."""
    captum_attr = pytest.importorskip("captum.attr")
    target = similarity_target(references, polarity)
    stdev = float(SMOOTHGRAD_ORACLE.sigma * (pixels.max() - pixels.min()))
    results = []
    for k in range(references.shape[0]):
        tunnel = captum_attr.NoiseTunnel(getattr(captum_attr, attribution)(lambda x, k=k: target(model(x))[:, k]))
        # Captum draws its noise with torch.normal on the global generator: the same stream as
        # our seeded generator (one draw of n samples).
        torch.manual_seed(SMOOTHGRAD_ORACLE.seed)
        results.append(tunnel.attribute(pixels, nt_type="smoothgrad", nt_samples=SMOOTHGRAD_ORACLE.n_samples, stdevs=stdev))
    model.zero_grad(set_to_none=True)
    return results


def test_smoothgrad_matches_captum_noise_tunnel_with_the_same_noise(arch):
    _, model, _, _ = arch
    pixels, references = inputs(1, 3, model.num_features)
    ours = SmoothGrad(model, options=SMOOTHGRAD_ORACLE).explain(pixels, references).heatmaps[0]
    for k, attributions in enumerate(captum_smoothgrad("Saliency", model, pixels, references, "similar")):
        theirs = normalise_maps(attributions.amax(dim=1))[0].numpy()
        np.testing.assert_allclose(ours[k], theirs, atol=1e-5)


def test_smoothgrad_dissimilar_matches_captum_noise_tunnel_of_input_x_gradient(arch):
    """The signed form: ReLU(sum over channels of SmoothGrad(x * d(-cos)/dx)), with the same noise
    as Captum's NoiseTunnel(InputXGradient) on the negated cosine."""
    _, model, _, _ = arch
    pixels, references = inputs(1, 2, model.num_features)
    ours = SmoothGrad(model, options=SMOOTHGRAD_ORACLE).explain(pixels, references, "dissimilar").heatmaps[0]
    for k, attributions in enumerate(captum_smoothgrad("InputXGradient", model, pixels, references, "dissimilar")):
        theirs = normalise_maps(attributions.sum(dim=1).clamp(min=0))[0].numpy()
        np.testing.assert_allclose(ours[k], theirs, atol=1e-5)
        assert (theirs == 0).mean() > 0.05  # the ReLU drops the pixels that raise the similarity


def test_smoothgrad_noise_depends_on_the_seed():
    model, _, _ = build("resnet18")
    pixels, references = inputs(1, 2, model.num_features)
    first = SmoothGrad(model, options=SmoothGradOptions(n_samples=3, seed=1)).explain(pixels, references)
    again = SmoothGrad(model, options=SmoothGradOptions(n_samples=3, seed=1)).explain(pixels, references)
    other = SmoothGrad(model, options=SmoothGradOptions(n_samples=3, seed=2)).explain(pixels, references)
    np.testing.assert_array_equal(first.heatmaps, again.heatmaps)
    assert np.abs(first.heatmaps - other.heatmaps).max() > 1e-3


# --------------------------------------------------------------------------------------------
# A hand-built model with values worked out by hand


class TinyEncoder(nn.Module):
    """x (B, 2, 2, 2) -> identity 1x1 conv (the target layer, A = x) -> global mean -> e (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


# A0 = [[2, 4], [2, 4]], A1 = [[8, 0], [4, 4]]  ->  e = (3, 4), |e| = 5; reference r = (1, 0).
TINY_X = torch.tensor([[[[2.0, 4.0], [2.0, 4.0]], [[8.0, 0.0], [4.0, 4.0]]]])
TINY_REF = torch.tensor([[1.0, 0.0]])
# cos = e0 / |e| = 3/5.  d cos/d e0 = 1/|e| - e0^2/|e|^3 = 1/5 - 9/125 = 16/125 = 0.128;
# d cos/d e1 = -e0 e1/|e|^3 = -12/125 = -0.096.  Each A_c,ij enters e_c with weight 1/4, so
# dS/dA0 = 0.032 and dS/dA1 = -0.024 at every position.
TINY_GRADS = (0.032, -0.024)


def tiny_explain(cls, polarity="similar", options=None):
    model = TinyEncoder().eval()
    return model, cls(model, model.conv, None, options).explain(TINY_X, TINY_REF, polarity)


def test_gradcam_by_hand():
    model, result = tiny_explain(GradCAM)
    assert result.scores[0, 0] == pytest.approx(0.6, abs=1e-6)
    # eq. 1: weights (0.032, -0.024); cam = 0.032*A0 - 0.024*A1
    #   = [[0.064-0.192, 0.128-0], [0.064-0.096, 0.128-0.096]] = [[-0.128, 0.128], [-0.032, 0.032]]
    # ReLU -> [[0, 0.128], [0, 0.032]], min-max -> [[0, 1], [0, 0.25]] (input is 2x2: no resize).
    np.testing.assert_allclose(result.heatmaps[0, 0], [[0, 1], [0, 0.25]], atol=1e-6)
    # dissimilar: weights negated -> ReLU([[0.128, -0.128], [0.032, -0.032]]) -> [[1, 0], [0.25, 0]]
    _, dissimilar = tiny_explain(GradCAM, "dissimilar")
    np.testing.assert_allclose(dissimilar.heatmaps[0, 0], [[1, 0], [0.25, 0]], atol=1e-6)
    np.testing.assert_allclose(dissimilar.scores, result.scores)  # scores stay the cosine


def test_gradcam_signed_map_sums_to_zero_by_hand():
    # Before the ReLU: [[-0.128, 0.128], [-0.032, 0.032]] (test_gradcam_by_hand), sum 0.
    model = TinyEncoder().eval()
    with gradient_mode():
        signed, _ = GradCAM(model, model.conv).signed_maps(TINY_X, similarity_target(TINY_REF))
    torch.testing.assert_close(signed[0, 0], torch.tensor([[-0.128, 0.128], [-0.032, 0.032]]))
    assert float(signed.sum()) == pytest.approx(0.0, abs=1e-7)


def test_gradcam_signed_map_sums_to_zero_when_the_embedding_is_the_mean():
    """g . e = 0 for the cosine target (g = (r_hat - s e_hat) / |e|), so sum_i sum_c w_c A_c(i)
    = HW g . e = 0 on a mean-pooled encoder: the map says where features lean towards the
    reference more than towards the image's own mean, not how much of the cosine they carry."""
    model, layer, _ = build("resnet18")
    pixels, references = inputs(2, 3, model.num_features)
    for polarity in ("similar", "dissimilar"):
        with gradient_mode():
            signed, _ = GradCAM(model, layer).signed_maps(pixels, similarity_target(references, polarity))
        totals = signed.sum(dim=(-2, -1))
        scale = signed.abs().sum(dim=(-2, -1))
        assert float((totals.abs() / scale).max()) < 1e-5
        assert float(scale.min()) > 0
    # Not a property of every pooling: the CLS-pooled ViT's map does not sum to zero.
    vit, vit_layer, reshape = build("vit_tiny")
    pixels, references = inputs(1, 3, vit.num_features)
    with gradient_mode():
        signed, _ = GradCAM(vit, vit_layer, reshape).signed_maps(pixels, similarity_target(references))
    assert float((signed.sum(dim=(-2, -1)).abs() / signed.abs().sum(dim=(-2, -1))).min()) > 1e-3


def tiny_weights(cls, options=None):
    model = TinyEncoder().eval()
    activations = TINY_X[:, None]  # (B, 1, C, h, w)
    grads = torch.tensor(TINY_GRADS).view(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2)
    return cls(model, model.conv, None, options).channel_weights(activations, grads)[0, 0]


def test_channel_weights_by_hand():
    torch.testing.assert_close(tiny_weights(GradCAM), torch.tensor([0.032, -0.024]))
    # GradCAM++ raw, channel 0: g = 0.032, g^2 = 0.001024, g^3 = 3.2768e-5, sum A0 = 12:
    #   a = 0.001024 / (2*0.001024 + 12*3.2768e-5 + 1e-6) = 0.001024 / 0.002442216
    #   w0 = sum_ij ReLU(g) a = 4 * 0.032 * a = 0.053669...
    # channel 1: g < 0, ReLU(g) = 0 -> w1 = 0.
    raw = tiny_weights(GradCAMPlusPlus, GradCAMPlusPlusOptions(gradient_scale="raw"))
    torch.testing.assert_close(raw, torch.tensor([4 * 0.032 * 0.001024 / 0.002442216, 0.0]))
    # unit scale: g / max|g| = (1, -0.75): a0 = 1 / (2 + 12 + 1e-6), w0 = 4 * a0 = 0.2857...
    unit = tiny_weights(GradCAMPlusPlus)
    torch.testing.assert_close(unit, torch.tensor([4 / (14 + 1e-6), 0.0]))


def test_gradcampp_map_by_hand():
    # Only channel 0 has a positive weight: map = A0 = [[2, 4], [2, 4]] -> [[0, 1], [0, 1]].
    _, result = tiny_explain(GradCAMPlusPlus)
    np.testing.assert_allclose(result.heatmaps[0, 0], [[0, 1], [0, 1]], atol=1e-6)


def test_input_gradient_by_hand_constant_map_is_zero():
    # |dS/dx| = (0.032, 0.024) everywhere; max over channels = 0.032 everywhere: a constant map,
    # which normalises to all zeros (not NaN).
    model = TinyEncoder().eval()
    with gradient_mode():
        attributions = InputGradient(model).attribute(TINY_X, similarity_target(TINY_REF))
    expected = torch.tensor(TINY_GRADS).abs().view(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2)
    torch.testing.assert_close(attributions, expected)
    result = InputGradient(model).explain(TINY_X, TINY_REF)
    np.testing.assert_array_equal(result.heatmaps, np.zeros((1, 1, 2, 2), np.float32))


# --------------------------------------------------------------------------------------------
# Invariants, over methods and over a CNN and a ViT

METHOD_NAMES = sorted(METHODS)


#: (architecture, method) pairs the invariants cover: simmap needs a mean-pooled encoder, so the
#: CLS-pooled ViT has no simmap case (it refuses it: test_simmap_refuses_a_cls_pooled_vit).
CASES = [
    (arch_name, method)
    for arch_name in ("resnet18", "vit_tiny")
    for method in METHOD_NAMES
    if not (method == "simmap" and arch_name == "vit_tiny")
]


@pytest.mark.parametrize(("arch", "method"), CASES, indirect=["arch"])
def test_shape_range_no_nan_no_side_effects(arch, method):
    _, model, layer, reshape = arch
    pixels, references = inputs(2, 3, model.num_features)
    pixels_before, references_before = pixels.clone(), references.clone()
    result = explainer(method, model, layer, reshape).explain(pixels, references)
    assert result.heatmaps.shape == (2, 3, SIZE, SIZE)
    assert result.heatmaps.dtype == np.float32
    assert np.isfinite(result.heatmaps).all()
    assert result.heatmaps.min() >= 0.0 and result.heatmaps.max() <= 1.0
    peaks = result.heatmaps.reshape(6, -1).max(axis=1)
    if method == "simmap":
        # The similar map is ReLU(share): empty exactly where no location has a positive share
        # (random references give negative cosines).
        shares = SimilarityMap(model, layer, reshape).decompose(pixels, references).shares
        np.testing.assert_array_equal(peaks == 0, (shares.amax(dim=(-2, -1)) <= 0).numpy().reshape(-1))
        assert peaks.max() == pytest.approx(1.0)
    else:
        assert (peaks == pytest.approx(1.0))  # no empty map
    expected_scores = F.normalize(model(pixels), dim=1) @ F.normalize(references, dim=1).T
    np.testing.assert_allclose(result.scores, expected_scores.detach().numpy(), atol=1e-5)
    torch.testing.assert_close(pixels, pixels_before, rtol=0, atol=0)
    torch.testing.assert_close(references, references_before, rtol=0, atol=0)
    assert not layer._forward_hooks and not layer._backward_hooks
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into weights


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_hooks_released_after_an_error(arch, method):
    _, model, layer, reshape = arch
    pixels, _ = inputs(1, 1, model.num_features)
    wrong_dim = torch.randn(2, model.num_features + 1)
    with pytest.raises(InvalidRequest, match="references"):
        explainer(method, model, layer, reshape).explain(pixels, wrong_dim)
    assert not layer._forward_hooks
    assert torch.is_grad_enabled()


@pytest.mark.parametrize(("arch", "method"), CASES, indirect=["arch"])
def test_batched_equals_one_by_one(arch, method):
    _, model, layer, reshape = arch
    pixels, references = inputs(3, 2, model.num_features)
    explain = explainer(method, model, layer, reshape)
    batched = explain.explain(pixels, references).heatmaps
    singles = np.concatenate([explain.explain(pixels[i : i + 1], references).heatmaps for i in range(3)])
    np.testing.assert_allclose(batched, singles, atol=1e-5)
    # and one reference at a time
    per_reference = np.concatenate(
        [explain.explain(pixels, references[k : k + 1]).heatmaps for k in range(2)], axis=1
    )
    np.testing.assert_allclose(batched, per_reference, atol=1e-5)


@pytest.mark.parametrize(("arch", "method"), CASES, indirect=["arch"])
def test_works_inside_inference_mode(arch, method):
    _, model, layer, reshape = arch
    explain = explainer(method, model, layer, reshape)
    pixels, references = inputs(1, 2, model.num_features)
    expected = explain.explain(pixels, references).heatmaps
    with torch.inference_mode():
        pixels_inf, references_inf = pixels.clone(), references.clone()  # inference tensors
        inside = explain.explain(pixels_inf, references_inf).heatmaps
        assert torch.is_inference_mode_enabled()
    np.testing.assert_allclose(inside, expected, atol=1e-6)


@pytest.mark.parametrize(("arch", "method"), CASES, indirect=["arch"])
def test_dissimilar_differs_from_similar(arch, method):
    _, model, layer, reshape = arch
    pixels, references = inputs(1, 2, model.num_features)
    explain = explainer(method, model, layer, reshape)
    similar = explain.explain(pixels, references, "similar")
    dissimilar = explain.explain(pixels, references, "dissimilar")
    np.testing.assert_array_equal(similar.scores, dissimilar.scores)
    # SmoothGrad too: its dissimilar form is signed (gradient x input), not |gradient|.
    assert np.abs(similar.heatmaps - dissimilar.heatmaps).max() > 0.05


def test_concurrent_calls_on_one_model_do_not_mix():
    model, layer, _ = build("resnet18")
    explain = GradCAM(model, layer)
    batches = [inputs(1, 2, model.num_features, seed=s) for s in (3, 4)]
    expected = [explain.explain(*batch).heatmaps for batch in batches]
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def work(i: int) -> None:
        for _ in range(4):
            results[i].append(explain.explain(*batches[i]).heatmaps)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in (0, 1):
        assert len(results[i]) == 4
        for maps in results[i]:
            np.testing.assert_allclose(maps, expected[i], atol=1e-6)
    assert not layer._forward_hooks


# --------------------------------------------------------------------------------------------
# Registry and validation


def test_simmap_refuses_a_cls_pooled_vit():
    model, layer, reshape = build("vit_tiny")
    pixels, references = inputs(1, 2, model.num_features)
    with pytest.raises(FailedPrecondition, match=r"'simmap' is not available for this encoder \(vit_tiny_patch16_224\)") as error:
        SimilarityMap(model, layer, reshape).explain(pixels, references)
    assert "gradcam, gradcampp, smoothgrad" in str(error.value)
    assert not layer._forward_hooks


def test_unknown_method_lists_the_known_ones():
    model, layer, _ = build("resnet18")
    with pytest.raises(UnknownNameError) as error:
        get_explainer("gradcam2", model, layer)
    for name in ("gradcam", "gradcampp", "smoothgrad", "simmap"):
        assert name in str(error.value)


def test_unknown_polarity_and_option():
    model, layer, _ = build("resnet18")
    pixels, references = inputs(1, 1, model.num_features)
    with pytest.raises(UnknownNameError, match="similar"):
        GradCAM(model, layer).explain(pixels, references, "opposite")
    # Options belong to their method: another method's are refused, by name and by class.
    with pytest.raises(InvalidRequest, match="SmoothGradOptions, not GradCAMPlusPlusOptions"):
        get_explainer("smoothgrad", model, layer, options=GradCAMPlusPlusOptions())
    with pytest.raises(InvalidRequest, match="GradCAMPlusPlus takes GradCAMPlusPlusOptions"):
        GradCAMPlusPlus(model, layer, options=SmoothGradOptions())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        SmoothGradOptions(n_samples=0)
    with pytest.raises(InvalidRequest, match="target layer"):
        get_explainer("gradcam", model, None)


def test_similarity_target_and_its_negation():
    references = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    embeddings = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(similarity_target(references)(embeddings), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(
        similarity_target(references, "dissimilar")(embeddings), torch.tensor([[-0.6, -0.8]])
    )
