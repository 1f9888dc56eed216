"""The limits fit together: what each allows at once fits in one message, and the relations
between them are checked whenever limits.py is imported."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quotad.core import limits
from quotad_contract.v1 import quotad_pb2 as pb
from messages_at_limits import (
    group_at_every_limit, plan_at_every_limit, plan_for_scale, plan_of_bytes,
    reserve_at_every_limit, track_at_every_limit,
)
from server_process import ROOT
from test_server_e2e import admin, plan_with, quota, subscribe


def test_an_operation_at_every_limit_fits_its_computed_bound_and_one_message():
    for message, bound in ((reserve_at_every_limit(), limits.RESERVE_REQUEST_BYTES_BOUND),
                           (track_at_every_limit(), limits.TRACK_REQUEST_BYTES_BOUND)):
        assert message.ByteSize() <= bound <= limits.MESSAGE_BYTES_MAX
    batch = pb.BatchRequest(operations=[pb.BatchOperation(reserve=reserve_at_every_limit()),
                                        pb.BatchOperation(track=track_at_every_limit())])
    assert batch.ByteSize() <= limits.MESSAGE_BYTES_MAX


def test_a_group_at_every_limit_fits_its_bound_and_a_plan_holds_one_but_not_32():
    group = group_at_every_limit()
    assert group.ByteSize() <= limits.LIMIT_GROUP_BYTES_BOUND
    every_limit = plan_at_every_limit()
    assert every_limit.ByteSize() <= limits.PLAN_BYTES_AT_EVERY_LIMIT
    assert every_limit.ByteSize() > limits.PLAN_BYTES_MAX  # why PLAN_BYTES_MAX exists
    one_group = pb.Plan(id=every_limit.id, name=every_limit.name, limit_groups=[group])
    assert one_group.ByteSize() <= limits.PLAN_BYTES_MAX


def test_a_large_real_plan_takes_about_35_kb_well_within_the_plan_bound():
    scale = plan_for_scale()  # the figure limits.PLAN_BYTES_MAX's docstring and the README give
    assert 34_000 <= scale.ByteSize() <= 36_000 < limits.PLAN_BYTES_MAX


def test_a_plan_of_plan_bytes_max_fits_every_message_that_carries_a_plan():
    plan = plan_of_bytes(limits.PLAN_BYTES_MAX)
    assert plan.ByteSize() == limits.PLAN_BYTES_MAX
    for message in (pb.UpsertPlanRequest(plan=plan), pb.UpsertPlanResponse(plan=plan, changed=True),
                    pb.GetPlanResponse(plan=plan), pb.ListPlansResponse(plans=[plan])):
        assert message.ByteSize() <= limits.MESSAGE_BYTES_MAX, type(message).__name__


def _bad_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [violation.field for violation in bad.field_violations]
    return []


def test_the_server_takes_everything_at_its_limit_and_refuses_a_plan_one_byte_over(server):
    stub, admin_stub = quota(server.address), admin(server.address)
    reserve, track = reserve_at_every_limit(), track_at_every_limit()
    subscribe(server.address, reserve.user_id, plan_with(limits.QUOTA_MAX, plan_id="wide"))
    assert stub.Reserve(reserve, timeout=10).allowed
    assert stub.Track(track, timeout=10).allowed
    batch = stub.Batch(pb.BatchRequest(operations=[
        pb.BatchOperation(reserve=reserve), pb.BatchOperation(track=track)]), timeout=10)
    assert [r.WhichOneof("result") for r in batch.results] == ["reserve", "track"]

    at_limit = plan_of_bytes(limits.PLAN_BYTES_MAX, plan_id="at-limit")
    assert admin_stub.UpsertPlan(pb.UpsertPlanRequest(plan=at_limit), timeout=10).changed
    assert admin_stub.GetPlan(pb.GetPlanRequest(id="at-limit"), timeout=10).plan == at_limit
    listed = admin_stub.ListPlans(pb.ListPlansRequest(), timeout=10).plans
    assert at_limit in listed

    digest = admin_stub.GetStateDigest(pb.GetStateDigestRequest(), timeout=10)
    over = plan_of_bytes(limits.PLAN_BYTES_MAX + 1, plan_id="over")
    with pytest.raises(grpc.RpcError) as refused:
        admin_stub.UpsertPlan(pb.UpsertPlanRequest(plan=over), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_fields(refused.value) == ["plan"]
    assert admin_stub.GetStateDigest(pb.GetStateDigestRequest(), timeout=10) == digest


CONTRACT_LIMITS = ROOT / "client" / "quotad_contract" / "limits.py"
SERVER_LIMITS = ROOT / "server" / "quotad" / "core" / "limits.py"


@pytest.mark.parametrize("source, line, broken", [
    (CONTRACT_LIMITS, "TTL_NS_DEFAULT = 60 * NS_PER_S", "TTL_NS_DEFAULT = 7200 * NS_PER_S"),
    (CONTRACT_LIMITS, "USER_TOKEN_TTL_NS_MIN = 1 * NS_PER_S",
     "USER_TOKEN_TTL_NS_MIN = 2 * 3600 * NS_PER_S"),
    (CONTRACT_LIMITS, "METADATA_ENTRIES_MAX = 16", "METADATA_ENTRIES_MAX = 160"),
    (CONTRACT_LIMITS, "METADATA_MATCH_VALUES_MAX = 32", "METADATA_MATCH_VALUES_MAX = 64"),
    (CONTRACT_LIMITS, "PLAN_BYTES_MAX = 60 * 1024", "PLAN_BYTES_MAX = 64 * 1024"),
    (SERVER_LIMITS, "WATCH_THRESHOLDS_PERCENT = (80, 100)",
     "WATCH_THRESHOLDS_PERCENT = (100, 80)"),
])
def test_limits_that_cannot_hold_together_fail_the_import_even_under_python_o(
        source, line, broken):
    text = source.read_text()
    assert text.count(line) == 1
    program = ("import sys\n"
               "source = sys.stdin.read()\n"
               "exec(compile(source, 'limits.py', 'exec'), {'__name__': 'limits'})\n")
    for given, fails in ((text, False), (text.replace(line, broken), True)):
        done = subprocess.run([sys.executable, "-O", "-c", program], input=given, text=True,
                              capture_output=True, timeout=60)
        assert (done.returncode != 0) == fails, done.stderr
        assert ("AssertionError" in done.stderr) == fails, done.stderr
