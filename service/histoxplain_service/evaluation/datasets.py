"""Dataset adapters: public histology datasets as labelled, grouped, split images.

Each adapter knows one folder layout (BACH, BRACS, extended CRC, Kather, class-per-folder),
the dataset's pixel size where it is published, and yields :class:`DatasetImage` records:

- ``label``  the class (folder name),
- ``split``  train / val / test / fold name, or ``"all"`` when the dataset has none,
- ``group``  what must not leak between a query and its matches: the source slide or patient
  where the file names say so, otherwise the image itself.

A folder that does not match raises :class:`InvalidRequest` with the expected layout and what
was found, so the user can fix the path or pick another ``--layout``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from histoxplain_model.errors import InvalidRequest, UnknownNameError

__all__ = [
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "DEFAULT_CRC_PATTERN",
    "DatasetImage",
    "DatasetAdapter",
    "BachAdapter",
    "BracsAdapter",
    "CrcAdapter",
    "KatherAdapter",
    "FoldersAdapter",
    "get_adapter",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
DEFAULT_CRC_PATTERN = "{split}/{label}/*"


@dataclass(frozen=True)
class DatasetImage:
    """One image of a dataset. ``image_id`` is the path relative to the dataset root (POSIX)."""

    path: Path
    image_id: str
    label: str
    split: str
    group: str
    mpp: float | None


class DatasetAdapter:
    """Base class: subclasses set ``name``, ``expected_layout``, ``mpp`` and ``_scan``."""

    name = ""
    expected_layout = ""
    mpp: float | None = None

    def scan(self, root: str | Path) -> list[DatasetImage]:
        """All images under ``root`` sorted by ``image_id``; raises InvalidRequest on a bad layout."""
        root = Path(root)
        if not root.is_dir():
            raise InvalidRequest(f"dataset root {str(root)!r} is not a folder; pass the folder that holds the {self.name} images")
        images = sorted(self._scan(root), key=lambda image: image.image_id)
        if not images:
            self.layout_error(root, "no images matched")
        return images

    def _scan(self, root: Path) -> list[DatasetImage]:
        raise NotImplementedError

    def layout_error(self, root: Path, problem: str) -> None:
        raise InvalidRequest(
            f"{root} does not look like a {self.name} dataset ({problem}); expected "
            f"{self.expected_layout}; found {describe_folder(root)}; pass the right ROOT or --layout"
        )

    def _image(self, root: Path, path: Path, label: str, split: str, group: str | None = None) -> DatasetImage:
        image_id = path.relative_to(root).as_posix()
        return DatasetImage(path=path, image_id=image_id, label=label, split=split, group=group or image_id, mpp=self.mpp)


def describe_folder(root: Path, limit: int = 8) -> str:
    """A short description of what a folder holds, for layout errors."""
    try:
        entries = sorted(root.iterdir())
    except OSError as error:
        return f"an unreadable folder ({error.strerror})"
    folders = [entry.name + "/" for entry in entries if entry.is_dir()]
    files = [entry for entry in entries if entry.is_file()]
    parts = []
    if folders:
        shown = ", ".join(folders[:limit]) + (", ..." if len(folders) > limit else "")
        parts.append(f"folders {shown}")
    if files:
        suffixes = Counter(entry.suffix.lower() or "(none)" for entry in files)
        parts.append("files " + ", ".join(f"{count} {suffix}" for suffix, count in suffixes.most_common()))
    return "; ".join(parts) if parts else "an empty folder"


def _image_files(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]


def _descend(root: Path, candidates: tuple[str, ...]) -> Path:
    """Accept the dataset root or any of its known parents (e.g. the archive's top folder)."""
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    return root


class BachAdapter(DatasetAdapter):
    """ICIAR 2018 BACH microscopy photos: 400 images of 2048x1536 at 0.42 um/px, 4 classes.

    BACH publishes no patient ids, so the group is the image: tiles of one photo never match
    each other.
    """

    name = "bach"
    classes = ("Benign", "InSitu", "Invasive", "Normal")
    expected_layout = "ROOT/[ICIAR2018_BACH_Challenge/][Photos/]{Benign,InSitu,Invasive,Normal}/*.tif"
    mpp = 0.42

    def _scan(self, root: Path) -> list[DatasetImage]:
        base = _descend(_descend(root, ("ICIAR2018_BACH_Challenge",)), ("Photos",))
        missing = [name for name in self.classes if not (base / name).is_dir()]
        if missing:
            self.layout_error(base, f"class folders missing: {', '.join(missing)}")
        return [self._image(base, path, label, "all") for label in self.classes for path in _image_files(base / label)]


class BracsAdapter(DatasetAdapter):
    """BRACS regions of interest: train/val/test, 7 classes, 0.25 um/px.

    File names are ``BRACS_<slide>_<class>_<n>.png``; the slide id is the group, so RoIs cut
    from one slide never count as matches for each other.
    """

    name = "bracs"
    classes = ("0_N", "1_PB", "2_UDH", "3_FEA", "4_ADH", "5_DCIS", "6_IC")
    splits = ("train", "val", "test")
    expected_layout = "ROOT/[BRACS_RoI/][latest_version/]{train,val,test}/{0_N,1_PB,2_UDH,3_FEA,4_ADH,5_DCIS,6_IC}/*.png"
    mpp = 0.25
    _slide = re.compile(r"^BRACS_(\d+)_")

    def _scan(self, root: Path) -> list[DatasetImage]:
        base = _descend(_descend(root, ("BRACS_RoI",)), ("latest_version",))
        splits = [split for split in self.splits if (base / split).is_dir()]
        if not splits:
            self.layout_error(base, "no train/, val/ or test/ folder")
        images = []
        for split in splits:
            labels = [entry.name for entry in (base / split).iterdir() if entry.is_dir()]
            unknown = sorted(set(labels) - set(self.classes))
            if unknown or not labels:
                self.layout_error(base / split, f"unexpected class folders {unknown}" if unknown else "no class folders")
            for label in labels:
                for path in _image_files(base / split / label):
                    match = self._slide.match(path.name)
                    group = f"slide:{match.group(1)}" if match else None
                    images.append(self._image(base, path, label, split, group))
        return images


class KatherAdapter(DatasetAdapter):
    """Kather NCT-CRC-HE-100K / CRC-VAL-HE-7K: 224x224 tiles at 0.5 um/px in 9 tissue classes.

    The split is the root folder's name (``NCT-CRC-HE-100K`` -> train, ``CRC-VAL-HE-7K`` ->
    test, otherwise ``all``). The files carry no patient id, so the group is the tile.
    """

    name = "kather"
    classes = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
    expected_layout = "ROOT/{ADI,BACK,DEB,LYM,MUC,MUS,NORM,STR,TUM}/*.tif (NCT-CRC-HE-100K or CRC-VAL-HE-7K)"
    mpp = 0.5

    def _scan(self, root: Path) -> list[DatasetImage]:
        present = [label for label in self.classes if (root / label).is_dir()]
        if len(present) < 2:
            self.layout_error(root, f"found {len(present)} of the 9 class folders")
        name = root.name.upper()
        split = "train" if "100K" in name else "test" if "VAL" in name or "7K" in name else "all"
        return [self._image(root, path, label, split) for label in present for path in _image_files(root / label)]


class FoldersAdapter(DatasetAdapter):
    """Generic class-per-folder layout: ``ROOT/<label>/<image>``, pixel size given by the user.

    A file name ``<group>__<rest>`` puts the image in ``<group>`` (e.g. a patient or source
    slide); otherwise the image is its own group.
    """

    name = "folders"
    expected_layout = "ROOT/<label>/*.{png,jpg,tif} (optionally named <group>__<name>.<ext>), at least 2 label folders"

    def __init__(self, mpp: float | None = None) -> None:
        self.mpp = mpp

    def _scan(self, root: Path) -> list[DatasetImage]:
        labels = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and _image_files(entry))
        if len(labels) < 2:
            self.layout_error(root, f"{len(labels)} folder(s) with images")
        images = []
        for label in labels:
            for path in _image_files(root / label):
                group = path.name.split("__", 1)[0] if "__" in path.name else None
                images.append(self._image(root, path, label, "all", group and f"group:{group}"))
        return images


