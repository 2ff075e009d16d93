"""Deletion/insertion and the model-randomisation check on a tiny model with known evidence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.evaluation.faithfulness import (
    baseline_image,
    centred_gaussian_map,
    deletion_insertion,
    deletion_insertion_many,
    pixel_random_map,
    smooth_random_map,
)
from histoxplain_service.evaluation.sanity import (
    map_rank_correlation,
    randomise_cascade,
    randomise_top_blocks,
    top_blocks,
)

torch.set_num_threads(1)
SIZE = 32


class RegionEncoder(nn.Module):
    """Embeds only the top-left 8x8 patch: its pixels, flattened, plus a small constant."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        region = pixels[:, :, :8, :8].flatten(1)
        return torch.cat([region, torch.full_like(region[:, :1], 0.1)], dim=1)


def cosine_score(encoder: nn.Module, reference: torch.Tensor):
    def score(pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(encoder(pixels), reference[None], dim=1)

    return score


def textured_image(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, SIZE, SIZE, generator=generator) * 2 - 1


def test_map_on_evidence_beats_random_map() -> None:
    encoder = RegionEncoder()
    image = textured_image()
    reference = encoder(image)[0].detach()
    score = cosine_score(encoder, reference)
    baseline = baseline_image(image, "zero")
    evidence_map = np.zeros((SIZE, SIZE), np.float32)
    evidence_map[:8, :8] = 1.0
    good = deletion_insertion(score, image, evidence_map, baseline, steps=16)
    chance = deletion_insertion(score, image, pixel_random_map((SIZE, SIZE), seed=3), baseline, steps=16)
    assert good.deletion_auc < chance.deletion_auc - 0.2
    assert good.insertion_auc > chance.insertion_auc + 0.2
    # A smooth random map sometimes lands on the evidence (it is one 8x8 cell of a 4x4 grid): on average it does not.
    smooth = [deletion_insertion(score, image, smooth_random_map((SIZE, SIZE), (4, 4), seed), baseline, steps=16) for seed in range(8)]
    assert good.deletion_auc < np.mean([c.deletion_auc for c in smooth]) - 0.2
    assert good.insertion_auc > np.mean([c.insertion_auc for c in smooth]) + 0.1
    assert good.deletion[0] == pytest.approx(1.0, abs=1e-5)
    # After 1/16 of the pixels (64 = the whole 8x8 region) the evidence is gone / restored.
    assert good.deletion[1] == pytest.approx(good.deletion[-1], abs=1e-5)
    assert good.insertion[1] == pytest.approx(1.0, abs=1e-5)


def test_curves_are_batch_size_independent_and_do_not_mutate() -> None:
    encoder = RegionEncoder()
    image = textured_image(1)
    before = image.clone()
    score = cosine_score(encoder, encoder(textured_image(7))[0])
    baseline = baseline_image(image, "blur")
    saliency = centred_gaussian_map((SIZE, SIZE))
    one = deletion_insertion(score, image, saliency, baseline, steps=8, batch_size=1)
    many = deletion_insertion(score, image, saliency, baseline, steps=8, batch_size=9)
    np.testing.assert_allclose(one.deletion, many.deletion, atol=1e-6)
    np.testing.assert_allclose(one.insertion, many.insertion, atol=1e-6)
    assert torch.equal(image, before)
    assert one.fractions[0] == 0 and one.fractions[-1] == 1
    # The endpoints meet: full deletion == insertion start (the baseline), and vice versa.
    assert one.deletion[-1] == pytest.approx(one.insertion[0], abs=1e-6)
    assert one.insertion[-1] == pytest.approx(one.deletion[0], abs=1e-6)


def test_many_maps_at_once_equal_one_at_a_time() -> None:
    encoder = RegionEncoder()
    image = textured_image(3)
    score = cosine_score(encoder, encoder(textured_image(8))[0])
    baseline = baseline_image(image, "blur")
    maps = [centred_gaussian_map((SIZE, SIZE)), pixel_random_map((SIZE, SIZE), 1), smooth_random_map((SIZE, SIZE), (4, 4), 2)]
    calls: list[int] = []

    def counted(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(len(pixels))
        return score(pixels)

    together = deletion_insertion_many(counted, image, maps, baseline, steps=8, batch_size=5, seed=4)
    # The image and the baseline once, then 3 maps x 2 curves x 7 interior points, 5 per forward pass.
    assert calls[0] == 2 and sum(calls[1:]) == 3 * 2 * 7 and max(calls[1:]) == 5
    for saliency, curves in zip(maps, together):
        alone = deletion_insertion(score, image, saliency, baseline, steps=8, batch_size=1, seed=4)
        np.testing.assert_allclose(curves.deletion, alone.deletion, atol=1e-6)
        np.testing.assert_allclose(curves.insertion, alone.insertion, atol=1e-6)


def test_smooth_random_map_is_as_smooth_as_gradcam() -> None:
    from histoxplain_model.saliency import normalise_maps, upsample_maps

    smooth = smooth_random_map((64, 64), (8, 8), seed=5)
    assert smooth.shape == (64, 64) and smooth.dtype == np.float32
    assert smooth.min() == pytest.approx(0.0) and smooth.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(smooth, smooth_random_map((64, 64), (8, 8), seed=5))
    assert not np.array_equal(smooth, smooth_random_map((64, 64), (8, 8), seed=6))
    # Same upsampling as GradCAM: a GradCAM-style map made from the same 8x8 noise is identical.
    noise = torch.from_numpy(np.random.default_rng(5).random((8, 8), dtype=np.float32))
    np.testing.assert_array_equal(smooth, normalise_maps(upsample_maps(noise[None, None], (64, 64)))[0, 0].numpy())
    # Neighbouring pixels are strongly correlated, unlike pixel noise.
    pixel = pixel_random_map((64, 64), seed=5)
    assert np.corrcoef(smooth[:, :-1].ravel(), smooth[:, 1:].ravel())[0, 1] > 0.9
    assert abs(np.corrcoef(pixel[:, :-1].ravel(), pixel[:, 1:].ravel())[0, 1]) < 0.1


def test_blur_baseline_removes_structure_keeps_mean() -> None:
    image = textured_image(2)
    blurred = baseline_image(image, "blur")
    assert blurred.shape == image.shape
    assert blurred.std() < image.std() / 3
    assert torch.allclose(blurred.mean(dim=(2, 3)), image.mean(dim=(2, 3)), atol=0.05)
    with pytest.raises(InvalidRequest, match="known: blur, zero"):
        baseline_image(image, "noise")


def test_map_shape_is_checked() -> None:
    image = textured_image()
    with pytest.raises(InvalidRequest, match="resize the map"):
        deletion_insertion(lambda x: x.mean(dim=(1, 2, 3)), image, np.zeros((8, 8)), image)


def test_centred_gaussian_peaks_in_centre() -> None:
    gaussian = centred_gaussian_map((31, 31))
    assert np.unravel_index(gaussian.argmax(), gaussian.shape) == (15, 15)
    assert gaussian.max() == pytest.approx(1.0)


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
        )
        self.head = nn.Linear(16, 8)

    def get_classifier(self) -> nn.Module:
        """timm's name for the head (the similarity decomposition applies it per location)."""
        return self.head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(pixels)).mean(dim=(2, 3)))


