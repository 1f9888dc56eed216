"""One description per RPC, shared by the sync and asyncio clients.

An ``Op`` says which stub method to call with which request, whether a retry after UNAVAILABLE
is safe, and how to turn the response into the client's Python type. The clients only run it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from quotad_contract.v1 import quotad_pb2, quotad_pb2_grpc

from . import _convert as cv
from ._errors import QuotaExceeded
from ._types import (
    Grant,
    GrantResult,
    SubscriptionPage,
    ApiKey,
    CommitResult,
    CreatedKey,
    UserToken,
    EventPage,
    Plan,
    ReleaseResult,
    Reservation,
    Subscription,
    TrackResult,
    UpsertPlanResult,
    UpsertSubscriptionResult,
    Usage,
)

T = TypeVar("T")

QUOTA = "quota"
ADMIN = "admin"
NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class Op(Generic[T]):
    service: str
    """QUOTA or ADMIN."""
    method: str
    """The RPC name, e.g. "Reserve"."""
    request: Message
    retryable: bool
    """Safe to send again after UNAVAILABLE (a read, an idempotent upsert, or a keyed mutation)."""
    convert: Callable[[Any], T]


def make_stubs(channel: Any) -> dict[str, Any]:
    """The generated stubs of both services over a ``grpc.Channel`` or ``grpc.aio.Channel``."""
    return {
        QUOTA: quotad_pb2_grpc.QuotaServiceStub(channel),  # type: ignore[no-untyped-call]
        ADMIN: quotad_pb2_grpc.AdminServiceStub(channel),  # type: ignore[no-untyped-call]
    }


def new_idempotency_key() -> str:
    """A fresh key: 32 hex characters, the milliseconds since the epoch in the first 12 (as
    a UUIDv7 begins) and 80 random bits (the server allows up to 128 bytes).

    The time first: the server files a key's row under the 12 hex digits it begins with, so
    that keys made at about the same time are written side by side (a page or two per
    transaction) rather than each to a page of its own. The random bits straight from
    os.urandom, never from a pool drawn ahead, which a fork would copy into two processes."""
    return f"{time.time_ns() // NS_PER_MS:012x}{os.urandom(10).hex()}"


def _key(given: str | None, auto: bool) -> tuple[str, bool]:
    """The idempotency key to send and whether the mutation may be retried with it.

    A key generated here is made once, before the first attempt, and sent on every retry.
    """
    if given:
        return given, True
    if auto:
        return new_idempotency_key(), True
    return "", False


def _set_metadata(field: Any, metadata: Mapping[str, str] | None) -> None:
    """Item by item: a map field's update() (and the constructor's metadata=) goes through
    MutableMapping.update in Python, several times slower for the usual one or two entries."""
    if metadata:
        for key, value in metadata.items():
            field[key] = value


def reserve(user_id: str, event_type: str, amount: int, metadata: Mapping[str, str] | None,
            ttl_s: float | timedelta | None, idempotency_key: str | None,
            auto_key: bool) -> Op[Reservation]:
    key, retryable = _key(idempotency_key, auto_key)
    request = quotad_pb2.ReserveRequest(user_id=user_id, event_type=event_type, amount=amount,
                                        idempotency_key=key)
    _set_metadata(request.metadata, metadata)
    if ttl_s is not None:
        request.ttl.CopyFrom(cv.to_duration(ttl_s))
    return Op(QUOTA, "Reserve", request, retryable,
              lambda r: cv.reservation_from_proto(r, amount))


def commit(reservation_id: str, amount: int | None, idempotency_key: str | None,
           auto_key: bool) -> Op[CommitResult]:
    key, retryable = _key(idempotency_key, auto_key)
    request = quotad_pb2.CommitRequest(reservation_id=reservation_id, idempotency_key=key)
    if amount is not None:
        request.amount = amount
    return Op(QUOTA, "Commit", request, retryable, cv.commit_from_proto)


def release(reservation_id: str, idempotency_key: str | None,
            auto_key: bool) -> Op[ReleaseResult]:
    key, retryable = _key(idempotency_key, auto_key)
    request = quotad_pb2.ReleaseRequest(reservation_id=reservation_id, idempotency_key=key)
    return Op(QUOTA, "Release", request, retryable, cv.release_from_proto)


def extend(reservation_id: str, ttl_s: float | timedelta, idempotency_key: str | None,
           auto_key: bool) -> Op[datetime]:
    key, retryable = _key(idempotency_key, auto_key)
    request = quotad_pb2.ExtendRequest(reservation_id=reservation_id, idempotency_key=key)
    request.ttl.CopyFrom(cv.to_duration(ttl_s))
    return Op(QUOTA, "Extend", request, retryable, lambda r: cv.to_datetime(r.expires_at))


def track(user_id: str, event_type: str, amount: int, metadata: Mapping[str, str] | None,
          enforce: bool, idempotency_key: str | None, auto_key: bool) -> Op[TrackResult]:
    key, retryable = _key(idempotency_key, auto_key)
    request = quotad_pb2.TrackRequest(user_id=user_id, event_type=event_type, amount=amount,
                                      enforce=enforce, idempotency_key=key)
    _set_metadata(request.metadata, metadata)
    return Op(QUOTA, "Track", request, retryable, cv.track_from_proto)


def grant_credits(user_id: str, group_key: str, amount: int, expires_at: datetime | None,
                  priority: int, idempotency_key: str | None,
                  auto_key: bool) -> Op[GrantResult]:
    key, retryable = _key(idempotency_key, auto_key)
    request = quotad_pb2.GrantCreditsRequest(user_id=user_id, group_key=group_key,
                                             amount=amount, priority=priority,
                                             idempotency_key=key)
    if expires_at is not None:
        request.expires_at.CopyFrom(cv.to_timestamp(expires_at))
    return Op(QUOTA, "GrantCredits", request, retryable, cv.grant_result_from_proto)


def list_grants(user_id: str, group_key: str) -> Op[tuple[Grant, ...]]:
    return Op(QUOTA, "ListGrants", quotad_pb2.ListGrantsRequest(user_id=user_id,
                                                                group_key=group_key),
              True, cv.grants_from_proto)


def usage(user_id: str) -> Op[Usage]:
    return Op(QUOTA, "GetUsage", quotad_pb2.GetUsageRequest(user_id=user_id), True,
              cv.usage_from_proto)


def upsert_plan(plan: cv.PlanLike) -> Op[UpsertPlanResult]:
    # Idempotent by nature: sending the same plan twice changes nothing the second time (a
    # retried upsert may then report changed=False).
    return Op(ADMIN, "UpsertPlan", quotad_pb2.UpsertPlanRequest(plan=cv.plan_to_proto(plan)),
              True, cv.upsert_plan_from_proto)


def get_plan(plan_id: str) -> Op[Plan]:
    return Op(ADMIN, "GetPlan", quotad_pb2.GetPlanRequest(id=plan_id), True,
              lambda r: cv.plan_from_proto(r.plan))


def list_plans() -> Op[list[Plan]]:
    return Op(ADMIN, "ListPlans", quotad_pb2.ListPlansRequest(), True,
              lambda r: [cv.plan_from_proto(p) for p in r.plans])


def delete_plan(plan_id: str) -> Op[None]:
    # No idempotency key in the contract, and a repeat after a lost answer would say NOT_FOUND:
    # not retried.
    return Op(ADMIN, "DeletePlan", quotad_pb2.DeletePlanRequest(id=plan_id), False,
              lambda r: None)


def subscribe(user_id: str, plan_id: str, time_zone: str,
              billing_customer_id: str | None = None) -> Op[UpsertSubscriptionResult]:
    request = quotad_pb2.UpsertSubscriptionRequest(user_id=user_id, plan_id=plan_id,
                                                   time_zone=time_zone)
    if billing_customer_id is not None:  # unset: the subscription keeps its own
        request.billing_customer_id = billing_customer_id
    return Op(ADMIN, "UpsertSubscription", request, True, cv.upsert_subscription_from_proto)


def get_subscription(user_id: str) -> Op[Subscription]:
    return Op(ADMIN, "GetSubscription", quotad_pb2.GetSubscriptionRequest(user_id=user_id), True,
              lambda r: cv.subscription_from_proto(r.subscription))


def list_subscriptions(plan_id: str, page_size: int, page_token: str) -> Op[SubscriptionPage]:
    request = quotad_pb2.ListSubscriptionsRequest(plan_id=plan_id, page_size=page_size,
                                                  page_token=page_token)
    return Op(ADMIN, "ListSubscriptions", request, True, cv.subscription_page_from_proto)


def export_usage_request(cursor: str, end: datetime | None,
                         app: str) -> quotad_pb2.ExportUsageRequest:
    request = quotad_pb2.ExportUsageRequest(app=app, cursor=cursor)
    if end is not None:
        request.end_time.CopyFrom(cv.to_timestamp(end))
    return request


def list_events(user_id: str, start: datetime | None, end: datetime | None, page_size: int,
                page_token: str) -> Op[EventPage]:
    request = quotad_pb2.ListEventsRequest(user_id=user_id, page_size=page_size,
                                           page_token=page_token)
    if start is not None:
        request.start_time.CopyFrom(cv.to_timestamp(start))
    if end is not None:
        request.end_time.CopyFrom(cv.to_timestamp(end))
    return Op(ADMIN, "ListEvents", request, True, cv.event_page_from_proto)


def create_key(kind: str, name: str, app: str) -> Op[CreatedKey]:
    # Not retried: a repeat after a lost answer would make a second key.
    request = quotad_pb2.CreateKeyRequest(app=app, kind=cv.key_kind_value(kind), name=name)
    return Op(ADMIN, "CreateKey", request, False, cv.created_key_from_proto)


def revoke_key(key_id: str) -> Op[ApiKey]:
    # Revoking a revoked key changes nothing: safe to repeat.
    return Op(ADMIN, "RevokeKey", quotad_pb2.RevokeKeyRequest(key_id=key_id), True,
              lambda r: cv.api_key_from_proto(r.key))


def list_keys(app: str) -> Op[list[ApiKey]]:
    return Op(ADMIN, "ListKeys", quotad_pb2.ListKeysRequest(app=app), True,
              lambda r: [cv.api_key_from_proto(k) for k in r.keys])


def mint_user_token(user_id: str, ttl_s: float | timedelta | None) -> Op[UserToken]:
    request = quotad_pb2.MintUserTokenRequest(user_id=user_id)
    if ttl_s is not None:
        request.ttl.CopyFrom(cv.to_duration(ttl_s))
    return Op(ADMIN, "MintUserToken", request, True, cv.user_token_from_proto)


def check_denial(result: T, *, user_id: str, event_type: str, amount: int,
                 raise_on_deny: bool) -> T:
    """Raises QuotaExceeded for a denied Reservation or TrackResult when asked to."""
    if raise_on_deny and isinstance(result, (Reservation, TrackResult)) and not result.allowed:
        raise QuotaExceeded(user_id=user_id, event_type=event_type, amount=amount, result=result)
    return result
