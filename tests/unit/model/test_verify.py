"""ExplainRequest.verify on a real pair (the default preset's real weights, scikit-image's IHC):
the AUCs are the evaluation's, native and finished maps agree, and the cost is the stated bound."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from histoxplain_model.encoders import DEFAULT_PRESET, load_encoder
from histoxplain_model.explain import explain_retrieval
from histoxplain_model.limits import VERIFY_FORWARD_PASSES_PER_MAP, VERIFY_STEPS
from histoxplain_model.requests import ExplainRequest
from histoxplain_service.evaluation.faithfulness import baseline_image, deletion_insertion_many, smooth_random_map

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(DEFAULT_PRESET)


@pytest.fixture(scope="module")
def tiles() -> tuple[np.ndarray, list[np.ndarray]]:
    from skimage import data

    ihc = data.immunohistochemistry()
    return np.ascontiguousarray(ihc[:224, :224]), [np.ascontiguousarray(ihc[256:480, 256:480]), np.ascontiguousarray(ihc[:224, 288:512])]


def test_verify_gives_the_evaluations_aucs(encoder, tiles) -> None:
    query, references = tiles
    explained = explain_retrieval(encoder, ExplainRequest(query, references, "gradcam", polarity="dissimilar", verify=True))
    assert len(explained.query_faithfulness) == 2 and len(explained.reference_faithfulness) == 2
    pixels = encoder.preprocess([query])
    vectors = encoder.embed(encoder.preprocess(references))
    for k, verified in enumerate(explained.query_faithfulness):

        def minus_cosine(images: torch.Tensor) -> torch.Tensor:
            return -(encoder.embed(images) @ vectors[k : k + 1].T)[:, 0]

        # The evaluation's computation: the map and the smooth random map on the grid of the layer
        # GradCAM hooked (the default preset's blocks.4, 14x14), blur baseline.
        curves = deletion_insertion_many(
            minus_cosine, pixels, [explained.query_heatmaps[k], smooth_random_map((224, 224), (14, 14), k)],
            baseline_image(pixels, "blur"), steps=VERIFY_STEPS, seed=k,
        )
        assert verified.steps == VERIFY_STEPS
        assert verified.deletion_auc == pytest.approx(curves[0].deletion_auc, abs=1e-5)
        assert verified.insertion_auc == pytest.approx(curves[0].insertion_auc, abs=1e-5)
        assert verified.random_deletion_auc == pytest.approx(curves[1].deletion_auc, abs=1e-5)
        assert verified.random_insertion_auc == pytest.approx(curves[1].insertion_auc, abs=1e-5)
        assert verified.deletion_difference == pytest.approx(verified.deletion_auc - verified.random_deletion_auc)


def test_native_maps_verify_like_finished_ones(encoder, tiles) -> None:
    query, references = tiles
    request = ExplainRequest(query, references[:1], "gradcampp", side="retrieved", verify=True)
    native = explain_retrieval(encoder, request, native_cams=True)
    finished = explain_retrieval(encoder, request)
    assert native.map_size is not None and native.query_faithfulness is None
    for a, b in zip(native.reference_faithfulness, finished.reference_faithfulness):
        assert a.deletion_auc == pytest.approx(b.deletion_auc, abs=1e-4)
        assert a.random_insertion_auc == pytest.approx(b.random_insertion_auc, abs=1e-4)


def test_verify_costs_the_stated_forward_passes_and_nothing_without_it(encoder, tiles) -> None:
    query, references = tiles
    embedded = []

    def counting_embedder(images: np.ndarray) -> np.ndarray:
        embedded.append(images.shape[0])
        with torch.no_grad():
            return encoder.model(torch.from_numpy(images)).numpy()  # the model's own, as ONNX's embed_raw

    request = ExplainRequest(query, references, "simmap", side="both", verify=True)
    explained = explain_retrieval(encoder, request, pixel_embedder=counting_embedder)
    maps = len(explained.query_faithfulness) + len(explained.reference_faithfulness)
    assert sum(embedded) == maps * VERIFY_FORWARD_PASSES_PER_MAP
    embedded.clear()
    plain = explain_retrieval(encoder, ExplainRequest(query, references, "simmap"), pixel_embedder=counting_embedder)
    assert plain.query_faithfulness is None and sum(embedded) == 0
