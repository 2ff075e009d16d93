"""Dataset adapters on throw-away copies of each layout made from the real sample tiles."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from histoxplain_model.errors import InvalidRequest, UnknownNameError
from histoxplain_service.evaluation.datasets import CrcAdapter, get_adapter
from histoxplain_service.evaluation.sample_layouts import CRC_PATTERN, sample_tiles, write_layout


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> list:
    return sample_tiles(tmp_path_factory.mktemp("samples"), tile_size=128, per_class=8)


@pytest.mark.parametrize(
    ("layout", "labels", "real_groups", "mpp"),
    [
        ("bach", {"Benign", "Invasive"}, False, 0.42),
        ("bracs", {"0_N", "6_IC"}, True, 0.25),
        ("crc", {"1_normal", "3_high_grade"}, True, None),
        ("kather", {"NORM", "TUM"}, False, 0.5),
        ("folders", {"HE_skin", "IHC_colon"}, True, None),
    ],
)
def test_each_layout_yields_labels_splits_groups(tmp_path: Path, tiles: list, layout, labels, real_groups, mpp) -> None:
    root = write_layout(layout, tmp_path / layout, tiles)
    images = get_adapter(layout, CRC_PATTERN).scan(root)
    assert len(images) == len(tiles)
    assert {image.label for image in images} == labels
    assert all(image.mpp == mpp for image in images)
    groups = Counter(image.group for image in images)
    expected_groups = len({group for _, group, _ in tiles}) if real_groups else len(tiles)
    assert len(groups) == expected_groups
    if layout == "bracs":
        assert {image.split for image in images} <= {"train", "val", "test"}
        assert all(image.group.startswith("slide:") for image in images)


def test_bach_accepts_parent_and_reports_missing_classes(tmp_path: Path, tiles: list) -> None:
    root = write_layout("bach", tmp_path / "bach", tiles)
    assert len(get_adapter("bach").scan(root / "ICIAR2018_BACH_Challenge" / "Photos")) == len(tiles)
    (root / "ICIAR2018_BACH_Challenge" / "Photos" / "Normal").rmdir()
    with pytest.raises(InvalidRequest, match=r"class folders missing: Normal.*expected ROOT/.*found folders Benign/"):
        get_adapter("bach").scan(root)


def test_wrong_layout_shows_expected_and_found(tmp_path: Path, tiles: list) -> None:
    root = write_layout("folders", tmp_path / "folders", tiles)
    with pytest.raises(InvalidRequest) as error:
        get_adapter("bracs").scan(root)
    message = str(error.value)
    assert "no train/, val/ or test/ folder" in message
    assert "{train,val,test}" in message and "found folders HE_skin/, IHC_colon/" in message
    with pytest.raises(InvalidRequest, match="found an empty folder"):
        (tmp_path / "empty").mkdir()
        get_adapter("kather").scan(tmp_path / "empty")
    with pytest.raises(InvalidRequest, match="not a folder"):
        get_adapter("folders").scan(tmp_path / "missing")


def test_crc_pattern_is_configurable_and_checked(tmp_path: Path, tiles: list) -> None:
    root = write_layout("crc", tmp_path / "crc", tiles)
    default = CrcAdapter().scan(root)  # {split}/{label}/*: one group per image
    assert {image.split for image in default} == {"fold_1", "fold_2", "fold_3"}
    assert len({image.group for image in default}) == len(tiles)
    with pytest.raises(InvalidRequest, match=r"no images matched.*ROOT/\{label\}/\*\.jpg"):
        CrcAdapter("{label}/*.jpg").scan(root)
    with pytest.raises(InvalidRequest, match="no {label} placeholder"):
        CrcAdapter("{split}/*.png")
    with pytest.raises(UnknownNameError, match="known: bach, bracs, crc, kather, folders"):
        get_adapter("camelyon")
