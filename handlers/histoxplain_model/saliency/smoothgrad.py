"""Input-gradient saliency and SmoothGrad, which wraps it (as Captum's NoiseTunnel wraps
Saliency, or InputXGradient for the signed dissimilar form)."""

from __future__ import annotations

import torch
from torch import nn

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import InvalidRequest
from histoxplain_model.options import SmoothGradOptions, options_or_defaults
from histoxplain_model.saliency.base import Explainer, ReshapeTransform, normalise_maps
from histoxplain_model.saliency.targets import CosineTarget, SimilarityTarget

__all__ = ["InputGradient", "SmoothGrad", "signed_form"]


class InputGradient(Explainer):
    """|dS/dx| (Simonyan et al., 2014; Captum ``Saliency`` with its default ``abs=True``).

    The map of one image is the maximum over colour channels of |dS/dx| (Simonyan et al.
    section 3.1), min-max normalised. Needs no target layer and has no options.
    """

    def gradients(self, pixels: torch.Tensor, target: SimilarityTarget) -> torch.Tensor:
        """dS_k/dx, signed, for every image and target: pixels (N,3,H,W) -> (N, K, 3, H, W).

        One forward pass; the K targets' backward passes reuse its graph (retain_graph).
        Must run in gradient mode (``Explainer.explain`` enters it).
        """
        inputs = pixels.detach().requires_grad_(True)
        scores = target(self.model(inputs))
        n_refs = scores.shape[1]
        grads = []
        for k in range(n_refs):
            check_deadline()
            grads.append(torch.autograd.grad(scores[:, k].sum(), inputs, retain_graph=k < n_refs - 1)[0])
        return torch.stack(grads, dim=1)

    def attribute(self, pixels: torch.Tensor, target: SimilarityTarget) -> torch.Tensor:
        """|dS_k/dx| for every image and target: pixels (N,3,H,W) -> (N, K, 3, H, W)."""
        return self.gradients(pixels, target).abs_()

    def _heatmaps(
        self, pixels: torch.Tensor, target: SimilarityTarget
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            embeddings = self.model(pixels)
        return normalise_maps(self.attribute(pixels, target).amax(dim=2)), embeddings


def signed_form(target: SimilarityTarget) -> bool:
    """Whether SmoothGrad explains ``target`` with its signed form: a :class:`CosineTarget` of
    polarity "dissimilar". Any other target (a plain callable included) gets the mean
    |gradient|, the original SmoothGrad."""
    return isinstance(target, CosineTarget) and target.polarity == "dissimilar"


class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al., 2017): noisy copies of the image, attributions averaged.

    Its settings are its own (:class:`SmoothGradOptions`), as Captum's NoiseTunnel takes them on
    its own ``attribute``; the wrapped :class:`InputGradient` has none.

    Polarity. ``similar``: the mean of |dS/dx| over the copies, maximum over colour channels
    (Smilkov et al.'s ImageNet form; Captum ``NoiseTunnel(Saliency)``). It is a sensitivity
    magnitude, and |d(-S)/dx| = |dS/dx|, so it cannot serve ``dissimilar``. ``dissimilar``:
    the signed form, SmoothGrad of gradient x input (Shrikumar et al. 2016, "Not just a black
    box"; Smilkov et al. 2017 smooth other attribution methods the same way; Captum
    ``NoiseTunnel(InputXGradient)``): with S = -cos,

        a(x) = mean_n sum_c x~_nc * dS/dx~_nc,   map = ReLU(a),   x~_n = x + noise_n.

    x * dS/dx is the first-order share of S of each pixel's departure from the all-zeros input,
    which after the encoder's normalisation is the mean colour of its training data (for a
    ReLU network it equals epsilon-LRP and approximates DeepLIFT-Rescale with a zero
    baseline, Ancona et al. 2018). Summed over channels (shares add up) and kept where positive, the map shows
    the pixels whose content pulls the cosine down; pixels that raise it are 0. Its mirror for
    ``similar`` would be ReLU(-a); the unsigned form is kept there, as before (oracle-tested).

    Noise: N(0, (sigma * (max(x) - min(x)))^2) per image, sigma = ``options.sigma``
    (Smilkov et al. section 4.1). One standard-normal draw of n samples from a
    ``torch.Generator`` seeded with ``options.seed`` is shared by all images of the batch and all
    K references, so the same image gives the same map alone or in a batch, and its K maps
    differ only through the references. (Captum draws new noise per call; with the same draws
    the result equals ``NoiseTunnel(Saliency)`` / ``NoiseTunnel(InputXGradient)``
    ``.attribute(nt_type="smoothgrad")``.)

    The noise is always drawn on the CPU and then copied to the model's device: CUDA generators
    (Philox) give other numbers than the CPU's (Mersenne Twister) for the same seed, so drawing
    on the GPU would make a seed mean different maps on a GPU server and on a CPU one. With the
    CPU draw, a seed gives the same noise everywhere and maps differ across devices only by
    floating-point rounding. The copy is n * 3 * H * W floats (n=25 at 224 px: 15 MB), once
    per explain call.

    Cost: the K references share the n noisy forward passes; each still needs its own backward
    pass per noisy copy (n forwards + n*K backwards), for either polarity. Images go one at a
    time and their copies ``options.chunk_size`` per forward pass, to bound memory. Maps are
    min-max normalised.
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
        """Mean attribution over the noisy copies: pixels (B,3,H,W) -> (B, K, 3, H, W):
        |dS_k/dx~|, or x~ * dS_k/dx~ for the signed form (:func:`signed_form`).

        Images are processed one at a time, ``options.chunk_size`` noisy copies per forward
        pass, so peak memory does not grow with B or n.
        """
        signed = signed_form(target)
        unit_noise = self.noise(tuple(pixels.shape[1:]), pixels.device).to(pixels.dtype)
        per_image = []
        for image in pixels:
            stdev = self.options.sigma * (image.amax() - image.amin())
            total: torch.Tensor | None = None
            for start in range(0, self.options.n_samples, self.options.chunk_size):
                check_deadline()
                noisy = image[None] + stdev * unit_noise[start : start + self.options.chunk_size]
                if signed:
                    attributions = self.inner.gradients(noisy, target).mul_(noisy[:, None])
                else:
                    attributions = self.inner.attribute(noisy, target)
                summed = attributions.sum(0)  # (K, 3, H, W)
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
        attributions = self.mean_attributions(pixels, target)
        if signed_form(target):
            maps = attributions.sum(dim=2).clamp_(min=0)  # shares add over colour channels
        else:
            maps = attributions.amax(dim=2)
        return normalise_maps(maps), embeddings
