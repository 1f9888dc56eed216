"""A request id for every call, echoed to the caller and carried by every log line.

The id is the caller's `x-request-id` metadata when it is sane (1 to REQUEST_ID_BYTES_MAX
printable ASCII characters), else one made here (a per-process random prefix and a counter:
unique, and cheaper than a uuid). It is sent back as initial metadata `x-request-id` and set
in logs.REQUEST_ID for the task that handles the call, so any log line written while handling
it names it.

Logged per call: one info line for each refused call (its code, method, request id and
status message); with --log-level debug also one line for every call, an access log. A call
that succeeds costs no logging work at info.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from .logs import REQUEST_ID

log = logging.getLogger("quotad.requests")

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_BYTES_MAX = 128
"""Longer (or non-printable) caller ids are replaced by one made here."""


def sane_request_id(value: Any) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= REQUEST_ID_BYTES_MAX
            and value.isascii() and value.isprintable())


def _given_request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER:
            return value if sane_request_id(value) else ""
    return ""


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN"


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Gives each call (unary, and WatchUsage's stream) its request id and logs refused calls
    (and, at debug, all)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._numbers = itertools.count(1)
        self._access_log = log.isEnabledFor(logging.DEBUG)

    def new_request_id(self) -> str:
        return f"{self._prefix}-{next(self._numbers):x}"

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return handler
        method = details.method
        request_id = _given_request_id(details.invocation_metadata) or self.new_request_id()
        access_log = self._access_log

        def refused(context: grpc.aio.ServicerContext) -> None:
            log.info("refused", extra={"code": _code_name(context), "method": method,
                                       "status_message": context.details() or ""})

        def served(started: float) -> None:
            log.debug("call", extra={"code": "OK", "method": method, "duration_ms": round(
                (time.perf_counter() - started) * 1e3, 3)})

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def with_request_id(request: Any, context: grpc.aio.ServicerContext) -> Any:
                REQUEST_ID.set(request_id)  # this call's own task: other calls never see it
                await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
                started = time.perf_counter() if access_log else 0.0
                try:
                    response = await inner(request, context)
                except BaseException:
                    refused(context)
                    raise
                if access_log:
                    served(started)
                return response

            return handler._replace(unary_unary=with_request_id)

        streaming = handler.unary_stream

        async def stream_with_request_id(request: Any,
                                         context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            REQUEST_ID.set(request_id)
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
            started = time.perf_counter() if access_log else 0.0
            try:
                async for message in streaming(request, context):
                    yield message
            except (asyncio.CancelledError, GeneratorExit):
                raise  # the caller went away: not a refusal
            except BaseException:
                refused(context)
                raise
            if access_log:
                served(started)

        return handler._replace(unary_stream=stream_with_request_id)
