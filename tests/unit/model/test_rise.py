"""RISE for similarity: masks, the two polarities' formulas, shared forward passes, options, the
stop signal, the ONNX Runtime path, a CLS-pooled ViT and real pairs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import math
import threading

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from histoxplain_model.deadlines import deadline
from histoxplain_model.errors import Cancelled, InvalidRequest
from histoxplain_model.options import RiseOptions, SmoothGradOptions
from histoxplain_model.saliency import Rise, get_explainer, normalise_maps
from histoxplain_model.saliency.rise import fill_image, mask_grids, masks_at

torch.set_num_threads(1)

SIZE = 64


class CountingModel(nn.Module):
    """A real model that counts its forward passes and the images it saw; ``on_call`` runs
    before pass number ``call_at`` (1-based)."""

    def __init__(self, inner: nn.Module, call_at: int = 0, on_call=None) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.images = 0
        self.call_at, self.on_call = call_at, on_call

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += pixels.shape[0]
        if self.on_call is not None and self.calls == self.call_at:
            self.on_call()
        return self.inner(pixels)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=0).eval()


def vit_tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=SIZE, global_pool="token"
    ).eval()


def inputs(batch: int, refs: int, dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, SIZE, SIZE, generator=generator), torch.randn(refs, dim, generator=generator)


# -- masks -------------------------------------------------------------------------------------


def test_masks_are_smooth_shifted_grids_kept_with_probability_p():
    options = RiseOptions(n_masks=2000, grid=7, keep_probability=0.3, seed=5)
    grids, shifts, cell = mask_grids(options, (SIZE, SIZE))
    assert grids.shape == (2000, 1, 7, 7) and set(torch.unique(grids).tolist()) == {0.0, 1.0}
    assert cell == (math.ceil(SIZE / 7),) * 2
    assert int(shifts.min()) == 0 and int(shifts.max()) == cell[0] - 1  # shifts cover one cell
    assert float(grids.mean()) == pytest.approx(0.3, abs=0.01)
    masks = masks_at(grids, shifts, cell, (SIZE, SIZE))
    assert masks.shape == (2000, SIZE, SIZE) and float(masks.min()) >= 0 and float(masks.max()) <= 1
    # E[M(i)] = p at every pixel (bilinear upsampling of cells that are 1 with probability p).
    assert float(masks.mean()) == pytest.approx(0.3, abs=0.01)
    assert float((masks.mean(dim=0) - 0.3).abs().max()) < 0.06
    # Smooth: a step between neighbouring pixels is at most 1/cell (bilinear over one cell),
    # and the masks are not binary.
    assert float((masks[:, 1:] - masks[:, :-1]).abs().max()) <= 1 / cell[0] + 1e-6
    assert float(((masks > 0.01) & (masks < 0.99)).float().mean()) > 0.2
    # The same seed draws the same masks; another seed other masks.
    again = mask_grids(options, (SIZE, SIZE))
    assert torch.equal(again[0], grids) and torch.equal(again[1], shifts)
    other = mask_grids(RiseOptions(n_masks=2000, grid=7, keep_probability=0.3, seed=6), (SIZE, SIZE))
    assert not torch.equal(other[0], grids)


def test_fills():
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    mean = fill_image(pixels, "mean")
    torch.testing.assert_close(mean[:, :, 5, 7], pixels.mean(dim=(-2, -1)))
    blurred = fill_image(pixels, "blur")
    assert blurred.shape == pixels.shape
    assert float(blurred.std()) < 0.2 * float(pixels.std())  # structure gone
    torch.testing.assert_close(blurred.mean(dim=(-2, -1)), pixels.mean(dim=(-2, -1)), atol=0.05, rtol=0)


# -- the maps ------------------------------------------------------------------------------------


def by_hand(model: nn.Module, image: torch.Tensor, reference: torch.Tensor, options: RiseOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Both polarities' maps straight from the formulas of the module docstring, one mask at a time."""
    grids, shifts, cell = mask_grids(options, (SIZE, SIZE))
    masks = masks_at(grids, shifts, cell, (SIZE, SIZE))
    fill = fill_image(image[None], options.fill)[0]
    with torch.no_grad():
        cosines = torch.stack([
            F.cosine_similarity(model((fill + m * (image - fill))[None]), reference[None])[0] for m in masks
        ])
    n, p = options.n_masks, options.keep_probability
    centred = (masks * (cosines - cosines.mean())[:, None, None]).sum(0) / (n * p * (1 - p))
    # The paper's S(i) = sum M s / (N p) minus the control variate: the same map after the min-max
    # in expectation (E[M(i)] = p), exactly (S - mean(s) mean(M) / p) / (1 - p) per sample.
    paper = (masks * cosines[:, None, None]).sum(0) / (n * p)
    torch.testing.assert_close(centred, (paper - cosines.mean() * masks.mean(0) / p) / (1 - p), atol=1e-5, rtol=1e-5)
    return normalise_maps(centred), normalise_maps((-centred).clamp(min=0))


