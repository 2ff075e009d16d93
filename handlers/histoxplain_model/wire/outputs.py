"""What the TorchServe handler answers inside its ``HXP1`` envelope, and how the backend reads it.

The request side is :mod:`histoxplain_model.wire.inputs`; the byte format is
:mod:`histoxplain_model.wire.envelope`. Per mode:

    embed     meta {"mode", "batch"}; ``embeddings`` (N, D) float32, L2-normalised rows
    explain   meta {"mode", "batch", "method", "polarity", "side", "map_size"?}; ``scores`` (K,)
              float32; ``query_heatmaps`` and/or ``reference_heatmaps``: GradCAM, GradCAM++
              and simmap send raw maps (K, h, w) float32 >= 0 at the target layer's
              resolution with ``map_size`` = [H, W] (7x7 instead of 224x224 values for
              EfficientNet-Lite0; the receiver finishes them with numpy), SmoothGrad the
              finished maps (K, H, W) float16 in [0, 1] (rounding moves a value by at most
              2**-12 = 2.4e-4)
              ``correspondence_cells`` (N, 10) int32 rows (reference index, rank, query box
              x, y, width, height, reference box x, y, width, height) and
              ``correspondence_shares`` (N,) float64, when correspondences were asked
              ``query_faithfulness`` / ``reference_faithfulness`` (K, 4) float64 rows
              (deletion AUC, insertion AUC, random deletion AUC, random insertion AUC) with
              meta ``verify_steps``, when verify was asked
    info      meta {"mode", "preset", "architecture", "embedding_dim", "input_size", "methods"}

``batch`` is the number of requests TorchServe batched with this one (benchmarks read it).
Torch-free: the gateway imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from histoxplain_model.results import Faithfulness, ModelInfo, RegionCorrespondence, RetrievalExplanation
from histoxplain_model.wire.envelope import encode_envelope
from histoxplain_model.wire.inputs import EMBED, EXPLAIN, INFO

__all__ = [
    "decode_embeddings",
    "decode_explanation",
    "decode_info",
    "encode_embeddings",
    "encode_explanation",
    "encode_info",
]

EMBEDDINGS = "embeddings"
SCORES = "scores"
QUERY_HEATMAPS, REFERENCE_HEATMAPS = "query_heatmaps", "reference_heatmaps"
MAP_SIZE = "map_size"
CORRESPONDENCE_CELLS, CORRESPONDENCE_SHARES = "correspondence_cells", "correspondence_shares"
FAITHFULNESS = {"query": "query_faithfulness", "reference": "reference_faithfulness"}
VERIFY_STEPS = "verify_steps"


def encode_embeddings(embeddings: np.ndarray, batch: int) -> bytes:
    """The envelope of an embed request: (N, D) float32 embeddings."""
    return encode_envelope({"mode": EMBED, "batch": batch}, {EMBEDDINGS: embeddings})


def decode_embeddings(arrays: Mapping[str, np.ndarray], count: int) -> np.ndarray:
    """(``count``, D) float32 from an embed envelope's arrays.

    Raises:
        RuntimeError: the handler answered with another number of embeddings.
    """
    embeddings = arrays[EMBEDDINGS].astype(np.float32, copy=False)
    if embeddings.shape[0] != count:
        raise RuntimeError(f"TorchServe returned {embeddings.shape[0]} embeddings for {count} images")
    return embeddings


def encode_explanation(explanation: RetrievalExplanation, side: str, batch: int) -> bytes:
    """The envelope of an explain request: raw CAMs as float32 (a few hundred values a map),
    finished maps as float16."""
    dtype = np.float32 if explanation.map_size is not None else np.float16
    arrays: dict[str, np.ndarray] = {SCORES: np.asarray(explanation.scores, dtype=np.float32)}
    if explanation.query_heatmaps is not None:
        arrays[QUERY_HEATMAPS] = np.asarray(explanation.query_heatmaps, dtype=dtype)
    if explanation.reference_heatmaps is not None:
        arrays[REFERENCE_HEATMAPS] = np.asarray(explanation.reference_heatmaps, dtype=dtype)
    meta: dict[str, Any] = {
        "mode": EXPLAIN, "batch": batch, "method": explanation.method, "polarity": explanation.polarity, "side": side,
    }
    if explanation.map_size is not None:
        meta[MAP_SIZE] = list(explanation.map_size)
    if explanation.correspondences is not None:
        arrays.update(_encode_correspondences(explanation.correspondences))
    for side, verified in (("query", explanation.query_faithfulness), ("reference", explanation.reference_faithfulness)):
        if verified is not None:
            arrays[FAITHFULNESS[side]] = np.asarray(
                [(f.deletion_auc, f.insertion_auc, f.random_deletion_auc, f.random_insertion_auc) for f in verified],
                dtype=np.float64,
            ).reshape(len(verified), 4)
            meta[VERIFY_STEPS] = verified[0].steps if verified else 0
    return encode_envelope(meta, arrays)


def _decode_faithfulness(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], side: str) -> tuple[Faithfulness, ...] | None:
    rows = arrays.get(FAITHFULNESS[side])
    if rows is None:
        return None
    steps = int(meta.get(VERIFY_STEPS, 0))
    return tuple(Faithfulness(*(float(v) for v in row), steps=steps) for row in rows.reshape(-1, 4).tolist())


def _encode_correspondences(per_reference: tuple[tuple[RegionCorrespondence, ...], ...]) -> dict[str, np.ndarray]:
    rows = [
        (index, pair.rank, *pair.query_box, *pair.reference_box)
        for index, pairs in enumerate(per_reference) for pair in pairs
    ]
    shares = [pair.share for pairs in per_reference for pair in pairs]
    return {
        CORRESPONDENCE_CELLS: np.asarray(rows, dtype=np.int32).reshape(len(rows), 10),
        CORRESPONDENCE_SHARES: np.asarray(shares, dtype=np.float64),
    }


def _decode_correspondences(
    arrays: Mapping[str, np.ndarray], count: int
) -> tuple[tuple[RegionCorrespondence, ...], ...] | None:
    cells, shares = arrays.get(CORRESPONDENCE_CELLS), arrays.get(CORRESPONDENCE_SHARES)
    if cells is None or shares is None:
        return None
    per_reference: list[list[RegionCorrespondence]] = [[] for _ in range(count)]
    for row, share in zip(cells.tolist(), shares.tolist()):
        index, rank, *boxes = (int(value) for value in row)
        query_box, reference_box = tuple(boxes[:4]), tuple(boxes[4:])
        per_reference[index].append(
            RegionCorrespondence(query_box, reference_box, float(share), rank)  # type: ignore[arg-type]
        )
    return tuple(tuple(pairs) for pairs in per_reference)


def decode_explanation(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> RetrievalExplanation:
    """The explanation in an explain envelope, with finished maps (raw CAMs are upsampled and
    normalised here, with numpy): float32 heatmaps (K, H, W) in [0, 1]."""
    map_size = meta.get(MAP_SIZE)
    return RetrievalExplanation(
        method=str(meta["method"]),
        polarity=str(meta["polarity"]),
        scores=arrays[SCORES].astype(np.float32),
        query_heatmaps=_as_float32(arrays.get(QUERY_HEATMAPS)),
        reference_heatmaps=_as_float32(arrays.get(REFERENCE_HEATMAPS)),
        map_size=None if map_size is None else (int(map_size[0]), int(map_size[1])),
        correspondences=_decode_correspondences(arrays, int(arrays[SCORES].shape[0])),
        query_faithfulness=_decode_faithfulness(meta, arrays, "query"),
        reference_faithfulness=_decode_faithfulness(meta, arrays, "reference"),
    ).finished()


def _as_float32(heatmaps: np.ndarray | None) -> np.ndarray | None:
    return None if heatmaps is None else heatmaps.astype(np.float32)


def encode_info(info: ModelInfo) -> bytes:
    """The envelope of an info request: what the worker serves (its ``backend`` stays local)."""
    return encode_envelope(
        {
            "mode": INFO,
            "preset": info.preset,
            "architecture": info.architecture,
            "embedding_dim": int(info.embedding_dim),
            "input_size": [int(size) for size in info.input_size],
            "methods": list(info.methods),
        },
        {},
    )


def decode_info(meta: Mapping[str, Any], backend: str) -> ModelInfo:
    """The :class:`ModelInfo` of an info envelope's ``meta``, as served through ``backend``."""
    height, width = (int(size) for size in meta["input_size"])
    return ModelInfo(
        preset=str(meta["preset"]),
        architecture=str(meta["architecture"]),
        embedding_dim=int(meta["embedding_dim"]),
        input_size=(height, width),
        methods=tuple(str(method) for method in meta["methods"]),
        backend=backend,
    )
