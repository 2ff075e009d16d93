"""Input-gradient saliency and SmoothGrad, which wraps it (as Captum's NoiseTunnel wraps
Saliency)."""

from __future__ import annotations

import torch
from torch import nn

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import SmoothGradOptions, options_or_defaults
from histoxplain_model.saliency.base import Explainer, ReshapeTransform, normalise_maps
from histoxplain_model.saliency.targets import SimilarityTarget

__all__ = ["InputGradient", "SmoothGrad"]


class InputGradient(Explainer):
    """|dS/dx| (Simonyan et al., 2014; Captum ``Saliency`` with its default ``abs=True``).

    The map of one image is the maximum over colour channels of |dS/dx| (Simonyan et al.
    section 3.1), min-max normalised. Needs no target layer and has no options.
    """

    def attribute(self, pixels: torch.Tensor, target: SimilarityTarget) -> torch.Tensor:
        """|dS_k/dx| for every image and target: pixels (N,3,H,W) -> (N, K, 3, H, W).

        One forward pass; the K targets' backward passes reuse its graph (retain_graph).
        Must run in gradient mode (``Explainer.explain`` enters it).
        """
        inputs = pixels.detach().requires_grad_(True)
        scores = target(self.model(inputs))
        n_refs = scores.shape[1]
        grads = []
        for k in range(n_refs):
            check_deadline()
            grads.append(torch.autograd.grad(scores[:, k].sum(), inputs, retain_graph=k < n_refs - 1)[0].abs_())
        return torch.stack(grads, dim=1)

    def _heatmaps(
        self, pixels: torch.Tensor, target: SimilarityTarget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            embeddings = self.model(pixels)
        return normalise_maps(self.attribute(pixels, target).amax(dim=2)), embeddings


class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al., 2017): the mean of |dS/dx| over n noisy copies of the image.

    Its settings are its own (:class:`SmoothGradOptions`), as Captum's NoiseTunnel takes them on
    its own ``attribute``; the wrapped :class:`InputGradient` has none.

    Noise: N(0, (sigma * (max(x) - min(x)))^2) per image, sigma = ``options.sigma``
    (Smilkov et al. section 4.1). One standard-normal draw of n samples from a
    ``torch.Generator`` seeded with ``options.seed`` is shared by all images of the batch and all
    K references, so the same image gives the same map alone or in a batch, and its K maps
    differ only through the references. (Captum draws new noise per call; with the same draws
    the result equals ``NoiseTunnel(Saliency).attribute(nt_type="smoothgrad")``.)

    The noise is always drawn on the CPU and then copied to the model's device: CUDA generators
    (Philox) give other numbers than the CPU's (Mersenne Twister) for the same seed, so drawing
    on the GPU would make a seed mean different maps on a GPU server and on a CPU one. With the
    CPU draw, a seed gives the same noise everywhere and maps differ across devices only by
    floating-point rounding. The copy is n * 3 * H * W floats (n=25 at 224 px: 15 MB), once
    per explain call.

    Cost: the K references share the n noisy forward passes; each still needs its own backward
    pass per noisy copy (n forwards + n*K backwards). Images go one at a time and their copies
    ``options.chunk_size`` per forward pass, to bound memory. The map is the per-pixel maximum
    over colour channels of the mean |gradient|, min-max normalised.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | None = None,
        reshape_transform: ReshapeTransform | None = None,
        options: SmoothGradOptions | None = None,
    ) -> None:
        super().__init__(model, target_layer, reshape_transform)
        self.options = options_or_defaults(SmoothGradOptions, options, type(self).__name__)
        self.inner = InputGradient(model)

    def noise(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """The n standard-normal draws (n, C, H, W) on ``device``, reproducible from
        ``options.seed``; drawn by a CPU generator whatever the device (class docstring)."""
        generator = torch.Generator(device="cpu").manual_seed(self.options.seed)
        draws = torch.randn((self.options.n_samples, *shape), generator=generator)
        return draws.to(device)

    def mean_attributions(self, pixels: torch.Tensor, target: SimilarityTarget) -> torch.Tensor:
        """Mean |dS_k/dx| over the noisy copies: pixels (B,3,H,W) -> (B, K, 3, H, W).

        Images are processed one at a time, ``options.chunk_size`` noisy copies per forward
        pass, so peak memory does not grow with B or n.
        """
        unit_noise = self.noise(tuple(pixels.shape[1:]), pixels.device).to(pixels.dtype)
        per_image = []
        for image in pixels:
            stdev = self.options.sigma * (image.amax() - image.amin())
            total: torch.Tensor | None = None
            for start in range(0, self.options.n_samples, self.options.chunk_size):
                check_deadline()
                noisy = image[None] + stdev * unit_noise[start : start + self.options.chunk_size]
                summed = self.inner.attribute(noisy, target).sum(0)  # (K, 3, H, W)
                total = summed if total is None else total.add_(summed)
            if total is None:  # unreachable: SmoothGradOptions checks n_samples >= 1
                raise InvalidRequest("n_samples must be >= 1")
            per_image.append(total / self.options.n_samples)
        return torch.stack(per_image)

    def _heatmaps(
        self, pixels: torch.Tensor, target: SimilarityTarget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            embeddings = self.model(pixels)
        maps = self.mean_attributions(pixels, target).amax(dim=2)
        return normalise_maps(maps), embeddings
