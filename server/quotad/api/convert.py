"""Requests (proto) to values (core) and results (core) to responses (proto): shapes only.

Every rule a request must keep is its value's own (quotad.core.commands): building the value
checks every field and names each bad one. Here a field left out becomes what the contract
says it means, and nothing is judged.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from quotad.core import commands as c
from quotad.core import limits
from quotad.core.errors import FieldViolation, InvalidArgument
from quotad.core.memo import remember
from quotad.core.plans import (
    Cost, Kind, LimitGroup, Match, MetadataMatch, Plan, RecurringGrant, Subscription, Window,
)
from quotad.storage.codec import RESERVATION_TIME_HEX_DIGITS
from quotad.storage.wal import StoredEvent
from quotad_contract.limits import SLOT_HEX_DIGITS, SLOTS
from quotad_contract.shards import ShardMap, slot_of, slot_ranges
from quotad_contract.v1 import quotad_pb2 as pb


_RESERVATION_IDS_PER_READ = 256
_RESERVATION_RANDOM_HEX_DIGITS = 24 - SLOT_HEX_DIGITS - RESERVATION_TIME_HEX_DIGITS
_random_hex: list[str] = []
NS_PER_MS = 1_000_000
_RESERVATION_TIME_MODULUS = 16**RESERVATION_TIME_HEX_DIGITS


def new_reservation_id(slot: int) -> str:
    """rsv_ and 24 hex digits: the user's slot in the first SLOT_HEX_DIGITS (so a cluster
    routes and checks a hold by its id alone), then the milliseconds since the epoch modulo
    16^9 (RESERVATION_TIME_HEX_DIGITS: the holds table files a hold under them, so that holds
    made at about the same time sit side by side), then 48 bits random from the OS's CSPRNG,
    read for 256 ids at a time (one read per id cost more than the rest of a Reserve's
    conversion)."""
    assert 0 <= slot < SLOTS, slot
    if not _random_hex:
        text = secrets.token_hex(_RESERVATION_RANDOM_HEX_DIGITS * _RESERVATION_IDS_PER_READ // 2)
        _random_hex.extend(text[at: at + _RESERVATION_RANDOM_HEX_DIGITS]
                           for at in range(0, len(text), _RESERVATION_RANDOM_HEX_DIGITS))
    made_at_ms = time.time_ns() // NS_PER_MS % _RESERVATION_TIME_MODULUS
    return f"rsv_{slot:03x}{made_at_ms:09x}{_random_hex.pop()}"


_MALFORMED_NS = -1
"""What a Duration or Timestamp whose nanos are not 0 ... 999,999,999 reads as: a negative
time or duration (malformed or negative on the wire), which no field of a request takes."""


def _ns(message: duration_pb2.Duration | timestamp_pb2.Timestamp) -> int:
    nanos = message.nanos
    if nanos < 0 or nanos >= limits.NS_PER_S:
        return _MALFORMED_NS
    return message.seconds * limits.NS_PER_S + nanos


def _metadata(entries: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A request's metadata map as (key, value) pairs sorted by key. Read key by key: upb's
    items() costs ~0.5 us even for an empty map. One entry, the usual, is sorted already:
    0.25 us against 0.88 through sorted() (timeit)."""
    if not entries:
        return ()
    if len(entries) == 1:
        (key,) = entries
        return ((key, entries[key]),)
    return tuple([(key, entries[key]) for key in sorted(entries)])


def reserve(app: str, request: pb.ReserveRequest) -> c.Reserve:
    return c.Reserve(
        app=app, user_id=request.user_id, event_type=request.event_type, amount=request.amount,
        metadata=_metadata(request.metadata),
        ttl_ns=_ns(request.ttl) if request.HasField("ttl") else limits.TTL_NS_DEFAULT,
        idempotency_key=request.idempotency_key,
        reservation_id=new_reservation_id(slot_of(app, request.user_id)))


def commit(app: str, request: pb.CommitRequest) -> c.Commit:
    amount = request.amount if request.HasField("amount") else None
    return c.Commit(app=app, reservation_id=request.reservation_id, amount=amount,
                    idempotency_key=request.idempotency_key)


def release(app: str, request: pb.ReleaseRequest) -> c.Release:
    return c.Release(app=app, reservation_id=request.reservation_id,
                     idempotency_key=request.idempotency_key)


def extend(app: str, request: pb.ExtendRequest) -> c.Extend:
    return c.Extend(app=app, reservation_id=request.reservation_id,
                    ttl_ns=_ns(request.ttl) if request.HasField("ttl") else None,
                    idempotency_key=request.idempotency_key)


def track(app: str, request: pb.TrackRequest) -> c.Track:
    return c.Track(app=app, user_id=request.user_id, event_type=request.event_type,
                   amount=request.amount, metadata=_metadata(request.metadata),
                   idempotency_key=request.idempotency_key, enforce=request.enforce)


