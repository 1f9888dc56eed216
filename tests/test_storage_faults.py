"""Storage faults against the real server: a failing write or sync stops it with a clear
message and loses nothing acknowledged. (Map full, torn tails and corruption are in
test_server_e2e.py.)"""

from __future__ import annotations

import grpc
import pytest

from quotad.v1 import quotad_pb2 as pb
from test_server_e2e import plan_with, quota, subscribe, usage


@pytest.mark.parametrize("fault", ["write-error", "sync-error"])
def test_a_failing_write_or_sync_stops_the_server_and_loses_nothing_acknowledged(
        start_server, tmp_path, fault):
    data_dir = tmp_path / "data"
    # Appends 1-2 load the plans at start-up, 3-4 subscribe; the 12th append fails.
    faulty = start_server(data_dir, env={"QUOTAD_FAULT_INJECT": f"{fault}@12"})
    subscribe(faulty.address, "u1", plan_with(10**6))
    stub = quota(faulty.address)
    acknowledged = 0
    with pytest.raises(grpc.RpcError) as error:
        for _ in range(100):
            stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1), timeout=10)
            acknowledged += 1
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert acknowledged == 7
    assert faulty.process.wait(timeout=30) == 1
    stopped = faulty.last("stopped after a failure")
    assert f"injected {fault.split('-')[0]} error" in stopped["error"]

    healthy = start_server(data_dir)
    used = usage(healthy.address, "u1").counters[0].used
    # A failed write leaves nothing; a failed sync may leave the unanswered record on disk.
    assert used == acknowledged if fault == "write-error" else used in (acknowledged,
                                                                         acknowledged + 1)
    print(f"\n{fault}: {acknowledged} acknowledged, {used} recovered")
