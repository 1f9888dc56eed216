"""The Batch RPC against the real server: operations applied in order within one group
commit, each answered with its own response or error."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from quotad.core import limits
from quotad_contract.v1 import quotad_pb2 as pb
from test_server_e2e import admin, plan_with, quota, subscribe, usage


def test_a_batch_is_applied_in_order_and_answered_one_by_one(server):
    subscribe(server.address, "u1", plan_with(100))
    stub = quota(server.address)
    first = stub.Batch(pb.BatchRequest(operations=[
        pb.BatchOperation(reserve=pb.ReserveRequest(user_id="u1", event_type="x", amount=60)),
        pb.BatchOperation(reserve=pb.ReserveRequest(user_id="u1", event_type="x", amount=60)),
        pb.BatchOperation(track=pb.TrackRequest(user_id="u1", event_type="x", amount=30,
                                                enforce=True)),
        pb.BatchOperation(reserve=pb.ReserveRequest(user_id="u1", event_type="x", amount=0)),
        pb.BatchOperation(commit=pb.CommitRequest(reservation_id="rsv_" + "0" * 24)),
        pb.BatchOperation(get_usage=pb.GetUsageRequest(user_id="u1")),
        pb.BatchOperation(),
    ])).results
    assert [r.WhichOneof("result") for r in first] == [
        "reserve", "reserve", "track", "error", "error", "get_usage", "error"]
    assert first[0].reserve.allowed and not first[1].reserve.allowed  # in order: 60 + 60 > 100
    assert first[2].track.allowed and first[2].track.counters[0].held == 60
    assert first[3].error.code == code_pb2.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert first[3].error.details[0].Unpack(bad) and bad.field_violations[0].field == "amount"
    assert first[4].error.code == code_pb2.NOT_FOUND
    assert (first[5].get_usage.counters[0].used, first[5].get_usage.counters[0].held) == (30, 60)
    assert first[6].error.code == code_pb2.INVALID_ARGUMENT

    hold = first[0].reserve.reservation_id
    second = stub.Batch(pb.BatchRequest(operations=[
        pb.BatchOperation(commit=pb.CommitRequest(reservation_id=hold, amount=50)),
        pb.BatchOperation(release=pb.ReleaseRequest(reservation_id=hold)),
    ])).results
    assert second[0].commit.committed == 50
    assert second[1].error.code == code_pb2.FAILED_PRECONDITION
    assert usage(server.address, "u1").counters[0].used == 80


def test_an_empty_or_oversized_batch_is_invalid(server):
    stub = quota(server.address)
    subscribe(server.address, "u", plan_with(10))
    read = pb.BatchOperation(get_usage=pb.GetUsageRequest(user_id="u"))
    largest = stub.Batch(pb.BatchRequest(operations=[read] * limits.BATCH_OPERATIONS_MAX))
    assert len(largest.results) == limits.BATCH_OPERATIONS_MAX  # at the limit: taken
    for operations in ([], [read] * (limits.BATCH_OPERATIONS_MAX + 1)):
        with pytest.raises(grpc.RpcError) as error:
            stub.Batch(pb.BatchRequest(operations=operations))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert admin(server.address).ListPlans(pb.ListPlansRequest()).plans
