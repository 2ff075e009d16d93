"""Tests for histoxplain_model.encoders: presets, local weights, real ImageNet weights, geometry."""

from __future__ import annotations

import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from skimage import data as skdata

from histoxplain_model.checkpoints import convert_hf_vit_state_dict
from histoxplain_model.ctranspath import create_ctranspath
from histoxplain_model.encoders import (
    DEFAULT_PRESET,
    PRESETS,
    efficientnet_lite0_package_weights,
    get_preset,
    load_encoder,
    preset_names,
    token_reshape_transform,
)
from histoxplain_model.errors import InvalidRequest, UnknownNameError, WeightsMismatchError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lite0():
    return load_encoder(DEFAULT_PRESET)


def _reference_model(preset_name: str) -> torch.nn.Module:
    """The preset's architecture built independently of the loader, randomly initialised."""
    torch.manual_seed(0)
    preset = get_preset(preset_name)
    if preset_name == "ctranspath":
        return create_ctranspath(num_classes=0).eval()
    return timm.create_model(preset.architecture, pretrained=False, num_classes=0, **preset.model_kwargs).eval()


def _timm_to_hf_vit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the loader's HuggingFace conversion, written out independently for the test."""
    out = {}
    for key, value in state_dict.items():
        block = re.match(r"blocks\.(\d+)\.(.*)", key)
        if key == "cls_token":
            out["embeddings.cls_token"] = value
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = value
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + key.split(".")[-1]] = value
        elif key.startswith("norm."):
            out["layernorm." + key.split(".")[-1]] = value
        elif block:
            index, rest = block.groups()
            layer = f"encoder.layer.{index}."
            kind = rest.split(".")[-1]
            if rest.startswith("attn.qkv."):
                for name, part in zip(("query", "key", "value"), value.chunk(3)):
                    out[f"{layer}attention.attention.{name}.{kind}"] = part
            else:
                names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                         "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
                out[layer + names[rest.rsplit(".", 1)[0]] + "." + kind] = value
        else:
            raise AssertionError(f"unmapped key {key}")
    out["pooler.dense.weight"] = torch.zeros(1)  # HF ViTModel saves a pooler the loader must drop
    return out


def _on_disk(preset_name: str, state_dict: dict[str, torch.Tensor]) -> object:
    """The state dict in the format the preset's published checkpoints use."""
    if preset_name == "ctranspath":  # TransPath: timm 0.5.4 Swin layout under "model", with buffers + head
        old = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
               for k, v in state_dict.items()}
        old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
        old["head.weight"], old["head.bias"] = torch.zeros(1000, 768), torch.zeros(1000)
        return {"model": old}
    if preset_name == "phikon":
        return _timm_to_hf_vit(state_dict)
    if preset_name == "lunit-dino-vits16":  # original DINO training checkpoint: teacher, DDP, with the DINO head
        teacher = {f"module.backbone.{k}": v for k, v in state_dict.items()}
        teacher["module.head.mlp.0.weight"] = torch.zeros(8, 384)
        return {"teacher": teacher, "epoch": 100}
    if preset_name.startswith("solo-learn"):  # Lightning checkpoint with projector, momentum copy, classifier
        wrapped = {f"backbone.{k}": v for k, v in state_dict.items()}
        wrapped.update({f"momentum_backbone.{k}": torch.zeros_like(v) for k, v in state_dict.items()})
        wrapped["projector.0.weight"] = torch.zeros(16, 16)
        wrapped["classifier.weight"] = torch.zeros(1000, 16)
        return {"state_dict": wrapped, "epoch": 3}
    if preset_name == "retccl":  # with a classification fc the preset drops
        return {**state_dict, "fc.weight": torch.zeros(2, 2048), "fc.bias": torch.zeros(2)}
    return state_dict


SLOW_PRESETS = ("uni", "phikon", "lunit-dino-vits8")  # ViT-L, ViT-B, ViT-S/8 (784 tokens): seconds each
FAST_FILE_PRESETS = [
    name for name, preset in PRESETS.items() if preset.weights_source == "file" and name not in SLOW_PRESETS
]


