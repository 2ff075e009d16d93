"""The model library's faithfulness curves: ROAD's noisy linear imputation (exact on a linear
ramp), ROAD curves on a tiny model with known evidence, and verify_maps against the curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histoxplain_model.faithfulness import (
    baseline_image,
    deletion_insertion_many,
    road_curves_many,
    road_impute,
    smooth_random_map,
    verify_maps,
)

torch.set_num_threads(1)


def ramp(height: int = 20, width: int = 24) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([0.5 * cols + 0.25 * rows, cols - rows, np.full_like(rows, 3.0)])


def test_road_imputation_of_a_linear_ramp_is_exact() -> None:
    # A linear function equals the weighted mean of its 8 neighbours (the weights are symmetric),
    # so the linear system's solution is the ramp itself wherever the neighbourhood is whole.
    image = ramp()
    removed = np.zeros(image.shape[1:], bool)
    removed[4:15, 3:18] = True
    removed[16, 20] = True
    imputed = road_impute(image, removed, noise=0.0)
    np.testing.assert_allclose(imputed, image, atol=1e-9)


def test_road_imputation_only_changes_removed_pixels_and_adds_the_stated_noise() -> None:
    image = np.random.default_rng(0).random((3, 30, 30))
    removed = np.zeros((30, 30), bool)
    removed[5:25, 5:25] = True
    exact = road_impute(image, removed, noise=0.0)
    noisy = road_impute(image, removed, noise=0.05, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(noisy[:, ~removed], image[:, ~removed])
    assert not np.allclose(exact[:, removed], image[:, removed])
    assert np.std(noisy[:, removed] - exact[:, removed]) == pytest.approx(0.05, rel=0.1)
    # A removed pixel is the weighted mean of its neighbours: within the range of the kept pixels.
    assert exact.min() >= image.min() - 1e-9 and exact.max() <= image.max() + 1e-9


class RegionEncoder(nn.Module):
    """Embeds only the top-left 8x8 patch plus a constant."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        region = pixels[:, :, :8, :8].flatten(1)
        return torch.cat([region, torch.full_like(region[:, :1], 0.1)], dim=1)


def _setup(size: int = 32):
    encoder = RegionEncoder()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = encoder(image)[0].detach()

    def score(pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cosine_similarity(encoder(pixels), reference[None], dim=1)

    evidence = np.zeros((size, size), np.float32)
    evidence[:8, :8] = 1.0
    return score, image, evidence


def test_road_morf_falls_faster_and_lerf_stays_higher_for_the_evidence_map() -> None:
    score, image, evidence = _setup()
    chance = smooth_random_map((32, 32), (4, 4), seed=1)
    good, random = road_curves_many(score, image, [evidence, chance], steps=4, batch_size=3)
    assert good.deletion[0] == pytest.approx(1.0, abs=1e-5) and len(good.deletion) == 5
    assert good.deletion_auc < random.deletion_auc - 0.1
    assert good.insertion_auc > random.insertion_auc + 0.1
    # Batched scoring never changes a curve.
    alone = road_curves_many(score, image, [evidence], steps=4, batch_size=1)[0]
    np.testing.assert_allclose(alone.deletion, good.deletion, atol=1e-6)


def test_verify_maps_is_the_deletion_insertion_of_the_map_and_its_random_map() -> None:
    score, image, evidence = _setup()
    verified = verify_maps(score, image, [evidence], grid=(4, 4), steps=8, seed=5)[0]
    curves = deletion_insertion_many(
        score, image, [evidence, smooth_random_map((32, 32), (4, 4), 5)], baseline_image(image, "blur"), steps=8, seed=5
    )
    assert verified.deletion_auc == pytest.approx(curves[0].deletion_auc)
    assert verified.insertion_auc == pytest.approx(curves[0].insertion_auc)
    assert verified.random_deletion_auc == pytest.approx(curves[1].deletion_auc)
    assert verified.deletion_difference < 0 < verified.insertion_difference
