"""The CAM finish: the numpy one (histoxplain_model.wire.cams) and the torch one (saliency.base),
both matrix products, equal torch's own bilinear interpolation and each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histoxplain_model.wire.cams import finish_cams, normalise_maps, upsample_bilinear
from histoxplain_model.saliency.base import normalise_maps as torch_normalise
from histoxplain_model.saliency.base import upsample_maps as torch_upsample


@pytest.mark.parametrize(
    ("shape", "size"),
    [((2, 3, 7, 7), (224, 224)), ((1, 4, 14, 14), (224, 224)), ((5, 9), (37, 61)), ((3, 1, 1), (8, 8)),
     ((2, 6, 6), (6, 6)), ((1, 12, 10), (7, 5))],
)
def test_upsample_equals_torch_bilinear(shape, size) -> None:
    maps = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32) * 3
    batch = torch.from_numpy(maps).reshape(-1, 1, *shape[-2:])
    reference = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    reference = reference.reshape(*shape[:-2], *size).numpy()
    ours_numpy = upsample_bilinear(maps, size)
    ours_torch = torch_upsample(batch, size).reshape(*shape[:-2], *size).numpy()
    for ours in (ours_numpy, ours_torch):
        assert ours.shape == reference.shape and ours.dtype == np.float32
        np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-6)


def test_finish_equals_the_torch_pipeline_on_real_cams() -> None:
    # ReLU'd CAM-like maps: a peak, zeros elsewhere, and a constant (all-zero) map.
    y, x = np.mgrid[0:7, 0:7].astype(np.float32)
    cams = np.stack([np.maximum(0, 1.5 - np.hypot(y - 2, x - 4)), np.zeros((7, 7), np.float32)])[None]
    ours = finish_cams(cams, (224, 224))
    theirs = torch_normalise(torch_upsample(torch.from_numpy(cams), (224, 224))).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
    assert ours[0, 0].max() == pytest.approx(1.0) and ours[0, 0].min() == 0.0
    assert not ours[0, 1].any()


def test_normalise_keeps_the_range() -> None:
    maps = normalise_maps(np.array([[[2.0, 4.0], [3.0, 2.0]]], np.float32))
    np.testing.assert_allclose(maps, [[[0.0, 1.0], [0.5, 0.0]]])