def grant_credits(app: str, request: pb.GrantCreditsRequest) -> c.GrantCredits:
    return c.GrantCredits(
        app=app, user_id=request.user_id, group_key=request.group_key, amount=request.amount,
        expires_at_ns=_ns(request.expires_at) if request.HasField("expires_at") else None,
        priority=request.priority, idempotency_key=request.idempotency_key)


def list_grants(app: str, request: pb.ListGrantsRequest) -> c.ListGrants:
    return c.ListGrants(app=app, user_id=request.user_id, group_key=request.group_key)


def grant(view: c.GrantView) -> pb.Grant:
    message = pb.Grant(grant_id=view.grant_id, group_key=view.group_key, granted=view.amount,
                       remaining=view.remaining, priority=view.priority,
                       granted_at=timestamp(view.granted_at_ns), expired=view.expired,
                       recurring=view.recurring)
    if view.expires_at_ns is not None:
        message.expires_at.CopyFrom(timestamp(view.expires_at_ns))
    return message


def grant_credits_response(result: c.GrantResult) -> pb.GrantCreditsResponse:
    return pb.GrantCreditsResponse(grant=grant(result.grant), counter=counter(result.counter))


def list_grants_response(result: c.GrantsResult) -> pb.ListGrantsResponse:
    return pb.ListGrantsResponse(grants=[grant(view) for view in result.grants])


def get_usage(app: str, request: pb.GetUsageRequest) -> c.GetUsage:
    return c.GetUsage(app=app, user_id=request.user_id)


def list_events(app: str, request: pb.ListEventsRequest) -> c.ListEvents:
    return c.ListEvents(
        app=app, user_id=request.user_id,
        start_time_ns=_ns(request.start_time) if request.HasField("start_time") else None,
        end_time_ns=_ns(request.end_time) if request.HasField("end_time") else None,
        page_size=request.page_size, page_token=request.page_token)


def upsert_subscription(app: str, request: pb.UpsertSubscriptionRequest) -> c.UpsertSubscription:
    return c.UpsertSubscription(
        app=app, user_id=request.user_id, plan_id=request.plan_id,
        time_zone=request.time_zone or "UTC",
        billing_customer_id=(request.billing_customer_id
                             if request.HasField("billing_customer_id") else None))


def list_subscriptions(app: str, request: pb.ListSubscriptionsRequest) -> c.ListSubscriptions:
    return c.ListSubscriptions(app=app, plan_id=request.plan_id, page_size=request.page_size,
                               after_user_id=request.page_token)


def export_usage(app: str, request: pb.ExportUsageRequest) -> c.ExportUsage:
    return c.ExportUsage(
        app=app, cursor=request.cursor,
        end_time_ns=_ns(request.end_time) if request.HasField("end_time") else None)


def watch_usage(app: str, request: pb.WatchUsageRequest) -> c.WatchUsage:
    return c.WatchUsage(app=app, user_id=request.user_id,
                        after_sequence=request.after_sequence)


def mint_user_token(app: str, request: pb.MintUserTokenRequest) -> c.MintUserToken:
    ttl_ns = _ns(request.ttl) if request.HasField("ttl") else limits.USER_TOKEN_TTL_NS_DEFAULT
    return c.MintUserToken(app=app, user_id=request.user_id, ttl_ns=ttl_ns)


_KEY_KINDS = {pb.KEY_KIND_SECRET: "secret", pb.KEY_KIND_PUBLIC: "public"}
_KEY_KIND_VALUES = {kind: value for value, kind in _KEY_KINDS.items()}


def key_spec(app: str, request: pb.CreateKeyRequest) -> c.KeySpec:
    """app: the app the key is for (the caller's, or the one the admin key names)."""
    return c.KeySpec(app=app, kind=_KEY_KINDS.get(request.kind, ""), name=request.name)


def api_key(key: c.KeyView) -> pb.ApiKey:
    message = pb.ApiKey(key_id=key.key_id, app=key.app, kind=_KEY_KIND_VALUES[key.kind],
                        name=key.name, created_at=timestamp(key.created_at_ns))
    if key.revoked_at_ns is not None:
        message.revoked_at.CopyFrom(timestamp(key.revoked_at_ns))
    return message


_EVENT_KINDS = {kind: pb.EventKind.Value(f"EVENT_KIND_{kind.upper()}") for kind in c.AUDIT_KINDS}


