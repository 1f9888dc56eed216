"""Real protobuf messages with every field at its limit, and plans of an exact encoded size."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from quotad_contract import limits
from quotad_contract.v1 import quotad_pb2 as pb


def text(byte_count: int, fill: str = "x", tail: str = "") -> str:
    """A string of exactly byte_count UTF-8 bytes ending in tail (to keep keys distinct)."""
    return fill * (byte_count - len(tail.encode())) + tail


def metadata_at_every_limit() -> dict[str, str]:
    return {text(limits.METADATA_KEY_BYTES_MAX, "k", f"{i:03d}"):
            text(limits.METADATA_VALUE_BYTES_MAX, "v")
            for i in range(limits.METADATA_ENTRIES_MAX)}


def reserve_at_every_limit() -> pb.ReserveRequest:
    return pb.ReserveRequest(
        user_id=text(limits.USER_ID_BYTES_MAX, "u"),
        event_type=text(limits.EVENT_TYPE_BYTES_MAX, "e"), amount=limits.AMOUNT_MAX,
        metadata=metadata_at_every_limit(),
        # the longest Duration within the limit: 3599 s and 999,999,999 ns
        ttl=Duration(seconds=limits.TTL_NS_MAX // limits.NS_PER_S - 1,
                     nanos=limits.NS_PER_S - 1),
        idempotency_key=text(limits.IDEMPOTENCY_KEY_BYTES_MAX, "i"))


def track_at_every_limit() -> pb.TrackRequest:
    return pb.TrackRequest(
        user_id=text(limits.USER_ID_BYTES_MAX, "u"),
        event_type=text(limits.EVENT_TYPE_BYTES_MAX, "e"), amount=-limits.AMOUNT_MAX,
        metadata=metadata_at_every_limit(),
        idempotency_key=text(limits.IDEMPOTENCY_KEY_BYTES_MAX, "i"), enforce=True)


def group_at_every_limit(key_tail: str = "", quota: int = limits.QUOTA_MAX) -> pb.LimitGroup:
    return pb.LimitGroup(
        key=text(limits.GROUP_KEY_BYTES_MAX, "g", key_tail),
        label=text(limits.GROUP_LABEL_BYTES_MAX, "L"),
        unit=text(limits.GROUP_UNIT_BYTES_MAX, "u"), quota=quota,
        window=pb.LIFETIME,
        match=pb.Match(
            event_types=[text(limits.EVENT_TYPE_BYTES_MAX, "e", f".{i:02d}")
                         for i in range(limits.EVENT_TYPE_PATTERNS_PER_GROUP_MAX)],
            metadata=[pb.MetadataMatch(
                key=text(limits.METADATA_KEY_BYTES_MAX, "k", f"{i:02d}"),
                values=[text(limits.METADATA_VALUE_BYTES_MAX, "v", f"{j:03d}")
                        for j in range(limits.METADATA_MATCH_VALUES_MAX)])
                for i in range(limits.METADATA_MATCHES_PER_GROUP_MAX)]),
        enforce=False,  # set is the longer: unset is the default, true
        kind=pb.LIMIT_KIND_RATE,  # a bucket, with the longest period within the limit
        period=Duration(seconds=limits.RATE_PERIOD_NS_MAX // limits.NS_PER_S - 1,
                        nanos=limits.NS_PER_S - 1),
        cost=pb.Cost(by=text(limits.METADATA_KEY_BYTES_MAX, "k"),
                     rates={text(limits.METADATA_VALUE_BYTES_MAX, "r", f"{i:03d}"):
                            limits.COST_RATE_MAX
                            for i in range(limits.COST_RATES_PER_GROUP_MAX)},
                     default_rate=limits.COST_RATE_MAX))


def plan_at_every_limit() -> pb.Plan:
    """Every field at its limit: far past PLAN_BYTES_MAX."""
    return pb.Plan(id=text(limits.PLAN_ID_BYTES_MAX, "p"),
                   name=text(limits.PLAN_NAME_BYTES_MAX, "n"),
                   limit_groups=[group_at_every_limit(f"{i:02d}")
                                 for i in range(limits.LIMIT_GROUPS_PER_PLAN_MAX)])


def plan_for_scale() -> pb.Plan:
    """A large real plan (limits.PLAN_BYTES_MAX's docstring): 32 groups, each with a 32-byte
    key and unit, a 64-byte label, 8 event-type patterns of 32 bytes and 16 model names of
    40 bytes."""
    return pb.Plan(id="scale", name="Scale", limit_groups=[pb.LimitGroup(
        key=text(32, "g", f"{group:02d}"), label=text(64, "L"), unit=text(32, "u"),
        quota=limits.QUOTA_MAX, window=pb.MONTH,
        match=pb.Match(event_types=[text(32, "e", f"{i:02d}") for i in range(8)],
                       metadata=[pb.MetadataMatch(key="model", values=[
                           text(40, "m", f"{j:02d}") for j in range(16)])]))
        for group in range(32)])


def plan_of_bytes(size_bytes: int, plan_id: str = "sized",
                  first_quota: int = limits.QUOTA_MAX) -> pb.Plan:
    """A plan of exactly size_bytes encoded: one group at every limit (of first_quota: valid
    unless told otherwise), then groups of event-type patterns, the last one's patterns, label
    and unit cut to land on the size."""
    plan = pb.Plan(id=plan_id, name=text(limits.PLAN_NAME_BYTES_MAX, "n"),
                   limit_groups=[group_at_every_limit(quota=first_quota)])
    while True:
        filler = plan.limit_groups.add(
            key=f"f{len(plan.limit_groups)}", quota=1, window=pb.DAY,
            match=pb.Match(event_types=[text(limits.EVENT_TYPE_BYTES_MAX, "e", f".{i:02d}")
                                        for i in range(limits.EVENT_TYPE_PATTERNS_PER_GROUP_MAX)]))
        if plan.ByteSize() >= size_bytes:
            break
    for patterns in range(len(filler.match.event_types), -1, -1):
        del filler.match.event_types[patterns:]
        for label_bytes in range(limits.GROUP_LABEL_BYTES_MAX, -1, -1):
            for unit_bytes in range(3):  # steps over a length that crosses a varint byte
                filler.label, filler.unit = "L" * label_bytes, "u" * unit_bytes
                if plan.ByteSize() == size_bytes:
                    assert len(plan.limit_groups) <= limits.LIMIT_GROUPS_PER_PLAN_MAX
                    return plan
    raise AssertionError(f"no plan of exactly {size_bytes} bytes this way")
