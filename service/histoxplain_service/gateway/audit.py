"""One structured audit line per call: who called what on which index, how it ended, how long.

The line goes to the ``histoxplain.audit`` logger at INFO as JSON:

    {"request_id": "...", "principal": "reader-service", "rpc": "Search", "index": "cases",
     "count": 10, "status": "OK", "latency_ms": 41.7}

``principal`` is the authenticated caller's name (``-`` without authentication, ``?`` when it
was refused before one was known); ``count`` is what the response carried (hits, references,
images indexed or deleted, indexes) or ``null``. Nothing else of the request is logged: never
image bytes, labels, sources, file paths or patient identifiers (``tests/unit/gateway/test_no_phi.py``
and ``test_audit.py`` scan the log). ``request_id`` is the caller's ``x-request-id`` metadata
when it is a plain token of at most 64 characters, else a new one; it is sent back as
trailing metadata so a caller can quote it. Health checks are not audited (probes every few
seconds would drown the rest).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc
from grpc import aio

from histoxplain_service.gateway.roles import HEALTH_SERVICE, Principal, service_of

__all__ = ["PRINCIPAL", "AuditInterceptor", "audit_logger"]

audit_logger = logging.getLogger("histoxplain.audit")

#: The caller of the call running in this task, set by the authentication interceptor.
PRINCIPAL: ContextVar[Principal | None] = ContextVar("histoxplain_principal", default=None)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_COUNTED = ("hits", "results", "references", "indexes")
_COUNTS = ("images_indexed", "images_deleted", "series_indexed")


class AuditInterceptor(aio.ServerInterceptor):
    """Wraps every unary-response call of the API (all of ``RetrievalService``) in one audit line.

    ``authenticated``: whether an authentication interceptor runs (it sets :data:`PRINCIPAL`).
    """

    def __init__(self, authenticated: bool) -> None:
        self._anonymous = "?" if authenticated else "-"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or service_of(method) == HEALTH_SERVICE:
            return handler
        request_id = _request_id(handler_call_details.invocation_metadata)
        rpc = method.rpartition("/")[2]
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._audited(handler.unary_unary, rpc, request_id))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._audited(handler.stream_unary, rpc, request_id))
        return handler

    def _audited(self, behavior: Callable[..., Awaitable[Any]], rpc: str, request_id: str) -> Callable[..., Awaitable[Any]]:
        async def audited(request_or_iterator: Any, context: aio.ServicerContext) -> Any:
            started = time.perf_counter()
            context.set_trailing_metadata((("x-request-id", request_id),))
            response = None
            status = "OK"
            try:
                response = await behavior(request_or_iterator, context)
                return response
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except BaseException:
                code = context.code()
                status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                principal = PRINCIPAL.get()
                audit_logger.info(json.dumps({
                    "request_id": request_id,
                    "principal": principal.name if principal is not None else self._anonymous,
                    "rpc": rpc,
                    "index": _index_of(request_or_iterator, response),
                    "count": _count_of(response),
                    "status": status,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                }))

        return audited


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


def _index_of(request: Any, response: Any) -> str | None:
    """The index a call names (index names are the operator's, not patient data)."""
    for message in (request, getattr(request, "indexed", None), response):
        name = getattr(message, "index", None)
        if isinstance(name, str) and name:
            return name
    return None


def _count_of(response: Any) -> int | None:
    for field in _COUNTED:
        values = getattr(response, field, None)
        if values is not None and not isinstance(values, (str, bytes)):
            return len(values)
    for field in _COUNTS:
        value = getattr(response, field, None)
        if isinstance(value, int):
            return value
    return None
