"""Exception hierarchy shared by the model library, the service and the handler.

Every error carries a one-line message that tells the user what to do. The gateway maps the
classes to gRPC status codes and the CLI to exit codes. This module must not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "HistoxplainError",
    "InvalidRequest",
    "UnknownNameError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "WeightsMismatchError",
    "NotFound",
    "FailedPrecondition",
    "DependencyUnavailable",
    "DeadlineExceeded",
]


class HistoxplainError(Exception):
    """Base class of every error histoxplain raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(HistoxplainError):
    """Bad input the caller can fix (gRPC INVALID_ARGUMENT, CLI exit 2)."""


class UnknownNameError(InvalidRequest):
    """Unknown preset, method or polarity; the message lists the known names.

    Raise it with a full message, or build one with :meth:`for_name`.
    """

    def __init__(self, message: str, known: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.known = tuple(known)

    @classmethod
    def for_name(cls, kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
        """``unknown preset 'x'; known: a, b, c``."""
        known_names = tuple(known)
        return cls(f"unknown {kind} {name!r}; known: {', '.join(known_names)}", known_names)


class ImageDecodeError(InvalidRequest):
    """Unreadable, truncated, empty or unsupported image."""


class ImageTooLargeError(InvalidRequest):
    """Image over the pixel limit (a decompression-bomb guard)."""


class WeightsMismatchError(InvalidRequest):
    """A state dict that does not fit the model; names the missing and unexpected keys."""

    def __init__(
        self,
        message: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        shape_mismatches: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.shape_mismatches = tuple(shape_mismatches)


class NotFound(HistoxplainError):
    """Unknown index or image id (gRPC NOT_FOUND)."""


class FailedPrecondition(HistoxplainError):
    """The system is not in a state for this request, e.g. an index built with another encoder."""


class DependencyUnavailable(HistoxplainError):
    """A dependency (TorchServe, Qdrant) is down or unreachable (gRPC UNAVAILABLE)."""


class DeadlineExceeded(HistoxplainError):
    """The request ran past its deadline (gRPC DEADLINE_EXCEEDED)."""
