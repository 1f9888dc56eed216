"""Conversions between the generated protobuf messages and the client's Python types."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Union

from google.protobuf import duration_pb2, timestamp_pb2

from quotad_contract.plans import plan_from_dict
from quotad_contract.v1 import quotad_pb2

from ._types import (
    Grant,
    GrantResult,
    RecurringGrant,
    ApiKey,
    CreatedKey,
    UserToken,
    CommitResult,
    Cost,
    Counter,
    Event,
    EventPage,
    LimitGroup,
    Match,
    Plan,
    ReleaseResult,
    Reservation,
    Subscription,
    SubscriptionPage,
    ThresholdCrossed,
    TrackResult,
    UpsertPlanResult,
    UpsertSubscriptionResult,
    UsageExportPage,
    UsageLine,
    WatchUpdate,
    Usage,
)

PlanLike = Union[Mapping[str, Any], Plan, quotad_pb2.Plan]
"""What ``upsert_plan`` accepts: a dict (as in plans.toml), a ``Plan``, or a proto ``Plan``."""

# --- times -----------------------------------------------------------------------------------

_EPOCH = datetime.fromtimestamp(0, timezone.utc)


def to_datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp as an aware UTC datetime."""
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def to_timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    if when.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when.astimezone(timezone.utc))
    return ts


def to_duration(seconds: float | timedelta) -> duration_pb2.Duration:
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"ttl must be seconds (int or float) or a timedelta, got {seconds!r}")
    duration = duration_pb2.Duration()
    whole = int(seconds)
    duration.seconds = whole
    duration.nanos = round((seconds - whole) * 1e9)
    return duration


# --- windows ---------------------------------------------------------------------------------

def _enum_names(enum: Any, prefix: str) -> dict[int, str]:
    """value -> lower-case name without prefix, for every value but UNSPECIFIED (0)."""
    return {value: name.removeprefix(prefix).lower() for name, value in enum.items() if value}


_WINDOW_NAMES = _enum_names(quotad_pb2.Window, "")
_KIND_NAMES = _enum_names(quotad_pb2.LimitKind, "LIMIT_KIND_")
_EVENT_KIND_NAMES = _enum_names(quotad_pb2.EventKind, "EVENT_KIND_")
_WATCH_REASON_NAMES = _enum_names(quotad_pb2.WatchReason, "WATCH_REASON_")


def kind_name(value: int) -> str:
    """The lower-case name of a proto LimitKind: "quota" for unset, "rate", else "unknown"."""
    return "quota" if value == 0 else _KIND_NAMES.get(value, "unknown")


def window_name(value: int) -> str:
    """The lower-case name of a proto Window ("unspecified" for 0 or an unknown value)."""
    return _WINDOW_NAMES.get(value, "unspecified")


# --- plans: Python -> proto ------------------------------------------------------------------

def _plan_as_data(plan: Mapping[str, Any] | Plan) -> Mapping[str, Any]:
    """A Plan, or a dict holding LimitGroup or Match values, as plain data for the parser."""
    if isinstance(plan, Plan):
        plan = {"id": plan.id, "name": plan.name, "limit_groups": plan.limit_groups}
    groups = plan.get("limit_groups")
    if not isinstance(groups, (list, tuple)):
        return plan
    return {**plan, "limit_groups": [_group_as_data(group) for group in groups]}


def _group_as_data(group: Any) -> Any:
    if isinstance(group, LimitGroup):
        group = {"key": group.key, "label": group.label, "unit": group.unit,
                 "quota": group.quota, "window": group.window, "match": group.match,
                 "enforce": group.enforce,
                 **({"cost": group.cost} if group.cost is not None else {}),
                 **({"kind": group.kind} if group.kind != "quota" else {}),
                 **({"period_s": group.period_s} if group.period_s is not None else {}),
                 **({"grant": group.grant} if group.grant is not None else {})}
    if isinstance(group, Mapping) and isinstance(group.get("match"), Match):
        match = group["match"]
        group = {**group, "match": {"event_types": match.event_types,
                                    "metadata": match.metadata}}
    if isinstance(group, Mapping) and isinstance(group.get("grant"), RecurringGrant):
        recurring = group["grant"]
        group = {**group, "grant": {"amount": recurring.amount, "every": recurring.every,
                                    "rollover_max": recurring.rollover_max,
                                    "priority": recurring.priority}}
    if isinstance(group, Mapping) and isinstance(group.get("cost"), Cost):
        cost = group["cost"]
        group = {**group, "cost": {"by": cost.by, "rates": dict(cost.rates), **(
            {"default": cost.default_rate} if cost.default_rate is not None else {})}}
    return group


