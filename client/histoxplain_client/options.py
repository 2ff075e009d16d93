"""Typed method options the SDK sends in ``ExplainOptions`` (protobuf stays in ``_convert``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from histoxplain_client._proto.histoxplain.v1 import types_pb2

__all__ = ["RISE_FILLS", "RiseOptions"]

#: What the hidden cells of a RISE mask show: SDK name -> ``RiseOptions.Fill`` value.
RISE_FILLS = {"blur": types_pb2.RiseOptions.FILL_BLUR, "mean": types_pb2.RiseOptions.FILL_MEAN}


@dataclass(frozen=True)
class RiseOptions:
    """RISE's masks (``method="rise"``); ``None`` / 0 leaves a field to the server's default.

    masks: number of random masks N (1 to 2000; server default 200); each costs one forward pass
        of each explained image. grid: mask cells per side (2 to 32; default 7).
    keep_probability: chance that a cell shows the image, in (0, 1) (default 0.5).
    fill: "blur" (default) or "mean". seed: seed of the mask generator (default 0).
    The server checks the ranges (INVALID_ARGUMENT names the field).
    """

    masks: int = 0
    grid: int = 0
    keep_probability: float | None = None
    fill: Literal["blur", "mean"] | None = None
    seed: int | None = None

    def to_proto(self) -> types_pb2.RiseOptions:
        if self.masks < 0 or self.grid < 0:
            raise ValueError("masks and grid must be >= 0 (0: the server's default)")
        if self.fill is not None and self.fill not in RISE_FILLS:
            raise ValueError(f"unknown RISE fill {self.fill!r}; known: {', '.join(RISE_FILLS)}")
        message = types_pb2.RiseOptions(masks=self.masks, grid=self.grid)
        if self.keep_probability is not None:
            message.keep_probability = self.keep_probability
        if self.fill is not None:
            message.fill = RISE_FILLS[self.fill]
        if self.seed is not None:
            message.seed = self.seed
        return message
