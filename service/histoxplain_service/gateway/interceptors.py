"""The one place where errors become gRPC status codes, and where callers are authenticated.

Servicer methods raise :mod:`histoxplain_model.errors` classes (or let the domain raise them);
:class:`ErrorMappingInterceptor` turns each into its status code with the error's message.
Anything else is a bug: the caller gets ``INTERNAL`` with a generic message and an incident id,
the log gets the traceback under the same id.

:class:`AuthInterceptor` runs first: every call but health needs a principal holding the role
the RPC requires (:mod:`histoxplain_service.gateway.roles`), else the call is refused before a
request message is even parsed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from histoxplain_model import errors
from histoxplain_service.gateway.audit import PRINCIPAL
from histoxplain_service.gateway.auth import AuthenticationFailed, Authenticator
from histoxplain_service.gateway.roles import HEALTH_SERVICE, Principal, required_role, service_of

__all__ = ["AuthInterceptor", "ErrorMappingInterceptor", "status_for"]

logger = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error in the histoxplain gateway (incident {incident}); see the gateway log"
#: The same words whatever was wrong (missing, unknown, expired, badly signed...): telling them
#: apart would help someone guessing credentials. The gateway log has the reason.
UNAUTHENTICATED_MESSAGE = (
    "missing or invalid credentials: send 'authorization: Bearer <API token or JWT>' "
    "(histoxplain_client: Client(token=...) or token_provider=...)"
)
PERMISSION_DENIED_MESSAGE = "this principal may not call {rpc} (it needs the role '{role}'); ask the gateway's administrator"


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


#: What a request deserializer hands on for bytes that are not a valid message (see _tolerant).
_UNDECODABLE = object()
UNDECODABLE_MESSAGE = (
    "the request is not a valid message of this RPC (protobuf wire format); "
    "build it from the histoxplain.v1 protos or use the SDK"
)


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` that hands on :data:`_UNDECODABLE` instead of raising: grpc would answer
    a parse error itself with UNKNOWN and the protobuf exception's text; the wrapped handler
    answers INVALID_ARGUMENT instead."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


def _decoded(request: Any) -> Any:
    if request is _UNDECODABLE:
        raise errors.InvalidRequest(UNDECODABLE_MESSAGE)
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _wrap_unary_response(behavior: Callable[..., Awaitable[Any]], streamed: bool = False) -> Callable[..., Awaitable[Any]]:
    async def guarded(request_or_iterator: Any, context: aio.ServicerContext) -> Any:
        try:
            requests = _decoded_stream(request_or_iterator) if streamed else _decoded(request_or_iterator)
            return await behavior(requests, context)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 -- mapped to a status, logged if unexpected
            await _abort(context, error)

    return guarded


def _wrap_stream_response(
    behavior: Callable[..., AsyncIterator[Any]], streamed: bool = False
) -> Callable[..., AsyncIterator[Any]]:
    async def guarded(request_or_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            requests = _decoded_stream(request_or_iterator) if streamed else _decoded(request_or_iterator)
            async for response in behavior(requests, context):
                yield response
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 -- mapped to a status, logged if unexpected
            await _abort(context, error)

    return guarded


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Maps :class:`~histoxplain_model.errors.HistoxplainError` subclasses to status codes.

    Each class's ``status_code`` (the table in ``histoxplain_model.errors``), ``TimeoutError`` ->
    DEADLINE_EXCEEDED, anything else -> INTERNAL with a generic message; request bytes that are
    no valid message of the RPC -> INVALID_ARGUMENT (grpc would answer UNKNOWN with the parser's
    text). Only async (``grpc.aio``) behaviours are wrapped; the health and reflection services
    pass through unchanged apart from the same mapping.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        tolerant = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary is not None and asyncio.iscoroutinefunction(handler.unary_unary):
            return tolerant._replace(unary_unary=_wrap_unary_response(handler.unary_unary))
        if handler.stream_unary is not None and asyncio.iscoroutinefunction(handler.stream_unary):
            return tolerant._replace(stream_unary=_wrap_unary_response(handler.stream_unary, streamed=True))
        if handler.unary_stream is not None and _is_async_gen(handler.unary_stream):
            return tolerant._replace(unary_stream=_wrap_stream_response(handler.unary_stream))
        if handler.stream_stream is not None and _is_async_gen(handler.stream_stream):
            return tolerant._replace(stream_stream=_wrap_stream_response(handler.stream_stream, streamed=True))
        return handler


def _is_async_gen(function: Callable[..., Any]) -> bool:
    return inspect.isasyncgenfunction(function)


class AuthInterceptor(aio.ServerInterceptor):
    """Authenticates every call except ``grpc.health.v1`` and checks the RPC's role.

    A missing or bad credential gets UNAUTHENTICATED, a principal without the role
    PERMISSION_DENIED; refused calls never reach the servicer. Unknown methods are
    UNAUTHENTICATED for anonymous callers and UNIMPLEMENTED for authenticated ones, so the
    service's shape is not probed without credentials.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if service_of(method) == HEALTH_SERVICE:
            return handler
        try:
            principal = await self._authenticate(handler_call_details.invocation_metadata)
        except AuthenticationFailed as reason:
            logger.warning("UNAUTHENTICATED %s: %s", method, reason)
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        except Exception as error:  # noqa: BLE001 -- e.g. the JWKS URL is down: mapped like a handler's error
            code, message = status_for(error)
            logger.warning("%s %s: %s", code.name, method, message)
            return _refusal(handler, code, message)
        if handler is None:
            return handler
        role = required_role(method)
        if not principal.has_role(role):
            logger.warning("PERMISSION_DENIED %s for %s %r (roles %s)", method, principal.mechanism,
                           principal.name, ", ".join(sorted(principal.roles)) or "none")
            rpc = method.rpartition("/")[2]
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE.format(rpc=rpc, role=role))
        logger.debug("%s by %s %r", method, principal.mechanism, principal.name)
        return _as_principal(handler, principal)

    async def _authenticate(self, metadata: Any) -> Principal:
        if self._authenticator.blocking:  # a JWKS URL may be fetched: keep the event loop free
            return await asyncio.to_thread(self._authenticator.authenticate, metadata)
        return self._authenticator.authenticate(metadata)


def _as_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    """``handler`` with :data:`~histoxplain_service.gateway.audit.PRINCIPAL` set while it runs
    (the audit line names the caller); the API's methods all answer with one message."""

    def bind(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def as_principal(request_or_iterator: Any, context: aio.ServicerContext) -> Any:
            PRINCIPAL.set(principal)
            return await behavior(request_or_iterator, context)

        return as_principal

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=bind(handler.unary_unary))
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=bind(handler.stream_unary))
    return handler


def _refusal(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that only aborts; requests are left
    as raw bytes (no deserializer), so a refused caller costs no parsing."""

    async def refuse_unary(request_or_iterator: Any, context: aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def refuse_stream(request_or_iterator: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover -- makes this an async generator; abort always raises

    if handler is None or handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse_unary)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse_unary)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)