class CrcAdapter(DatasetAdapter):
    """Extended CRC grading (about 5000x7300 px fields at 20x, 3 grades), configurable layout.

    ``pattern`` is a path relative to ROOT with ``{label}`` (required), ``{split}`` and
    ``{group}`` placeholders (each one path component or part of a file name) and ``*`` wildcards,
    e.g. ``fold_{split}/{label}/*.png`` or ``{label}/{group}_*.png``. The published pixel size
    varies between copies, so it is unknown unless given (``mpp``).
    """

    name = "crc"

    def __init__(self, pattern: str = DEFAULT_CRC_PATTERN, mpp: float | None = None) -> None:
        if "{label}" not in pattern:
            raise InvalidRequest(f"--crc-pattern {pattern!r} has no {{label}} placeholder; e.g. 'fold_{{split}}/{{label}}/*.png'")
        self.pattern = pattern
        self.mpp = mpp
        self.expected_layout = f"ROOT/{pattern} (set with --crc-pattern)"
        self._regex = _pattern_regex(pattern)

    def _scan(self, root: Path) -> list[DatasetImage]:
        images = []
        for path in root.rglob("*"):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            match = self._regex.fullmatch(path.relative_to(root).as_posix())
            if match is None:
                continue
            fields = match.groupdict()
            group = fields.get("group")
            images.append(self._image(root, path, fields["label"], fields.get("split") or "all", group and f"group:{group}"))
        return images


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{label\}|\{split\}|\{group\}|\*)", pattern)
    regex = []
    for part in parts:
        if part in ("{label}", "{split}", "{group}"):
            regex.append(f"(?P<{part[1:-1]}>[^/]+?)")
        elif part == "*":
            regex.append("[^/]*")
        else:
            regex.append(re.escape(part))
    try:
        return re.compile("".join(regex))
    except re.error as error:
        raise InvalidRequest(f"--crc-pattern {pattern!r} is not a valid pattern ({error}); use each placeholder once") from error