@pytest.mark.parametrize("fill", ["blur", "mean"])
def test_maps_follow_the_formulas(fill):
    model = resnet18()
    pixels, references = inputs(1, 1, model.num_features)
    options = RiseOptions(n_masks=20, grid=4, keep_probability=0.4, fill=fill, batch_size=7)
    explainer = get_explainer("rise", model, options=options)
    similar, dissimilar = by_hand(model, pixels[0], references[0], options)
    np.testing.assert_allclose(explainer.explain(pixels, references).heatmaps[0, 0], similar.numpy(), atol=1e-4)
    np.testing.assert_allclose(explainer.explain(pixels, references, "dissimilar").heatmaps[0, 0], dissimilar.numpy(), atol=1e-4)


def test_finds_the_only_region_the_model_sees():
    """A model whose embedding depends on the top-left quarter only: the similar map puts its
    mass there; hiding any part of the quarter lowers the cosine, so the dissimilar map is 0 there."""

    class TopLeft(nn.Module):
        """The top-left quarter's 8x8 px block means, centred: hiding a block moves the cosine."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            blocks = F.avg_pool2d(x[:, :, : SIZE // 2, : SIZE // 2], 8).flatten(1)
            return blocks - blocks.mean(dim=1, keepdim=True)

    model = TopLeft().eval()
    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(pixels)  # the image's own embedding: keeping the quarter keeps the cosine
    result = get_explainer("rise", model, options=RiseOptions(n_masks=300, fill="mean")).explain(pixels, reference)
    heatmap = result.heatmaps[0, 0]
    quarter, far = heatmap[: SIZE // 2 - 8, : SIZE // 2 - 8].mean(), heatmap[SIZE // 2 + 8 :, SIZE // 2 + 8 :].mean()
    assert quarter > 0.6 and far < 0.35, (quarter, far)
    dissimilar = get_explainer("rise", model, options=RiseOptions(n_masks=300, fill="mean")).explain(pixels, reference, "dissimilar")
    assert dissimilar.heatmaps[0, 0, : SIZE // 2 - 8, : SIZE // 2 - 8].mean() < 0.02


def test_deterministic_and_independent_of_batching_and_of_other_references():
    model = resnet18()
    pixels, references = inputs(2, 3, model.num_features)
    options = RiseOptions(n_masks=30, batch_size=8, seed=11)
    maps = get_explainer("rise", model, options=options).explain(pixels, references).heatmaps
    again = get_explainer("rise", model, options=options).explain(pixels, references).heatmaps
    np.testing.assert_array_equal(maps, again)
    rebatched = get_explainer("rise", model, options=RiseOptions(n_masks=30, batch_size=30, seed=11))
    np.testing.assert_allclose(rebatched.explain(pixels, references).heatmaps, maps, atol=1e-5)
    alone = get_explainer("rise", model, options=options).explain(pixels[1:], references[2:]).heatmaps
    np.testing.assert_allclose(alone[0, 0], maps[1, 2], atol=1e-5)
    reseeded = get_explainer("rise", model, options=RiseOptions(n_masks=30, batch_size=8, seed=12))
    assert np.abs(reseeded.explain(pixels, references).heatmaps - maps).max() > 0.05


def test_k_references_cost_the_forward_passes_of_one():
    counting = CountingModel(resnet18())
    options = RiseOptions(n_masks=40, batch_size=16)
    pixels, references = inputs(1, 10, 512)
    explainer = get_explainer("rise", counting, options=options)
    explainer.explain(pixels, references[:1])
    one = (counting.calls, counting.images)
    counting.calls = counting.images = 0
    explainer.explain(pixels, references)
    assert (counting.calls, counting.images) == one == (1 + math.ceil(40 / 16), 1 + 40)
    # The retrieved side: every image has its own N masked passes.
    counting.calls = counting.images = 0
    explainer.explain(torch.cat([pixels] * 3), references[:1])
    assert counting.images == 3 * (1 + 40)


def test_works_on_a_cls_pooled_vit_and_the_polarities_differ():
    model = vit_tiny()
    pixels, references = inputs(1, 2, model.num_features)
    explainer = get_explainer("rise", model, model.blocks[-1].norm1, options=RiseOptions(n_masks=48, batch_size=16))
    similar = explainer.explain(pixels, references)
    dissimilar = explainer.explain(pixels, references, "dissimilar")
    assert similar.heatmaps.shape == (1, 2, SIZE, SIZE) and np.isfinite(similar.heatmaps).all()
    expected = F.normalize(model(pixels), dim=1) @ F.normalize(references, dim=1).T
    np.testing.assert_allclose(similar.scores, expected.detach().numpy(), atol=1e-5)
    assert np.abs(similar.heatmaps - dissimilar.heatmaps).max() > 0.05
    # Not the mirror image of the similar map: the dissimilar one is 0 wherever a region raises the cosine.
    assert np.abs(dissimilar.heatmaps - (1 - similar.heatmaps)).max() > 0.05
    assert (dissimilar.heatmaps == 0).mean() > 0.05


# -- options, errors, stop signal --------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_masks", 0), ("n_masks", 2001), ("n_masks", 1.5), ("grid", 1), ("grid", 33), ("keep_probability", 0.0),
     ("keep_probability", 1.0), ("keep_probability", float("nan")), ("fill", "zero"), ("seed", -1),
     ("batch_size", 0), ("batch_size", 257)],
)
def test_invalid_options_are_refused_by_field_name(field, value):
    with pytest.raises(InvalidRequest, match=rf"^{field} ") as error:
        RiseOptions(**{field: value})
    assert "RISE" in str(error.value) or field == "seed"


def test_another_methods_options_are_refused():
    with pytest.raises(InvalidRequest, match="RiseOptions, not SmoothGradOptions"):
        get_explainer("rise", resnet18(), options=SmoothGradOptions())
    with pytest.raises(InvalidRequest, match="references"):
        get_explainer("rise", resnet18()).explain(*inputs(1, 1, 513))


def test_stop_signal_ends_the_work_between_batches():
    stop = threading.Event()
    counting = CountingModel(resnet18(), call_at=3, on_call=stop.set)  # set during the 2nd masked batch
    explainer = get_explainer("rise", counting, options=RiseOptions(n_masks=100, batch_size=10))
    with deadline(None, stop), pytest.raises(Cancelled):
        explainer.explain(*inputs(1, 2, 512))
    assert counting.calls == 3  # the clean pass, two masked batches; the other 8 never ran


# -- the ONNX Runtime path -----------------------------------------------------------------------


def test_pixel_embedder_replaces_the_torch_forward_passes(tmp_path):
    pytest.importorskip("onnxruntime")
    from histoxplain_model.onnx_embedder import OnnxEmbedder, export_onnx

    model = resnet18()
    embedder = OnnxEmbedder(export_onnx(model, tmp_path / "resnet18.onnx", (SIZE, SIZE)))
    counting = CountingModel(model)
    options = RiseOptions(n_masks=32, batch_size=16)
    pixels, references = inputs(1, 3, model.num_features)
    through_onnx = get_explainer("rise", counting, options=options, pixel_embedder=embedder.embed_raw)
    onnx_maps = through_onnx.explain(pixels, references)
    assert counting.calls == 0  # no torch forward pass at all
    torch_maps = get_explainer("rise", model, options=options).explain(pixels, references)
    np.testing.assert_allclose(onnx_maps.heatmaps, torch_maps.heatmaps, atol=2e-3)
    np.testing.assert_allclose(onnx_maps.scores, torch_maps.scores, atol=1e-4)
    assert isinstance(through_onnx, Rise)


def test_the_projection_target_runs_through_the_pixel_embedder_too():
    """The pixel embedder returns the model's own embeddings, not normalised, so the projection
    (e . r_hat, which needs |e|) is computed from them as exactly as the cosine: no torch pass."""
    model = resnet18()
    counting = CountingModel(model)
    options = RiseOptions(n_masks=8, batch_size=8)
    pixels, references = inputs(1, 2, model.num_features)

    def raw(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()

    explainer = get_explainer("rise", counting, options=options, pixel_embedder=raw)
    torch_path = get_explainer("rise", model, options=options)
    expected = {}
    for target in ("cosine", "projection"):
        expected[target] = torch_path.explain(pixels, references, target=target).heatmaps
        np.testing.assert_allclose(explainer.explain(pixels, references, target=target).heatmaps, expected[target], atol=1e-6)
    assert counting.calls == 0
    # A normalised embedder would give the projection the cosine's maps: the two must differ here.
    assert not np.allclose(expected["projection"], expected["cosine"])
