"""Caller input checked against the limits of ``histoxplain_model.limits``, for every entry point.

The CLI and the gateway both reach the index through the domain, so the checks live here once:
text fields (image ids, labels, sources, point ids) against :data:`~histoxplain_model.limits.TEXT_LIMITS`,
microns per pixel against :func:`~histoxplain_model.limits.check_mpp`, and images sent as bytes
against the request pixel limit. Index names are checked where they become a collection and a
folder name (:func:`histoxplain_service.index.base.validate_index_name`).

What messages say
    A refused value is named by its field and position (``image_ids[2]``, ``image 3``) and the
    limit, never by its content: labels, sources and image ids may carry patient data, and the
    gateway logs every error message it returns. The CLI reading its own files may name them
    (the path is the local user's own); the gateway never names a server path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from histoxplain_model.errors import ImageTooLargeError, InvalidRequest
from histoxplain_model.imageio import MAX_PIXELS_ENV, MAX_REQUEST_PIXELS_ENV, decode_image
from histoxplain_model.limits import IMAGE_ID, LABEL, SOURCE, TextLimit, check_mpp

from histoxplain_service.config import Settings
from histoxplain_service.domain.types import check_metadata

__all__ = [
    "REQUEST_PIXEL_BUDGET",
    "EncodedImage",
    "check_image_metadata",
    "check_texts",
    "decode_request_image",
    "decode_request_images",
    "request_pixel_limit",
]

#: The images of one request together hold at most this many times the request pixel limit.
#: Each image is checked from its header; without a total, 100 references of 16 Mpx that
#: compress to a few KB each (one message) would decode to 4.8 GB.
REQUEST_PIXEL_BUDGET = 2


class EncodedImage(NamedTuple):
    """One image received in memory (e.g. an ``ImageRecord`` over gRPC), not yet decoded.

    A plain ``(data, source, label, image_id)`` tuple converts with ``EncodedImage(*item)``.
    """

    data: bytes
    source: str
    label: str | None = None
    image_id: str | None = None
    mpp: float | None = None
    #: descriptive fields stored with every tile (``domain.types.check_metadata``'s rules)
    metadata: Mapping[str, str] | None = None


def request_pixel_limit(settings: Settings) -> tuple[int, str]:
    """The pixel limit of an image sent as bytes and the variable that sets it.

    The smaller of ``max_request_pixels`` and ``max_pixels``: an operator who lowers
    ``HISTOXPLAIN_MAX_PIXELS`` means every decode.
    """
    if settings.max_pixels < settings.max_request_pixels:
        return settings.max_pixels, MAX_PIXELS_ENV
    return settings.max_request_pixels, MAX_REQUEST_PIXELS_ENV


def decode_request_image(data: bytes, settings: Settings, what: str) -> np.ndarray:
    """Decode an image sent as bytes under the request pixel limit (checked from the header).

    Args:
        what: how messages name it (``"query image"``, ``"image 3"``): a word and a position,
            never the caller's text.

    Raises:
        InvalidRequest (ImageDecodeError, ImageTooLargeError): empty, unreadable or too large.
    """
    if not data:
        raise InvalidRequest(f"the {what} is empty; send PNG, JPEG or TIFF bytes")
    limit, setting = request_pixel_limit(settings)
    return decode_image(data, limit, source=what, setting=setting)


def decode_request_images(images: Sequence[bytes], settings: Settings, what: str) -> list[np.ndarray]:
    """Decode a request's images (``what 0``, ``what 1``, ...), each within the request pixel
    limit and all together within :data:`REQUEST_PIXEL_BUDGET` times it.

    The total is checked after each decode, so a request holds at most the budget plus one
    image while it is refused.

    Raises:
        ImageTooLargeError: one image over the limit, or the images together over the budget.
    """
    limit, setting = request_pixel_limit(settings)
    budget = REQUEST_PIXEL_BUDGET * limit
    decoded: list[np.ndarray] = []
    total = 0
    for position, data in enumerate(images):
        image = decode_request_image(data, settings, f"{what} {position}")
        total += image.shape[0] * image.shape[1]
        if total > budget:
            raise ImageTooLargeError(
                f"the first {position + 1} {what}s hold {total:,} pixels; one request may hold {budget:,} "
                f"({REQUEST_PIXEL_BUDGET} x {setting}): send fewer or smaller images"
            )
        decoded.append(image)
    return decoded


def check_image_metadata(image: EncodedImage, where: str) -> None:
    """An image's id, label, source, mpp and metadata within the limits.

    Raises:
        InvalidRequest: naming the field, ``where`` and the limit (never the value).
    """
    if image.image_id:
        IMAGE_ID.check(image.image_id, where)
    if image.label:
        LABEL.check(image.label, where)
    SOURCE.check(image.source, where)
    check_mpp(image.mpp, where)
    check_metadata(image.metadata, where)


def check_texts(values: Sequence[str], limit: TextLimit, field: str) -> list[str]:
    """Every value of a repeated field within ``limit``; ``field[i]`` names the one that is not."""
    for position, value in enumerate(values):
        limit.check(value, f"{field}[{position}]")
    return list(values)