LAYOUTS = ("bach", "bracs", "crc", "kather", "folders")


def get_adapter(layout: str, crc_pattern: str = DEFAULT_CRC_PATTERN, mpp: float | None = None) -> DatasetAdapter:
    """The adapter for ``layout``; ``mpp`` overrides the dataset's published pixel size."""
    if layout == "bach":
        adapter: DatasetAdapter = BachAdapter()
    elif layout == "bracs":
        adapter = BracsAdapter()
    elif layout == "kather":
        adapter = KatherAdapter()
    elif layout == "crc":
        return CrcAdapter(crc_pattern, mpp)
    elif layout == "folders":
        return FoldersAdapter(mpp)
    else:
        raise UnknownNameError.for_name("layout", layout, LAYOUTS)
    if mpp is not None:
        adapter.mpp = mpp
    return adapter


@dataclass(frozen=True)
class TilingPolicy:
    """How an image becomes tiles: resize to ``target_mpp`` (when both it and the dataset's
    pixel size are known), cut a grid of ``tile_size`` px squares (stride = tile size), keep
    tiles whose tissue fraction is at least ``min_tissue`` (at least the best one per image)
    and at most ``max_tiles`` of them per image (a seeded choice, stable per image)."""

    tile_size: int = 224
    target_mpp: float | None = 0.5
    min_tissue: float = 0.5
    max_tiles: int = 8

    def scale_for(self, mpp: float | None) -> float:
        """Resize factor for an image of pixel size ``mpp`` (1.0 when either is unknown)."""
        if mpp is None or self.target_mpp is None:
            return 1.0
        return mpp / self.target_mpp

    def check(self) -> None:
        if self.tile_size < 16:
            raise InvalidRequest(f"--tile-size {self.tile_size} is too small; use at least 16 px")
        if self.target_mpp is not None and self.target_mpp <= 0:
            raise InvalidRequest(f"--target-mpp must be positive, got {self.target_mpp}")
        if self.max_tiles < 1:
            raise InvalidRequest(f"--max-tiles-per-image must be >= 1, got {self.max_tiles}")
        if not 0 <= self.min_tissue <= 1:
            raise InvalidRequest(f"--min-tissue must be in [0, 1], got {self.min_tissue}")
