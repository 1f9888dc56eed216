"""Prometheus metrics from the real server, scraped over HTTP."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from quotad_contract.v1 import quotad_pb2 as pb
from test_server_e2e import plan_with, quota, subscribe


def _scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _scrape_showing(address: str, name: str, timeout_s: float = 5.0) -> dict[str, float]:
    """A scrape that shows `name`: a failed call is counted just after its status is sent,
    so the client can scrape before the count lands."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _scrape(address)
        if name in samples or time.monotonic() >= deadline:
            return samples
        time.sleep(0.05)


def test_metrics_count_calls_codes_denials_holds_and_flushes(start_server):
    server = start_server(extra_args=("--metrics-listen", "127.0.0.1:0"))
    subscribe(server.address, "u1", plan_with(10))
    stub = quota(server.address)
    held = stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="x", amount=4, ttl={"seconds": 600}))
    assert not stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="x", amount=7)).allowed
    with pytest.raises(grpc.RpcError):
        stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="x", amount=0))
    samples = _scrape_showing(server.last("serving")["metrics"],
                                   'quotad_requests_total{code="INVALID_ARGUMENT",method="Reserve"}')
    assert samples['quotad_requests_total{code="OK",method="Reserve"}'] == 2
    assert samples['quotad_requests_total{code="INVALID_ARGUMENT",method="Reserve"}'] == 1
    assert samples['quotad_denials_total{group="units"}'] == 1
    assert samples["quotad_live_holds"] == 1
    assert samples['quotad_request_seconds_count{method="Reserve"}'] == 3
    assert samples["quotad_flush_records_count"] >= 3
    assert samples["quotad_log_sequence"] >= 5
    stub.Release(pb.ReleaseRequest(reservation_id=held.reservation_id))
    assert _scrape(server.last("serving")["metrics"])["quotad_live_holds"] == 0


def test_metrics_show_batch_sizes_denials_inside_batches_and_the_log_size(start_server):
    server = start_server(extra_args=("--metrics-listen", "127.0.0.1:0"))
    subscribe(server.address, "u1", plan_with(10))
    stub = quota(server.address)
    batch = stub.Batch(pb.BatchRequest(operations=[
        pb.BatchOperation(reserve=pb.ReserveRequest(user_id="u1", event_type="x", amount=6)),
        pb.BatchOperation(reserve=pb.ReserveRequest(user_id="u1", event_type="x", amount=6)),
        pb.BatchOperation(track=pb.TrackRequest(user_id="u1", event_type="x", amount=9,
                                                enforce=True)),
    ]))
    assert [r.reserve.allowed for r in batch.results[:2]] == [True, False]
    assert not batch.results[2].track.allowed
    samples = _scrape(server.last("serving")["metrics"])
    assert samples["quotad_batch_operations_count"] == 1
    assert samples["quotad_batch_operations_sum"] == 3
    assert samples['quotad_denials_total{group="units"}'] == 2
    assert samples["quotad_log_bytes"] >= 4096
    assert samples["quotad_log_bytes"] <= samples["quotad_log_map_bytes"]
    assert samples["quotad_log_map_bytes"] == 1024**4  # the default map
    assert 4096 <= samples["quotad_log_live_bytes"] <= samples["quotad_log_bytes"]
    (bound,) = [line["audit_retention_bytes"] for line in server.log_lines
                if line["message"].startswith("the log's live data is kept under")]
    assert samples["quotad_log_live_bytes_max"] == bound > samples["quotad_log_live_bytes"]
    assert 0 < samples["quotad_audit_trail_seconds"] < 600  # its first record: this test's
    assert samples["quotad_log_records_pruned_total"] == 0  # none older than 24 h


def test_each_snapshot_childs_cpu_is_logged_and_counted_with_the_snapshots(start_server):
    """A snapshot costs its forked child CPU in proportion to the state, outside the server's
    own: each child's is logged ("snapshot made") and summed in a counter beside the
    snapshots stored, and the stop line gives the sum."""
    server = start_server(extra_args=("--metrics-listen", "127.0.0.1:0",
                                      "--snapshot-every-records", "5"))
    subscribe(server.address, "u1", plan_with(10**6))
    stub = quota(server.address)
    for _ in range(12):
        stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1))
    made = server.wait_for("snapshot made", timeout_s=30)
    assert made["bytes"] > 0
    # one process from fork to reap: its CPU fits in that time (each rounded to 1 ms)
    assert 0 <= made["child_cpu_s"] <= made["child_s"] + 0.002
    samples = _scrape(server.last("serving")["metrics"])
    assert samples["quotad_log_sequence"] >= made["sequence"] >= 5
    assert samples["quotad_snapshots_total"] >= 1
    assert samples["quotad_snapshot_children_failed_total"] == 0
    # at least the first child's, unrounded (its line is logged once it is counted)
    assert samples["quotad_snapshot_children_cpu_seconds_total"] > 0
    assert samples["quotad_snapshot_children_cpu_seconds_total"] >= made["child_cpu_s"] - 0.001
    assert server.stop() == 0
    stopped = server.last("stopped")
    logged_cpu_s = [line["child_cpu_s"] for line in server.log_lines
                    if line["message"] == "snapshot made"]
    assert stopped["snapshot_children_cpu_s"] == pytest.approx(sum(logged_cpu_s),
                                                                abs=0.001 * len(logged_cpu_s))


def _scrapes_around_tracks(start_server, tracks: int) -> tuple[dict[str, float],
                                                              dict[str, float]]:
    """A server with metrics, scraped before and after `tracks` Tracks of one user."""
    server = start_server(extra_args=("--metrics-listen", "127.0.0.1:0"))
    subscribe(server.address, "u1", plan_with(10**6))
    address = server.last("serving")["metrics"]
    first = _scrape(address)
    stub = quota(server.address)
    for _ in range(tracks):
        stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1))
    return first, _scrape(address)


def test_metrics_give_the_servers_own_cpu_memory_and_collections_beside_its_childrens(
        start_server):
    """prometheus-client's process and Python collectors: the server's own CPU (its snapshot
    children's apart, in their own counter), its memory, descriptors and cyclic collections."""
    first, then = _scrapes_around_tracks(start_server, 50)
    assert 0 < first["process_cpu_seconds_total"] <= then["process_cpu_seconds_total"]
    assert then["process_resident_memory_bytes"] > 10 * 2**20  # an interpreter with grpc
    assert then["process_open_fds"] >= 3
    assert 0 < then["process_start_time_seconds"] <= time.time()
    assert {f'python_gc_collections_total{{generation="{g}"}}' for g in "012"} <= set(then)
    assert any(name.startswith("python_info{") for name in then)


@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(), reason="no schedstat here")
def test_metrics_give_the_event_loops_time_on_a_cpu_and_waiting_for_one(start_server):
    """The event loop thread's schedstat: its time on a CPU grows with the calls it serves and
    is part of the process's CPU; its wait for a CPU is there, and only grows."""
    first, then = _scrapes_around_tracks(start_server, 200)
    on_cpu = "quotad_event_loop_cpu_seconds_total"
    waiting = "quotad_event_loop_waiting_seconds_total"
    assert 0 < first[on_cpu] < then[on_cpu]
    assert then[on_cpu] <= then["process_cpu_seconds_total"] + 0.02  # one thread of the process
    assert 0 <= first[waiting] <= then[waiting]