@pytest.mark.parametrize(
    "preset_name",
    [*FAST_FILE_PRESETS, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW_PRESETS)],
)
def test_preset_weights_round_trip(preset_name: str, tmp_path) -> None:
    reference = _reference_model(preset_name)
    path = tmp_path / "weights.pth"
    torch.save(_on_disk(preset_name, reference.state_dict()), path)

    encoder = load_encoder(preset_name, path)

    preset = PRESETS[preset_name]
    assert encoder.preset.embedding_dim == preset.embedding_dim
    assert encoder.input_size == (224, 224)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = F.normalize(reference(pixels), dim=1)
    embedded = encoder.embed(pixels)
    assert embedded.shape == (1, preset.embedding_dim) and embedded.dtype == torch.float32
    torch.testing.assert_close(embedded, expected, rtol=0, atol=1e-6)

    # The target layer is reachable by gradients and reshapes to a (B, C, h, w) map with signal.
    captured = {}
    handle = encoder.target_layer.register_forward_hook(lambda m, i, o: captured.setdefault("act", o))
    try:
        with torch.enable_grad():
            embedding = encoder.model(pixels)
            activation = captured["act"]
            # A random direction: the plain sum of a LayerNorm'd embedding has zero gradient.
            direction = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(2))
            (gradient,) = torch.autograd.grad((embedding * direction).sum(), activation)
    finally:
        handle.remove()
    maps = gradient if encoder.reshape_transform is None else encoder.reshape_transform(gradient)
    assert maps.ndim == 4 and maps.shape[0] == 1
    assert maps.shape[-1] * 224 // maps.shape[-1] == 224  # spatial grid divides the input
    assert maps.abs().sum(dim=1).gt(0).float().mean() > 0.9, "most positions receive gradient"


def test_every_preset_is_tested_or_packaged() -> None:
    assert set(FAST_FILE_PRESETS) | set(SLOW_PRESETS) | {DEFAULT_PRESET} == set(PRESETS)


def test_unknown_preset_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as caught:
        get_preset("resnet-imagenet")
    message = str(caught.value)
    for name in ("efficientnet-lite0-imagenet", "uni", "ctranspath", "timm:<arch>"):
        assert name in message
    assert caught.value.known == tuple(preset_names())
    with pytest.raises(UnknownNameError, match="no_such_arch"):
        load_encoder("timm:no_such_arch")


def test_weights_required_missing_or_unreadable(tmp_path) -> None:
    with pytest.raises(InvalidRequest, match="--weights FILE"):
        load_encoder("retccl")
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_encoder("retccl", tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(InvalidRequest, match="cannot read weights file"):
        load_encoder("retccl", garbage)
    whole_model = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), whole_model)  # a pickled module is refused by weights_only
    with pytest.raises(InvalidRequest, match="cannot read weights file"):
        load_encoder("solo-learn-resnet18", whole_model)


def test_mismatch_names_missing_unexpected_and_shapes(tmp_path) -> None:
    state_dict = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    del state_dict["layer1.0.conv1.weight"]
    state_dict["layer9.extra.weight"] = torch.zeros(1)
    state_dict["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state_dict, path)
    with pytest.raises(WeightsMismatchError) as caught:
        load_encoder("solo-learn-resnet18", path)
    error = caught.value
    assert error.missing == ("layer1.0.conv1.weight",)
    assert error.unexpected == ("layer9.extra.weight",)
    message = str(error)
    assert "missing 1 (layer1.0.conv1.weight)" in message
    assert "unexpected 1 (layer9.extra.weight)" in message
    assert "conv1.weight: file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in message
    # Another architecture entirely: counts plus the first few names.
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match=r"missing \d+ \(.*, \.\.\.\)"):
        load_encoder("retccl", path)


def test_real_lite0_weights_classify_a_cat() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(efficientnet_lite0_package_weights(with_classifier=True), strict=True)
    model.eval()
    encoder = load_encoder(DEFAULT_PRESET)
    pixels = encoder.preprocess([skdata.chelsea()])
    with torch.no_grad():
        top = model(pixels).softmax(dim=1)[0].topk(3)
    assert 281 <= int(top.indices[0]) <= 285, top  # ImageNet domestic cats
    assert float(top.values[0]) > 0.5
    # The preset's backbone is the same network without its classifier.
    with torch.no_grad():
        torch.testing.assert_close(encoder.model(pixels), model.forward_head(model.forward_features(pixels), pre_logits=True))