def plan_to_proto(plan: PlanLike) -> quotad_pb2.Plan:
    """A plan dict (as in plans.toml), ``Plan`` or proto ``Plan`` as a (new) proto ``Plan``.

    Read by the contract's parser, the one behind ``quotad serve --plans`` and ``quotactl``:
    unknown keys (named with their path) and unknown windows raise ValueError, wrong types
    TypeError. Limits (empty ids, quotas below 0...) are the server's to check.
    """
    if isinstance(plan, quotad_pb2.Plan):
        copy = quotad_pb2.Plan()
        copy.CopyFrom(plan)
        return copy
    if not isinstance(plan, (Mapping, Plan)):
        raise TypeError(f"plan: expected a mapping, Plan or quotad_pb2.Plan, got {plan!r}")
    return plan_from_dict(_plan_as_data(plan))


# --- proto -> Python -------------------------------------------------------------------------

def counter_from_proto(c: quotad_pb2.Counter) -> Counter:
    return Counter(
        key=c.key, label=c.label, unit=c.unit, window=window_name(c.window), quota=c.quota,
        used=c.used, held=c.held, remaining=c.remaining, window_start=to_datetime(c.window_start),
        resets_at=to_datetime(c.resets_at) if c.HasField("resets_at") else None,
        overage=c.overage, kind=kind_name(c.kind),
        full_at=to_datetime(c.full_at) if c.HasField("full_at") else None)


def counters_from_proto(counters: Sequence[quotad_pb2.Counter]) -> tuple[Counter, ...]:
    return tuple(counter_from_proto(c) for c in counters)


def reservation_from_proto(r: quotad_pb2.ReserveResponse, amount: int) -> Reservation:
    return Reservation(
        allowed=r.allowed, reservation_id=r.reservation_id,
        expires_at=to_datetime(r.expires_at) if r.HasField("expires_at") else None,
        counters=counters_from_proto(r.counters), denied_by=r.denied_by, amount=amount,
        fits_at=to_datetime(r.fits_at) if r.HasField("fits_at") else None)


def commit_from_proto(r: quotad_pb2.CommitResponse) -> CommitResult:
    return CommitResult(counters=counters_from_proto(r.counters), committed=r.committed,
                        returned=r.returned, expired=r.expired)


def release_from_proto(r: quotad_pb2.ReleaseResponse) -> ReleaseResult:
    return ReleaseResult(counters=counters_from_proto(r.counters))


def track_from_proto(r: quotad_pb2.TrackResponse) -> TrackResult:
    return TrackResult(allowed=r.allowed, counters=counters_from_proto(r.counters),
                       denied_by=r.denied_by,
                       fits_at=to_datetime(r.fits_at) if r.HasField("fits_at") else None)


def usage_from_proto(r: quotad_pb2.GetUsageResponse) -> Usage:
    return Usage(user_id=r.user_id, plan_id=r.plan_id, counters=counters_from_proto(r.counters))


def cost_from_proto(c: quotad_pb2.Cost) -> Cost:
    return Cost(by=c.by, rates=MappingProxyType(dict(sorted(c.rates.items()))),
                default_rate=c.default_rate if c.HasField("default_rate") else None)


def plan_from_proto(p: quotad_pb2.Plan) -> Plan:
    return Plan(id=p.id, name=p.name, limit_groups=tuple(
        LimitGroup(key=g.key, label=g.label, unit=g.unit, quota=g.quota,
                   window=window_name(g.window),
                   match=Match(event_types=tuple(g.match.event_types),
                               metadata=MappingProxyType({m.key: tuple(m.values)
                                                          for m in g.match.metadata})),
                   enforce=g.enforce if g.HasField("enforce") else True,
                   cost=cost_from_proto(g.cost) if g.HasField("cost") else None,
                   kind=kind_name(g.kind),
                   period_s=g.period.seconds if g.HasField("period") else None,
                   grant=RecurringGrant(amount=g.grant.amount, every=window_name(g.grant.every),
                                        rollover_max=g.grant.rollover_max,
                                        priority=g.grant.priority)
                   if g.HasField("grant") else None)
        for g in p.limit_groups))


def grant_from_proto(g: quotad_pb2.Grant) -> Grant:
    return Grant(grant_id=g.grant_id, group_key=g.group_key, granted=g.granted,
                 remaining=g.remaining, granted_at=to_datetime(g.granted_at),
                 expires_at=to_datetime(g.expires_at) if g.HasField("expires_at") else None,
                 priority=g.priority, expired=g.expired, recurring=g.recurring)


def grant_result_from_proto(r: quotad_pb2.GrantCreditsResponse) -> GrantResult:
    return GrantResult(grant=grant_from_proto(r.grant), counter=counter_from_proto(r.counter))