def input_gradient_map(model: nn.Module, image: torch.Tensor, reference_image: torch.Tensor) -> np.ndarray:
    """|d cos(f(x), f(ref)) / dx| summed over channels: depends on the weights."""
    pixels = image.clone().requires_grad_(True)
    with torch.no_grad():
        reference = model(reference_image)
    score = torch.nn.functional.cosine_similarity(model(pixels), reference).sum()
    (gradient,) = torch.autograd.grad(score, pixels)
    return gradient.abs().sum(dim=1)[0].numpy()


def edge_map(model: nn.Module, image: torch.Tensor, reference_image: torch.Tensor) -> np.ndarray:
    """Sobel magnitude of the image: ignores the model entirely."""
    gray = image.mean(dim=1, keepdim=True)
    kernel = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx = torch.nn.functional.conv2d(gray, kernel, padding=1)
    gy = torch.nn.functional.conv2d(gray, kernel.transpose(2, 3), padding=1)
    return torch.sqrt(gx**2 + gy**2)[0, 0].numpy()


def test_sanity_check_flags_edge_detector_not_gradient() -> None:
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    randomised, names = randomise_top_blocks(model, n_blocks=1, seed=1)
    assert names == ["blocks.1", "head"]
    assert torch.equal(model.blocks[0][0].weight, randomised.blocks[0][0].weight)
    assert not torch.equal(model.blocks[1][0].weight, randomised.blocks[1][0].weight)
    image, reference = textured_image(4), textured_image(5)
    edges = map_rank_correlation(edge_map(model, image, reference), edge_map(randomised, image, reference))
    gradients = map_rank_correlation(
        input_gradient_map(model, image, reference), input_gradient_map(randomised, image, reference)
    )
    assert edges == pytest.approx(1.0)
    assert gradients < 0.5


