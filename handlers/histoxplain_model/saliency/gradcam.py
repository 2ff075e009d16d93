"""GradCAM and GradCAM++ channel weights (the rest of the pipeline is :class:`BaseCAM`)."""

from __future__ import annotations

import torch

from histoxplain_model.options import GradCAMOptions, GradCAMPlusPlusOptions
from histoxplain_model.saliency.base import BaseCAM

__all__ = ["GradCAM", "GradCAMPlusPlus"]


class GradCAM(BaseCAM[GradCAMOptions]):
    """GradCAM (Selvaraju et al., 2017).

    Eq. 1: alpha_k = mean_ij dS/dA^k_ij (global-average-pooled gradients);
    eq. 2: L = ReLU(sum_k alpha_k A^k).
    """

    options_type = GradCAMOptions

    def channel_weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        return grads.mean(dim=(-2, -1))


class GradCAMPlusPlus(BaseCAM[GradCAMPlusPlusOptions]):
    """GradCAM++ (Chattopadhay et al., 2018), weights from eq. 19 (with eq. 7's ReLU):

        a^kc_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3 + eps),   w^c_k = sum_ij a^kc_ij ReLU(g),
        g = dS/dA^k_ij; a is only needed (and only computed) where g > 0.

    Gradient scale (a departure from pytorch-grad-cam, on purpose). Eq. 19 is not homogeneous
    in the score S: scaling S by s scales the g^2 terms by s^2 but the g^3 term by s^3, and
    pytorch-grad-cam adds an absolute eps = 1e-6. A cosine target has tiny gradients, so g^2 is
    far below that eps and the map is really sum_ij ReLU(g)^3 / eps; multiplying the same
    similarity by 1000 gives a different map (PLATFORM.md measured changes of 0.15-0.98 after
    min-max). By default ("unit") we therefore evaluate eq. 19 on g / max|g| (max over the
    map's channels and positions, per image and reference): gradients in units of the steepest
    one. The map is then invariant to the scale of the target, and eps (relative to that unit,
    default 1e-6) only guards 0/0.

    Signed activations. Eq. 19 is derived for non-negative (post-ReLU) activations, where
    a = 1 / (2 + sum A * g) lies in (0, 1/2] for g > 0. With signed activations (a ViT's
    LayerNorm tokens) a negative channel sum makes the denominator cross zero and a explode, so
    in "unit" mode sum_ab A_ab is clamped at 0 (a = 1/2: the value eq. 19 takes when the
    higher-order terms vanish). CNN target layers after a ReLU are unaffected.

    ``GradCAMPlusPlusOptions(gradient_scale="raw")`` uses the raw gradients and no clamp, and
    reproduces pytorch-grad-cam exactly.
    """

    options_type = GradCAMPlusPlusOptions

    def channel_weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        sum_activations = activations.sum(dim=(-2, -1), keepdim=True)
        eps = self.options.eps
        if self.options.gradient_scale == "unit":
            # Eq. 19 on g' = g / m (m = max|g|) without dividing the big gradient tensor:
            # multiplying numerator and denominator by m^3 gives, for g > 0,
            #   a' g' = g^3 / (2 m g^2 + S g^3 + eps m^3)  (S = sum_ab A_ab, clamped at 0).
            steepest = grads.abs().amax(dim=(-3, -2, -1), keepdim=True)
            unit = torch.where(steepest > 0, steepest, torch.ones_like(steepest))
            sum_activations = sum_activations.clamp(min=0)
            two_m, eps_m3 = 2 * unit, eps * unit.pow(3)
        else:
            two_m, eps_m3 = 2.0, eps
        grads_2 = grads * grads
        denominator = torch.addcmul(two_m * torch.ones_like(sum_activations), sum_activations, grads)
        denominator.mul_(grads_2).add_(eps_m3)
        # a * ReLU(g) is 0 where g <= 0; the clamp keeps those entries (and a 0/0 there) out.
        numerator = grads.clamp(min=0).mul_(grads_2)
        return numerator.div_(denominator).nan_to_num_(nan=0.0).sum(dim=(-2, -1))