def grants_from_proto(r: quotad_pb2.ListGrantsResponse) -> tuple[Grant, ...]:
    return tuple(grant_from_proto(g) for g in r.grants)


def upsert_plan_from_proto(r: quotad_pb2.UpsertPlanResponse) -> UpsertPlanResult:
    return UpsertPlanResult(plan=plan_from_proto(r.plan), changed=r.changed)


def subscription_from_proto(s: quotad_pb2.Subscription) -> Subscription:
    return Subscription(user_id=s.user_id, plan_id=s.plan_id, time_zone=s.time_zone,
                        billing_customer_id=s.billing_customer_id)


def subscription_page_from_proto(r: quotad_pb2.ListSubscriptionsResponse) -> SubscriptionPage:
    return SubscriptionPage(subscriptions=tuple(subscription_from_proto(s)
                                                for s in r.subscriptions),
                            next_page_token=r.next_page_token)


def usage_export_page_from_proto(r: quotad_pb2.ExportUsageResponse) -> UsageExportPage:
    return UsageExportPage(lines=tuple(UsageLine(
        id=line.id, sequence=line.sequence, index=line.index, time=to_datetime(line.time),
        kind=event_kind_name(line.kind), user_id=line.user_id,
        billing_customer_id=line.billing_customer_id, event_type=line.event_type,
        amount=line.amount, metadata=MappingProxyType(dict(line.metadata)),
        reservation_id=line.reservation_id, shard_id=line.shard_id) for line in r.lines),
        next_cursor=r.next_cursor)


def upsert_subscription_from_proto(
        r: quotad_pb2.UpsertSubscriptionResponse) -> UpsertSubscriptionResult:
    return UpsertSubscriptionResult(subscription=subscription_from_proto(r.subscription),
                                    changed=r.changed)


def event_kind_name(value: int) -> str:
    return _EVENT_KIND_NAMES.get(value, "unspecified")


def event_from_proto(e: quotad_pb2.Event) -> Event:
    return Event(sequence=e.sequence, time=to_datetime(e.time), kind=event_kind_name(e.kind),
                 user_id=e.user_id, event_type=e.event_type, amount=e.amount,
                 metadata=MappingProxyType(dict(e.metadata)), reservation_id=e.reservation_id,
                 allowed=e.allowed, limit_group_key=e.limit_group_key,
                 threshold_percent=e.threshold_percent,
                 window_start=to_datetime(e.window_start) if e.HasField("window_start")
                 else None)


def watch_reason_name(value: int) -> str:
    return _WATCH_REASON_NAMES.get(value, "unspecified")


def watch_update_from_proto(r: quotad_pb2.WatchUsageResponse) -> WatchUpdate:
    return WatchUpdate(
        reason=watch_reason_name(r.reason), sequence=r.sequence, user_id=r.user_id,
        plan_id=r.plan_id, counters=counters_from_proto(r.counters),
        thresholds=tuple(ThresholdCrossed(
            limit_group_key=t.limit_group_key, percent=t.percent,
            window_start=to_datetime(t.window_start), sequence=t.sequence)
            for t in r.thresholds))


def event_page_from_proto(r: quotad_pb2.ListEventsResponse) -> EventPage:
    return EventPage(events=tuple(event_from_proto(e) for e in r.events),
                     next_page_token=r.next_page_token)


KEY_KINDS = {"secret": quotad_pb2.KEY_KIND_SECRET, "public": quotad_pb2.KEY_KIND_PUBLIC}
_KEY_KIND_NAMES = {value: name for name, value in KEY_KINDS.items()}


def key_kind_value(kind: str) -> quotad_pb2.KeyKind:
    if kind not in KEY_KINDS:
        raise ValueError(f"key kind must be 'secret' or 'public', got {kind!r}")
    return KEY_KINDS[kind]


def api_key_from_proto(k: quotad_pb2.ApiKey) -> ApiKey:
    return ApiKey(key_id=k.key_id, app=k.app, kind=_KEY_KIND_NAMES.get(k.kind, "unspecified"),
                  name=k.name, created_at=to_datetime(k.created_at),
                  revoked_at=to_datetime(k.revoked_at) if k.HasField("revoked_at") else None)


def created_key_from_proto(r: quotad_pb2.CreateKeyResponse) -> CreatedKey:
    return CreatedKey(key=api_key_from_proto(r.key), secret=r.secret)


def user_token_from_proto(r: quotad_pb2.MintUserTokenResponse) -> UserToken:
    return UserToken(token=r.token, expires_at=to_datetime(r.expires_at))
