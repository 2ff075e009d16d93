"""Exception hierarchy shared by the model library, the service and the handler.

Every error carries a one-line message that tells the user what to do, and its class carries
the two codes it becomes: ``status_code`` (the gRPC status name; the gateway's interceptor and
the TorchServe envelope use it) and ``exit_code`` (the ``histoxplain`` command's exit status).
This class hierarchy is the one table of those codes. This module must not import torch (or grpc).

=========================  ====================  =========
class                      ``status_code``       exit code
=========================  ====================  =========
``InvalidRequest``         INVALID_ARGUMENT      2
``NotFound``               NOT_FOUND             3
``FailedPrecondition``     FAILED_PRECONDITION   4
``DependencyUnavailable``  UNAVAILABLE           5
``DeadlineExceeded``       DEADLINE_EXCEEDED     6
``ResourceExhausted``      RESOURCE_EXHAUSTED    7
``PermissionDenied``       PERMISSION_DENIED     8
``Cancelled``              CANCELLED             130
anything else              INTERNAL              1
=========================  ====================  =========
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
    "ResourceExhausted",
    "PermissionDenied",
    "Cancelled",
    "error_class_for_status",
]


class HistoxplainError(Exception):
    """Base class of every error histoxplain raises on purpose.

    ``status_code``: gRPC status name; ``exit_code``: CLI exit status (subclasses set both).
    """

    status_code: str = "INTERNAL"
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(HistoxplainError):
    """Bad input the caller can fix (gRPC INVALID_ARGUMENT, CLI exit 2)."""

    status_code = "INVALID_ARGUMENT"
    exit_code = 2


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

    status_code = "NOT_FOUND"
    exit_code = 3


class FailedPrecondition(HistoxplainError):
    """The system is not in a state for this request, e.g. an index built with another encoder."""

    status_code = "FAILED_PRECONDITION"
    exit_code = 4


class DependencyUnavailable(HistoxplainError):
    """A dependency (TorchServe, Qdrant) is down or unreachable (gRPC UNAVAILABLE)."""

    status_code = "UNAVAILABLE"
    exit_code = 5


class DeadlineExceeded(HistoxplainError):
    """The request ran past its deadline (gRPC DEADLINE_EXCEEDED)."""

    status_code = "DEADLINE_EXCEEDED"
    exit_code = 6


class ResourceExhausted(HistoxplainError):
    """Busy: the server is at its limit of concurrent work; the same call may succeed later."""

    status_code = "RESOURCE_EXHAUSTED"
    exit_code = 7


class PermissionDenied(HistoxplainError):
    """A dependency refused histoxplain's credentials (e.g. a PACS answering HTTP 401 / 403): an
    operator fixes the setting the message names; retrying as is does not help."""

    status_code = "PERMISSION_DENIED"
    exit_code = 8


class Cancelled(HistoxplainError):
    """The caller cancelled the request (or the server is shutting down) and its work stopped.

    Exit code 130, what a shell reports for Ctrl-C."""

    status_code = "CANCELLED"
    exit_code = 130


#: The error class each status name stands for (the classes that set a ``status_code``).
_BY_STATUS: dict[str, type[HistoxplainError]] = {
    cls.status_code: cls
    for cls in (
        InvalidRequest, NotFound, FailedPrecondition, DependencyUnavailable, DeadlineExceeded, ResourceExhausted,
        PermissionDenied, Cancelled,
    )
}


def error_class_for_status(status_code: str) -> type[HistoxplainError] | None:
    """The error class of a gRPC status name (e.g. from a TorchServe envelope); None if none."""
    return _BY_STATUS.get(status_code)
