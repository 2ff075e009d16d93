"""The one place where errors become gRPC status codes.

Servicer methods raise :mod:`histoxplain_model.errors` classes (or let the domain raise them);
:class:`ErrorMappingInterceptor` turns each into its status code with the error's message.
Anything else is a bug: the caller gets ``INTERNAL`` with a generic message and an incident id,
the log gets the traceback under the same id.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from histoxplain_model import errors

__all__ = ["ErrorMappingInterceptor", "status_for"]

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error in the histoxplain gateway (incident {incident}); see the gateway log"


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message for an exception raised by a handler."""
    if isinstance(error, errors.HistoxplainError) and error.status_code != "INTERNAL":
        return grpc.StatusCode[error.status_code], str(error)
    if isinstance(error, TimeoutError):  # asyncio.wait_for / futures time-outs on 3.11
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request ran past its deadline"
    incident = uuid.uuid4().hex[:12]
    logger.error("unexpected error (incident %s)", incident, exc_info=error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(incident=incident)


async def _abort(context: aio.ServicerContext, error: Exception) -> None:
    code, message = status_for(error)
    if code is not grpc.StatusCode.INTERNAL:
        logger.info("%s: %s", code.name, message)
    await context.abort(code, message)


def _wrap_unary_response(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def guarded(request_or_iterator: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behavior(request_or_iterator, context)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 -- mapped to a status, logged if unexpected
            await _abort(context, error)

    return guarded


def _wrap_stream_response(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request_or_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request_or_iterator, context):
                yield response
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 -- mapped to a status, logged if unexpected
            await _abort(context, error)

    return guarded


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Maps :class:`~histoxplain_model.errors.HistoxplainError` subclasses to status codes.

    ``InvalidRequest`` -> INVALID_ARGUMENT, ``NotFound`` -> NOT_FOUND, ``FailedPrecondition`` ->
    FAILED_PRECONDITION, ``DependencyUnavailable`` -> UNAVAILABLE, ``DeadlineExceeded`` (and
    ``TimeoutError``) -> DEADLINE_EXCEEDED; anything else -> INTERNAL with a generic message.
    Only async (``grpc.aio``) behaviours are wrapped; the health and reflection services pass
    through unchanged apart from the same mapping.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        if handler.unary_unary is not None and asyncio.iscoroutinefunction(handler.unary_unary):
            return handler._replace(unary_unary=_wrap_unary_response(handler.unary_unary))
        if handler.stream_unary is not None and asyncio.iscoroutinefunction(handler.stream_unary):
            return handler._replace(stream_unary=_wrap_unary_response(handler.stream_unary))
        if handler.unary_stream is not None and _is_async_gen(handler.unary_stream):
            return handler._replace(unary_stream=_wrap_stream_response(handler.unary_stream))
        if handler.stream_stream is not None and _is_async_gen(handler.stream_stream):
            return handler._replace(stream_stream=_wrap_stream_response(handler.stream_stream))
        return handler


def _is_async_gen(function: Callable[..., Any]) -> bool:
    return inspect.isasyncgenfunction(function)