def events_response(page: Sequence[StoredEvent], next_page_token: str) -> pb.ListEventsResponse:
    return pb.ListEventsResponse(
        events=[pb.Event(
            sequence=stored.sequence, time=timestamp(stored.now_ns),
            kind=_EVENT_KINDS[stored.event.kind], user_id=stored.event.user_id,
            event_type=stored.event.event_type, amount=stored.event.amount,
            metadata=dict(stored.event.metadata),
            reservation_id=stored.event.reservation_id, allowed=stored.event.allowed,
            limit_group_key=stored.event.limit_group_key,
            threshold_percent=stored.event.threshold_percent,
            window_start=(timestamp(stored.event.window_start_ns)
                          if stored.event.limit_group_key else None),
        ) for stored in page],
        next_page_token=next_page_token,
    )


def plan_from_proto(plan: pb.Plan) -> Plan:
    size_bytes = plan.ByteSize()  # the one rule of the wire form itself: its encoded size
    if size_bytes > limits.PLAN_BYTES_MAX:
        raise InvalidArgument([FieldViolation(
            "plan", f"at most {limits.PLAN_BYTES_MAX} bytes encoded, got {size_bytes}")])
    groups = []
    for group in plan.limit_groups:
        kind = Kind(group.kind) if group.kind in Kind._value2member_map_ else (
            Kind.QUOTA if group.kind == 0 else group.kind)  # unknown: an int the plan names
        window = group.window
        if kind in (Kind.RATE, Kind.BALANCE) and window == 0:
            window = Window.LIFETIME  # a bucket or a balance has no calendar window
        known = window in Window._value2member_map_
        groups.append(LimitGroup(  # an unknown window stays an int: the plan names it
            key=group.key, label=group.label, unit=group.unit, quota=group.quota,
            window=Window(window) if known else window,
            kind=kind, period_ns=_ns(group.period) if group.HasField("period") else 0,
            match=Match(
                event_types=tuple(group.match.event_types),
                metadata=tuple(MetadataMatch(key=m.key, values=tuple(m.values))
                               for m in group.match.metadata),
            ),
            enforce=group.enforce if group.HasField("enforce") else True,
            cost=_cost_from_proto(group.cost) if group.HasField("cost") else None,
            grant=_recurring_grant_from_proto(group.grant) if group.HasField("grant") else None,
        ))
    return Plan(id=plan.id, name=plan.name, limit_groups=tuple(groups))


def _recurring_grant_from_proto(grant: pb.RecurringGrant) -> RecurringGrant:
    known = grant.every in Window._value2member_map_
    return RecurringGrant(amount=grant.amount,
                          every=Window(grant.every) if known else grant.every,
                          rollover_max=grant.rollover_max, priority=grant.priority)


def _cost_from_proto(cost: pb.Cost) -> Cost:
    return Cost(by=cost.by, rates=tuple(sorted(cost.rates.items())),
                default_rate=cost.default_rate if cost.HasField("default_rate") else None)


def _group_to_proto(group: LimitGroup) -> pb.LimitGroup:
    message = pb.LimitGroup(
        key=group.key, label=group.label, unit=group.unit, quota=group.quota,
        window=int(group.window),
        match=pb.Match(event_types=group.match.event_types, metadata=[
            pb.MetadataMatch(key=m.key, values=m.values) for m in group.match.metadata
        ]),
    )
    if not group.enforce:  # a hard limit leaves it unset, as a plan written without it does
        message.enforce = False
    if group.kind is not Kind.QUOTA:
        message.kind = int(group.kind)
    if group.kind is Kind.RATE:
        message.period.seconds, message.period.nanos = divmod(group.period_ns, limits.NS_PER_S)
    if group.grant is not None:
        message.grant.amount, message.grant.every = group.grant.amount, int(group.grant.every)
        message.grant.rollover_max = group.grant.rollover_max
        message.grant.priority = group.grant.priority
    if group.cost is not None:
        message.cost.by = group.cost.by
        message.cost.rates.update(group.cost.rates)
        if group.cost.default_rate is not None:
            message.cost.default_rate = group.cost.default_rate
    return message


def plan_to_proto(plan: Plan) -> pb.Plan:
    return pb.Plan(id=plan.id, name=plan.name,
                   limit_groups=[_group_to_proto(g) for g in plan.limit_groups])


def upsert_plan(app: str, request: pb.UpsertPlanRequest) -> c.UpsertPlan:
    plan = plan_from_proto(request.plan) if request.HasField("plan") else None
    return c.UpsertPlan(app=app, plan=plan)  # type: ignore[arg-type]  # None: refused


def subscription_to_proto(subscription: Subscription) -> pb.Subscription:
    return pb.Subscription(user_id=subscription.user_id, plan_id=subscription.plan_id,
                           time_zone=subscription.time_zone,
                           billing_customer_id=subscription.billing_customer_id)


def timestamp(at_ns: int) -> timestamp_pb2.Timestamp:
    seconds, nanos = divmod(at_ns, limits.NS_PER_S)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def counter(view: c.CounterView) -> pb.Counter:
    message = pb.Counter()
    _fill_counter(message, view)
    return message


