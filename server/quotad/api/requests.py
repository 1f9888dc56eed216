"""A request id for every call, sent back to the caller and carried by every log line.

The id is the caller's `x-request-id` metadata when it is sane (1 to limits.REQUEST_ID_BYTES_MAX
printable ASCII characters), else one made here (a per-process random prefix and a counter:
unique, and cheaper than a uuid). It is set in logs.REQUEST_ID for the task that handles the
call, so any log line written while handling it names it. It is sent back as `x-request-id`
whenever a log line names it: in the trailing metadata of a refused unary call (with the
status, so it costs no extra send), of every unary call with --log-level debug, and in the
initial metadata of a stream (which may run for hours). A call that succeeds at info is
logged nowhere, so it gets no id back: echoing one cost ~30 us of server CPU per call.

Logged per call: one info line for each refused call (its code, method, request id and
status message, and who made it: the peer's address, the app and the key id its credentials
name, never a secret); with --log-level debug also one line for every call, an access log. A call
that succeeds costs no logging work at info.

This is done inside the handlers rather than by a grpc.aio server interceptor: an
interceptor wraps every call in another coroutine, measurably dearer on the hot path.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from typing import Any

from quotad.core import limits
from quotad.logs import REQUEST_ID

log = logging.getLogger("quotad.requests")

REQUEST_ID_HEADER = "x-request-id"


def sane_request_id(value: Any) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= limits.REQUEST_ID_BYTES_MAX
            and value.isascii() and value.isprintable())


_PREFIX = secrets.token_hex(4)
_NUMBERS = itertools.count(1)


def new_request_id() -> str:
    return f"{_PREFIX}-{next(_NUMBERS):x}"


def begin(metadata: Any) -> str:
    """The call's request id (the caller's, if sane), set for its log lines."""
    request_id = ""
    for key, value in metadata:
        if key == REQUEST_ID_HEADER:
            request_id = value if sane_request_id(value) else ""
            break
    request_id = request_id or new_request_id()
    REQUEST_ID.set(request_id)  # this call's own task: other calls never see it
    return request_id


def access_log_on() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def refused(method: str, code: str, message: str, *, peer: str, app: str,
            key_id: str) -> None:
    """The refused call's line: what was refused, and who asked (peer address, app, key id;
    empty when the call named none). An error line for INTERNAL: a fault of the server's."""
    log.log(logging.ERROR if code == "INTERNAL" else logging.INFO, "refused", extra={
        "code": code, "method": method, "status_message": message, "peer": peer, "app": app,
        "key_id": key_id})


def served(method: str, started_s: float) -> None:
    log.debug("call", extra={"code": "OK", "method": method,
                             "duration_ms": round((time.perf_counter() - started_s) * 1e3, 3)})
