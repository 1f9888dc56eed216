"""Exceptions of the quotad client, and the mapping from gRPC errors to them.

``QuotadError`` and its subclasses mean the call failed (the server refused it, or could not be
reached). ``QuotaExceeded`` is deliberately NOT a ``QuotadError``: it means quotad answered and
said no. Code that fails open on ``except QuotadError`` therefore never lets a denied user through.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from quotad_contract.errors import ERROR_DOMAIN, ERRORS, ErrorReason

from ._types import Counter, Reservation, TrackResult


class QuotadError(Exception):
    """A quotad call that failed. ``code`` is the gRPC status code, ``message`` its text.
    ``retry_delay_s`` is the server's ``google.rpc.RetryInfo`` delay when it sent one."""

    retry_delay_s: float | None = None

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message


class InvalidArgument(QuotadError):
    """The request broke a limit; ``field_violations`` names each bad field."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 field_violations: list[tuple[str, str]] | None = None) -> None:
        super().__init__(code, message)
        self.field_violations: list[tuple[str, str]] = list(field_violations or [])


class NotFound(QuotadError):
    """Unknown reservation, plan or subscription."""


class _WithReason(QuotadError):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(code, message)
        self.reason = reason


class FailedPrecondition(_WithReason):
    """The state does not allow it; ``reason`` is machine-readable: a
    ``quotad_contract.errors.ErrorReason`` (``NO_PLAN``...)."""


class ResourceExhausted(_WithReason):
    """A server or transport limit; ``reason`` is set when quotad gave one (an ``ErrorReason``
    such as ``TOO_MANY_HOLDS``). ``OVERLOADED``: the server shed the call, having done nothing
    (the client retries it after ``retry_delay_s``, within the call's time budget)."""


class AlreadyExists(QuotadError):
    """An idempotency key reused for a different request."""


class PermissionDenied(QuotadError):
    """The key may not do this: another app's data, or an RPC its kind may not call (a pk_
    key reads usage only, of the user its user token names)."""


class Unauthenticated(QuotadError):
    """No valid key came with the call (missing, unknown, revoked), or a pk_ key came without
    a valid user token (missing, malformed, badly signed, expired)."""


class Unavailable(_WithReason):
    """The server is starting, draining, stopped, or unreachable (retried by the client).
    ``reason`` ``SLOTS_MOVING``: the user's slot is moving between shards and nothing was
    done (the client sends the call again after ``retry_delay_s``, whatever it is).
    ``may_need_tls``: a plaintext channel found no server it could speak to, which is what a
    server serving TLS looks like to it (the message then says how to connect over TLS)."""

    may_need_tls: bool = False


class DeadlineExceeded(QuotadError):
    """No answer within the call's time budget."""


_CLASSES: dict[grpc.StatusCode, type[QuotadError]] = {
    grpc.StatusCode[kind.code]: globals()[kind.client_error] for kind in ERRORS.values()}
"""The exception of each code, as quotad_contract.errors.ERRORS names it."""

def error_from_status(code: grpc.StatusCode, message: str,
                      status: status_pb2.Status | None = None) -> QuotadError:
    """The exception for a gRPC status and its optional ``google.rpc.Status`` details."""
    violations: list[tuple[str, str]] = []
    reason = ""
    retry_delay_s: float | None = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry_delay_s = max(0.0, retry_info.retry_delay.ToNanoseconds() / 1e9)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if not reason or info.domain == ERROR_DOMAIN:
                reason = info.reason
    error_class = _CLASSES.get(code, QuotadError)
    error: QuotadError
    if issubclass(error_class, InvalidArgument):
        error = error_class(code, message, violations)
    elif issubclass(error_class, _WithReason):
        error = error_class(code, message, reason)
    else:
        error = error_class(code, message)
    error.retry_delay_s = retry_delay_s
    return error


def shed_delay_s(error: QuotadError) -> float | None:
    """The server's retry delay when it shed the call (RESOURCE_EXHAUSTED ``OVERLOADED`` with
    a RetryInfo): it did nothing, so the call may be sent again, any call, after that long.
    None for every other error (an OVERLOADED without a RetryInfo cannot succeed again: a
    Batch over the server's whole admission limit)."""
    if (isinstance(error, ResourceExhausted) and error.reason == ErrorReason.OVERLOADED
            and error.retry_delay_s is not None):
        return error.retry_delay_s
    return None


SLOTS_MOVING_DELAY_S_DEFAULT = 0.05
"""The wait before sending a call refused SLOTS_MOVING again when the refusal names none (a
shard names its own, in a RetryInfo)."""


def slots_moving_delay_s(error: QuotadError) -> float | None:
    """The wait before sending a call again that a shard refused because its user's slot is
    moving (UNAVAILABLE ``SLOTS_MOVING``: nothing was done, so any call may be sent again);
    None for every other error."""
    if isinstance(error, Unavailable) and error.reason == ErrorReason.SLOTS_MOVING:
        return (error.retry_delay_s if error.retry_delay_s is not None
                else SLOTS_MOVING_DELAY_S_DEFAULT)
    return None


TLS_HINT = ("no server there, or one that requires TLS: pass tls_root_cert=<the CA's PEM "
            "bytes>, or tls=True to trust the system's roots")
_CONNECT_FAILURES = ("failed to connect", "Socket closed", "Connection reset")
"""What gRPC says when a plaintext channel meets a TLS server (it closes the connection at
the first bytes, which are no TLS ClientHello), and when nothing listens."""


def with_tls_hint(error: QuotadError, plaintext: bool) -> QuotadError:
    """The error a caller sees: on a plaintext channel that could not connect, it also says
    that the server may require TLS and names the argument that turns it on."""
    if (plaintext and isinstance(error, Unavailable)
            and any(text in error.message for text in _CONNECT_FAILURES)):
        error.may_need_tls = True
        error.args = (f"{error.args[0]} ({TLS_HINT})",)
    return error


def error_from_rpc_error(error: grpc.RpcError) -> QuotadError:
    """Maps a failed call (sync ``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = (details_fn() if callable(details_fn) else None) or ""
    status: status_pb2.Status | None = None
    try:
        status = rpc_status.from_call(cast(grpc.Call, error))  # sync and aio errors are Calls
    except (ValueError, AttributeError, TypeError, DecodeError):
        status = None  # malformed or inconsistent details: keep the plain code and message
    return error_from_status(code, message, status)


class QuotaExceeded(Exception):
    """quotad denied the request: ``denied_by`` had no room for ``amount``.

    ``remaining`` and ``resets_at`` are those of the denying group's counter; ``counters`` are
    all matched groups' counters; ``result`` is the denied Reservation or TrackResult.
    """

    def __init__(self, *, user_id: str, event_type: str, amount: int,
                 result: Reservation | TrackResult) -> None:
        self.user_id = user_id
        self.event_type = event_type
        self.amount = amount
        self.result = result
        self.denied_by = result.denied_by
        self.counters: tuple[Counter, ...] = result.counters
        denying = result.counter(result.denied_by)
        self.remaining: int = denying.remaining if denying is not None else 0
        self.resets_at: datetime | None = denying.resets_at if denying is not None else None
        self.fits_at: datetime | None = result.fits_at
        """When the same request would fit if nothing else happened; None: not by waiting."""
        when = f", resets at {self.resets_at.isoformat()}" if self.resets_at else ""
        if self.fits_at is not None:
            when += f", fits at {self.fits_at.isoformat()}"
        super().__init__(
            f"quota exceeded for user {user_id!r}, event {event_type!r}, amount {amount}: "
            f"limit group {self.denied_by!r} has {self.remaining} left{when}")
