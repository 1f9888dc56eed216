"""Storage faults against the real server: a failing write or sync stops it with a clear
message and loses nothing acknowledged. (Map full, torn tails and corruption are in
test_server_e2e.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import lmdb
import pytest

from quotad_contract.v1 import quotad_pb2 as pb
from quotad.storage.wal import WriteAheadLog
from server_process import ROOT
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


def test_data_of_another_format_version_is_refused_cleanly_and_left_as_it_was(tmp_path):
    data_dir = tmp_path / "data"
    WriteAheadLog(data_dir).close()
    env = lmdb.open(str(data_dir), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format_version", b"1")
    env.close()
    before = (data_dir / "data.mdb").read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--listen", "127.0.0.1:0", "--data-dir",
         str(data_dir)], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=dict(os.environ))
    assert result.returncode == 2, result.stderr
    assert "holds data format 1, this server reads format" in result.stderr
    assert "Traceback" not in result.stderr
    assert (data_dir / "data.mdb").read_bytes() == before
