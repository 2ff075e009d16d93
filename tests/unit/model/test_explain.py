"""explain_retrieval: both sides of a retrieval, one explainer call per side."""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from histoxplain_model.errors import DeadlineExceeded, InvalidRequest, UnknownNameError
from histoxplain_model.explain import explain_retrieval
from histoxplain_model.options import RiseOptions, SmoothGradOptions
from histoxplain_model.requests import ExplainRequest
from histoxplain_model.results import RetrievalExplanation
from histoxplain_model.saliency import get_explainer

torch.set_num_threads(1)


class StandInEncoder:
    """The Encoder contract (DEVELOPERS.md) on a small random ResNet-18 at 64 px."""

    input_size = (64, 64)

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
        self.target_layer = self.gradcam_layer = self.model.layer4
        self.reshape_transform = None

    def preprocess(self, images):
        batch = torch.stack([torch.from_numpy(image).permute(2, 0, 1).float() / 255 for image in images])
        return (F.interpolate(batch, size=self.input_size, mode="bilinear", antialias=True) - 0.5) / 0.25

    def embed(self, pixels):
        with torch.no_grad():
            return F.normalize(self.model(pixels), dim=1)


@pytest.fixture(scope="module")
def encoder():
    return StandInEncoder()


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (80, 96, 3), dtype=np.uint8) for _ in range(count)]


#: Short runs of the sampling methods.
FAST = {"smoothgrad": SmoothGradOptions(n_samples=3), "rise": RiseOptions(n_masks=12)}


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "smoothgrad", "simmap", "rise"])
def test_both_sides_match_the_explainer_one_reference_at_a_time(encoder, method):
    query, references = images(1, 1)[0], images(3, 2)
    options = FAST.get(method)
    result = explain_retrieval(encoder, ExplainRequest(query, references, method, "similar", "both", options))
    assert isinstance(result, RetrievalExplanation)
    assert result.query_heatmaps.shape == result.reference_heatmaps.shape == (3, 64, 64)
    for maps in (result.query_heatmaps, result.reference_heatmaps):
        assert maps.dtype == np.float32 and np.isfinite(maps).all()
        assert maps.min() >= 0 and maps.max() <= 1
    query_pixels, reference_pixels = encoder.preprocess([query]), encoder.preprocess(references)
    query_vector, reference_vectors = encoder.embed(query_pixels), encoder.embed(reference_pixels)
    np.testing.assert_allclose(result.scores, (reference_vectors @ query_vector.T)[:, 0], atol=1e-5)
    explainer = get_explainer(method, encoder.model, encoder.target_layer, options=options)
    for k in range(3):
        alone = explainer.explain(query_pixels, reference_vectors[k : k + 1]).heatmaps[0, 0]
        np.testing.assert_allclose(result.query_heatmaps[k], alone, atol=1e-5)
        reverse = explainer.explain(reference_pixels[k : k + 1], query_vector).heatmaps[0, 0]
        np.testing.assert_allclose(result.reference_heatmaps[k], reverse, atol=1e-5)


def test_one_side_only_and_given_embeddings(encoder):
    query, references = images(1, 3)[0], images(2, 4)
    query_only = explain_retrieval(encoder, ExplainRequest(query, references, "gradcam", side="query"))
    assert query_only.reference_heatmaps is None and query_only.query_heatmaps.shape == (2, 64, 64)
    retrieved = explain_retrieval(encoder, ExplainRequest(query, references, "gradcam", "dissimilar", side="retrieved"))
    assert retrieved.query_heatmaps is None and retrieved.reference_heatmaps.shape == (2, 64, 64)
    assert retrieved.polarity == "dissimilar" and retrieved.method == "gradcam"
    stored = explain_retrieval(encoder, ExplainRequest(
        query, references, "gradcam", side="query",
        query_embedding=encoder.embed(encoder.preprocess([query]))[0].numpy(),
        reference_embeddings=encoder.embed(encoder.preprocess(references)).numpy(),
    ))
    np.testing.assert_allclose(stored.query_heatmaps, query_only.query_heatmaps, atol=1e-6)
    np.testing.assert_allclose(stored.scores, query_only.scores, atol=1e-6)


def test_bad_requests(encoder):
    query, references = images(1)[0], images(1)
    with pytest.raises(UnknownNameError, match="retrieved"):
        explain_retrieval(encoder, ExplainRequest(query, references, "gradcam", side="left"))
    with pytest.raises(UnknownNameError, match="smoothgrad"):
        explain_retrieval(encoder, ExplainRequest(query, references, "lime"))
    with pytest.raises(UnknownNameError, match="dissimilar"):
        explain_retrieval(encoder, ExplainRequest(query, references, "gradcam", polarity="same"))
    with pytest.raises(InvalidRequest, match="at least one"):
        explain_retrieval(encoder, ExplainRequest(query, [], "gradcam"))
    with pytest.raises(InvalidRequest, match="GradCAMOptions, not SmoothGradOptions"):
        explain_retrieval(encoder, ExplainRequest(query, references, "gradcam", options=SmoothGradOptions()))


