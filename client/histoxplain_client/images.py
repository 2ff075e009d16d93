"""What the SDK accepts as an image, and how it becomes the encoded bytes the API carries."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

__all__ = ["IMAGE_SUFFIXES", "ImageInput", "IndexImage", "encode_image", "images_from_folder"]

# A path (sent as the file's bytes, unchanged), encoded bytes (PNG/JPEG/TIFF), an RGB array
# (H, W, 3) uint8, or a PIL image (both encoded to PNG, lossless).
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})


def encode_image(image: ImageInput) -> bytes:
    """The encoded bytes of ``image`` for the wire; the server detects the format.

    Raises FileNotFoundError for a missing path, ValueError for an array that is not
    (H, W, 3) uint8 or for empty bytes, TypeError for anything else.
    """
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty")
        return data
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image array must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}"
            )
        return _png_bytes(Image.fromarray(np.ascontiguousarray(image), mode="RGB"))
    if isinstance(image, Image.Image):
        return _png_bytes(image if image.mode == "RGB" else image.convert("RGB"))
    raise TypeError(
        "image must be a path, encoded bytes, an (H, W, 3) uint8 array or a PIL image, "
        f"got {type(image).__name__}"
    )


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class IndexImage:
    """One image to index and its metadata.

    ``image_id`` empty: the server uses the SHA-256 of the bytes (re-sending an image updates
    it, never duplicates it). ``source`` empty and ``image`` a path: the path is the source.
    ``metadata``: descriptive fields stored with every tile and returned on hits, e.g.
    ``{"organ": "colon", "stain": "HE"}`` (at most 16; keys: letters, digits, '_'; values at most
    256 characters); search with ``filter={"organ": "colon"}``.
    """

    image: ImageInput
    image_id: str = ""
    label: str = ""
    source: str = ""
    mpp: float | None = None
    metadata: Mapping[str, str] | None = None


def images_from_folder(root: str | os.PathLike) -> Iterator[IndexImage]:
    """Every PNG/JPEG/TIFF under ``root`` (sorted), labelled with its sub-folder's name.

    ``root/tumour/a.png`` -> IndexImage(image_id="tumour/a.png", label="tumour"); files directly
    in ``root`` get no label. Files are read only when the stream sends them.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise NotADirectoryError(f"{root_path} is not a folder")
    for path in sorted(root_path.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            relative = path.relative_to(root_path)
            label = relative.parts[0] if len(relative.parts) > 1 else ""
            yield IndexImage(image=path, image_id=relative.as_posix(), label=label, source=str(path))
