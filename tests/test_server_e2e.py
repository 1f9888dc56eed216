"""The real server process, end to end: concurrency, restarts, kill -9, shutdown, refusals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as stubs
from quotad.storage.wal import WriteAheadLog
from server_process import ROOT, ServerProcess

ONE_HOUR = {"seconds": 3600}


def admin(address: str) -> stubs.AdminServiceStub:
    return stubs.AdminServiceStub(grpc.insecure_channel(address))


def quota(address: str) -> stubs.QuotaServiceStub:
    return stubs.QuotaServiceStub(grpc.insecure_channel(address))


def plan_with(quota_value: int, window: int = pb.LIFETIME, plan_id: str = "p") -> pb.Plan:
    return pb.Plan(id=plan_id, name=plan_id, limit_groups=[pb.LimitGroup(
        key="units", label="Units", unit="units", quota=quota_value, window=window,
        match=pb.Match(event_types=["*"]),
    )])


def subscribe(address: str, user_id: str, plan: pb.Plan) -> None:
    stub = admin(address)
    stub.UpsertPlan(pb.UpsertPlanRequest(plan=plan))
    stub.UpsertSubscription(pb.UpsertSubscriptionRequest(user_id=user_id, plan_id=plan.id))


def usage(address: str, user_id: str) -> pb.GetUsageResponse:
    return quota(address).GetUsage(pb.GetUsageRequest(user_id=user_id))


def test_64_concurrent_callers_reserving_7_of_1000_get_exactly_142_holds(server):
    subscribe(server.address, "hot", plan_with(1000))
    attempts_per_caller = 3  # 192 attempts for 142 places

    async def run() -> list[pb.ReserveResponse]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = stubs.QuotaServiceStub(channel)

            async def caller() -> list[pb.ReserveResponse]:
                return [await stub.Reserve(pb.ReserveRequest(
                    user_id="hot", event_type="render", amount=7, ttl=ONE_HOUR))
                    for _ in range(attempts_per_caller)]

            batches = await asyncio.gather(*(caller() for _ in range(64)))
            return [response for batch in batches for response in batch]

    responses = asyncio.run(run())
    allowed = [r for r in responses if r.allowed]
    denied = [r for r in responses if not r.allowed]
    print(f"\n64 callers x {attempts_per_caller}: {len(allowed)} holds, {len(denied)} denials")
    assert len(allowed) == 142
    assert len({r.reservation_id for r in allowed}) == 142
    # No false denial: every denial saw no room for 7 more.
    for response in denied:
        (counter,) = response.counters
        assert response.denied_by == "units"
        assert counter.used + counter.held + 7 > 1000, counter
    (counter,) = usage(server.address, "hot").counters
    assert (counter.held, counter.used, counter.remaining) == (994, 0, 6)


def test_kill_9_after_acknowledged_commits_then_restart_answers_usage_exactly_as_before(
        start_server):
    first = start_server()
    subscribe(first.address, "u1", plan_with(10_000, pb.MONTH))
    stub = quota(first.address)
    for amount in (100, 250, 7):
        hold = stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="chat", amount=amount,
                                              ttl=ONE_HOUR))
        stub.Commit(pb.CommitRequest(reservation_id=hold.reservation_id, amount=amount - 1))
    live = stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="chat", amount=40,
                                          ttl=ONE_HOUR))
    stub.Track(pb.TrackRequest(user_id="u1", event_type="chat", amount=-5))
    before = usage(first.address, "u1")
    assert first.kill() == -signal.SIGKILL

    second = start_server(first.data_dir)
    after = usage(second.address, "u1")
    assert after == before
    assert after.counters[0].used == 99 + 249 + 6 - 5
    assert after.counters[0].held == 40
    # The live hold survived and can still be committed.
    committed = quota(second.address).Commit(pb.CommitRequest(reservation_id=live.reservation_id))
    assert committed.committed == 40 and not committed.expired


def test_graceful_restart_recovers_exactly_the_state_the_last_run_ended_with(start_server):
    first = start_server()
    subscribe(first.address, "u1", plan_with(500, pb.DAY))
    stub = quota(first.address)
    hold = stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="x", amount=50,
                                          idempotency_key="k1", ttl=ONE_HOUR))
    stub.Release(pb.ReleaseRequest(reservation_id=hold.reservation_id))
    stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=30, enforce=True))
    assert first.stop() == 0
    stopped_digest = first.last("stopped")["state_digest"]

    second = start_server(first.data_dir)
    assert second.last("serving")["state_digest"] == stopped_digest
    # The idempotency key survived too: the same request gets the first answer.
    again = quota(second.address).Reserve(pb.ReserveRequest(
        user_id="u1", event_type="x", amount=50, idempotency_key="k1", ttl=ONE_HOUR))
    assert again.reservation_id == hold.reservation_id


def test_one_caller_at_a_time_gets_its_records_written_on_the_loop_and_none_is_lost(
        start_server):
    """Sequential calls: after LONE_CALL_QUIET_FLUSHES on the log thread, the server writes
    a lone call's record inline, but for a probe every LONE_CALL_PROBE_EVERY_FLUSHES + 1;
    every acknowledged call is in the state a restart recovers."""
    from quotad.core import limits

    first = start_server()
    subscribe(first.address, "u1", plan_with(10**6))
    stub = quota(first.address)
    calls = 2 * (limits.LONE_CALL_QUIET_FLUSHES + limits.LONE_CALL_PROBE_EVERY_FLUSHES)
    for _ in range(calls):
        stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1))
    assert first.stop() == 0
    stopped = first.last("stopped")
    inline = stopped["batches"] - stopped["batches_on_log_thread"]
    assert inline >= calls - limits.LONE_CALL_QUIET_FLUSHES - (
        calls // limits.LONE_CALL_PROBE_EVERY_FLUSHES), stopped
    second = start_server(first.data_dir)
    assert second.last("serving")["state_digest"] == stopped["state_digest"]
    assert usage(second.address, "u1").counters[0].used == calls


def test_with_a_commit_delay_concurrent_callers_share_transactions_and_none_is_lost(
        start_server):
    """--commit-delay-ms: 32 callers at once, each a few Tracks; small batches wait for more
    (the stopped line counts them), every acknowledged call is in the state a restart
    recovers, and a lone call afterwards is answered at once."""
    first = start_server(extra_args=("--commit-delay-ms", "5", "--log-state-digest"))
    subscribe(first.address, "u1", plan_with(10**6))
    callers, calls_each = 32, 8

    async def run() -> None:
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = stubs.QuotaServiceStub(channel)

            async def caller() -> None:
                for _ in range(calls_each):
                    await stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1))

            await asyncio.gather(*(caller() for _ in range(callers)))

    asyncio.run(run())
    assert usage(first.address, "u1").counters[0].used == callers * calls_each
    assert first.stop() == 0
    stopped = first.last("stopped")
    print(f"\n{stopped['records_written']} records in {stopped['batches']} transactions, "
          f"{stopped['lingered_batches']} of them waited for more")
    assert stopped["lingered_batches"] > 0, stopped
    assert stopped["records_written"] >= 2 * stopped["batches"], stopped
    second = start_server(first.data_dir)
    assert second.last("serving")["state_digest"] == stopped["state_digest"]
    assert usage(second.address, "u1").counters[0].used == callers * calls_each


def test_holds_survive_a_restart_and_still_expire_at_their_time(start_server):
    first = start_server()
    subscribe(first.address, "u1", plan_with(100))
    hold = quota(first.address).Reserve(pb.ReserveRequest(
        user_id="u1", event_type="x", amount=30, ttl={"seconds": 3}))
    expires_at_s = hold.expires_at.seconds + hold.expires_at.nanos / 1e9
    assert first.stop() == 0

    second = start_server(first.data_dir)
    if time.time() < expires_at_s - 0.2:
        assert usage(second.address, "u1").counters[0].held == 30
    while time.time() < expires_at_s + 0.05:
        time.sleep(0.05)
    assert usage(second.address, "u1").counters[0].held == 0
    extend = quota(second.address)
    with pytest.raises(grpc.RpcError) as error:
        extend.Extend(pb.ExtendRequest(reservation_id=hold.reservation_id, ttl={"seconds": 5}))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # An expired hold still takes its commit, and says so.
    late = extend.Commit(pb.CommitRequest(reservation_id=hold.reservation_id, amount=12))
    assert late.expired and late.committed == 12 and late.returned == 0
    assert usage(second.address, "u1").counters[0].used == 12


def test_a_hold_that_expired_while_the_server_was_down_is_released_at_start(start_server):
    first = start_server()
    subscribe(first.address, "u1", plan_with(100))
    quota(first.address).Reserve(pb.ReserveRequest(user_id="u1", event_type="x", amount=30,
                                                   ttl={"seconds": 1}))
    assert first.stop() == 0
    time.sleep(1.1)
    second = start_server(first.data_dir)
    assert second.last("serving")["records"] > first.last("stopped")["records"]
    assert usage(second.address, "u1").counters[0].held == 0


def test_sigterm_drains_and_exits_zero_and_health_reports_serving_before(server):
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    for service in ("", "quotad.v1.QuotaService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert server.stop() == 0
    assert server.last("stopped")


def test_the_server_runs_on_uvloop_and_names_its_loop_as_it_listens(server):
    assert server.last("listening")["event_loop"] == "uvloop"


def test_without_uvloop_the_server_coroutine_runs_on_asyncio_s_own_loop(monkeypatch):
    from quotad.cli import run_server
    from quotad.server import event_loop_name

    async def named() -> str:
        return event_loop_name()

    assert run_server(named()) == "uvloop"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as where it is not installed
    assert run_server(named()) == "asyncio"


def test_a_second_server_on_the_same_data_directory_refuses_to_start(server):
    result = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "in use by another quotad process" in result.stderr


def test_a_non_loopback_address_without_api_keys_is_refused(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--listen", "0.0.0.0:0",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "loopback" in result.stderr


def test_plans_file_loads_idempotently_across_restarts(start_server):
    first = start_server()
    assert first.stop() == 0
    second = start_server(first.data_dir)
    assert second.last("serving")["records"] == first.last("serving")["records"] == 2
    plans = admin(second.address).ListPlans(pb.ListPlansRequest()).plans
    assert [p.id for p in plans] == ["free", "pro"]
    free = {g.key: g for g in plans[0].limit_groups}
    assert free["premium_tokens"].quota == 0
    assert list(free["premium_tokens"].match.metadata[0].values) == ["gpt-4o", "gpt-4-turbo"]


def test_free_user_is_denied_premium_model_but_not_other_models(server):
    admin(server.address).UpsertSubscription(
        pb.UpsertSubscriptionRequest(user_id="f", plan_id="free"))
    stub = quota(server.address)
    premium = stub.Reserve(pb.ReserveRequest(user_id="f", event_type="openai.chat", amount=10,
                                             metadata={"model": "gpt-4o"}))
    assert not premium.allowed and premium.denied_by == "premium_tokens"
    cheap = stub.Reserve(pb.ReserveRequest(user_id="f", event_type="openai.chat", amount=10,
                                           metadata={"model": "gpt-4o-mini"}))
    assert cheap.allowed and [c.key for c in cheap.counters] == ["tokens"]


def test_map_full_stops_the_server_and_a_larger_map_recovers_every_acknowledged_change(
        start_server, tmp_path: Path):
    data_dir = tmp_path / "small"
    small = start_server(data_dir, extra_args=("--map-size-gib", str(1 / 1024)))
    subscribe(small.address, "u1", plan_with(10**12))
    stub = quota(small.address)
    acknowledged = 0
    failure = None
    for _ in range(20_000):  # 1 MiB fills long before this
        try:
            stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1,
                                       metadata={"pad": "p" * 200}), timeout=10)
            acknowledged += 1
        except grpc.RpcError as error:
            failure = error
            break
    assert failure is not None and failure.code() == grpc.StatusCode.UNAVAILABLE
    assert small.process.wait(timeout=30) == 1
    assert small.last("stopped after a failure")
    print(f"\nmap full after {acknowledged} acknowledged tracks")
    # it said so before: the file grew toward its 1 MiB map, to be full within a day
    warned = [line for line in small.log_lines
              if line["message"].startswith("the log will fill its map within a day")]
    assert warned and warned[0]["level"] == "warning", small.log_lines[-5:]
    assert warned[0]["bound"] == "map" and 0 < warned[0]["left_bytes"] < 1024**2
    assert 0 < warned[0]["fills_in_h"] <= 24 and warned[0]["growth_bytes_per_s"] > 0

    larger = start_server(data_dir, extra_args=("--map-size-gib", "0.1"))
    assert usage(larger.address, "u1").counters[0].used == acknowledged


def test_invalid_requests_name_their_fields_and_change_nothing(server):
    subscribe(server.address, "u1", plan_with(100))
    stub = quota(server.address)
    before = usage(server.address, "u1")
    cases = [
        (pb.ReserveRequest(user_id="u" * 257, event_type="x", amount=1), {"user_id"}),
        (pb.ReserveRequest(user_id="u1", event_type="x", amount=2**53 + 1), {"amount"}),
        (pb.ReserveRequest(user_id="u1", event_type="x", amount=1, ttl={"seconds": 3601}),
         {"ttl"}),
        (pb.ReserveRequest(user_id="u1", event_type="x" * 129, amount=0),
         {"event_type", "amount"}),
        (pb.ReserveRequest(user_id="u1", event_type="x", amount=1,
                           metadata={f"k{i}": "v" for i in range(17)}), {"metadata"}),
        (pb.ReserveRequest(user_id="u1", event_type="x", amount=1, idempotency_key="k" * 129),
         {"idempotency_key"}),
    ]
    for request, fields in cases:
        with pytest.raises(grpc.RpcError) as error:
            stub.Reserve(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(error.value)
        assert status is not None
        from google.rpc import error_details_pb2
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad)
        assert {v.field for v in bad.field_violations} == fields
    # Just inside every limit is fine.
    ok = stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="x" * 128, amount=1,
                                        ttl={"seconds": 3600}, idempotency_key="k" * 128,
                                        metadata={f"k{i}": "v" * 256 for i in range(16)}))
    assert ok.allowed
    stub.Release(pb.ReleaseRequest(reservation_id=ok.reservation_id))
    after = usage(server.address, "u1")
    assert [(c.used, c.held) for c in after.counters] == [(c.used, c.held) for c in before.counters]


def test_unparseable_and_oversized_requests_are_refused_and_the_server_keeps_serving(server):
    channel = grpc.insecure_channel(server.address)
    raw = channel.unary_unary("/quotad.v1.QuotaService/Reserve")
    with pytest.raises(grpc.RpcError) as error:
        raw(b"\x0a\x02\xff\xfe")  # user_id holding invalid UTF-8
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as error:
        raw(b"\x0a\x83\x80\x04" + b"u" * (64 * 1024 + 3))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    subscribe(server.address, "u1", plan_with(100))
    assert usage(server.address, "u1").counters[0].quota == 100


def test_unknown_and_malformed_reservation_ids(server):
    stub = quota(server.address)
    with pytest.raises(grpc.RpcError) as error:
        stub.Commit(pb.CommitRequest(reservation_id="rsv_" + "0" * 24))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        stub.Release(pb.ReleaseRequest(reservation_id="nope"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _flip_a_byte_of_record(data_dir: Path, sequence: int) -> None:
    import lmdb

    from quotad.storage.codec import record_key

    env = lmdb.open(str(data_dir), max_dbs=8, map_size=64 * 1024**3)
    log_db = env.open_db(b"log")
    with env.begin(write=True, db=log_db) as txn:
        value = bytearray(txn.get(record_key(sequence)))
        value[-2] ^= 0x01
        txn.put(record_key(sequence), bytes(value))
    env.close()


def _two_batches_then_kill(start_server) -> ServerProcess:
    """Records 1-2 (plans), 3 (a plan) and 4 (a subscription) in separate batches; no
    snapshot covers them (kill -9: no final snapshot)."""
    first = start_server()
    subscribe(first.address, "u1", plan_with(100))
    assert first.kill() == -signal.SIGKILL
    return first


def test_a_corrupt_acknowledged_record_refuses_start_naming_the_record(start_server):
    first = _two_batches_then_kill(start_server)
    _flip_a_byte_of_record(first.data_dir, 3)

    broken = ServerProcess(first.data_dir)
    try:
        with pytest.raises(RuntimeError, match="exited"):
            broken.start()
    finally:
        broken.close()  # had it started after all, it must not outlive the test
    refusal = broken.last("cannot recover the log, refusing to start")
    assert "log record 3: checksum mismatch" in refusal["error"]
    assert broken.process.returncode == 1
    code, summary = _verify(first.data_dir)
    assert code == 1 and not summary["clean"] and "log record 3" in summary["error"]


def test_a_corrupt_record_in_the_last_batch_is_a_torn_tail_dropped_with_a_log_line(
        start_server):
    first = _two_batches_then_kill(start_server)
    _flip_a_byte_of_record(first.data_dir, 4)
    code, summary = _verify(first.data_dir)
    assert code == 1 and "torn" in summary["error"]

    second = start_server(first.data_dir)
    dropped = second.last("dropped a torn log tail")
    assert dropped["from_sequence"] == 4 and dropped["records"] == 1
    with pytest.raises(grpc.RpcError) as error:  # the subscription was never acknowledged
        usage(second.address, "u1")
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert second.stop() == 0
    code, summary = _verify(first.data_dir)
    assert code == 0 and summary["clean"]


def test_a_corrupt_record_a_snapshot_covers_is_internal_to_the_read_that_meets_it(
        start_server):
    first = start_server(extra_args=("--snapshot-every-records", "4"))
    subscribe(first.address, "u1", plan_with(100))  # records 3 and 4, after the plans
    stub = quota(first.address)
    for _ in range(4):  # records 5 to 8: a snapshot of them is made
        stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1))
    first.wait_for("snapshot made", 30)  # its child's file, stored by the next write
    stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1))  # stores it
    assert first.stop() == 0
    wal = WriteAheadLog(first.data_dir)
    try:
        assert wal.whole_snapshot_sequence() >= 5  # a start replays nothing up to record 5
    finally:
        wal.close()
    _flip_a_byte_of_record(first.data_dir, 5)

    second = start_server(first.data_dir)
    digest = admin(second.address).GetStateDigest(pb.GetStateDigestRequest())
    with pytest.raises(grpc.RpcError) as error:
        admin(second.address).ListEvents(pb.ListEventsRequest(user_id="u1"))
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert error.value.details().startswith(
        "quotad cannot read its log record 5 (checksum mismatch): nothing was done")
    assert "quotad verify" in error.value.details()
    refused = second.wait_for("refused", 10)  # the only one; written before the answer, read
    # from the server's stderr by a thread of this process, which may come after the answer
    assert (refused["level"], refused["code"], refused["method"]) == (
        "error", "INTERNAL", "/quotad.v1.AdminService/ListEvents")
    assert usage(second.address, "u1").counters[0].used == 5  # it serves on, unchanged
    assert admin(second.address).GetStateDigest(pb.GetStateDigestRequest()) == digest


def _verify(data_dir: Path) -> tuple[int, dict]:
    import json

    result = subprocess.run([sys.executable, "-m", "quotad", "verify", "--data-dir",
                             str(data_dir)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    return result.returncode, json.loads(result.stdout) if result.stdout else {}


def test_verify_checks_a_stopped_data_directory_and_the_digest_rpc_agrees(server):
    subscribe(server.address, "u1", plan_with(100))
    quota(server.address).Track(pb.TrackRequest(user_id="u1", event_type="x", amount=3))
    live = admin(server.address).GetStateDigest(pb.GetStateDigestRequest())
    assert live.sequence == 5 and len(live.digest) == 32
    assert server.stop() == 0
    code, summary = _verify(server.data_dir)
    assert code == 0 and summary["clean"] and summary["records"] == live.sequence
    assert summary["state_digest"] == live.digest == server.last("stopped")["state_digest"]


def test_snapshots_let_a_restart_replay_only_the_log_after_them(start_server):
    args = ("--log-state-digest", "--snapshot-every-records", "10")
    first = start_server(extra_args=args)
    subscribe(first.address, "u1", plan_with(10**6))
    stub = quota(first.address)
    for _ in range(45):
        stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=2))
    before = admin(first.address).GetStateDigest(pb.GetStateDigestRequest())
    assert first.kill() == -signal.SIGKILL

    second = start_server(first.data_dir, extra_args=args)
    recovered = second.last("recovered")
    # A child process makes each snapshot while serving goes on, so the latest one stored
    # may lag the log by what was applied meanwhile: fewer records than all, not < 10.
    assert recovered["snapshot_sequence"] >= 10
    assert recovered["replayed"] == before.sequence - recovered["snapshot_sequence"]
    after = admin(second.address).GetStateDigest(pb.GetStateDigestRequest())
    assert (after.digest, after.sequence) == (before.digest, before.sequence)
    assert usage(second.address, "u1").counters[0].used == 90
    assert second.stop() == 0  # a final snapshot: the next start replays nothing
    third = start_server(first.data_dir, extra_args=args)
    assert third.last("recovered")["replayed"] == 0
    assert third.last("serving")["state_digest"] == second.last("stopped")["state_digest"]


def test_log_records_stay_at_least_as_long_as_the_idempotency_keys_they_answer_for(
        start_server):
    """An audit retention of 0 prunes nothing younger than 24 h: a record is also where its
    idempotency key's first answer and its finished holds are kept (pruning itself:
    tests/test_idempotency_durable.py)."""
    args = ("--snapshot-every-records", "5", "--audit-retention-days", "0")
    first = start_server(extra_args=args)
    subscribe(first.address, "u1", plan_with(10**6))
    for n in range(20):
        quota(first.address).Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1,
                                                    idempotency_key=f"k{n}"))
    assert first.stop() == 0
    code, summary = _verify(first.data_dir)
    assert code == 0 and summary["clean"]
    second = start_server(first.data_dir, extra_args=args)
    assert second.last("recovered")["log_first_sequence"] == 1
    again = quota(second.address).Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1,
                                                         idempotency_key="k0"))
    assert again.counters[0].used == 1  # the first answer, from the log
    assert usage(second.address, "u1").counters[0].used == 20


def test_a_log_size_bound_the_last_day_passes_keeps_that_day_and_says_so(start_server):
    """--audit-retention-gib reaches the writer: a bound of 100 KiB, which the day's records
    pass, is logged once, and they all stay (pruning to the bound, with days of server time
    passing: tests/test_prune.py)."""
    args = ("--snapshot-every-records", "20", "--audit-retention-gib", str(100 / 1024**2))
    first = start_server(extra_args=args)
    subscribe(first.address, "u1", plan_with(10**6))
    stub = quota(first.address)
    for n in range(400):
        stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1,
                                   idempotency_key=f"k{n}", metadata={"pad": "p" * 200}))
    assert first.stop() == 0
    warned = [line for line in first.log_lines if line["message"].startswith(
        "the log's live data is over --audit-retention-gib")]
    assert len(warned) == 1 and warned[0]["level"] == "warning", first.log_lines[-5:]
    assert warned[0]["live_bytes"] > warned[0]["audit_retention_bytes"] == 100 * 1024
    second = start_server(first.data_dir, extra_args=args)
    assert second.last("recovered")["log_first_sequence"] == 1
    assert usage(second.address, "u1").counters[0].used == 400


def test_a_size_bound_the_disk_has_no_room_for_is_said_at_start(start_server, tmp_path: Path):
    """A 2 TiB bound (in a 4 TiB map: address space, not disk) on a disk with less free than
    that: the disk would fill first, and the server says so as it starts."""
    args = ("--map-size-gib", "4096", "--audit-retention-gib", "2048")
    server = start_server(extra_args=args)
    warned = [line for line in server.log_lines if line["message"].startswith(
        "the disk under the data directory has less room than the log may grow")]
    assert len(warned) == 1 and warned[0]["level"] == "warning"
    assert warned[0]["disk_free_bytes"] < warned[0]["growth_left_bytes"] < 2048 * 1024**3
    assert warned[0]["audit_retention_bytes"] == 2048 * 1024**3
    small = start_server(tmp_path / "small", extra_args=("--audit-retention-gib", "0.001"))
    assert not [line for line in small.log_lines
                if line["message"].startswith("the disk under the data directory")]


def test_the_log_is_bounded_by_its_disk_by_default_and_the_bound_is_logged(
        start_server, tmp_path: Path):
    """Without --audit-retention-gib the bound is three quarters of the log's room on its disk
    (its file's bytes and the disk's free bytes, as it starts), or of the map if smaller."""
    def bound(server: ServerProcess) -> dict:
        (line,) = [line for line in server.log_lines
                   if line["message"].startswith("the log's live data is kept under")]
        return line

    disk = start_server()
    by_disk = bound(disk)
    stat = os.statvfs(disk.data_dir)
    assert by_disk["map_bytes"] == 1024**4  # the default map: address space, not disk
    assert abs(by_disk["room_bytes"] - stat.f_bavail * stat.f_frsize) < 1024**3  # others write
    assert by_disk["audit_retention_bytes"] == int(by_disk["room_bytes"] * 0.75)
    by_map = bound(start_server(tmp_path / "m", extra_args=("--map-size-gib", "1")))
    assert by_map["audit_retention_bytes"] == 768 * 1024**2
    set_ = bound(start_server(tmp_path / "s", extra_args=("--audit-retention-gib", "0.5")))
    assert set_["audit_retention_bytes"] == 512 * 1024**2
    assert "three quarters" not in set_["message"]


def _retention_lines(server) -> list[dict]:
    return [line for line in server.log_lines
            if line["message"].startswith("idempotency keys are remembered")]


def test_a_server_logs_the_retention_when_it_changes_and_keeps_it_across_restarts(start_server):
    first = start_server(extra_args=("--idempotency-retention-hours", "48"))
    (changed,) = _retention_lines(first)
    assert (changed["idempotency_retention_s"], changed["previous_s"]) == (48 * 3600, 24 * 3600)
    subscribe(first.address, "u1", plan_with(10**6))
    track = pb.TrackRequest(user_id="u1", event_type="x", amount=2, idempotency_key="k")
    quota(first.address).Track(track)
    assert first.stop() == 0
    same = start_server(first.data_dir, extra_args=("--idempotency-retention-hours", "48"))
    assert _retention_lines(same) == []  # in force already: no record
    quota(same.address).Track(track)  # a repeat: the first answer, counted once
    assert usage(same.address, "u1").counters[0].used == 2
    assert same.stop() == 0
    default = start_server(first.data_dir)
    (back,) = _retention_lines(default)
    assert (back["idempotency_retention_s"], back["previous_s"]) == (24 * 3600, 48 * 3600)


def test_an_address_in_use_is_refused_with_one_clear_line(server):
    result = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--listen", server.address,
         "--data-dir", str(server.data_dir.parent / "other")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode == 2
    assert f"--listen {server.address}: cannot listen there" in result.stderr
    assert "Traceback" not in result.stderr


def test_reflection_lists_the_services_only_when_asked_for(start_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def listed(address: str) -> set[str] | grpc.StatusCode:
        stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(address))
        try:
            (answer,) = list(stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        except grpc.RpcError as error:
            return error.code()
        return {service.name for service in answer.list_services_response.service}

    plain = start_server()
    assert listed(plain.address) == grpc.StatusCode.UNIMPLEMENTED
    reflective = start_server(plain.data_dir.parent / "other", extra_args=("--reflection",))
    assert {"quotad.v1.QuotaService", "quotad.v1.AdminService"} <= listed(reflective.address)


def test_reflection_describes_every_service_it_lists_health_included(start_server):
    """What grpcurl does: list the services, fetch each one's descriptor, call one built only
    from what reflection gave."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase)

    server = start_server(extra_args=("--reflection",))
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        listed = set(database.get_services())
        assert {"quotad.v1.QuotaService", "quotad.v1.AdminService", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= listed
        pool = descriptor_pool.DescriptorPool(database)
        for name in listed:
            assert pool.FindServiceByName(name).methods
        check = pool.FindMethodByName("grpc.health.v1.Health.Check")
        request_class = message_factory.GetMessageClass(check.input_type)
        response_class = message_factory.GetMessageClass(check.output_type)
        answer = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString)(
                request_class(service="quotad.v1.QuotaService"), timeout=10)
    assert check.output_type.fields_by_name["status"].enum_type.values_by_number[
        answer.status].name == "SERVING"


def test_a_snapshot_file_left_by_a_killed_server_is_removed_at_start(start_server, tmp_path):
    first = start_server(extra_args=("--snapshot-every-records", "5"))
    subscribe(first.address, "u1", plan_with(10**6))
    stub = quota(first.address)
    for _ in range(30):
        stub.Track(pb.TrackRequest(user_id="u1", event_type="x", amount=1))
    assert first.kill() == -signal.SIGKILL
    leftover = first.data_dir / "snapshot-999999-7.partial"  # as a child of a killed parent
    leftover.write_bytes(b"half a snapshot")

    second = start_server(first.data_dir, extra_args=("--snapshot-every-records", "5"))
    assert second.last("removed unfinished snapshot files")["files"] >= 1
    assert not list(first.data_dir.glob("snapshot-*.partial"))
    assert usage(second.address, "u1").counters[0].used == 30
