"""The ``explain`` command's RISE flags (``--rise-masks N`` ...) and the options they build."""

from __future__ import annotations

import argparse
from dataclasses import fields

from histoxplain_model.errors import InvalidRequest
from histoxplain_model.limits import MAX_RISE_BATCH, MAX_RISE_GRID, MAX_RISE_MASKS, MIN_RISE_GRID
from histoxplain_model.options import RISE_FILLS, RiseOptions
from histoxplain_model.vocabulary import RISE

__all__ = ["add_rise_arguments", "rise_options_from_args"]

#: RiseOptions field -> its flag.
RISE_FLAGS = {
    "n_masks": "--rise-masks",
    "grid": "--rise-grid",
    "keep_probability": "--rise-keep",
    "fill": "--rise-fill",
    "seed": "--rise-seed",
    "batch_size": "--rise-batch-size",
}


def add_rise_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rise-*`` flags; unset ones keep the library defaults (:class:`RiseOptions`)."""
    defaults = RiseOptions()
    group = parser.add_argument_group("RISE (--method rise)")
    group.add_argument("--rise-masks", dest="rise_n_masks", type=int, metavar="N",
                       help=f"random masks, 1 to {MAX_RISE_MASKS} (default {defaults.n_masks}); each is one "
                            "forward pass of the query, and of each hit on the retrieved side")
    group.add_argument("--rise-grid", dest="rise_grid", type=int, metavar="S",
                       help=f"mask grid cells per side, {MIN_RISE_GRID} to {MAX_RISE_GRID} (default {defaults.grid})")
    group.add_argument("--rise-keep", dest="rise_keep_probability", type=float, metavar="P",
                       help=f"chance a cell shows the image, in (0, 1) (default {defaults.keep_probability})")
    group.add_argument("--rise-fill", dest="rise_fill", choices=RISE_FILLS,
                       help=f"what hidden cells show (default {defaults.fill})")
    group.add_argument("--rise-seed", dest="rise_seed", type=int, metavar="SEED", help=f"mask seed (default {defaults.seed})")
    group.add_argument("--rise-batch-size", dest="rise_batch_size", type=int, metavar="B",
                       help=f"masked images per forward pass, 1 to {MAX_RISE_BATCH} (default {defaults.batch_size})")


def rise_options_from_args(method: str, args: argparse.Namespace) -> RiseOptions | None:
    """The ``--rise-*`` flags as options (``None``: none given); refused for any other method
    (the flags would otherwise be silently ignored). A bad value names its flag."""
    given = {
        field.name: getattr(args, f"rise_{field.name}")
        for field in fields(RiseOptions) if getattr(args, f"rise_{field.name}", None) is not None
    }
    if not given:
        return None
    if method != RISE:
        flags = ", ".join(RISE_FLAGS[name] for name in given)
        raise InvalidRequest(f"{flags} apply to --method rise only, not {method}; drop them")
    try:
        return RiseOptions(**given)
    except InvalidRequest as error:
        flag = next((RISE_FLAGS[name] for name in given if str(error).startswith(name)), "--rise-*")
        raise InvalidRequest(f"{flag}: {error}") from None
