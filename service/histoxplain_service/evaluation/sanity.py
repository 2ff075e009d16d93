"""Model-randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", sec. 3).

A map that explains the model must change when the model's learned weights are destroyed.
We re-initialise the top block(s) of the encoder (the cascade's first step(s), from the output
down), recompute the map for the same image and reference, and measure the Spearman rank
correlation between the two maps. A correlation near 1 means the method is insensitive to the
weights (like an edge detector, which ignores the model); a faithful method falls well below.
The randomised model also re-embeds the reference, because the explained function is the
whole similarity, not one branch of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

__all__ = ["SANITY_THRESHOLD", "map_rank_correlation", "randomise_top_blocks", "top_blocks"]

SANITY_THRESHOLD = 0.5
"""A method whose mean |rank correlation| stays above this after randomisation fails the check."""


def map_rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation of two maps (flattened); 1.0 when either is constant and equal."""
    a = np.asarray(first, dtype=np.float64).reshape(-1)
    b = np.asarray(second, dtype=np.float64).reshape(-1)
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(spearmanr(a, b).statistic)


def top_blocks(model: nn.Module, n_blocks: int = 1) -> list[tuple[str, nn.Module]]:
    """The top ``n_blocks`` blocks of ``model`` and every parametrised module after them.

    timm CNNs and ViTs keep their stages in ``blocks`` / ``stages`` / ``layers``
    (ResNets: ``layer1..layer4``); the head modules registered after them (``conv_head``,
    ``bn2``, ``norm``, ``head``) are randomised too, as in the cascade's first step.
    """
    owner = model
    while True:
        children = dict(owner.named_children())
        containers = [name for name in ("blocks", "stages", "layers") if name in children]
        if containers or len(children) != 1:
            break
        owner = next(iter(children.values()))  # unwrap a single-child wrapper (e.g. an encoder head)
    prefix = next((name for name, module in model.named_modules() if module is owner), "")
    prefix = f"{prefix}." if prefix else ""
    children = list(owner.named_children())
    container = next((name for name in ("blocks", "stages", "layers") if name in dict(children)), None)
    if container is not None:
        blocks = list(dict(children)[container].named_children())
        chosen = [(f"{prefix}{container}.{name}", module) for name, module in blocks[-n_blocks:]]
        after = [name for name, _ in children][[name for name, _ in children].index(container) + 1 :]
    else:
        stages = [(name, module) for name, module in children if name.startswith("layer")]
        chosen = [(f"{prefix}{name}", module) for name, module in stages[-n_blocks:]]
        last = chosen[-1][0].rsplit(".", 1)[-1] if chosen else None
        names = [name for name, _ in children]
        after = names[names.index(last) + 1 :] if last else names[-n_blocks:]
    tail = [(f"{prefix}{name}", dict(children)[name]) for name in after]
    return chosen + [(name, module) for name, module in tail if any(True for _ in module.parameters())]


def randomise_top_blocks(model: nn.Module, n_blocks: int = 1, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` with its top block(s) re-initialised; returns it and their names."""
    randomised = copy.deepcopy(model)
    chosen = top_blocks(randomised, n_blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, block in chosen:
            for module in block.modules():
                reset: Callable[[], None] | None = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
    randomised.eval()
    return randomised, [name for name, _ in chosen]
