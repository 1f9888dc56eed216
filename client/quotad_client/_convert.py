"""Conversions between the generated protobuf messages and the client's Python types."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, Union, cast

from google.protobuf import duration_pb2, timestamp_pb2

from quotad_contract.v1 import quotad_pb2

from ._types import (
    WINDOWS,
    ApiKey,
    CreatedKey,
    UserToken,
    CommitResult,
    Counter,
    Event,
    EventPage,
    LimitGroup,
    Match,
    Plan,
    ReleaseResult,
    Reservation,
    Subscription,
    ThresholdCrossed,
    TrackResult,
    UpsertPlanResult,
    UpsertSubscriptionResult,
    WatchUpdate,
    Usage,
)

PlanLike = Union[Mapping[str, Any], Plan, quotad_pb2.Plan]
"""What ``upsert_plan`` accepts: a dict (as in plans.toml), a ``Plan``, or a proto ``Plan``."""

_PLAN_KEYS = frozenset({"id", "name", "limit_groups"})
_GROUP_KEYS = frozenset({"key", "label", "unit", "quota", "window", "match"})
_MATCH_KEYS = frozenset({"event_types", "metadata"})


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
_EVENT_KIND_NAMES = _enum_names(quotad_pb2.EventKind, "EVENT_KIND_")
_WATCH_REASON_NAMES = _enum_names(quotad_pb2.WatchReason, "WATCH_REASON_")


def window_name(value: int) -> str:
    """The lower-case name of a proto Window ("unspecified" for 0 or an unknown value)."""
    return _WINDOW_NAMES.get(value, "unspecified")


def window_value(window: str | int) -> quotad_pb2.Window:
    """A window name ("month", case-insensitive) or proto enum value, as the proto enum."""
    if isinstance(window, bool):
        raise TypeError(f"window must be a name such as 'month', got {window!r}")
    if isinstance(window, int):
        if window not in quotad_pb2.Window.values():
            raise ValueError(f"unknown window value {window}")
        return cast(quotad_pb2.Window, window)
    if isinstance(window, str) and window.lower() in WINDOWS:
        return cast(quotad_pb2.Window, quotad_pb2.Window.Value(window.upper()))
    raise ValueError(f"unknown window {window!r}; expected one of {', '.join(WINDOWS)}")


# --- plans: Python -> proto ------------------------------------------------------------------

def _check_keys(given: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"expected some of {', '.join(sorted(allowed))}")


def _strings(value: str | Iterable[str], where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = list(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{where}: expected strings, got {item!r}")
    return items


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected an int, got {value!r}")
    return value


def _match_to_proto(match: Match | Mapping[str, Any], where: str) -> quotad_pb2.Match:
    if isinstance(match, Match):
        event_types: Any = match.event_types
        metadata: Any = match.metadata
    else:
        _check_keys(match, _MATCH_KEYS, where)
        event_types = match.get("event_types", ())
        metadata = match.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{where}.metadata: expected a mapping of key -> values, got {metadata!r}")
    return quotad_pb2.Match(
        event_types=_strings(event_types, f"{where}.event_types"),
        metadata=[quotad_pb2.MetadataMatch(key=key, values=_strings(values, f"{where}.{key}"))
                  for key, values in metadata.items()],
    )


def _group_to_proto(group: LimitGroup | Mapping[str, Any], where: str) -> quotad_pb2.LimitGroup:
    if isinstance(group, LimitGroup):
        group = {"key": group.key, "label": group.label, "unit": group.unit,
                 "quota": group.quota, "window": group.window, "match": group.match}
    elif not isinstance(group, Mapping):
        raise TypeError(f"{where}: expected a mapping or LimitGroup, got {group!r}")
    _check_keys(group, _GROUP_KEYS, where)
    proto = quotad_pb2.LimitGroup(
        key=group.get("key", ""), label=group.get("label", ""), unit=group.get("unit", ""),
        quota=_int(group.get("quota", 0), f"{where}.quota"))
    if "window" in group:
        proto.window = window_value(group["window"])
    if "match" in group:
        proto.match.CopyFrom(_match_to_proto(group["match"], f"{where}.match"))
    return proto


def plan_to_proto(plan: PlanLike) -> quotad_pb2.Plan:
    """A plan dict, ``Plan`` or proto ``Plan`` as a (new) proto ``Plan``.

    Unknown keys and unknown window names raise ValueError; wrong types raise TypeError.
    Limits (empty ids, quotas below 0...) are the server's to check.
    """
    if isinstance(plan, quotad_pb2.Plan):
        copy = quotad_pb2.Plan()
        copy.CopyFrom(plan)
        return copy
    if isinstance(plan, Plan):
        plan = {"id": plan.id, "name": plan.name, "limit_groups": plan.limit_groups}
    elif not isinstance(plan, Mapping):
        raise TypeError(f"plan: expected a mapping, Plan or quotad_pb2.Plan, got {plan!r}")
    _check_keys(plan, _PLAN_KEYS, "plan")
    groups = plan.get("limit_groups", ())
    if isinstance(groups, (str, Mapping)):
        raise TypeError("plan.limit_groups: expected a list of limit groups")
    return quotad_pb2.Plan(
        id=plan.get("id", ""), name=plan.get("name", ""),
        limit_groups=[_group_to_proto(g, f"plan.limit_groups[{i}]")
                      for i, g in enumerate(groups)])


# --- proto -> Python -------------------------------------------------------------------------

def counter_from_proto(c: quotad_pb2.Counter) -> Counter:
    return Counter(
        key=c.key, label=c.label, unit=c.unit, window=window_name(c.window), quota=c.quota,
        used=c.used, held=c.held, remaining=c.remaining, window_start=to_datetime(c.window_start),
        resets_at=to_datetime(c.resets_at) if c.HasField("resets_at") else None)


def counters_from_proto(counters: Sequence[quotad_pb2.Counter]) -> tuple[Counter, ...]:
    return tuple(counter_from_proto(c) for c in counters)


def reservation_from_proto(r: quotad_pb2.ReserveResponse, amount: int) -> Reservation:
    return Reservation(
        allowed=r.allowed, reservation_id=r.reservation_id,
        expires_at=to_datetime(r.expires_at) if r.HasField("expires_at") else None,
        counters=counters_from_proto(r.counters), denied_by=r.denied_by, amount=amount)


def commit_from_proto(r: quotad_pb2.CommitResponse) -> CommitResult:
    return CommitResult(counters=counters_from_proto(r.counters), committed=r.committed,
                        returned=r.returned, expired=r.expired)


def release_from_proto(r: quotad_pb2.ReleaseResponse) -> ReleaseResult:
    return ReleaseResult(counters=counters_from_proto(r.counters))


def track_from_proto(r: quotad_pb2.TrackResponse) -> TrackResult:
    return TrackResult(allowed=r.allowed, counters=counters_from_proto(r.counters),
                       denied_by=r.denied_by)


def usage_from_proto(r: quotad_pb2.GetUsageResponse) -> Usage:
    return Usage(user_id=r.user_id, plan_id=r.plan_id, counters=counters_from_proto(r.counters))


def plan_from_proto(p: quotad_pb2.Plan) -> Plan:
    return Plan(id=p.id, name=p.name, limit_groups=tuple(
        LimitGroup(key=g.key, label=g.label, unit=g.unit, quota=g.quota,
                   window=window_name(g.window),
                   match=Match(event_types=tuple(g.match.event_types),
                               metadata=MappingProxyType({m.key: tuple(m.values)
                                                          for m in g.match.metadata})))
        for g in p.limit_groups))


def upsert_plan_from_proto(r: quotad_pb2.UpsertPlanResponse) -> UpsertPlanResult:
    return UpsertPlanResult(plan=plan_from_proto(r.plan), changed=r.changed)


def subscription_from_proto(s: quotad_pb2.Subscription) -> Subscription:
    return Subscription(user_id=s.user_id, plan_id=s.plan_id, time_zone=s.time_zone)


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
