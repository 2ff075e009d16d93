"""The saliency pipeline shared by every method.

:class:`Explainer` is the public interface: ``explain(pixels (B,3,H,W), references (K,D),
polarity) -> SaliencyResult`` with heatmaps (B, K, H, W) float32 in [0, 1]. It owns the parts
every method needs: input checks, leaving an outer ``torch.inference_mode()`` (TorchServe runs
handlers inside one), the cosine target, and the final upsample + per-map min-max.

:class:`BaseCAM` is the class-activation-map pipeline (pytorch-grad-cam's shape): one forward
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
import torch.nn.functional as F
from torch import nn

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import OptionsT, options_or_defaults
from histoxplain_model.saliency.targets import (
    SimilarityTarget,
    check_polarity,
    cosine_scores,
    similarity_target,
)

__all__ = [
    "BaseCAM",
    "Explainer",
    "ReshapeTransform",
    "SaliencyResult",
    "gradient_mode",
    "normalise_maps",
    "upsample_maps",
]

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SaliencyResult:
    """heatmaps (B, K, H, W) float32 in [0, 1]: image b explained against reference k;
    scores (B, K) float32: cosine similarity of image b's embedding to reference k.

    native: the heatmaps are raw class activation maps (B, K, h, w) >= 0 at the target layer's
    resolution, not yet upsampled or normalised (``explain(..., native=True)`` on a CAM method);
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
    INTER_LINEAR does when enlarging, so maps match pytorch-grad-cam's)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each (H, W) map of (..., H, W) to [0, 1]; a constant map becomes all zeros."""
    low, high = torch.aminmax(maps.flatten(-2), dim=-1)
    # A constant map has maps - low == 0 everywhere, so the clamped span turns it into zeros.
    span = (high - low).clamp_(min=torch.finfo(maps.dtype).tiny)
    return (maps - low[..., None, None]).div_(span[..., None, None]).clamp_(0.0, 1.0)


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
        self, pixels: torch.Tensor, references: torch.Tensor, polarity: str = "similar", native: bool = False
    ) -> SaliencyResult:
        """Heatmaps of each image's evidence for (or against) its similarity to each reference.

        pixels: (B, 3, H, W) float, preprocessed as the model expects; not modified.
        references: (K, D) reference embeddings (normalised or not), K >= 1.
        polarity: "similar" explains the cosine similarity, "dissimilar" its negation.
        native: CAM methods return their maps before the upsample and min-max (see
            :class:`SaliencyResult`; what the TorchServe handler sends); other methods ignore it.
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
            target = similarity_target(references, polarity)
            heatmaps, embeddings, is_native = (
                self._native_maps(pixels, target) if native else (*self._heatmaps(pixels, target), False)
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


class BaseCAM(Explainer, Generic[OptionsT]):
    """Class activation maps from one forward pass for all K references.

    A subclass sets ``options_type`` to its own options type; the constructor takes only that
    type (``None``: its defaults) and refuses another method's options.

    The hook starts the autograd graph at the target layer: the layers below it run without
    recording (their gradients are never needed), so the forward costs about one inference pass.
    The K targets' gradients with respect to the hooked activations come from K
    ``autograd.grad`` calls that reuse the graph above the target layer (retain_graph). On CPU a
    loop is as fast as ``is_grads_batched``/vmap, which fall back to per-slice loops here
    (PLATFORM.md).
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
    def channel_weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """activations (B, 1, C, h, w), grads (B, K, C, h, w) -> weights (B, K, C)."""

    def _forward_from_target_layer(
        self, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model; return (hooked activations as a grad-requiring leaf, embeddings)."""
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
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            torch.set_grad_enabled(True)  # record from here up; the no_grad below restores
            # A clone, so that in-place ops of later layers cannot touch the leaf.
            return leaf.clone()

        target_layer: nn.Module = self.target_layer  # set in __init__
        handle = target_layer.register_forward_hook(hook)
        try:
            with torch.no_grad():
                embeddings = self.model(pixels)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise InvalidRequest(
                f"the target layer ran {len(captured)} times in one forward pass; it must run "
                f"exactly once (choose another layer)"
            )
        if not embeddings.requires_grad:
            raise InvalidRequest("the model output does not depend on the target layer")
        return captured[0], embeddings

    def _heatmaps(
        self, pixels: torch.Tensor, target: SimilarityTarget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cam, embeddings = self._cams(pixels, target)
        return normalise_maps(upsample_maps(cam, tuple(pixels.shape[-2:]))), embeddings

    def _native_maps(
        self, pixels: torch.Tensor, target: SimilarityTarget
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        cam, embeddings = self._cams(pixels, target)
        return cam, embeddings, True

    def _cams(self, pixels: torch.Tensor, target: SimilarityTarget) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw CAMs (B, K, h, w) >= 0 at the target layer's resolution, clean embeddings (B, D))."""
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
        if activations.ndim != 4:
            raise InvalidRequest(
                f"target layer activations have shape {tuple(activations.shape)}; a (B, C, h, w) "
                f"map is needed (a ViT needs a reshape_transform)"
            )
        grad_stack = torch.stack(grads, dim=1)  # (B, K, C, h, w)
        weights = self.channel_weights(activations[:, None], grad_stack)  # (B, K, C)
        cam = torch.einsum("bkc,bchw->bkhw", weights, activations).clamp_(min=0)
        return cam, embeddings.detach()
