"""Turn image files, folders and whole-slide files into indexed tiles.

Inputs
    :func:`discover_inputs` expands PATHs: a file is taken as given; a folder is walked
    recursively for PNG/JPEG/TIFF images and slides, each labelled with the name of the folder
    that holds it (``root/Benign/a.png`` -> ``Benign``; files directly in ``root`` have no
    label). Hidden files and other extensions in folders are ignored. Whole-slide files
    (``.svs``, ``.ndpi``, ``.scn``, ``.bif``, and ``.tif``/``.tiff`` files that are pyramids) are
    read tile by tile with tiffslide at a chosen pyramid level; plain images are decoded whole
    by :func:`histoxplain_model.imageio.decode_image` under the pixel limit.

Image ids
    Derived from the file's bytes (SHA-256; for files over 64 MiB, of the size plus the first
    and last MiB), so the same file indexed again, from any path, gets the same id and the same
    point ids: it is updated, never duplicated. Two identical files in one run are indexed once.

Limits and patient data
    Labels, sources, image ids and mpp are checked against ``histoxplain_model.limits``
    (:mod:`.checks`) before anything is stored: an explicit ``--label`` over the limit is a
    usage error, an image sent as bytes with a field over its limit is skipped as
    ``invalid_metadata``. Sources and labels may carry patient data, so the log names a skipped
    input by its position and kind only; the reason (with the CLI's own file path, for files it
    reads) goes to the caller in the summary. Images sent as bytes are named ``image <position>``
    in every reason, never by their source, and decoded under the request pixel limit.

Bad input
    A file that cannot be read (corrupt, truncated, empty, unsupported, over the pixel limit, a
    slide without the requested level) is skipped and its reason recorded in the summary; the
    run goes on. This holds for files named explicitly too, so one bad file does not lose a
    batch; the caller decides from :attr:`IndexSummary.skipped` how to exit. A PATH that does
    not exist or has an unsupported extension is a usage error raised before anything is
    written. Failures of the embedder or of Qdrant stop the run; re-running it finishes the job.

Stopping
    The loop calls :func:`histoxplain_model.deadlines.check_deadline` between images and before
    each embedding batch, so a run whose caller cancelled it, or whose deadline passed, stops
    within one batch. It commits whole images only: the images not finished when it stopped are
    removed (no partial image is left behind), and :attr:`IndexSummary.stopped` says why it
    stopped while :attr:`IndexSummary.images` lists exactly the images that were committed.

Resuming
    Before tiling an image, its planned point ids are checked against the index
    (:meth:`~histoxplain_service.index.base.VectorIndex.image_state`): complete images are
    skipped, so an interrupted run re-run only embeds what is missing, and upserts by
    deterministic id never double anything.

Why one module of about 600 lines: every source (files, folders, slides, bytes received by
the gateway) feeds the same resumable embed-and-upsert loop and its record and state checks;
it splits by source when a second remote source (DICOMweb) lands.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from tqdm.auto import tqdm

from histoxplain_model.deadlines import check_deadline
from histoxplain_model.errors import Cancelled, DeadlineExceeded, ImageDecodeError, ImageTooLargeError, InvalidRequest
from histoxplain_model.imageio import decode_image
from histoxplain_model.limits import LABEL, SOURCE, check_mpp

from histoxplain_service.config import Settings
from histoxplain_service.domain.checks import EncodedImage, check_image_metadata, decode_request_image
from histoxplain_service.domain.tiling import pad_tile, plan_tile_boxes
from histoxplain_service.domain.types import Box, DicomReference, Metadata, TileRecord, check_metadata
from histoxplain_service.index.base import VectorIndex

__all__ = [
    "EmbedFn",
    "IMAGE_SUFFIXES",
    "SLIDE_SUFFIXES",
    "ArraySource",
    "ImageSource",
    "IndexSummary",
    "IndexedImage",
    "InputFile",
    "SkippedInput",
    "SlideSource",
    "bytes_id",
    "content_id",
    "discover_inputs",
    "index_images",
    "index_paths",
    "index_sources",
    "iter_tiles",
    "open_source",
    "plan_tiles",
]

log = logging.getLogger(__name__)

EmbedFn = Callable[[Sequence[np.ndarray]], np.ndarray]
"""(H, W, 3) uint8 tiles -> (B, D) float32 L2-normalised embeddings."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".scn", ".bif"})
_HASH_WHOLE_LIMIT = 64 * 1024 * 1024
_HASH_EDGE = 1024 * 1024
# 40 hex digits (160 bits, like a git object id). Not 32: a 32-digit hex string parses as a UUID,
# and qdrant-client local mode's facet() hands such keyword values back in UUID form.
_ID_HEX = 40
THUMBNAIL_SIDE = 2048
"""Longest side of the thumbnail the tissue mask is computed on."""


