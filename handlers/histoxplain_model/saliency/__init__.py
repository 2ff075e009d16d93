"""Similarity saliency: why is an image similar (or dissimilar) to a reference embedding?

    explainer = get_explainer("gradcam", encoder.model, encoder.target_layer,
                              encoder.reshape_transform)
    result = explainer.explain(pixels, references, polarity="similar")
    result.heatmaps  # (B, K, H, W) float32 in [0, 1]; result.scores (B, K) cosine

Methods: "gradcam", "gradcampp" (both from one forward pass for all K references),
"smoothgrad" (input gradients averaged over noisy copies; needs no target layer) and "simmap"
(the cosine decomposed exactly over the target layer's locations; one forward pass, no
gradients; mean-pooled encoders only) and "rise" (random smooth masks weighted by the cosine they
leave; forward passes only, any encoder; the K references share the masked passes).
"""

from __future__ import annotations

from torch import nn

from histoxplain_model.errors import UnknownNameError
from histoxplain_model.options import SaliencyOptions, check_options
from histoxplain_model.vocabulary import GRADCAM, GRADCAM_PLUS_PLUS, RISE, SIMMAP, SMOOTHGRAD
from histoxplain_model.saliency.base import (
    BaseCAM,
    Explainer,
    LayerMapExplainer,
    ReshapeTransform,
    SaliencyResult,
    finish_maps,
    gradient_mode,
    normalise_maps,
    upsample_maps,
)
from histoxplain_model.saliency.gradcam import GradCAM, GradCAMPlusPlus
from histoxplain_model.saliency.rise import PixelEmbedder, Rise
from histoxplain_model.saliency.simmap import SimilarityDecomposition, SimilarityMap
from histoxplain_model.saliency.smoothgrad import InputGradient, SmoothGrad
from histoxplain_model.saliency.targets import (
    POLARITIES,
    CosineTarget,
    Polarity,
    SimilarityTarget,
    check_polarity,
    cosine_scores,
    similarity_target,
)

__all__ = [
    "METHODS",
    "POLARITIES",
    "BaseCAM",
    "CosineTarget",
    "Explainer",
    "GradCAM",
    "GradCAMPlusPlus",
    "InputGradient",
    "LayerMapExplainer",
    "PixelEmbedder",
    "Polarity",
    "ReshapeTransform",
    "Rise",
    "SaliencyResult",
    "SimilarityDecomposition",
    "SimilarityMap",
    "SimilarityTarget",
    "SmoothGrad",
    "check_method",
    "check_polarity",
    "cosine_scores",
    "finish_maps",
    "get_explainer",
    "gradient_mode",
    "normalise_maps",
    "similarity_target",
    "upsample_maps",
]

METHODS: dict[str, type[Explainer]] = {
    GRADCAM: GradCAM,
    GRADCAM_PLUS_PLUS: GradCAMPlusPlus,
    SMOOTHGRAD: SmoothGrad,
    SIMMAP: SimilarityMap,
    RISE: Rise,
}


def check_method(method: str) -> str:
    """Return ``method`` if registered, else raise :class:`UnknownNameError` listing them."""
    if method not in METHODS:
        raise UnknownNameError.for_name("method", str(method), METHODS)
    return method


def get_explainer(
    method: str,
    encoder_model: nn.Module,
    target_layer: nn.Module | None = None,
    reshape_transform: ReshapeTransform | None = None,
    options: SaliencyOptions | None = None,
    pixel_embedder: PixelEmbedder | None = None,
) -> Explainer:
    """Build the explainer registered as ``method``.

    ``encoder_model``: pixels (B,3,H,W) -> embeddings (B,D), in eval mode.
    ``target_layer``/``reshape_transform``: the layer GradCAM(++) hooks and, for a ViT, the
    tokens (B,N,C) -> (B,C,h,w) reshape; SmoothGrad ignores them; simmap decomposes the
    layer's map (its mean must be the embedding).
    ``options``: the method's own options type (``histoxplain_model.options.OPTIONS_TYPES``);
    ``None``: its defaults; another method's options raise :class:`InvalidRequest`.
    ``pixel_embedder``: a faster forward pass (the ONNX Runtime session) for the method that needs
    embeddings only (rise); the gradient methods need the torch model and ignore it.
    """
    explainer_class = METHODS[check_method(method)]
    checked = check_options(method, options)
    if explainer_class is Rise:
        return Rise(encoder_model, target_layer, reshape_transform, checked, pixel_embedder=pixel_embedder)
    return explainer_class(encoder_model, target_layer, reshape_transform, checked)
