"""Exception hierarchy shared by the model library, the service and the handler.

Every error carries a one-line message that tells the user what to do. The gateway maps the
classes to gRPC status codes and the CLI to exit codes. This module must not import torch.
"""

from __future__ import annotations

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
    """Unknown preset, method or polarity; the message lists the known names."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]) -> None:
        self.kind = kind
        self.name = name
        self.known = tuple(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known)}")


class ImageDecodeError(InvalidRequest):
    """Unreadable, truncated, empty or unsupported image."""


class ImageTooLargeError(InvalidRequest):
    """Image over the pixel limit (a decompression-bomb guard)."""


class WeightsMismatchError(InvalidRequest):
    """A state dict that does not fit the model; names the missing and unexpected keys."""

    def __init__(
        self,
        message: str,
        missing: list[str] | tuple[str, ...] = (),
        unexpected: list[str] | tuple[str, ...] = (),
        shape_mismatches: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.shape_mismatches = tuple(shape_mismatches)
        super().__init__(message)


class NotFound(HistoxplainError):
    """Unknown index or image id (gRPC NOT_FOUND)."""


class FailedPrecondition(HistoxplainError):
    """The system is not in a state for this request, e.g. an index built with another encoder."""


class DependencyUnavailable(HistoxplainError):
    """A dependency (TorchServe, Qdrant) is down or unreachable (gRPC UNAVAILABLE)."""


class DeadlineExceeded(HistoxplainError):
    """The request ran past its deadline (gRPC DEADLINE_EXCEEDED)."""
