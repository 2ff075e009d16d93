"""Per-location embeddings: the target layer's map as embeddings whose mean is the model's own.

For an encoder whose embedding is the mean over locations i of the target layer's activations
A(i) (global average pooling, every CNN preset here), possibly followed by a linear head
(e = W mean_i A(i) + b), the per-location embeddings z(i) = W A(i) + b average to e exactly: each
location carries the whole bias before the 1/HW, an equal share b/HW. The similarity
decomposition (``saliency.simmap``) and the region-to-region correspondences
(``saliency.correspondences``) are both made of them.

Exactness is checked, not assumed (:func:`check_mean_pooled`): the mean of the z(i) must give
the model's own embedding (relative deviation <= :data:`EXACTNESS_TOLERANCE`). A ViT pooled by
its CLS token (UNI, Phikon, Lunit DINO, HistoEncoder's XCiT), a Swin whose final LayerNorm
follows the target layer (CTransPath), a pooling other than the mean or a non-linear head fail
it with :class:`FailedPrecondition`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import FailedPrecondition
from histoxplain_model.saliency.base import ReshapeTransform, check_feature_map, forward_capturing

__all__ = [
    "EXACTNESS_TOLERANCE",
    "capturing_forward",
    "check_mean_pooled",
    "forward_locations",
    "linear_head",
    "location_embeddings",
    "model_name",
]

#: Largest |mean_i z(i) - e| / |e| accepted as the same embedding (float32 rounding is ~1e-7;
#: an encoder that is not mean-pooled misses by far more, e.g. 0.3 to 1 for a CLS-pooled ViT).
EXACTNESS_TOLERANCE = 1e-3


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The model's classifier when it is one ``nn.Linear`` (timm's ``get_classifier()``), else None.

    An identity head (timm with ``num_classes=0``, every preset) needs nothing; any other head is
    left out here and then fails the exactness check unless it really is the identity.
    """
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    return head if isinstance(head, nn.Linear) else None


def model_name(model: nn.Module) -> str:
    """The timm architecture name of ``model`` (its class name if it has none), for messages."""
    config = getattr(model, "pretrained_cfg", None)
    architecture = config.get("architecture") if isinstance(config, dict) else None
    return str(architecture or type(model).__name__)


@torch.no_grad()  # the head's weights would otherwise record a graph
def location_embeddings(
    model: nn.Module, activations: torch.Tensor, reshape_transform: ReshapeTransform | None = None
) -> torch.Tensor:
    """The target layer's output -> z (B, h, w, D) float32: W A(i) + b at every location (A(i)
    itself without a linear head). Not checked for exactness (:func:`check_mean_pooled`)."""
    if reshape_transform is not None:
        activations = reshape_transform(activations)
    check_feature_map(activations)
    locations = activations.detach().permute(0, 2, 3, 1).float()  # (B, h, w, C)
    head = linear_head(model)
    if head is not None and locations.shape[-1] == head.in_features:
        locations = F.linear(locations, head.weight.float(), None if head.bias is None else head.bias.float())
    return locations


def forward_locations(
    model: nn.Module, target_layer: nn.Module, reshape_transform: ReshapeTransform | None, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (B, h, w, D), the model output (B, D)) from one forward pass, no autograd."""
    check_deadline()
    activations, embeddings = forward_capturing(model, target_layer, pixels, start_graph=False)
    return location_embeddings(model, activations, reshape_transform), embeddings.detach()


def check_mean_pooled(model: nn.Module, locations: torch.Tensor, embeddings: torch.Tensor, what: str) -> torch.Tensor:
    """The mean of ``locations`` (B, h, w, D) over (h, w), (B, D), after checking that it is the
    model's own ``embeddings`` (B, D) (module docstring).

    Raises:
        FailedPrecondition: "{what} is not available for this encoder (...)" with the reason.
    """
    mean = locations.mean(dim=(1, 2))
    embeddings = embeddings.float()
    if mean.shape == embeddings.shape:
        scale = embeddings.norm(dim=1).clamp(min=1e-12)
        deviation = float(((mean - embeddings).norm(dim=1) / scale).max())
        if deviation <= EXACTNESS_TOLERANCE:
            return mean
        why = f"the mean of its target layer's map misses the embedding by {deviation:.2g} of its norm"
    else:
        why = f"its target layer has {locations.shape[-1]} channels, the embedding {embeddings.shape[-1]}"
    raise FailedPrecondition(
        f"{what} is not available for this encoder ({model_name(model)}): it needs an embedding that "
        f"is the mean of the target layer's activations (with at most a linear head), and {why} "
        f"(e.g. a CLS-pooled ViT)"
    )


@contextmanager
def capturing_forward(
    model: nn.Module, layer: nn.Module
) -> Iterator[Callable[[], tuple[list[torch.Tensor], list[torch.Tensor]]]]:
    """Record detached copies of ``layer``'s outputs and of ``model``'s outputs in this thread's
    forward passes.

    Yields a function returning (the layer's outputs, the model's outputs) recorded so far, one
    of each per forward pass. Lets a caller reuse a forward pass someone else runs (an
    explainer's) instead of running its own; passes run by other threads through the same
    model are ignored. The hooks are removed on exit.
    """
    activations: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    owner = threading.get_ident()

    def recorder(into: list[torch.Tensor]) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if threading.get_ident() == owner and isinstance(output, torch.Tensor):
                into.append(output.detach().clone())

        return hook

    handles = [layer.register_forward_hook(recorder(activations)), model.register_forward_hook(recorder(outputs))]
    try:
        yield lambda: (list(activations), list(outputs))
    finally:
        for handle in handles:
            handle.remove()
