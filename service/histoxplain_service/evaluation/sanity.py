"""Model-randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps", sec. 3).

A map that explains the model must change when the model's learned weights are destroyed.
Adebayo et al. randomise cascadingly from the top: step 1 re-initialises the top block (and
the head modules after it), step 2 also the block below, and so on, each step keeping the
previous steps' random weights (:func:`randomise_cascade`). At each step the map is recomputed
for the same image and reference, and the Spearman rank correlation with the trained model's
map is measured. A correlation near 1 means the method is insensitive to the
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

__all__ = ["SANITY_THRESHOLD", "map_rank_correlation", "randomise_cascade", "randomise_top_blocks", "top_blocks"]

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


def _reset(modules: list[tuple[str, nn.Module]], seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, block in modules:
            for module in block.modules():
                reset: Callable[[], None] | None = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()


def randomise_top_blocks(model: nn.Module, n_blocks: int = 1, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` with its top block(s) re-initialised; returns it and their names."""
    randomised = copy.deepcopy(model)
    chosen = top_blocks(randomised, n_blocks)
    _reset(chosen, seed)
    randomised.eval()
    return randomised, [name for name, _ in chosen]


def randomise_cascade(model: nn.Module, n_steps: int, seed: int = 0) -> list[tuple[nn.Module, list[str]]]:
    """The cascade's first ``n_steps`` steps: one deep copy of ``model`` per step.

    Step k has the top k blocks (and the head modules after them) re-initialised; it is step
    k-1's model with one more block re-initialised, so the randomisation accumulates from the
    top as in Adebayo et al. sec. 3.1. Returns (model, names of all its re-initialised
    modules) per step. ``n_steps`` above the number of blocks stops at the last block.
    """
    steps: list[tuple[nn.Module, list[str]]] = []
    previous: nn.Module = model
    done: list[str] = []
    for step in range(1, n_steps + 1):
        randomised = copy.deepcopy(previous)
        chosen = top_blocks(randomised, step)
        new = [(name, module) for name, module in chosen if name not in done]
        if not new:
            break
        _reset(new, seed + step)
        randomised.eval()
        done = [name for name, _ in chosen]
        steps.append((randomised, done))
        previous = randomised
    return steps