# -- inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    path: Path
    label: str | None


def _supported(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | SLIDE_SUFFIXES


def discover_inputs(paths: Iterable[str | os.PathLike[str]], label: str | None = None) -> list[InputFile]:
    """Files to index from PATHs (files or folders), in a stable order.

    Args:
        paths: files and folders.
        label: label of explicitly named files (folders label by sub-folder name).

    Raises:
        InvalidRequest: a PATH that does not exist, a file with an unsupported extension, or a
            label or path over its limit (``histoxplain_model.limits``).
    """
    if label:
        LABEL.check(label, "--label")
    found: list[InputFile] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                if any(part.startswith(".") for part in relative.parts) or not file.is_file() or not _supported(file):
                    continue
                found.append(InputFile(file, file.parent.name if file.parent != path else None))
        elif path.is_file():
            if not _supported(path):
                raise InvalidRequest(
                    f"unsupported file type {path.suffix or '(none)'!r} for {str(path)!r}; histoxplain indexes "
                    f"images ({', '.join(sorted(IMAGE_SUFFIXES))}) and slides ({', '.join(sorted(SLIDE_SUFFIXES))})"
                )
            found.append(InputFile(path, label))
        else:
            raise InvalidRequest(f"{str(path)!r} does not exist; give image files or folders of images")
    for item in found:  # the user's own paths: naming them helps and reveals nothing new
        SOURCE.check(str(item.path), repr(str(item.path)[:64]))
        if item.label:
            LABEL.check(item.label, f"folder {item.path.parent.name[:64]!r}")
    return found


def content_id(path: Path) -> str:
    """Deterministic image id from the file content (see the module docstring)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= _HASH_WHOLE_LIMIT:
            for chunk in iter(lambda: handle.read(_HASH_EDGE), b""):
                digest.update(chunk)
        else:
            digest.update(f"size={size};".encode())
            digest.update(handle.read(_HASH_EDGE))
            handle.seek(size - _HASH_EDGE)
            digest.update(handle.read(_HASH_EDGE))
    return digest.hexdigest()[:_ID_HEX]


def bytes_id(data: bytes) -> str:
    """Image id of encoded bytes (images sent over the network); the same rule as :func:`content_id`."""
    if len(data) <= _HASH_WHOLE_LIMIT:
        return hashlib.sha256(data).hexdigest()[:_ID_HEX]
    digest = hashlib.sha256(f"size={len(data)};".encode())
    digest.update(data[:_HASH_EDGE])
    digest.update(data[-_HASH_EDGE:])
    return digest.hexdigest()[:_ID_HEX]


# -- sources -------------------------------------------------------------------------------------


class ImageSource(Protocol):
    """One image to tile: a decoded array or one level of a slide (a file, or a DICOM series read
    over DICOMweb, whose tiles carry ``dicom`` and keep no pixel copy)."""

    image_id: str
    source: str
    label: str | None
    level: int
    mpp: float | None
    downsample: float
    width: int
    height: int
    dicom: DicomReference | None
    metadata: Metadata

    def thumbnail(self, max_side: int) -> np.ndarray: ...
    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray: ...
    def close(self) -> None: ...


@dataclass
class ArraySource:
    """A decoded plain image (H, W, 3) uint8 RGB; level 0."""

    image: np.ndarray
    image_id: str
    source: str
    label: str | None = None
    mpp: float | None = None
    level: int = 0
    downsample: float = 1.0
    dicom: DicomReference | None = None
    metadata: Metadata = ()

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    def thumbnail(self, max_side: int) -> np.ndarray:
        step = max(1, -(-max(self.width, self.height) // max_side))
        return self.image[::step, ::step]

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.image[y : y + h, x : x + w]

    def close(self) -> None:
        return None


class SlideSource:
    """One pyramid level of a whole-slide file, read through tiffslide."""

    dicom: DicomReference | None = None

    def __init__(
        self, path: Path, level: int, image_id: str, label: str | None = None, metadata: Metadata = ()
    ) -> None:
        import tiffslide  # imported here: only slides need it

        try:
            self._slide = tiffslide.TiffSlide(path)
        except Exception as exc:  # tifffile/tiffslide raise many types for unreadable files
            raise ImageDecodeError(f"{str(path)!r} is not a readable slide ({exc}); check the file") from exc
        levels = self._slide.level_count
        if level >= levels:
            self._slide.close()
            raise InvalidRequest(
                f"slide {str(path)!r} has {levels} level(s) (0..{levels - 1}); choose a level in that range"
            )
        self.image_id = image_id
        self.source = str(path)
        self.label = label
        self.metadata = metadata
        self.level = level
        self.width, self.height = (int(v) for v in self._slide.level_dimensions[level])
        self.downsample = float(self._slide.level_downsamples[level])
        mpp = self._slide.properties.get("tiffslide.mpp-x")
        try:  # a slide with a broken mpp is still a slide: store its pixel size as unknown
            self.mpp = check_mpp(float(mpp) * self.downsample) if mpp else None
        except (InvalidRequest, ValueError):
            log.warning("a slide declares an invalid mpp %r; stored as unknown", mpp)
            self.mpp = None

    def thumbnail(self, max_side: int) -> np.ndarray:
        return np.asarray(self._slide.get_thumbnail((max_side, max_side)).convert("RGB"), dtype=np.uint8)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        location = (round(x * self.downsample), round(y * self.downsample))
        try:
            region = self._slide.read_region(location, self.level, (w, h))
        except Exception as exc:  # codecs raise many types for corrupt tiles
            raise ImageDecodeError(
                f"slide {self.source!r} has an unreadable region at {location} (level {self.level}): {exc}"
            ) from exc
        return np.asarray(region.convert("RGB"), dtype=np.uint8)

    def close(self) -> None:
        self._slide.close()


def _is_pyramid_tiff(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            return bool(tiff.series) and (len(tiff.series[0].levels) > 1 or tiff.is_svs or tiff.is_ndpi or tiff.is_scn)
    except Exception:  # not a TIFF tifffile can parse: let the image decoder report it
        return False


def open_source(item: InputFile, settings: Settings, metadata: Metadata = ()) -> ImageSource:
    """Open one file as an image source (a slide level or a decoded image) with ``metadata``.

    Raises:
        InvalidRequest (ImageDecodeError, ImageTooLargeError): the file cannot be used.
    """
    path = item.path
    try:
        image_id = content_id(path)
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES or (suffix in (".tif", ".tiff") and _is_pyramid_tiff(path)):
        return SlideSource(path, settings.slide_level, image_id, item.label, metadata)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    image = decode_image(data, settings.max_pixels, source=repr(str(path)))
    return ArraySource(image, image_id, str(path), item.label, metadata=metadata)


# -- tiling --------------------------------------------------------------------------------------


def plan_tiles(source: ImageSource, tile_size: int, stride: int, min_tissue: float) -> list[TileRecord]:
    """Records of the tiles to index from one source, background tiles left out.

    An image that is a single tile is kept whatever its tissue fraction (it is the unit the
    user gave, e.g. a 224 px patch of a labelled dataset, background class included).
    Boxes are in level-0 pixels.
    """

    def thumbnail() -> tuple[np.ndarray, float]:
        image = source.thumbnail(THUMBNAIL_SIDE)
        return image, image.shape[1] / source.width

    planned = plan_tile_boxes(source.width, source.height, tile_size, stride, thumbnail, min_tissue, fallback="single")
    ds = source.downsample
    boxes = [tile.box for tile in planned]
    level0 = [Box(round(x * ds), round(y * ds), round(w * ds), round(h * ds)) for x, y, w, h in boxes]
    return [
        TileRecord(
            source.image_id, source.source, source.label, box, source.level, source.mpp, i, len(level0), source.dicom,
            source.metadata,
        )
        for i, box in enumerate(level0)
    ]


def iter_tiles(source: ImageSource, records: Sequence[TileRecord], tile_size: int) -> Iterator[np.ndarray]:
    """Pixels (tile_size, tile_size, 3) uint8 of each planned record, padded with white at edges."""
    ds = source.downsample
    for record in records:
        box = record.box
        x, y = round(box.x / ds), round(box.y / ds)
        w, h = min(tile_size, source.width - x), min(tile_size, source.height - y)
        yield pad_tile(source.read(x, y, w, h), tile_size)


# -- indexing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexedImage:
    """One image the run handled: ``indexed`` (embedded now), ``unchanged`` (already complete),
    or ``relabelled`` (already complete; label/source updated without re-embedding)."""

    image_id: str
    source: str
    label: str | None
    tiles: int
    status: Literal["indexed", "unchanged", "relabelled"]


#: Why an input was skipped: unreadable (corrupt, truncated, empty, unsupported), too_large
#: (over the pixel limit), no_tissue (every tile is background), duplicate (same content or
#: image id as an earlier input of the run), invalid_metadata (e.g. an image id over the limit).
SkipKind = Literal["unreadable", "too_large", "no_tissue", "duplicate", "invalid_metadata"]


@dataclass(frozen=True)
class SkippedInput:
    """An input that was not indexed; ``position`` is its place among the run's inputs."""

    source: str
    reason: str
    kind: SkipKind = "unreadable"
    position: int = -1


def _skipped(name: str, error: InvalidRequest, position: int) -> SkippedInput:
    """The caller gets the reason; the log gets the position and kind (no source, no message)."""
    kind: SkipKind = "too_large" if isinstance(error, ImageTooLargeError) else "unreadable"
    log.warning("skipping input %d: %s", position, kind)
    return SkippedInput(name, str(error), kind, position)


@dataclass(frozen=True)
class IndexSummary:
    """What a run did. ``images``: the images committed (complete in the index) or found
    complete; ``stopped``: why the run stopped before its last input (its caller cancelled it,
    or its deadline passed), ``None`` when it ran to the end."""

    index: str
    images: tuple[IndexedImage, ...]
    skipped: tuple[SkippedInput, ...]
    stopped: Cancelled | DeadlineExceeded | None = None

    @property
    def images_indexed(self) -> int:
        return sum(image.status == "indexed" for image in self.images)

    @property
    def images_unchanged(self) -> int:
        return sum(image.status != "indexed" for image in self.images)

    @property
    def tiles_indexed(self) -> int:
        return sum(image.tiles for image in self.images if image.status == "indexed")


@dataclass
class _Pending:
    records: list[TileRecord]
    remaining: int


@dataclass
class _Indexer:
    """Streams tiles of many images through fixed-size embedding batches."""

    index: VectorIndex
    embed_fn: EmbedFn
    settings: Settings
    dim: int
    progress: tqdm
    batch: list[tuple[TileRecord, np.ndarray]] = field(default_factory=list)
    pending: dict[str, _Pending] = field(default_factory=dict)
    done: list[IndexedImage] = field(default_factory=list)

    def add(self, source: ImageSource) -> IndexedImage | SkippedInput:
        settings = self.settings
        records = plan_tiles(source, settings.tile_size, settings.tile_stride, settings.min_tissue)
        if not records:
            return SkippedInput(
                source.source,
                f"no tissue found (no tile has {settings.min_tissue:.0%} tissue; lower --min-tissue)",
                "no_tissue",
            )
        state = self.index.image_state(records)
        if state != "incomplete":
            if state == "metadata":
                self.index.set_image_metadata(source.image_id, source.label, source.source, source.metadata)
            status = "unchanged" if state == "complete" else "relabelled"
            return IndexedImage(source.image_id, source.source, source.label, len(records), status)
        self.pending[source.image_id] = _Pending(records, len(records))
        try:
            for record, tile in zip(records, iter_tiles(source, records, settings.tile_size)):
                self.batch.append((record, tile))
                if len(self.batch) >= settings.batch_size:
                    self.flush()
        except InvalidRequest:
            # A tile that cannot be read (a corrupt slide region): leave no partial image behind.
            self.abandon([source.image_id])
            raise
        return IndexedImage(source.image_id, source.source, source.label, len(records), "indexed")

    def abandon(self, image_ids: Sequence[str]) -> None:
        """Drop unfinished images: their queued tiles, and whatever of them reached the index."""
        dropped = set(image_ids)
        self.batch = [(record, tile) for record, tile in self.batch if record.image_id not in dropped]
        for image_id in dropped:
            del self.pending[image_id]
        if dropped:
            self.index.delete(sorted(dropped))

    def flush(self) -> None:
        if not self.batch:
            return
        check_deadline()
        records = [record for record, _ in self.batch]
        tiles = [tile for _, tile in self.batch]
        vectors = np.asarray(self.embed_fn(tiles), dtype=np.float32)
        if vectors.shape != (len(tiles), self.dim):
            raise ValueError(f"the embedder returned {vectors.shape} for {len(tiles)} tiles; expected ({len(tiles)}, {self.dim})")
        self.index.upsert(records, vectors, tiles)
        self.batch.clear()
        self.progress.update(len(records))
        for record in records:
            pending = self.pending[record.image_id]
            pending.remaining -= 1
            if pending.remaining == 0:
                self.index.finish_image(record.image_id, [r.point_id for r in pending.records])
                del self.pending[record.image_id]


def _run(
    items: Iterable[tuple[int, str, Callable[[], ImageSource]]],
    index: VectorIndex,
    embed_fn: EmbedFn,
    settings: Settings,
    preset: str,
    dim: int,
    show_progress: bool,
    total: int | None,
    *,
    named_inputs: bool,
) -> IndexSummary:
    """The embed-and-upsert loop over ``(position, name, opener)`` items.

    ``named_inputs``: reasons may name an earlier input by its name (the CLI's own file paths);
    otherwise by its position (images sent as bytes, whose source is the caller's text).
    """
    images: list[IndexedImage] = []
    skipped: list[SkippedInput] = []
    first_seen: dict[str, str] = {}
    stopped: Cancelled | DeadlineExceeded | None = None
    ensured = False
    with tqdm(total=None, unit="tile", desc=f"indexing {index.name}", disable=not show_progress) as bar:
        indexer = _Indexer(index, embed_fn, settings, dim, bar)
        inputs = tqdm(items, total=total, unit="image", disable=not show_progress, leave=False)
        try:
            for position, name, opener in inputs:
                check_deadline()
                if not ensured:  # an input stream that brings no image leaves the index untouched
                    index.ensure(preset, dim)
                    ensured = True
                try:
                    source = opener()
                except InvalidRequest as exc:
                    skipped.append(_skipped(name, exc, position))
                    continue
                try:
                    if source.image_id in first_seen:
                        reason = f"same image as {first_seen[source.image_id]} (same content or image id)"
                        skipped.append(SkippedInput(name, reason, "duplicate", position))
                        continue
                    first_seen[source.image_id] = name if named_inputs else f"image {position}"
                    result = indexer.add(source)
                except InvalidRequest as exc:
                    result = _skipped(name, exc, position)
                finally:
                    source.close()
                if isinstance(result, IndexedImage):
                    images.append(result)
                else:
                    skipped.append(replace(result, position=position))
            indexer.flush()
        except (Cancelled, DeadlineExceeded) as stop:
            stopped = stop
            unfinished = set(indexer.pending)
            indexer.abandon(sorted(unfinished))
            images = [image for image in images if image.image_id not in unfinished]
    summary = IndexSummary(index.name, tuple(images), tuple(skipped), stopped)
    log.info(
        "index %s: %d images indexed (%d tiles), %d already indexed, %d skipped%s",
        index.name, summary.images_indexed, summary.tiles_indexed, summary.images_unchanged, len(skipped),
        f"; stopped early ({stopped.status_code})" if stopped is not None else "",
    )
    return summary


def index_paths(
    paths: Iterable[str | os.PathLike[str]],
    index: VectorIndex,
    embed_fn: EmbedFn,
    settings: Settings,
    *,
    preset: str,
    dim: int,
    label: str | None = None,
    show_progress: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> IndexSummary:
    """Index every image and slide under ``paths`` (see the module docstring).

    Args:
        paths: files and folders.
        index: the target index; created for (``preset``, ``dim``) if missing.
        embed_fn: tiles -> (B, D) float32 L2-normalised embeddings.
        settings: tile size, stride, min tissue, slide level, batch size, pixel limit.
        preset, dim: the encoder behind ``embed_fn`` (an index built with another is refused).
        label: label of explicitly named files.
        show_progress: tqdm progress bars on stderr.
        metadata: descriptive fields stored with every tile of every input (``organ``, ``stain``).

    Raises:
        InvalidRequest: a PATH that does not exist or has an unsupported extension (nothing written).
        FailedPrecondition: the index was built with another encoder.
    """
    checked = check_metadata(metadata, "--metadata")
    inputs = discover_inputs(paths, label)
    items = [
        (position, str(item.path), lambda item=item: open_source(item, settings, checked))
        for position, item in enumerate(inputs)
    ]
    return _run(items, index, embed_fn, settings, preset, dim, show_progress, len(items), named_inputs=True)


def index_sources(
    openers: Iterable[tuple[str, Callable[[], ImageSource]]],
    index: VectorIndex,
    embed_fn: EmbedFn,
    settings: Settings,
    *,
    preset: str,
    dim: int,
    show_progress: bool = False,
) -> IndexSummary:
    """Index images that other sources open (e.g. DICOM slides over DICOMweb,
    :mod:`histoxplain_service.pacs`), one ``(name, opener)`` each, with the same resumable loop.

    ``name`` stands for the input in :attr:`IndexSummary.skipped` (the caller's own reference,
    never logged); ``opener`` returns the :class:`ImageSource` or raises InvalidRequest (the
    input is skipped with its reason). Inputs are opened one at a time, in order.
    """
    items = ((position, name, opener) for position, (name, opener) in enumerate(openers))
    return _run(items, index, embed_fn, settings, preset, dim, show_progress, None, named_inputs=False)


def index_images(
    images: Iterable[EncodedImage],
    index: VectorIndex,
    embed_fn: EmbedFn,
    settings: Settings,
    *,
    preset: str,
    dim: int,
    show_progress: bool = False,
) -> IndexSummary:
    """Index encoded images received in memory (e.g. over gRPC), :class:`EncodedImage` each,
    one at a time as ``images`` yields them (a stream is never held whole).

    ``image_id`` ``None`` uses :func:`bytes_id` of the data (re-sending the same bytes updates
    the image); a caller-given id makes re-sending under that id replace the image. Bad images
    are skipped with their reason and position (their place in ``images``). An image whose id,
    label, source or mpp is over its limit, or whose id came earlier, is skipped before its
    bytes are decoded; when no image is left the index is not touched. Reasons name an image
    by its position, never by its source (see the module docstring); images are decoded under
    the request pixel limit (``HISTOXPLAIN_MAX_REQUEST_PIXELS``).
    """
    refused: list[SkippedInput] = []

    def opener(position: int, image: EncodedImage) -> Callable[[], ImageSource]:
        def open_() -> ImageSource:
            pixels = decode_request_image(image.data, settings, f"image {position}")
            return ArraySource(
                pixels, image.image_id or bytes_id(image.data), image.source, image.label, image.mpp,
                metadata=check_metadata(image.metadata),
            )

        return open_

    def items() -> Iterator[tuple[int, str, Callable[[], ImageSource]]]:
        """The images worth opening, one at a time as they arrive; the others go to ``refused``."""
        seen_ids: set[str] = set()
        for position, item in enumerate(images):
            image = EncodedImage(*item)
            try:
                check_image_metadata(image, f"image {position}")
            except InvalidRequest as exc:
                refused.append(SkippedInput(image.source, str(exc), "invalid_metadata", position))
                continue
            if image.image_id and image.image_id in seen_ids:
                reason = "this image_id came earlier in the stream; the first one was kept"
                refused.append(SkippedInput(image.source, reason, "duplicate", position))
                continue
            seen_ids.add(image.image_id or "")
            yield position, image.source, opener(position, image)

    summary = _run(items(), index, embed_fn, settings, preset, dim, show_progress, None, named_inputs=False)
    skipped = sorted([*refused, *summary.skipped], key=lambda item: item.position)
    return replace(summary, skipped=tuple(skipped))
