"""Errors the core raises for requests it refuses. Each class carries its code, the gRPC
status code's name, looked up in quotad_contract.errors.ERRORS for the gRPC, HTTP and client
answers; FailedPrecondition and ResourceExhausted also carry an ErrorReason.

A refused request changes nothing. Field names in violations are the contract's (proto) names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from quotad.core.limits import SLOTS_MOVING_RETRY_DELAY_S
from quotad_contract.errors import ErrorReason


class Refusal(Exception):
    """A call the server refuses, whoever refuses it (the core, the keys, the gate, the
    writer). Subclasses name their code; `reason`, when set, is sent as an ErrorInfo, with
    `metadata` as the ErrorInfo's metadata."""

    code = "INTERNAL"
    reason: ErrorReason | None = None
    metadata: Mapping[str, str] = MappingProxyType({})


class QuotaError(Refusal):
    """A request the core refuses; the state is unchanged."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(QuotaError):
    code = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation] | tuple[FieldViolation, ...]) -> None:
        assert violations
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class NotFound(QuotaError):
    code = "NOT_FOUND"


class FailedPrecondition(QuotaError):
    code = "FAILED_PRECONDITION"

    def __init__(self, reason: ErrorReason, message: str, *,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        if metadata is not None:
            self.metadata = MappingProxyType(dict(metadata))


class AlreadyExists(QuotaError):
    code = "ALREADY_EXISTS"


class PermissionDenied(QuotaError):
    """The caller's key may not do this (another app's data, or an RPC its kind may not call)."""

    code = "PERMISSION_DENIED"


class Unauthenticated(QuotaError):
    """No valid key (or user token) came with the call: missing, unknown, revoked, malformed,
    badly signed or expired."""

    code = "UNAUTHENTICATED"


class ResourceExhausted(QuotaError):
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, reason: ErrorReason, message: str, *,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        if metadata is not None:
            self.metadata = MappingProxyType(dict(metadata))


class SlotsMoving(QuotaError):
    """The user's (or the hold's) slot is being moved between shards: nothing was done; the
    caller sends the call again after retry_delay_s, to the shard the map then names."""

    code = "UNAVAILABLE"
    reason = ErrorReason.SLOTS_MOVING

    def __init__(self, message: str, *, slot: int | None = None,
                 retry_delay_s: float = SLOTS_MOVING_RETRY_DELAY_S) -> None:
        super().__init__(message)
        if slot is not None:
            self.metadata = MappingProxyType({"slot": str(slot)})
        self.retry_delay_s = retry_delay_s


class Violations:
    """Collects every field violation of a request, then raises them all at once."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def check(self, ok: bool, field: str, description: str) -> None:
        if not ok:
            self.add(field, description)

    def text(self, value: str, field: str, *, bytes_min: int, bytes_max: int) -> None:
        size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        if size < bytes_min or size > bytes_max:
            self.add(field, f"must be {bytes_min} to {bytes_max} bytes, got {size}")

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)
