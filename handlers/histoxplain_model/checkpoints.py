"""Reading local weight files into a model: unwrap, rename, check, load. Never downloads.

A checkpoint goes through four steps: read (``torch.load(weights_only=True)`` or safetensors),
unwrap (``state_dict`` / ``model`` / ``teacher`` wrappers, ``module.`` / ``backbone.`` prefixes),
convert (a preset-specific key mapping, e.g. HuggingFace ViT -> timm) and check (missing,
unexpected and wrongly shaped keys become one :class:`WeightsMismatchError`), then
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import InvalidRequest, WeightsMismatchError

__all__ = [
    "StateDict",
    "read_checkpoint",
    "unwrap_state_dict",
    "check_and_load",
    "convert_hf_vit_state_dict",
    "pair_state_dict_in_order",
]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_SHOWN = 5  # keys listed per category in a mismatch message


def read_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, object]:
    """Load a checkpoint file safely (tensors and plain containers only, no pickled code)."""
    path = Path(path)
    if not path.exists():
        raise InvalidRequest(f"weights file {str(path)!r} does not exist; pass --weights FILE with a local checkpoint")
    if path.is_dir():
        raise InvalidRequest(f"weights path {str(path)!r} is a directory; pass --weights FILE (a .pth/.pt/.bin/.safetensors file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint: object = load_file(str(path), device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises pickle, zip, runtime and OS errors for bad files
        raise InvalidRequest(
            f"cannot read weights file {str(path)!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "it must be a state dict saved with torch.save or a .safetensors file"
        ) from exc
    if not isinstance(checkpoint, Mapping):
        raise InvalidRequest(
            f"weights file {str(path)!r} holds a {type(checkpoint).__name__}, not a state dict; "
            "save model.state_dict() instead of the model object"
        )
    return checkpoint


def _is_tensor_dict(candidate: object) -> bool:
    return isinstance(candidate, Mapping) and bool(candidate) and all(
        isinstance(value, torch.Tensor) for value in candidate.values()
    )


def unwrap_state_dict(
    checkpoint: Mapping[str, object],
    wrapper_keys: Sequence[str] = ("state_dict", "model", "teacher"),
    strip_prefixes: Sequence[str] = ("module.",),
    required_prefix: str = "",
) -> StateDict:
    """Descend into wrapper keys, keep ``required_prefix`` keys only (stripped), strip common prefixes.

    ``required_prefix`` (e.g. solo-learn's ``backbone.``) selects the backbone and drops
    projectors and other heads saved beside it; ``strip_prefixes`` are removed only when every
    key carries them (``module.`` from DataParallel).
    """
    current: object = checkpoint
    for _ in range(4):  # wrappers nest at most a few levels (Lightning: state_dict -> model.)
        if _is_tensor_dict(current):
            break
        if not isinstance(current, Mapping):
            break
        inner = next((current[key] for key in wrapper_keys if isinstance(current.get(key), Mapping)), None)
        if inner is None:
            break
        current = inner
    if not isinstance(current, Mapping):
        raise InvalidRequest("weights file holds no state dict (tensor name -> tensor mapping)")
    tensors = {key: value for key, value in current.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise InvalidRequest(
            f"weights file holds no tensors at the top level or under {', '.join(wrapper_keys)}; "
            f"its keys are {', '.join(list(map(str, current))[:_SHOWN])}"
        )
    for prefix in strip_prefixes:
        if all(key.startswith(prefix) for key in tensors):
            tensors = {key[len(prefix):]: value for key, value in tensors.items()}
    if required_prefix:
        selected = {key: value for key, value in tensors.items() if key.startswith(required_prefix)}
        if selected:  # e.g. drops solo-learn's momentum_backbone., projector. and classifier.
            tensors = {key[len(required_prefix):]: value for key, value in selected.items()}
        # else: the file already holds the bare backbone; the key check below judges it
    return tensors


def _show(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOWN else ''})"


def check_and_load(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """Load ``state_dict`` strictly; unexpected keys matching ``ignore`` (heads) are dropped first.

    Raises:
        WeightsMismatchError: names the first few missing, unexpected and wrongly shaped keys.
    """
    expected = model.state_dict()
    unexpected = [key for key in state_dict if key not in expected]
    dropped = [key for key in unexpected if ignore(key)]
    unexpected = [key for key in unexpected if not ignore(key)]
    missing = [key for key in expected if key not in state_dict]
    shapes = [
        f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_show(missing)}")
        if unexpected:
            parts.append(f"unexpected {_show(unexpected)}")
        if shapes:
            parts.append(f"wrong shape {len(shapes)} ({'; '.join(shapes[:_SHOWN])}{'; ...' if len(shapes) > _SHOWN else ''})")
        raise WeightsMismatchError(
            f"weights {source} do not fit the model: {'; '.join(parts)}; "
            "check that the file belongs to this preset (or use timm:<arch> for another architecture)",
            missing=missing,
            unexpected=unexpected,
            shape_mismatches=shapes,
        )
    if dropped:
        log.info("ignoring %d head keys in %s (e.g. %s)", len(dropped), source, dropped[0])
    model.load_state_dict({key: value for key, value in state_dict.items() if key in expected}, strict=True)


def pair_state_dict_in_order(
    state_dict: Mapping[str, torch.Tensor], target_keys: Sequence[str], target_shapes: Sequence[torch.Size], source: str
) -> StateDict:
    """Rename keys by position: the i-th tensor of the file becomes ``target_keys[i]`` (shapes must match)."""
    if len(state_dict) != len(target_keys):
        raise WeightsMismatchError(
            f"weights {source} have {len(state_dict)} tensors, the model {len(target_keys)}; they cannot be paired"
        )
    shapes = [
        f"#{index} {name}: file {tuple(value.shape)} vs model {tuple(shape)}"
        for index, ((name, value), shape) in enumerate(zip(state_dict.items(), target_shapes))
        if value.shape != shape
    ]
    if shapes:
        raise WeightsMismatchError(f"weights {source} do not pair with the model: {'; '.join(shapes[:_SHOWN])}", shape_mismatches=shapes)
    return dict(zip(target_keys, state_dict.values()))


_HF_VIT_RULES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def convert_hf_vit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """HuggingFace ``ViTModel`` keys -> timm ``VisionTransformer`` keys; timm-format dicts pass through.

    Query, key and value projections are concatenated into timm's fused ``qkv``; the pooler
    (unused with CLS pooling) is dropped.
    """
    if not any(key.startswith(("embeddings.", "vit.embeddings.")) for key in state_dict):
        return dict(state_dict)
    converted: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("vit.")
        if key.startswith("pooler."):
            continue
        match = _HF_QKV.match(key)
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = value
            continue
        for pattern, replacement in _HF_VIT_RULES:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        converted[key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise WeightsMismatchError(f"HuggingFace ViT block {block} lacks some of query/key/value {kind}")
        converted[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return converted