def test_cascade_accumulates_from_the_top_and_keeps_flagging_edges() -> None:
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    cascade = randomise_cascade(model, 3, seed=1)
    # Two blocks: a third step has nothing left to randomise.
    assert [names for _, names in cascade] == [["blocks.1", "head"], ["blocks.0", "blocks.1", "head"]]
    (first, _), (second, _) = cascade
    assert torch.equal(first.blocks[1][0].weight, second.blocks[1][0].weight)  # step 2 keeps step 1's weights
    assert not torch.equal(first.blocks[0][0].weight, second.blocks[0][0].weight)
    assert torch.equal(model.blocks[0][0].weight, first.blocks[0][0].weight)
    assert torch.equal(model.stem.weight, second.stem.weight)
    image, reference = textured_image(4), textured_image(5)
    for randomised, _ in cascade:
        assert map_rank_correlation(edge_map(model, image, reference), edge_map(randomised, image, reference)) == pytest.approx(1.0)
        assert map_rank_correlation(
            input_gradient_map(model, image, reference), input_gradient_map(randomised, image, reference)
        ) < 0.5


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "smoothgrad", "simmap"])
def test_every_method_has_its_own_dissimilar_map(method: str) -> None:
    """Why the evaluation explains each polarity: no method's dissimilar map is its similar one."""
    from histoxplain_model.options import SmoothGradOptions
    from histoxplain_model.saliency import get_explainer

    torch.manual_seed(0)
    model = TinyConvNet().eval()
    options = SmoothGradOptions(n_samples=3) if method == "smoothgrad" else None
    explainer = get_explainer(method, model, model.blocks[1], options=options)
    reference = model(textured_image(5)).detach()
    similar = explainer.explain(textured_image(4), reference, polarity="similar").heatmaps
    dissimilar = explainer.explain(textured_image(4), reference, polarity="dissimilar").heatmaps
    assert similar.std() > 0 and dissimilar.std() > 0
    assert np.abs(similar - dissimilar).max() > 0.1


def test_top_blocks_of_timm_models() -> None:
    timm = pytest.importorskip("timm")
    effnet = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    assert [name for name, _ in top_blocks(effnet)] == ["blocks.6", "conv_head", "bn2"]
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert [name for name, _ in top_blocks(resnet)] == ["layer4"]
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    assert [name for name, _ in top_blocks(vit, 2)][:3] == ["blocks.10", "blocks.11", "norm"]
    wrapped = nn.Sequential(effnet)
    assert [name for name, _ in top_blocks(wrapped)][0] == "0.blocks.6"
