"""Region-to-region correspondences: which query region matches which region of the hit, and how much.

The pairwise form of the similarity decomposition (Stylianou et al. 2019, "Visualizing deep
similarity networks"; Zhu et al. 2019): with per-location embeddings z_q(i) of the query and
z_r(j) of the reference (``saliency.locations``: the target layer's activations, through a
linear head if there is one), whose means are the embeddings e_q and e_r,

    C(i, j) = z_q(i) . z_r(j) / (HW_q HW_r |e_q| |e_r|),   sum_ij C(i, j) = cos(e_q, e_r)  exactly.

Each term is the share of the cosine that query cell i and reference cell j hold together.
Exact for mean-pooled encoders (every CNN preset here); others (CLS-pooled ViTs) are refused with
:class:`FailedPrecondition`, like simmap.

Which pairs are "matched": the largest C(i, j) alone are not correspondences. C grows with both
cells' activation norms, so a few strongly activated cells ("hubs") pair with everything: on a
real IHC tile against a copy of itself shifted by two cells, the 16 largest terms held 5 query
cells and no corresponding pair. The matched pairs are therefore the mutual nearest neighbours of
the two grids by the cosine of their cell features (cell j is query cell i's best match and i is
j's: one-to-one, Lowe-style matching without a ratio test), ranked by their share C(i, j); the
top m are returned (fewer when fewer cells match mutually). Shares stay exact terms of the sum.

The cells live on the target layer's grid over the model input (7x7 for EfficientNet-Lite0 at
224 px); :func:`cell_box` maps each back through the preprocessing's resize (the whole image is
resized to the input size, no crop: ``Encoder.preprocess``) to a box in the image's own pixels.
Cost: a (HW_q x D) by (D x HW_r) product per reference (49 x 1280 x 49 for EfficientNet-Lite0)
and a top-m, on activations of forward passes run anyway (``explain_retrieval``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.limits import MAX_CORRESPONDENCES
from histoxplain_model.results import RegionCorrespondence

__all__ = ["cell_box", "mutual_matches", "pairwise_shares", "region_correspondences"]


def pairwise_shares(query_locations: torch.Tensor, reference_locations: torch.Tensor) -> torch.Tensor:
    """Every C(i, j) (module docstring): (K, h_q w_q, h_r w_r) float32, row-major cells.

    query_locations (h_q, w_q, D); reference_locations (K, h_r, w_r, D); both checked to be
    mean-pooled by the caller. Sums over the last two axes to the K cosines.
    """
    query = query_locations.reshape(-1, query_locations.shape[-1]).float()  # (Nq, D)
    references = reference_locations.reshape(reference_locations.shape[0], -1, reference_locations.shape[-1]).float()
    query_norm = query.mean(dim=0).norm().clamp(min=1e-12)
    reference_norms = references.mean(dim=1).norm(dim=1).clamp(min=1e-12)  # (K,)
    scale = query.shape[0] * references.shape[1] * query_norm * reference_norms
    return torch.einsum("id,kjd->kij", query, references).div_(scale[:, None, None])


def cell_box(cell: int, grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Cell ``cell`` (row-major) of a ``grid`` (h, w) laid over a whole image of ``image_size``
    (H, W) -> its box (x, y, width, height) in the image's pixels, at least 1 px each way.

    The cells split the image evenly (edges floor(c W / w)), so they tile it without gaps and
    the last cell ends at the image's edge.
    """
    (rows, columns), (height, width) = grid, image_size
    row, column = divmod(int(cell), columns)
    x0, x1 = (column * width) // columns, ((column + 1) * width) // columns
    y0, y1 = (row * height) // rows, ((row + 1) * height) // rows
    x0, y0 = min(x0, width - 1), min(y0, height - 1)
    return x0, y0, max(x1 - x0, 1), max(y1 - y0, 1)


def region_correspondences(
    query_locations: torch.Tensor,
    reference_locations: torch.Tensor,
    top: int,
    query_size: tuple[int, int],
    reference_sizes: Sequence[tuple[int, int]],
) -> tuple[tuple[RegionCorrespondence, ...], ...]:
    """The ``top`` largest C(i, j) of each reference, best first, with their cells' boxes.

    query_locations (h_q, w_q, D); reference_locations (K, h_r, w_r, D); top: 1 to
    ``MAX_CORRESPONDENCES`` (fewer come back when the grids have fewer pairs); query_size and
    reference_sizes (K of them): (H, W) of the images as sent or stored.
    """
    if not 1 <= top <= MAX_CORRESPONDENCES:
        raise InvalidRequest(f"correspondences must be from 1 to {MAX_CORRESPONDENCES}, got {top}")
    shares = pairwise_shares(query_locations, reference_locations)
    query_grid = (int(query_locations.shape[0]), int(query_locations.shape[1]))
    reference_grid = (int(reference_locations.shape[1]), int(reference_locations.shape[2]))
    matched = mutual_matches(query_locations, reference_locations)  # (K, Nq, Nr) bool
    ranked = torch.where(matched, shares, torch.full_like(shares, -torch.inf)).flatten(1)
    values, flat = ranked.topk(min(top, ranked.shape[1]), dim=1)
    reference_cells = shares.shape[2]
    return tuple(
        tuple(
            RegionCorrespondence(
                query_box=cell_box(index // reference_cells, query_grid, query_size),
                reference_box=cell_box(index % reference_cells, reference_grid, reference_sizes[k]),
                share=float(share),
                rank=rank,
            )
            for rank, (share, index) in enumerate(zip(values[k].tolist(), flat[k].tolist()), start=1)
            if share > -torch.inf
        )
        for k in range(shares.shape[0])
    )


def mutual_matches(query_locations: torch.Tensor, reference_locations: torch.Tensor) -> torch.Tensor:
    """(K, h_q w_q, h_r w_r) bool: True where query cell i and reference cell j are each other's
    most similar cell by the cosine of their features (module docstring)."""
    query = F.normalize(query_locations.reshape(-1, query_locations.shape[-1]).float(), dim=-1)
    references = F.normalize(
        reference_locations.reshape(reference_locations.shape[0], -1, reference_locations.shape[-1]).float(), dim=-1
    )
    similarity = torch.einsum("id,kjd->kij", query, references)
    best_reference = F.one_hot(similarity.argmax(dim=2), similarity.shape[2]).bool()  # (K, Nq, Nr)
    best_query = F.one_hot(similarity.argmax(dim=1), similarity.shape[1]).bool().transpose(1, 2)
    return best_reference & best_query