def test_real_encoder_on_real_histology():
    """The default preset's real ImageNet weights on the scikit-image IHC image."""
    encoders = pytest.importorskip("histoxplain_model.encoders")
    skimage_data = pytest.importorskip("skimage.data")
    from histoxplain_model.overlay import overlay_png

    encoder = encoders.load_encoder("efficientnet-lite0-imagenet")
    ihc = skimage_data.immunohistochemistry()  # (512, 512, 3) uint8
    tiles = [ihc[y : y + 128, x : x + 128] for y, x in ((0, 0), (0, 256), (256, 0), (256, 256))]
    with torch.inference_mode():  # as TorchServe calls it
        result = explain_retrieval(encoder, ExplainRequest(tiles[0], tiles[1:], "gradcampp"))
    assert result.query_heatmaps.shape == (3, *encoder.input_size)
    assert np.isfinite(result.query_heatmaps).all() and np.isfinite(result.reference_heatmaps).all()
    assert (result.query_heatmaps.reshape(3, -1).max(1) == pytest.approx(1.0))
    assert np.all((result.scores > 0) & (result.scores <= 1))  # tiles of one image are similar
    png = overlay_png(tiles[0], result.query_heatmaps[0])
    assert png[:4] == b"\x89PNG"


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "smoothgrad", "simmap", "rise"])
def test_native_cams_finish_to_the_same_maps(encoder, method):
    query, *references = images(4, seed=5)
    request = ExplainRequest(query, references, method, options=FAST.get(method))
    finished = explain_retrieval(encoder, request)
    native = explain_retrieval(encoder, request, native_cams=True)
    if method in ("smoothgrad", "rise"):  # input-gradient and mask maps are already at the input resolution
        assert native.map_size is None and native.finished() is native
    else:
        assert native.map_size == finished.query_heatmaps.shape[1:]
        assert native.query_heatmaps.shape[1:] < finished.query_heatmaps.shape[1:]  # target-layer grid
        assert native.query_heatmaps.min() >= 0
    again = native.finished()
    np.testing.assert_allclose(again.query_heatmaps, finished.query_heatmaps, atol=1e-5)
    np.testing.assert_allclose(again.reference_heatmaps, finished.reference_heatmaps, atol=1e-5)
    np.testing.assert_array_equal(again.scores, finished.scores)


@pytest.mark.parametrize("method", ["gradcam", "smoothgrad"])
def test_an_explanation_past_its_deadline_stops_itself(encoder, method):
    query, *references = images(5, seed=4)
    with pytest.raises(DeadlineExceeded, match="deadline"):
        explain_retrieval(encoder, ExplainRequest(query, references, method, deadline=time.time() - 1))


def test_a_long_smoothgrad_stops_within_one_chunk_of_its_deadline(encoder):
    query, *references = images(5, seed=5)
    long_run = SmoothGradOptions(n_samples=256, chunk_size=1)  # 256 noisy chunks x 4 backward passes
    one_chunk = time.perf_counter()
    explain_retrieval(encoder, ExplainRequest(query, references, "smoothgrad", side="query",
                                              options=SmoothGradOptions(n_samples=1, chunk_size=1)))
    one_chunk = time.perf_counter() - one_chunk
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        explain_retrieval(encoder, ExplainRequest(query, references, "smoothgrad", side="query", options=long_run,
                                                  deadline=time.time() + 3 * one_chunk))
    # Stopped after a few chunks, far from the 256 the request asked for.
    assert time.perf_counter() - started < 40 * one_chunk


def test_the_deadline_is_per_explanation_not_per_thread(encoder):
    query, *references = images(3, seed=6)
    with pytest.raises(DeadlineExceeded):
        explain_retrieval(encoder, ExplainRequest(query, references, "gradcam", deadline=time.time() - 1))
    explain_retrieval(encoder, ExplainRequest(query, references, "gradcam"))  # no deadline left behind


def test_the_served_gradcam_of_the_default_preset_hooks_the_stage_the_evaluation_chose() -> None:
    """efficientnet-lite0-imagenet: GradCAM on blocks.4 (14x14, faithful on every curve in
    docs/EVALUATION.md), equal to pytorch-grad-cam there; GradCAM++ and simmap keep bn2 (7x7)."""
    import pytorch_grad_cam

    from histoxplain_model.encoders import DEFAULT_PRESET, load_encoder

    real = load_encoder(DEFAULT_PRESET)
    assert real.gradcam_layer is real.model.blocks[4] and real.target_layer is real.model.bn2
    rng = np.random.default_rng(3)
    query, reference = (rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(2))
    served = explain_retrieval(real, ExplainRequest(query, [reference], "gradcam", side="query"))
    vector = real.embed(real.preprocess([reference]))[0]
    with pytorch_grad_cam.GradCAM(model=real.model, target_layers=[real.model.blocks[4]]) as cam:
        theirs = cam(input_tensor=real.preprocess([query]),
                     targets=[lambda output: F.cosine_similarity(output, vector, dim=0)])
    np.testing.assert_allclose(served.query_heatmaps[0], theirs[0], atol=1e-5)
    native = explain_retrieval(real, ExplainRequest(query, [reference], "gradcam", side="query"), native_cams=True)
    assert native.query_heatmaps.shape[-2:] == (14, 14)
    for method in ("gradcampp", "simmap"):
        raw = explain_retrieval(real, ExplainRequest(query, [reference], method, side="query"), native_cams=True)
        assert raw.query_heatmaps.shape[-2:] == (7, 7)
