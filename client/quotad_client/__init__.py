"""Python client for quotad, the per-end-user quota authority (sync and asyncio).

    from quotad_client import QuotaClient, QuotaExceeded

    with QuotaClient("127.0.0.1:50051", api_key="sk_...") as client:
        try:
            with client.reserve("u1", "openai.chat", 2000, metadata={"model": "gpt-4o"}) as hold:
                reply = call_llm(...)
                hold.actual = reply.usage.total_tokens
        except QuotaExceeded as denied:
            print(denied.denied_by, denied.remaining, denied.resets_at)

``QuotaExceeded`` (a denial) is not a ``QuotadError`` (a failed call): failing open on
``except QuotadError`` never admits a user who is over quota.
"""

from __future__ import annotations

from ._async import AsyncQuotaClient, PendingReserve
from ._convert import PlanLike, plan_to_proto
from ._errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotadError,
    QuotaExceeded,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    error_from_rpc_error,
    error_from_status,
)
from ._hold import AsyncHold, Hold
from ._ops import new_idempotency_key
from ._retry import RetryPolicy
from ._sync import QuotaClient
from ._token import mint_user_token
from ._types import (
    WINDOWS,
    ApiKey,
    CommitResult,
    Cost,
    Counter,
    CreatedKey,
    Event,
    EventPage,
    Grant,
    GrantResult,
    LimitGroup,
    Match,
    Plan,
    RecurringGrant,
    ReleaseResult,
    Reservation,
    Subscription,
    SubscriptionPage,
    ThresholdCrossed,
    TrackResult,
    UpsertPlanResult,
    UpsertSubscriptionResult,
    Usage,
    UsageExportPage,
    UsageLine,
    UserToken,
    WatchUpdate,
)

__all__ = [
    "WINDOWS",
    "AlreadyExists",
    "ApiKey",
    "AsyncHold",
    "AsyncQuotaClient",
    "CommitResult",
    "Cost",
    "Counter",
    "CreatedKey",
    "DeadlineExceeded",
    "Event",
    "EventPage",
    "FailedPrecondition",
    "Grant",
    "GrantResult",
    "Hold",
    "InvalidArgument",
    "LimitGroup",
    "Match",
    "NotFound",
    "PendingReserve",
    "PermissionDenied",
    "Plan",
    "PlanLike",
    "QuotaClient",
    "QuotaExceeded",
    "QuotadError",
    "RecurringGrant",
    "ReleaseResult",
    "Reservation",
    "ResourceExhausted",
    "RetryPolicy",
    "Subscription",
    "SubscriptionPage",
    "ThresholdCrossed",
    "TrackResult",
    "Unauthenticated",
    "Unavailable",
    "UpsertPlanResult",
    "UpsertSubscriptionResult",
    "Usage",
    "UsageExportPage",
    "UsageLine",
    "UserToken",
    "WatchUpdate",
    "error_from_rpc_error",
    "error_from_status",
    "mint_user_token",
    "new_idempotency_key",
    "plan_to_proto",
]
