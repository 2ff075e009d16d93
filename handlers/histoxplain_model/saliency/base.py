"""The saliency pipeline shared by every method.

:class:`Explainer` is the public interface: ``explain(pixels (B,3,H,W), references (K,D),
polarity) -> SaliencyResult`` with heatmaps (B, K, H, W) float32 in [0, 1]. It owns the parts
every method needs: input checks, leaving an outer ``torch.inference_mode()`` (TorchServe runs
handlers inside one), the cosine target, and the final upsample + per-map min-max
(:func:`finish_maps`). :func:`forward_capturing` runs the model with a hook on the target layer,
for the CAMs (autograd from that layer up) and for the similarity decomposition (none at all).

:class:`LayerMapExplainer` is what the methods with maps on the target layer's grid share (the
layer requirement, own options, finishing or sending the maps native). :class:`BaseCAM` is the
class-activation-map pipeline (pytorch-grad-cam's shape): one forward
pass with a hook on the target layer, the gradients of the K targets with respect to the hooked
activations, channel weights, weighted sum, ReLU, upsample, normalise. Subclasses override only
:meth:`BaseCAM.channel_weights` and name their options type (``BaseCAM.options_type``).

Options belong to their method (``histoxplain_model.options``): an explainer takes only its
own options type, so the base :class:`Explainer` has none.

Thread safety: per-call state lives in local variables only; a forward hook ignores forward
passes run by other threads (hooks are per module, not per thread), and is removed in
``finally``. Gradients are taken with ``torch.autograd.grad`` so nothing accumulates into the
parameters' ``.grad``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Generic

import numpy as np
import torch
from torch import nn

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import OptionsT, options_or_defaults
from histoxplain_model.vocabulary import DEFAULT_TARGET
from histoxplain_model.wire.cams import bilinear_weights
from histoxplain_model.saliency.targets import (
    SimilarityTarget,
    check_polarity,
    cosine_scores,
    similarity_target,
)

__all__ = [
    "BaseCAM",
    "Explainer",
    "LayerMapExplainer",
    "ReshapeTransform",
    "SaliencyResult",
    "check_feature_map",
    "finish_maps",
    "forward_capturing",
    "gradient_mode",
    "normalise_maps",
    "upsample_maps",
]

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SaliencyResult:
    """heatmaps (B, K, H, W) float32 in [0, 1]: image b explained against reference k;
    scores (B, K) float32: cosine similarity of image b's embedding to reference k.

    native: the heatmaps are raw maps (B, K, h, w) >= 0 at the target layer's resolution, not
    yet upsampled or normalised (``explain(..., native=True)`` on a CAM method or simmap);
    ``histoxplain_model.wire.cams.finish_cams(heatmaps, (H, W))`` gives the finished maps.
    """

    heatmaps: np.ndarray
    scores: np.ndarray
    native: bool = False


@contextmanager
def gradient_mode() -> Iterator[None]:
    """Autograd on, even inside an outer ``torch.inference_mode()``.

    ``enable_grad`` alone does not undo inference mode (PLATFORM.md, TorchServe).
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, H, W), bilinear with half-pixel centres (what cv2.resize's
    INTER_LINEAR does when enlarging, so maps match pytorch-grad-cam's).

    Two matrix products with the interpolation weights (``rows @ map @ columns.T``, the numpy
    twin's ``wire.cams.upsample_bilinear``): equal to ``F.interpolate(..., mode="bilinear",
    align_corners=False)`` within float32 rounding, and 5x faster than it for ten 7x7 or 14x14
    maps to 224 px on one CPU thread (0.10 vs 0.58 ms, measured), the finishing cost every
    layer-map method pays.
    """
    height, width = size
    if tuple(maps.shape[-2:]) == (height, width):
        return maps
    rows = torch.tensor(bilinear_weights(height, maps.shape[-2]), dtype=maps.dtype, device=maps.device)
    columns = torch.tensor(bilinear_weights(width, maps.shape[-1]), dtype=maps.dtype, device=maps.device)
    return rows @ maps @ columns.T


def normalise_maps(maps: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """Min-max each (H, W) map of (..., H, W) to [0, 1]; a constant map becomes all zeros.

    in_place: overwrite ``maps`` (same values; saves a copy of the full-size maps).
    """
    flat = maps.flatten(-2)
    # amin and amax, not aminmax: the same values, but torch 2.14's CPU aminmax over the last
    # dim is about 20x slower (1.1 ms vs 0.05 ms for 10 maps at 224 px, one thread; measured).
    low, high = flat.amin(dim=-1), flat.amax(dim=-1)
    # A constant map has maps - low == 0 everywhere, so the clamped span turns it into zeros.
    span = (high - low).clamp_(min=torch.finfo(maps.dtype).tiny)
    shifted = maps.sub_(low[..., None, None]) if in_place else maps - low[..., None, None]
    return shifted.div_(span[..., None, None]).clamp_(0.0, 1.0)


def finish_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Raw maps (B, K, h, w) >= 0 -> heatmaps (B, K, H, W) in [0, 1]: upsample, then min-max
    (the torch twin of ``histoxplain_model.wire.cams.finish_cams``). ``maps`` is not modified."""
    upsampled = upsample_maps(maps, size)
    # The upsampled maps are a new tensor, normalised where they lie (saves a 2 MB copy at k=10).
    return normalise_maps(upsampled, in_place=upsampled is not maps)


def check_feature_map(activations: torch.Tensor) -> None:
    """Raise :class:`InvalidRequest` unless the target layer's activations are a (B, C, h, w) map."""
    if activations.ndim != 4:
        raise InvalidRequest(
            f"target layer activations have shape {tuple(activations.shape)}; a (B, C, h, w) "
            f"map is needed (a ViT needs a reshape_transform)"
        )


def forward_capturing(
    model: nn.Module, layer: nn.Module, pixels: torch.Tensor, *, start_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``pixels`` without autograd below ``layer``; return (``layer``'s output,
    the model output).

    start_graph: the output becomes a grad-requiring leaf and autograd records from there up
    (the CAM methods: one backward pass above the layer only); otherwise nothing is recorded
    and the output is a detached copy (the similarity decomposition needs no gradient).

    The hook ignores forward passes run by other threads through the same model (hooks are per
    module, not per thread) and is removed in ``finally``.
    """
    captured: list[torch.Tensor] = []
    owner = threading.get_ident()

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor | None:
        if threading.get_ident() != owner:
            return None  # another thread's forward pass through the same model
        if not isinstance(output, torch.Tensor):
            raise InvalidRequest(
                f"target layer {type(module).__name__} returns {type(output).__name__}; "
                f"choose a layer whose output is a tensor"
            )
        if not start_graph:
            # A copy: in-place ops of later layers must not change what was captured.
            captured.append(output.detach().clone())
            return None
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        torch.set_grad_enabled(True)  # record from here up; the no_grad below restores
        # A clone, so that in-place ops of later layers cannot touch the leaf.
        return leaf.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            embeddings = model(pixels)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise InvalidRequest(
            f"the target layer ran {len(captured)} times in one forward pass; it must run "
            f"exactly once (choose another layer)"
        )
    return captured[0], embeddings


def _detached_input(pixels: torch.Tensor) -> torch.Tensor:
    """A tensor autograd can use: inference tensors cannot be saved for backward, so they are
    copied (this runs inside ``gradient_mode``, where a clone is a normal tensor)."""
    return pixels.clone() if pixels.is_inference() else pixels.detach()


class Explainer(ABC):
    """Explains images (B,3,H,W) against K reference embeddings; see :meth:`explain`."""

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | None = None,
        reshape_transform: ReshapeTransform | None = None,
    ) -> None:
        self.model = model
        self.target_layer = target_layer
        self.reshape_transform = reshape_transform

    def explain(
        self,
        pixels: torch.Tensor,
        references: torch.Tensor,
        polarity: str = "similar",
        native: bool = False,
        target: str = DEFAULT_TARGET,
    ) -> SaliencyResult:
        """Heatmaps of each image's evidence for (or against) its similarity to each reference.

        pixels: (B, 3, H, W) float, preprocessed as the model expects; not modified.
        references: (K, D) reference embeddings (normalised or not), K >= 1.
        polarity: "similar" explains the cosine similarity, "dissimilar" its negation.
        native: CAM methods and simmap return their maps before the upsample and min-max (see
            :class:`SaliencyResult`; what the TorchServe handler sends); SmoothGrad ignores it.
        target: "cosine" (default) explains the cosine, "projection" e . r_hat
            (``histoxplain_model.saliency.targets``); the scores are the cosine either way.
        Returns heatmaps (B, K, H, W) float32 in [0, 1] at the input resolution and the
        cosine scores (B, K).
        """
        polarity = check_polarity(polarity)
        if pixels.ndim != 4 or pixels.shape[0] == 0 or not pixels.is_floating_point():
            raise InvalidRequest(
                f"pixels must be a float (B, C, H, W) batch with B >= 1, got "
                f"{pixels.dtype} {tuple(pixels.shape)}"
            )
        if references.ndim == 1:
            references = references[None]
        with gradient_mode():
            pixels = _detached_input(pixels)
            references = _detached_input(references)
            score = similarity_target(references, polarity, target)
            heatmaps, embeddings, is_native = (
                self._native_maps(pixels, score) if native else (*self._heatmaps(pixels, score), False)
            )
            scores = cosine_scores(embeddings.detach(), references.to(embeddings))
        return SaliencyResult(
            heatmaps=heatmaps.detach().float().cpu().numpy(),
            scores=scores.float().cpu().numpy(),
            native=is_native,
        )

    def _native_maps(
        self, pixels: torch.Tensor, target: SimilarityTarget
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(maps, embeddings, whether the maps are raw CAMs); finished maps unless overridden."""
        heatmaps, embeddings = self._heatmaps(pixels, target)
        return heatmaps, embeddings, False

    @abstractmethod
    def _heatmaps(
        self, pixels: torch.Tensor, target: SimilarityTarget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(heatmaps (B, K, H, W) in [0, 1], clean embeddings (B, D)); runs in gradient mode."""


class LayerMapExplainer(Explainer, Generic[OptionsT]):
    """An explainer whose maps live on the target layer's grid: raw maps (B, K, h, w) >= 0 that
    are finished by :func:`finish_maps`, or sent as they are (``native``; the TorchServe handler
    does, and the receiver finishes them with numpy). The CAM methods and the similarity map.

    A subclass sets ``options_type`` to its own options type; the constructor takes only that
    type (``None``: its defaults) and refuses another method's options. It implements
    :meth:`_layer_maps`.
    """

    options_type: ClassVar[type]

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | None = None,
        reshape_transform: ReshapeTransform | None = None,
        options: OptionsT | None = None,
    ) -> None:
        if target_layer is None:
            raise InvalidRequest(f"{type(self).__name__} needs a target layer to hook")
        super().__init__(model, target_layer, reshape_transform)
        self.options: OptionsT = options_or_defaults(self.options_type, options, type(self).__name__)

    @abstractmethod
    def _layer_maps(self, pixels: torch.Tensor, target: SimilarityTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw maps (B, K, h, w) >= 0 at the target layer's resolution, clean embeddings (B, D))."""

    def _heatmaps(
        self, pixels: torch.Tensor, target: SimilarityTarget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        maps, embeddings = self._layer_maps(pixels, target)
        return finish_maps(maps, tuple(pixels.shape[-2:])), embeddings

    def _native_maps(
        self, pixels: torch.Tensor, target: SimilarityTarget
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        maps, embeddings = self._layer_maps(pixels, target)
        return maps, embeddings, True


class BaseCAM(LayerMapExplainer[OptionsT]):
    """Class activation maps from one forward pass for all K references.

    The hook starts the autograd graph at the target layer: the layers below it run without
    recording (their gradients are never needed), so the forward costs about one inference pass.
    The K targets' gradients with respect to the hooked activations come from K
    ``autograd.grad`` calls that reuse the graph above the target layer (retain_graph). On CPU a
    loop is as fast as ``is_grads_batched``/vmap, which fall back to per-slice loops here
    (PLATFORM.md).
    """

    @abstractmethod
    def channel_weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """activations (B, 1, C, h, w), grads (B, K, C, h, w) -> weights (B, K, C)."""

    def _forward_from_target_layer(
        self, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return (hooked activations as a grad-requiring leaf, embeddings)."""
        target_layer: nn.Module = self.target_layer  # set in __init__
        leaf, embeddings = forward_capturing(self.model, target_layer, pixels, start_graph=True)
        if not embeddings.requires_grad:
            raise InvalidRequest("the model output does not depend on the target layer")
        return leaf, embeddings

    def _layer_maps(self, pixels: torch.Tensor, target: SimilarityTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw CAMs (B, K, h, w) >= 0: the signed maps after the ReLU, clean embeddings (B, D))."""
        signed, embeddings = self.signed_maps(pixels, target)
        return signed.clamp_(min=0), embeddings

    def signed_maps(self, pixels: torch.Tensor, target: SimilarityTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_c w_kc A_c before the ReLU (B, K, h, w), clean embeddings (B, D)); in gradient mode.

        For a cosine target and an embedding that is the mean of the target layer's activations,
        GradCAM's signed map sums to zero over the locations (the gradient is orthogonal to the
        embedding; README "What the cosine Grad-CAM map shows").
        """
        leaf, embeddings = self._forward_from_target_layer(pixels)
        scores = target(embeddings)  # (B, K)
        n_refs = scores.shape[1]
        # Row b of the scores depends only on image b (eval mode), so the gradient of the
        # column sum gives every image's gradient at once.
        grads = []
        for k in range(n_refs):
            check_deadline()
            grads.append(torch.autograd.grad(scores[:, k].sum(), leaf, retain_graph=k < n_refs - 1)[0])
        activations = leaf.detach()
        if self.reshape_transform is not None:
            activations = self.reshape_transform(activations)
            grads = [self.reshape_transform(g) for g in grads]
        check_feature_map(activations)
        grad_stack = torch.stack(grads, dim=1)  # (B, K, C, h, w)
        weights = self.channel_weights(activations[:, None], grad_stack)  # (B, K, C)
        return torch.einsum("bkc,bchw->bkhw", weights, activations), embeddings.detach()
