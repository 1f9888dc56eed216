"""How quotad refuses a call, as data shared by the server and its clients.

A refusal has a code, the name of its gRPC status code, and some also a reason: an
`ErrorReason`, sent as the `reason` of a `google.rpc.ErrorInfo` in the domain `ERROR_DOMAIN`.
`ERRORS` is the one table from a code to what each side makes of it: the gRPC status, the
HTTP status of the browser endpoint, and the client's exception class.

Standard library only: the server's pure core imports this module too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

ERROR_DOMAIN = "quotad"
"""The ErrorInfo domain of quotad's reasons."""


class ErrorReason(enum.StrEnum):
    """Why a FAILED_PRECONDITION or RESOURCE_EXHAUSTED refusal was made. Each value is its
    own name, the string sent as ErrorInfo.reason; the proto's enum ErrorReason names the
    same strings for other languages. A str, so `error.reason == ErrorReason.NO_PLAN` holds
    for a reason received as plain text."""

    # FAILED_PRECONDITION
    NO_PLAN = "NO_PLAN"
    """The user has no subscription."""
    RESERVATION_COMMITTED = "RESERVATION_COMMITTED"
    """The hold was already committed."""
    RESERVATION_RELEASED = "RESERVATION_RELEASED"
    """The hold was released."""
    RESERVATION_EXPIRED = "RESERVATION_EXPIRED"
    """The hold expired (extending it is refused; committing it counts the amount)."""
    PLAN_IN_USE = "PLAN_IN_USE"
    """A subscription still names the plan."""
    KEYS_DISABLED = "KEYS_DISABLED"
    """The server runs without an admin key, so it has no API keys."""
    # RESOURCE_EXHAUSTED
    COUNTER_LIMIT = "COUNTER_LIMIT"
    """The change would push used or held past COUNTER_MAX."""
    TOO_MANY_HOLDS = "TOO_MANY_HOLDS"
    """The user has LIVE_HOLDS_PER_USER_MAX live holds."""
    TOO_MANY_KEYS = "TOO_MANY_KEYS"
    """The app has KEYS_PER_APP_MAX keys, revoked ones included."""
    TOO_MANY_WATCHERS = "TOO_MANY_WATCHERS"
    """A cap on usage watches was reached: the ErrorInfo metadata's "limit" names it
    (WATCHERS_PER_USER_MAX, WATCHERS_PER_KEY_MAX, WATCHERS_PER_APP_MAX or WATCHERS_MAX)."""
    WATCH_QUEUE_FULL = "WATCH_QUEUE_FULL"
    """The watcher fell behind; it resumes from its last sequence."""
    OVERLOADED = "OVERLOADED"
    """The server is at its admission limit and did nothing with the call: it may be sent
    again, after the RetryInfo delay that comes with it."""
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    """A cap on the browser endpoint's connections was reached (HTTP 429): the error's
    metadata "limit" names it (HTTP_CONNECTIONS_PER_PEER_MAX, HTTP_CONNECTIONS_PER_KEY_MAX or
    HTTP_CONNECTIONS_PER_APP_MAX). Never sent over gRPC."""
    # FAILED_PRECONDITION, added after the RESOURCE_EXHAUSTED ones (the proto's numbers)
    EXPORT_CURSOR_PRUNED = "EXPORT_CURSOR_PRUNED"
    """An export's cursor names log records pruned past the audit retention."""
    # RESOURCE_EXHAUSTED
    TOO_MANY_GRANTS = "TOO_MANY_GRANTS"
    """The user's balance group has GRANTS_PER_BALANCE_MAX grants with credit left."""
    # FAILED_PRECONDITION
    WRONG_SHARD = "WRONG_SHARD"
    """The user (or the reservation id's slot) belongs to another shard of the cluster; the
    ErrorInfo metadata names it: "slot", "shard_id" and "address" of the shard that owns it.
    Nothing changed: send the call there."""
    # UNAVAILABLE
    SLOTS_MOVING = "SLOTS_MOVING"
    """The user's slot is being moved to another shard (frozen on its source, or adopted by
    its target before the shard map names it the owner): nothing was done. Send the call
    again after the RetryInfo delay, to the shard the map then names."""


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """What one code of refusal becomes on each side."""

    code: str
    """The gRPC status code's name (grpc.StatusCode and google.rpc.Code name it alike)."""
    http_status: int
    """The browser endpoint's HTTP status for it."""
    client_error: str
    """The name of the quotad_client exception a client raises for it."""


ERRORS: dict[str, ErrorKind] = {kind.code: kind for kind in (
    ErrorKind("INVALID_ARGUMENT", 400, "InvalidArgument"),
    ErrorKind("UNAUTHENTICATED", 401, "Unauthenticated"),
    ErrorKind("PERMISSION_DENIED", 403, "PermissionDenied"),
    ErrorKind("NOT_FOUND", 404, "NotFound"),
    ErrorKind("ALREADY_EXISTS", 409, "AlreadyExists"),
    ErrorKind("FAILED_PRECONDITION", 409, "FailedPrecondition"),
    ErrorKind("RESOURCE_EXHAUSTED", 429, "ResourceExhausted"),
    ErrorKind("UNAVAILABLE", 503, "Unavailable"),
    ErrorKind("DEADLINE_EXCEEDED", 408, "DeadlineExceeded"),
    ErrorKind("INTERNAL", 500, "QuotadError"),
)}
"""Every code a quotad refusal carries; DEADLINE_EXCEEDED (a call's deadline passed; over HTTP,
a request that did not arrive in time) and INTERNAL (a fault, never anything a caller did)
too."""

INTERNAL = ERRORS["INTERNAL"]