def counters(views: tuple[c.CounterView, ...]) -> list[pb.Counter]:
    return [counter(view) for view in views]


def reserve_response(result: c.ReserveResult) -> pb.ReserveResponse:
    response = pb.ReserveResponse()
    fill_reserve_response(response, result)
    return response


# Responses are filled in place, field by field: on the hot path that is about twice as fast
# as building messages from keyword arguments, which copies every sub-message (and a Batch
# would copy each response once more into its result).

def _fill_timestamp(message: timestamp_pb2.Timestamp, at_ns: int) -> None:
    message.seconds, message.nanos = divmod(at_ns, limits.NS_PER_S)


_counter_heads: dict[tuple[object, ...], bytes] = {}
"""A quota counter's unchanging part (see _counter_head) -> its encoded Counter fields."""


def _fill_counter(message: pb.Counter, view: c.CounterView) -> None:
    """A quota counter's unchanging part is copied in as the bytes it encodes to, remembered
    (one merge instead of eight fields and two timestamps: ~0.45 us less per counter); its
    usage set field by field."""
    if view.kind is not Kind.QUOTA:
        _fill_counter_fields(message, view)
        return
    head = (view.key, view.label, view.unit, view.window, view.quota, view.window_start_ns,
            view.resets_at_ns)
    encoded = _counter_heads.get(head)
    if encoded is None:
        encoded = _counter_head(view)
        remember(_counter_heads, head, encoded, limits.COUNTER_HEADS_REMEMBERED_MAX)
    message.MergeFromString(encoded)
    message.used = view.used
    message.held = view.held
    message.remaining = view.remaining
    message.overage = view.overage


_COUNTER_USAGE_FIELDS = ("used", "held", "remaining", "overage")


def _counter_head(view: c.CounterView) -> bytes:
    """The encoded fields of a quota counter that only its plan and window change: all but
    its usage."""
    message = pb.Counter()
    _fill_counter_fields(message, view)
    for name in _COUNTER_USAGE_FIELDS:
        message.ClearField(name)
    return message.SerializeToString()


def _fill_counter_fields(message: pb.Counter, view: c.CounterView) -> None:
    """Any counter, field by field."""
    message.key = view.key
    message.label = view.label
    message.unit = view.unit
    message.quota = view.quota
    message.used = view.used
    message.held = view.held
    message.remaining = view.remaining
    message.overage = view.overage
    message.window = view.window
    _fill_timestamp(message.window_start, view.window_start_ns)
    if view.resets_at_ns is not None:
        _fill_timestamp(message.resets_at, view.resets_at_ns)
    if view.kind is not Kind.QUOTA:
        message.kind = view.kind
        if view.full_at_ns is not None:
            _fill_timestamp(message.full_at, view.full_at_ns)


def _fill_counters(repeated, views: tuple[c.CounterView, ...]) -> None:
    for view in views:
        _fill_counter(repeated.add(), view)


def fill_reserve_response(message: pb.ReserveResponse, result: c.ReserveResult) -> None:
    message.allowed = result.allowed
    message.reservation_id = result.reservation_id
    message.denied_by = result.denied_by
    _fill_counters(message.counters, result.counters)
    if result.allowed:
        _fill_timestamp(message.expires_at, result.expires_at_ns)
    elif result.fits_at_ns is not None:
        _fill_timestamp(message.fits_at, result.fits_at_ns)


def fill_commit_response(message: pb.CommitResponse, result: c.CommitResult) -> None:
    _fill_counters(message.counters, result.counters)
    message.committed = result.committed
    message.returned = result.returned
    message.expired = result.expired


def fill_release_response(message: pb.ReleaseResponse, result: c.ReleaseResult) -> None:
    _fill_counters(message.counters, result.counters)


def fill_extend_response(message: pb.ExtendResponse, result: c.ExtendResult) -> None:
    _fill_timestamp(message.expires_at, result.expires_at_ns)


def fill_track_response(message: pb.TrackResponse, result: c.TrackResult) -> None:
    message.allowed = result.allowed
    _fill_counters(message.counters, result.counters)
    message.denied_by = result.denied_by
    if result.fits_at_ns is not None:
        _fill_timestamp(message.fits_at, result.fits_at_ns)


def fill_usage_response(message: pb.GetUsageResponse, result: c.UsageResult) -> None:
    message.user_id = result.user_id
    message.plan_id = result.plan_id
    _fill_counters(message.counters, result.counters)


def shard_map_response(shard_map: ShardMap, shard_id: int, app: str) -> pb.GetShardMapResponse:
    return pb.GetShardMapResponse(
        shards=[pb.Shard(shard_id=shard.shard_id, address=shard.address,
                         slots=[pb.SlotRange(first=first, last=last)
                                for first, last in slot_ranges(shard.slots)])
                for shard in shard_map.shards],
        shard_id=shard_id, app=app)
