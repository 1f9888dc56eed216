"""ListEvents: the audit trail, paged, by user and time range, from the real server."""

from __future__ import annotations

import time

import grpc
import pytest

from quotad_contract.v1 import quotad_pb2 as pb
from test_server_e2e import admin, plan_with, quota, subscribe

KIND = pb.EventKind.Name


def _all_events(address: str, user_id: str, page_size: int, **query) -> list[pb.Event]:
    events, token = [], ""
    for _ in range(1000):  # bounded: never more pages than this
        page = admin(address).ListEvents(pb.ListEventsRequest(
            user_id=user_id, page_size=page_size, page_token=token, **query))
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events
    raise AssertionError("ListEvents never ended")


def test_every_change_of_a_user_is_in_the_audit_trail_in_order_and_pages(server):
    subscribe(server.address, "u1", plan_with(100))
    subscribe(server.address, "u2", plan_with(100))
    stub = quota(server.address)
    kept = stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="chat", amount=30,
                                          metadata={"model": "gpt-4o"}))
    stub.Extend(pb.ExtendRequest(reservation_id=kept.reservation_id, ttl={"seconds": 120}))
    stub.Commit(pb.CommitRequest(reservation_id=kept.reservation_id, amount=25))
    dropped = stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="chat", amount=10))
    stub.Release(pb.ReleaseRequest(reservation_id=dropped.reservation_id))
    stub.Track(pb.TrackRequest(user_id="u1", event_type="image", amount=4, enforce=True))
    stub.Track(pb.TrackRequest(user_id="u1", event_type="image", amount=500, enforce=True,
                               idempotency_key="denied-once"))  # denied, kept by its key
    stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="chat", amount=1,
                                   ttl={"seconds": 1}))
    stub.Track(pb.TrackRequest(user_id="u2", event_type="image", amount=9))
    time.sleep(1.2)
    quota(server.address).GetUsage(pb.GetUsageRequest(user_id="u1"))  # expires the last hold

    events = _all_events(server.address, "u1", page_size=2)
    assert [(KIND(e.kind), e.amount, e.allowed) for e in events] == [
        ("EVENT_KIND_RESERVE", 30, True), ("EVENT_KIND_EXTEND", 0, True),
        ("EVENT_KIND_COMMIT", 25, True), ("EVENT_KIND_RESERVE", 10, True),
        ("EVENT_KIND_RELEASE", 10, True), ("EVENT_KIND_TRACK", 4, True),
        ("EVENT_KIND_TRACK", 500, False), ("EVENT_KIND_RESERVE", 1, True),
        ("EVENT_KIND_EXPIRE", 1, True),
    ]
    assert {e.user_id for e in events} == {"u1"}
    assert dict(events[0].metadata) == {"model": "gpt-4o"}
    assert events[2].reservation_id == kept.reservation_id
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences)

    middle = events[3].time
    later = _all_events(server.address, "u1", page_size=100, start_time=middle)
    assert [e.sequence for e in later] == sequences[3:]
    earlier = _all_events(server.address, "u1", page_size=100, end_time=middle)
    assert [e.sequence for e in earlier] == sequences[:3]


@pytest.mark.parametrize("request_fields, field", [
    ({"user_id": ""}, "user_id"),
    ({"user_id": "u1", "page_size": 1001}, "page_size"),
    ({"user_id": "u1", "page_token": "zz"}, "page_token"),
    ({"user_id": "u1", "start_time": {"seconds": 10}, "end_time": {"seconds": 10}},
     "end_time"),
])
def test_bad_event_queries_are_invalid_arguments(server, request_fields, field):
    with pytest.raises(grpc.RpcError) as error:
        admin(server.address).ListEvents(pb.ListEventsRequest(**request_fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
