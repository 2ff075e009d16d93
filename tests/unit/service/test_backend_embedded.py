"""The in-process model backend: ONNX embeddings agree with torch, errors are the domain's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from skimage import data

from histoxplain_model.errors import DeadlineExceeded, InvalidRequest, UnknownNameError
from histoxplain_model.requests import ExplainRequest
from histoxplain_service.backends.embedded import create_embedded_backend
from histoxplain_service.config import Settings


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    return create_embedded_backend(Settings(data_dir=tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    ihc = data.immunohistochemistry()
    return [ihc[:224, :224], ihc[200:424, 100:324], ihc[288:, 288:]]


def test_embeddings_come_from_onnx_and_match_torch(backend, tiles: list[np.ndarray]) -> None:
    assert backend._pixel_embedder is not None, "onnxruntime is installed, so embeddings should use it"
    onnx = backend.embed(tiles)
    torch_embeddings = backend.encoder.embed_images(tiles)
    assert onnx.dtype == np.float32 and onnx.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(onnx * torch_embeddings, axis=1)) >= 0.9999
    assert list((backend_dir := Path(backend_path(backend))).glob("*.onnx")), backend_dir


def backend_path(backend) -> Path:
    return backend._pixel_embedder.__self__.path.parent


def test_info_describes_the_encoder(backend) -> None:
    info = backend.info()
    assert (info.preset, info.embedding_dim, info.input_size) == ("efficientnet-lite0-imagenet", 1280, (224, 224))
    assert set(info.methods) == {"gradcam", "gradcampp", "smoothgrad", "simmap", "rise"} and info.backend == "embedded"


def test_explain_scores_are_the_embedding_cosines(backend, tiles: list[np.ndarray]) -> None:
    result = backend.explain(ExplainRequest(tiles[0], tiles[1:], "gradcam", "similar", "both"))
    embeddings = backend.encoder.embed_images(tiles)
    np.testing.assert_allclose(result.scores, embeddings[1:] @ embeddings[0], atol=1e-4)
    assert result.query_heatmaps.shape == (2, 224, 224) and result.reference_heatmaps.shape == (2, 224, 224)


@pytest.mark.parametrize("given", ["both", "query", "references"])
def test_given_embeddings_give_the_same_explanation(backend, tiles: list[np.ndarray], given: str) -> None:
    embeddings = backend.embed(tiles)
    query_embedding = embeddings[0] if given in ("both", "query") else None
    reference_embeddings = embeddings[1:] if given in ("both", "references") else None
    result = backend.explain(ExplainRequest(
        tiles[0], tiles[1:], "gradcam", "similar", "both",
        query_embedding=query_embedding, reference_embeddings=reference_embeddings,
    ))
    recomputed = backend.explain(ExplainRequest(tiles[0], tiles[1:], "gradcam", "similar", "both"))
    np.testing.assert_allclose(result.scores, recomputed.scores, atol=1e-6)
    np.testing.assert_allclose(result.query_heatmaps, recomputed.query_heatmaps, atol=1e-5)
    np.testing.assert_allclose(result.reference_heatmaps, recomputed.reference_heatmaps, atol=1e-5)


def test_given_embeddings_are_used_not_recomputed(backend, tiles: list[np.ndarray], monkeypatch) -> None:
    embeddings = backend.embed(tiles)
    monkeypatch.setattr(backend, "_pixel_embedder", None)
    monkeypatch.setattr(backend.encoder, "embed", lambda pixels: pytest.fail("embedded again"))
    flipped = -embeddings[1:]  # the scores must follow the vectors given, not the pixels
    result = backend.explain(ExplainRequest(
        tiles[0], tiles[1:], "gradcam", "similar", "query",
        query_embedding=embeddings[0], reference_embeddings=flipped,
    ))
    np.testing.assert_allclose(result.scores, flipped @ embeddings[0], atol=1e-5)


def test_embeddings_of_the_wrong_shape_are_invalid(backend, tiles: list[np.ndarray]) -> None:
    embeddings = backend.embed(tiles)
    with pytest.raises(InvalidRequest, match="query_embedding"):
        backend.explain(ExplainRequest(tiles[0], tiles[1:], "gradcam", query_embedding=embeddings[0, :100]))
    with pytest.raises(InvalidRequest, match="reference_embeddings"):
        backend.explain(ExplainRequest(tiles[0], tiles[1:], "gradcam", reference_embeddings=embeddings[1:2]))
    with pytest.raises(InvalidRequest, match="NaN"):
        backend.explain(ExplainRequest(tiles[0], tiles[1:], "gradcam", query_embedding=np.full(1280, np.nan, np.float32)))


def test_errors(backend, tiles: list[np.ndarray]) -> None:
    with pytest.raises(InvalidRequest, match="at least one"):
        backend.embed([])
    with pytest.raises(InvalidRequest, match="at least one"):
        backend.explain(ExplainRequest(tiles[0], [], "gradcam"))
    with pytest.raises(UnknownNameError, match="gradcam"):
        backend.explain(ExplainRequest(tiles[0], tiles[1:], "lime"))
    with pytest.raises(DeadlineExceeded):
        backend.embed(tiles, timeout=0.0)


def test_explain_passes_method_options_to_the_library(backend, tiles: list[np.ndarray]) -> None:
    from histoxplain_model.explain import explain_retrieval
    from histoxplain_model.options import SmoothGradOptions

    request = ExplainRequest(tiles[0], tiles[1:2], "smoothgrad", side="query", options=SmoothGradOptions(n_samples=3))
    chosen = backend.explain(request)
    default = backend.explain(ExplainRequest(tiles[0], tiles[1:2], "smoothgrad", side="query"))
    library = explain_retrieval(backend.encoder, request)
    np.testing.assert_allclose(chosen.query_heatmaps, library.query_heatmaps, atol=1e-6)
    assert np.abs(chosen.query_heatmaps - default.query_heatmaps).max() > 0.05
    assert chosen.reference_heatmaps is None


def test_concurrent_explanations_do_not_mix(backend, tiles: list[np.ndarray]) -> None:
    """No lock serialises explanations: each one's hook ignores the other threads' forward passes."""
    requests = [
        ExplainRequest(tiles[0], tiles[1:], "gradcam", side="query"),
        ExplainRequest(tiles[2], tiles[:2], "gradcampp", side="query"),
    ]
    expected = [backend.explain(request) for request in requests]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(backend.explain, requests * 2))
    for result, alone in zip(results, expected * 2, strict=True):
        np.testing.assert_allclose(result.query_heatmaps, alone.query_heatmaps, atol=1e-6)
        np.testing.assert_allclose(result.scores, alone.scores, atol=1e-6)


def test_rise_runs_its_masked_images_through_onnx(backend, tiles: list[np.ndarray]) -> None:
    """The backend hands its ONNX Runtime embedder to rise: every masked image goes through it,
    and the maps agree with the torch path's."""
    from histoxplain_model.explain import explain_retrieval
    from histoxplain_model.options import RiseOptions
    from histoxplain_service.backends.embedded import EmbeddedBackend

    images_embedded = []

    def counted(pixels: np.ndarray) -> np.ndarray:
        images_embedded.append(len(pixels))
        return backend._pixel_embedder(pixels)

    counting = EmbeddedBackend(backend.encoder, pixel_embedder=counted)
    request = ExplainRequest(tiles[0], tiles[1:], "rise", side="query", options=RiseOptions(n_masks=24, batch_size=12))
    through_onnx = counting.explain(request)
    # 3 images embedded up front (query + 2 references), then the clean query and 24 masked copies
    # shared by both references.
    assert sum(images_embedded) == 3 + 1 + 24
    torch_path = explain_retrieval(backend.encoder, request)
    np.testing.assert_allclose(through_onnx.query_heatmaps, torch_path.query_heatmaps, atol=5e-3)