def test_real_weights_embed_histology_sensibly(lite0) -> None:
    ihc = skdata.immunohistochemistry()  # 512x512 IHC of colonic glands
    crops = [ihc[:256, :256], ihc[256:, 256:], skdata.chelsea()[:256, :256], skdata.rocket()[:256, :256]]
    embeddings = lite0.embed_images(crops)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.1
    assert similarity[0, 1] > similarity[0, 3] + 0.1


def test_norms_dtype_and_batching(lite0, tmp_path) -> None:
    vit_weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), vit_weights)
    vit = load_encoder("timm:vit_tiny_patch16_224", vit_weights)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((224, 224), (300, 180), (64, 96))]
    for encoder in (lite0, vit):
        originals = [image.copy() for image in images]
        embeddings = encoder.embed_images(images, batch_size=2)
        assert embeddings.dtype == np.float32 and embeddings.shape == (3, encoder.embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
        one_by_one = np.concatenate([encoder.embed_images([image]) for image in images])
        np.testing.assert_allclose(embeddings, one_by_one, atol=1e-5)
        for image, original in zip(images, originals):
            np.testing.assert_array_equal(image, original)
    assert vit.preset.embedding_dim == 192 and vit.preset.target_layer == "blocks.-1.norm1"
    assert vit.target_layer is vit.model.blocks[-1].norm1


def test_preprocess_resizes_whole_tile_and_normalises(lite0) -> None:
    tile = np.zeros((448, 224, 3), dtype=np.uint8)
    tile[:224] = 255  # top half white: a centre crop would lose it
    pixels = lite0.preprocess([tile])
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32
    mean, std = lite0.data_config["mean"][0], lite0.data_config["std"][0]
    assert pixels[0, 0, 10, 10].item() == pytest.approx((1.0 - mean) / std, abs=1e-4)
    assert pixels[0, 0, -10, 10].item() == pytest.approx((0.0 - mean) / std, abs=1e-4)
    with pytest.raises(InvalidRequest):
        lite0.preprocess([np.zeros((8, 8), dtype=np.uint8)])


def test_generic_cnn_uses_feature_info(tmp_path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": timm.create_model("resnet18", num_classes=0).state_dict()}, path)
    encoder = load_encoder("timm:resnet18", path)
    assert encoder.preset.target_layer == encoder.model.feature_info[-1]["module"] == "layer4"
    assert encoder.reshape_transform is None and encoder.preset.embedding_dim == 512


def test_generic_vit_with_register_tokens(tmp_path) -> None:
    arch = "vit_little_patch16_reg4_gap_256"
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    path = tmp_path / "vit.pth"
    torch.save(model.state_dict(), path)
    encoder = load_encoder(f"timm:{arch}", path)
    assert encoder.input_size == (256, 256)
    assert encoder.model.num_prefix_tokens == model.num_prefix_tokens >= 4
    tokens = torch.randn(2, model.num_prefix_tokens + 16 * 16, 7)
    maps = encoder.reshape_transform(tokens)
    assert maps.shape == (2, 7, 16, 16)
    torch.testing.assert_close(maps[:, :, 0, 0], tokens[:, model.num_prefix_tokens])
    torch.testing.assert_close(maps[:, :, 1, 0], tokens[:, model.num_prefix_tokens + 16])


def test_token_geometry_dynamic_size_with_registers() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, reg_tokens=4,
                              dynamic_img_size=True).eval()
    assert model.num_prefix_tokens == 5
    transform = token_reshape_transform(model, (224, 224))
    for size in (224, 160):
        captured = []
        handle = model.blocks[-1].norm1.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, size, size))
        finally:
            handle.remove()
        maps = transform(captured[0])
        assert maps.shape == (1, 192, size // 16, size // 16)
        torch.testing.assert_close(maps[0, :, 0, 1], captured[0][0, 5 + 1])
        torch.testing.assert_close(maps[0, :, 1, 0], captured[0][0, 5 + size // 16])


def test_hf_vit_conversion_on_a_small_vit(tmp_path) -> None:
    """Phikon's HuggingFace layout, checked on ViT-Ti through the generic loader path."""
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    hf = _timm_to_hf_vit(reference.state_dict())
    converted = convert_hf_vit_state_dict({f"vit.{k}": v for k, v in hf.items()})
    assert set(converted) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0)
    assert convert_hf_vit_state_dict(reference.state_dict()).keys() == reference.state_dict().keys()
