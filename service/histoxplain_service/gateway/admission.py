"""Admission control: a budget of expensive work in flight in one gateway, refused beyond it.

Without it, explanations queue behind the worker threads until every caller's deadline has
passed (measured: four SmoothGrad calls with samples=256, k=100, side=both kept 10 s calls of
every other client failing for more than 70 s, while health said SERVING). With it, a call that
would take the gateway over its budget fails at once with RESOURCE_EXHAUSTED and a retry hint,
and a call that could never fit fails with INVALID_ARGUMENT naming what to lower.

Cost unit: about one forward pass of one image through the encoder (34 ms for
EfficientNet-Lite0 on one CPU thread, 136 ms for ResNet-50; benchmarks/RESULTS.md), per side
explained (``both`` costs twice):

* Grad-CAM / Grad-CAM++ / the similarity decomposition (simmap): ``k`` (the retrieved side
  embeds k images; the query side's k targets share one forward pass and, for the CAMs, k
  short backward passes, counted the same for a bound);
* SmoothGrad: ``2 * n * k`` (n noisy copies, each with a backward pass to the input per
  reference: measured 11.5 s for n=25, k=10, one side, on EfficientNet-Lite0 = 2*25*10 units
  of 23 ms);
* RISE: ``n`` for the query side (its n masked copies serve all k references) and ``n * k``
  for the retrieved side (each hit gets its own n masked copies), n = its masks (at most
  ``MAX_RISE_MASKS``, so a call is bounded as SmoothGrad's is by its samples).
* ``verify`` (any method) adds ``VERIFY_FORWARD_PASSES_PER_MAP`` (30: deletion and insertion
  of the map and of its random map in 8 steps) per explained map, i.e. per reference and side
  (:func:`verify_cost`).

A unit is released when the work really ends on its worker thread, not when the call returns:
work whose caller gave up still holds its share until it stops.
"""

from __future__ import annotations

import threading

from histoxplain_model.errors import InvalidRequest, ResourceExhausted
from histoxplain_model.limits import VERIFY_FORWARD_PASSES_PER_MAP
from histoxplain_model.vocabulary import RISE, SMOOTHGRAD

__all__ = ["Admission", "explain_cost", "verify_cost"]


def explain_cost(method: str, references: int, side: str, samples: int) -> int:
    """Work units of explaining a query against ``references`` (see the module docstring).

    ``samples``: SmoothGrad's noisy copies, or RISE's masks (ignored by the other methods).
    """
    if method == RISE:
        query_side = samples if side in ("query", "both") else 0
        retrieved_side = samples * references if side in ("retrieved", "both") else 0
        return query_side + retrieved_side
    per_side = 2 * samples * references if method == SMOOTHGRAD else references
    return per_side * (2 if side == "both" else 1)


def verify_cost(references: int, side: str) -> int:
    """Work units ``ExplainOptions.verify`` adds: a fixed number of forward passes per map."""
    return VERIFY_FORWARD_PASSES_PER_MAP * references * (2 if side == "both" else 1)


class Admission:
    """Up to ``capacity`` units of work at once. Thread-safe: units are taken on the event loop
    and given back by whichever thread finishes the work."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def take(self, cost: int) -> None:
        """Reserve ``cost`` units, or refuse the call.

        Raises:
            InvalidRequest: ``cost`` is over the whole budget (it could never be admitted).
            ResourceExhausted: the budget is taken by other calls now; retrying later may work.
        """
        if cost > self.capacity:
            raise InvalidRequest(
                f"this explanation costs {cost} units (k x sides x SmoothGrad samples or RISE masks, see "
                f"docs/SERVING.md), over the gateway's limit of {self.capacity} (HISTOXPLAIN_MAX_EXPLAIN_COST); "
                "lower k, smoothgrad_samples or rise.masks, or explain one side"
            )
        with self._lock:
            if self._in_flight + cost > self.capacity:
                raise ResourceExhausted(
                    "the gateway is busy with other explanations (HISTOXPLAIN_MAX_EXPLAIN_COST); retry in a few seconds"
                )
            self._in_flight += cost

    def give_back(self, cost: int) -> None:
        with self._lock:
            self._in_flight -= cost
