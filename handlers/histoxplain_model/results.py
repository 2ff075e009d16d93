"""What the model side returns: :class:`RetrievalExplanation`, and :class:`ModelInfo` (what it is).

Torch-free (numpy only), so the gateway in front of TorchServe can receive, finish and convert
explanations without loading torch; ``histoxplain_model.explain`` produces them with torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from histoxplain_model.wire.cams import finish_cams

__all__ = ["Faithfulness", "ModelInfo", "RegionCorrespondence", "RetrievalExplanation"]


@dataclass(frozen=True)
class ModelInfo:
    """What the served encoder is: enough for a client to interpret embeddings and heatmaps.

    ``methods``: the explanation methods it serves; ``backend``: where it runs
    (``embedded`` in-process, ``torchserve``).
    """

    preset: str
    architecture: str
    embedding_dim: int
    input_size: tuple[int, int]
    methods: tuple[str, ...]
    backend: str


@dataclass(frozen=True)
class Faithfulness:
    """How one map fared on deletion and insertion (blur baseline, ``steps`` steps) against a
    smooth random map of its own grid on the same image (``ExplainOptions.verify``).

    AUCs are in units of the explained score (cosine for ``similar``, minus the cosine for
    ``dissimilar``). Deletion: lower is more faithful; insertion: higher is more faithful.
    """

    deletion_auc: float
    insertion_auc: float
    random_deletion_auc: float
    random_insertion_auc: float
    steps: int

    @property
    def deletion_difference(self) -> float:
        """Map minus random deletion AUC: below 0 the map beat chance on this pair."""
        return self.deletion_auc - self.random_deletion_auc

    @property
    def insertion_difference(self) -> float:
        """Map minus random insertion AUC: above 0 the map beat chance on this pair."""
        return self.insertion_auc - self.random_insertion_auc


@dataclass(frozen=True)
class RegionCorrespondence:
    """A query cell matched to a reference cell (``histoxplain_model.saliency.correspondences``).

    query_box / reference_box: (x, y, width, height) in pixels of the query / reference image as
    sent or stored (not the model input). share: C(i, j), this pair's exact share of the cosine
    (all pairs of cells sum to it). rank: 1 for the largest share, then 2, 3, ...
    """

    query_box: tuple[int, int, int, int]
    reference_box: tuple[int, int, int, int]
    share: float
    rank: int


@dataclass(frozen=True)
class RetrievalExplanation:
    """Heatmaps at the model input resolution (H, W), float32 in [0, 1].

    scores (K,): cosine similarity of the query to each reference.
    query_heatmaps (K, H, W): the query explained against reference k (None unless side is
        "query" or "both").
    reference_heatmaps (K, H, W): reference k explained against the query (None unless side is
        "retrieved" or "both").
    map_size: None for finished maps. (H, W) when the heatmaps are raw maps (K, h, w) >= 0 at
        the target layer's resolution (CAMs and simmap; ``explain_retrieval(..., native_cams=True)``,
        what the TorchServe handler sends); :meth:`finished` turns them into the maps above.
    correspondences: None unless asked (``ExplainRequest.correspondences``); then one tuple per
        reference of its best-matched region pairs, best first.
    query_faithfulness / reference_faithfulness: None unless ``ExplainRequest.verify``; then one
        :class:`Faithfulness` per reference for each side that was explained.
    """

    method: str
    polarity: str
    scores: np.ndarray
    query_heatmaps: np.ndarray | None
    reference_heatmaps: np.ndarray | None
    map_size: tuple[int, int] | None = None
    correspondences: tuple[tuple[RegionCorrespondence, ...], ...] | None = None
    query_faithfulness: tuple[Faithfulness, ...] | None = None
    reference_faithfulness: tuple[Faithfulness, ...] | None = None

    def finished(self) -> RetrievalExplanation:
        """The same explanation with finished maps (upsampled to ``map_size``, min-max; numpy)."""
        if self.map_size is None:
            return self
        size = self.map_size

        def finish(maps: np.ndarray | None) -> np.ndarray | None:
            return None if maps is None else finish_cams(maps, size)

        return replace(
            self, query_heatmaps=finish(self.query_heatmaps), reference_heatmaps=finish(self.reference_heatmaps),
            map_size=None,
        )
