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
    random_map,
)
from histoxplain_service.evaluation.sanity import (
    map_rank_correlation,
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
    chance = deletion_insertion(score, image, random_map((SIZE, SIZE), seed=3), baseline, steps=16)
    assert good.deletion[0] == pytest.approx(1.0, abs=1e-5)
    assert good.deletion_auc < chance.deletion_auc - 0.2
    assert good.insertion_auc > chance.insertion_auc + 0.2
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
