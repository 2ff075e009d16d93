"""Tests for histoxplain_model.onnx_embedder: parity with torch, dynamic batch, export cache."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import timm
import torch

pytest.importorskip("onnxruntime")

from histoxplain_model.encoders import DEFAULT_PRESET, load_encoder  # noqa: E402
from histoxplain_model.onnx_embedder import (  # noqa: E402
    OnnxEmbedder,
    cached_onnx_embedder,
    export_onnx,
    weights_fingerprint,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lite0():
    return load_encoder(DEFAULT_PRESET)


@pytest.fixture(scope="module")
def lite0_onnx(lite0, tmp_path_factory):
    return export_onnx(lite0, tmp_path_factory.mktemp("onnx") / "lite0.onnx")


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet") / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), path)
    return load_encoder("timm:resnet18", path)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "vit.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), path)
    return load_encoder("timm:vit_tiny_patch16_224", path)


@pytest.mark.parametrize("encoder_name", ["lite0", "vit"])
def test_onnx_matches_torch_at_batch_1_and_3(encoder_name, request, tmp_path) -> None:
    encoder = request.getfixturevalue(encoder_name)
    path = request.getfixturevalue("lite0_onnx") if encoder_name == "lite0" else export_onnx(encoder, tmp_path / "m.onnx")
    embedder = OnnxEmbedder(path, intra_op_threads=1)
    assert "CPUExecutionProvider" in embedder.providers
    assert embedder.embedding_dim == encoder.embedding_dim
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    pixels = encoder.preprocess(images)
    expected = encoder.embed(pixels).numpy()
    for batch in (1, 3):
        actual = embedder.embed(pixels[:batch].numpy())
        assert actual.dtype == np.float32 and actual.shape == (batch, encoder.embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)
        cosine = np.sum(actual * expected[:batch], axis=1)
        assert cosine.min() >= 0.9999, cosine


def test_real_histology_parity(lite0, lite0_onnx) -> None:
    from skimage import data as skdata

    ihc = skdata.immunohistochemistry()
    tiles = [ihc[:224, :224], ihc[200:424, 100:324], ihc[288:, 288:]]
    embedder = OnnxEmbedder(lite0_onnx, preprocess=lite0.preprocess)
    cosine = np.sum(embedder.embed_images(tiles, batch_size=2) * lite0.embed_images(tiles), axis=1)
    assert cosine.min() >= 0.9999, cosine


def test_embed_rejects_wrong_shape(lite0_onnx) -> None:
    embedder = OnnxEmbedder(lite0_onnx)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        embedder.embed(np.zeros((3, 224, 224), dtype=np.float32))
    with pytest.raises(RuntimeError, match="preprocess"):
        embedder.embed_images([np.zeros((8, 8, 3), dtype=np.uint8)])


def test_cache_reuses_rebuilds_and_keys_on_weights(resnet18, vit, tmp_path) -> None:
    first = cached_onnx_embedder(resnet18, tmp_path)
    files = sorted(tmp_path.glob("*.onnx"))
    assert [f.name for f in files] == [first.path.name] and first.path.name.startswith("timm_resnet18-")
    stamp = first.path.stat().st_mtime_ns
    again = cached_onnx_embedder(resnet18, tmp_path)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # reused, not re-exported

    first.path.write_bytes(b"truncated garbage")  # corrupt cache file -> rebuilt
    rebuilt = cached_onnx_embedder(resnet18, tmp_path)
    assert rebuilt.path == first.path and rebuilt.path.stat().st_size > 1_000_000
    pixels = resnet18.preprocess([np.full((224, 224, 3), 128, dtype=np.uint8)])
    assert float(np.sum(rebuilt.embed(pixels.numpy()) * resnet18.embed(pixels).numpy())) >= 0.9999

    other = cached_onnx_embedder(vit, tmp_path)  # other weights: another file beside the first
    assert other.path != first.path and len(list(tmp_path.glob("*.onnx"))) == 2
    assert not list(tmp_path.glob("*.tmp")), "no temporary files left behind"


def test_fingerprint_changes_with_weights() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-3
    assert weights_fingerprint(model) != before
