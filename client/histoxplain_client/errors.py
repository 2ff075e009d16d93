"""SDK exceptions: one class per gRPC status code the gateway sends, all under :class:`ApiError`.

Every exception carries the status ``code`` (a :class:`grpc.StatusCode`), the server's
``details`` message, which says what to do (for example "unknown index 'crc'; known: ..."), and
the call's trailing ``metadata`` (``x-request-id`` to quote to the gateway's operator; for an
``index_images`` call that stopped early, :attr:`ApiError.committed_images` and
:attr:`ApiError.committed_tiles`). Catch :class:`ApiError` for all of them, or a subclass for one
kind of failure.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AlreadyExists",
    "ApiError",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]


class ApiError(Exception):
    """A call to the gateway failed; ``code`` is the gRPC status, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, details: str, code: grpc.StatusCode | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(details)
        self.details = details
        self.metadata = dict(metadata or {})
        if code is not None:
            self.code = code

    @property
    def request_id(self) -> str | None:
        """The gateway's id of the failed call (its audit log line has the same), if it sent one."""
        return self.metadata.get("x-request-id")

    @property
    def committed_images(self) -> int | None:
        """For an ``index_images`` call that stopped early (cancelled, deadline, a bad message):
        how many images the index kept, all of them whole; ``None`` when the gateway did not say."""
        return _count(self.metadata.get("histoxplain-images-committed"))

    @property
    def committed_tiles(self) -> int | None:
        """The tiles of :attr:`committed_images`."""
        return _count(self.metadata.get("histoxplain-tiles-committed"))

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(ApiError):
    """The request is wrong (bad image, k out of range, unknown method); fix it, do not retry."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ApiError):
    """Unknown index, image id or point id."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ApiError):
    """The resource already exists."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ApiError):
    """The server's state forbids the call (for example an index built with another encoder)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ApiError):
    """The credentials do not allow the call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ApiError):
    """No or invalid credentials (bearer token)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(ApiError):
    """A limit was hit, typically a message larger than the configured maximum size."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ApiError):
    """The gateway or a dependency (model server, Qdrant) is down; retried with backoff."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ApiError):
    """The call did not finish within its timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ApiError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Unimplemented(ApiError):
    """The server does not implement this RPC (an older gateway)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ApiError):
    """The server failed unexpectedly; its log has the details."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
    )
}


def _count(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def from_rpc_error(error: grpc.RpcError) -> ApiError:
    """The SDK exception for a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    trailing = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    metadata = {key: value for key, value in (trailing or ()) if isinstance(value, str)}
    cls = _BY_CODE.get(code, ApiError)
    return cls(details or code.name, code, metadata)
