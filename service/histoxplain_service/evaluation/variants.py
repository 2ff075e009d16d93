"""What the explanation evaluation compares: every registered method, on each target layer and target.

Methods come from the library's registry (``histoxplain_model.saliency.METHODS``), so a method
added there is evaluated without an edit here. A *variant* is one way to ask a method for a map:

- ``gradcam``: the method on the encoder's target layer (the last stage), cosine target;
- ``gradcam@previous``: on the stage before it (``histoxplain_model.encoders.previous_stage_layer``,
  a grid twice as fine), for the methods whose maps live on a layer (``LayerMapExplainer``);
- ``gradcam+projection``: the projection target e . r_hat instead of the cosine.

Each variant is compared with the smooth random map on its own grid: ``random`` on the last
stage's grid, ``random@previous`` on the finer one (methods without a layer, SmoothGrad and
RISE, against ``random``). A variant a method refuses (the similarity decomposition on a layer
whose mean is not the embedding, a target a method does not accept) is probed once on the first
pair and left out with the reason recorded in ``settings.skipped_variants``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from histoxplain_model.errors import HistoxplainError
from histoxplain_model.faithfulness import feature_grid
from histoxplain_model.options import SaliencyOptions
from histoxplain_model.saliency import METHODS, LayerMapExplainer, get_explainer
from histoxplain_model.vocabulary import DEFAULT_TARGET

__all__ = [
    "LAYERS", "LAST", "PREVIOUS", "Variant", "build_explainers", "feature_grid", "layer_modules", "plan_variants",
    "probe_variants", "random_map_name",
]

LAST, PREVIOUS = "last", "previous"
LAYERS = (LAST, PREVIOUS)


@dataclass(frozen=True)
class Variant:
    """One way to ask a method for a map; ``name`` keys the results."""

    method: str
    layer: str = LAST
    target: str = DEFAULT_TARGET

    @property
    def name(self) -> str:
        suffix = "" if self.layer == LAST else f"@{self.layer}"
        return f"{self.method}{suffix}" + ("" if self.target == DEFAULT_TARGET else f"+{self.target}")

    @property
    def is_base(self) -> bool:
        """The method as served by default (last layer, cosine): the sanity check's subject."""
        return self.layer == LAST and self.target == DEFAULT_TARGET


def random_map_name(layer: str) -> str:
    """The reference map a variant on ``layer`` is compared with."""
    return "random" if layer == LAST else f"random@{layer}"


def layer_modules(encoder, layers: Sequence[str]) -> dict[str, str]:
    """Layer label -> dotted module name in ``encoder.model`` ("" = the model itself)."""
    from histoxplain_model.encoders import previous_stage_layer

    names = {LAST: next(name for name, module in encoder.model.named_modules() if module is encoder.target_layer)}
    if PREVIOUS in layers:
        names[PREVIOUS] = previous_stage_layer(encoder)[0]
    return names


def plan_variants(methods: Sequence[str], layers: Sequence[str], targets: Sequence[str]) -> list[Variant]:
    """Every method on the last layer with the default target, then the finer layer for the
    layer-map methods, then each other target on the last layer."""
    variants = [Variant(method) for method in methods]
    if PREVIOUS in layers:
        variants += [Variant(m, PREVIOUS) for m in methods if issubclass(METHODS[m], LayerMapExplainer)]
    variants += [Variant(m, LAST, t) for t in targets if t != DEFAULT_TARGET for m in methods]
    return variants


def build_explainers(
    model: torch.nn.Module,
    variants: Sequence[Variant],
    layer_names: dict[str, str],
    reshape_transform,
    options: dict[str, SaliencyOptions],
    pixel_embedder=None,
) -> dict[str, object]:
    """Variant name -> explainer of ``model`` (the trained encoder or a randomised copy).

    ``pixel_embedder``: numpy (n, 3, H, W) -> (n, D), the ONNX session of ``model`` for the
    methods that only need forward passes (``get_explainer`` hands it to them); None for torch.
    """
    explainers = {}
    for variant in variants:
        name = layer_names[variant.layer]
        layer = model.get_submodule(name) if name else model
        explainers[variant.name] = get_explainer(
            variant.method, model, layer, reshape_transform, options.get(variant.method), pixel_embedder=pixel_embedder
        )
    return explainers


def probe_variants(
    model: torch.nn.Module,
    variants: Sequence[Variant],
    layer_names: dict[str, str],
    reshape_transform,
    options: dict[str, SaliencyOptions],
    pixels: torch.Tensor,
    reference: torch.Tensor,
    pixel_embedder=None,
) -> tuple[list[Variant], dict[str, str]]:
    """The variants that explain ``pixels`` against ``reference`` (one real pair), and the left-out
    ones with the reason: the error a method raised, or, for a variant of a non-default target,
    that its maps equal the method's default ones on both polarities (the similarity
    decomposition's projection shares are its cosine shares times the constant |e|: the finished
    map is the same), so measuring it again would only repeat the same numbers."""
    kept, skipped = [], {}
    maps: dict[str, list[np.ndarray]] = {}
    for variant in variants:
        try:
            explainer = build_explainers(model, [variant], layer_names, reshape_transform, options, pixel_embedder)[variant.name]
            maps[variant.name] = [
                explainer.explain(pixels, reference, polarity=polarity, target=variant.target).heatmaps[0, 0]
                for polarity in ("similar", "dissimilar")
            ]
        except HistoxplainError as error:
            skipped[variant.name] = f"{type(error).__name__}: {error}"
            continue
        same_as = Variant(variant.method, variant.layer).name
        if variant.target != DEFAULT_TARGET and same_as in maps and all(
            np.allclose(a, b, atol=1e-4) for a, b in zip(maps[variant.name], maps[same_as])
        ):
            skipped[variant.name] = f"its maps equal {same_as}'s on the probe pair (both polarities)"
            continue
        kept.append(variant)
    return kept, skipped
