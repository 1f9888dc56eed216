"""Load shedding against real servers: past the admission limit calls are refused at once with
RESOURCE_EXHAUSTED OVERLOADED (and a RetryInfo), having done nothing; a call whose deadline
passed before it started changes nothing; WatchUsage and health checks are not counted and
are served under overload; the limit's edge; the clients retry a shed call."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import quotad_client as qc
from quotad.api.admission import SHED_OVERLOADED, Admission, overloaded
from quotad.api.gate import Gate
from quotad.api.service import REGISTERED_METHODS, method_handlers, status_proto_of
from quotad.core import limits
from quotad.core.commands import Track
from quotad.core.errors import ResourceExhausted
from quotad.engine.recovery import recover
from quotad.engine.writer import DeadlinePassed, Writer
from quotad.server import SERVICE_NAMES, Config, pending_calls_options
from quotad.storage.codec import state_digest
from quotad.storage.wal import WriteAheadLog
from quotad_client._errors import error_from_status, shed_delay_s
from quotad_client._retry import RetryPolicy
from quotad_contract.errors import ErrorReason
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as stubs
from test_server_e2e import plan_with, subscribe, usage

ONE_HOUR = {"seconds": 3600}
BURST_CALLS = 200
BURST_ROUNDS_MAX = 5
"""A burst is repeated (a fresh user each time) until some of it is shed; far past the
limit it is at the first round, unless the machine serialises everything. Fewer calls than
grpc's default queue per method (limits.PENDING_CALLS_PER_METHOD) holds, so that grpc refuses
none of them and what is shed is admission's doing."""
DEADLINES_S = (0.001, 0.002, 0.003, 0.004, 0.006, 0.008, 0.012, 0.016)
DEADLINE_ROUNDS_MAX = 6 * len(DEADLINES_S)
"""Deadlines short enough to pass before a full Batch is applied, tried in turn (a fresh
user each round) until one is shed for its deadline."""
CALL_TIMEOUT_S = 60.0
assert BURST_CALLS < limits.PENDING_CALLS_PER_METHOD


def _details(error: grpc.aio.AioRpcError | grpc.RpcError) -> tuple[str, float | None]:
    """(ErrorInfo reason, RetryInfo delay in seconds) of a refused call."""
    reason, delay_s = "", None
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay_s = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, delay_s


def _scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in text.splitlines()
             if line and not line.startswith("#"))}


def _reserve(user_id: str, amount: int = 1) -> pb.ReserveRequest:
    return pb.ReserveRequest(user_id=user_id, event_type="x", amount=amount, ttl=ONE_HOUR)


async def _burst(address: str, requests: list, method: str = "Reserve") -> list:
    """Each request sent at once as its own unary call: its response, or its AioRpcError."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = getattr(stubs.QuotaServiceStub(channel), method)

        async def one(request):
            try:
                return await call(request, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                return error

        return await asyncio.gather(*(one(request) for request in requests))


def _assert_shed(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert _details(error) == (ErrorReason.OVERLOADED, limits.OVERLOAD_RETRY_DELAY_S)


# --- the limit and its flag -----------------------------------------------------------------

def test_the_admission_limit_counts_operations_and_refuses_the_one_past_it():
    admission = Admission(3)
    admission.admit("Batch", 2)
    admission.admit("Reserve", 1)  # exactly the limit
    with pytest.raises(Exception) as refused:
        admission.admit("Reserve", 1)
    assert (refused.value.reason, refused.value.retry_delay_s) == (
        ErrorReason.OVERLOADED, limits.OVERLOAD_RETRY_DELAY_S)
    admission.release(2)
    admission.admit("Reserve", 2)
    assert admission.admitted == 3
    assert admission.shed == {("Reserve", SHED_OVERLOADED): 1}


def test_the_admission_limit_is_checked_at_its_bounds():
    for good in (limits.ADMISSION_OPERATIONS_MIN, limits.ADMISSION_OPERATIONS_MAX):
        assert Config(admission_operations=good).admission_operations == good
        Admission(good)
    for bad in (limits.ADMISSION_OPERATIONS_MIN - 1, limits.ADMISSION_OPERATIONS_MAX + 1):
        with pytest.raises(ValueError, match="admission-operations"):
            Config(admission_operations=bad)
        with pytest.raises(ValueError):
            Admission(bad)


def test_a_batch_of_exactly_the_limit_is_admitted_and_one_of_one_more_operation_is_shed(
        start_server):
    server = start_server(extra_args=("--admission-operations", "8"))
    subscribe(server.address, "edge", plan_with(1000))
    quota = stubs.QuotaServiceStub(grpc.insecure_channel(server.address))

    def batch(count: int) -> pb.BatchRequest:
        return pb.BatchRequest(operations=[pb.BatchOperation(reserve=_reserve("edge", 10))
                                           for _ in range(count)])

    answered = quota.Batch(batch(8), timeout=CALL_TIMEOUT_S)
    assert [result.reserve.allowed for result in answered.results] == [True] * 8
    with pytest.raises(grpc.RpcError) as refused:
        quota.Batch(batch(9), timeout=CALL_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _details(refused.value) == (ErrorReason.OVERLOADED, None)  # retrying cannot help
    (counter,) = usage(server.address, "edge").counters
    assert (counter.used, counter.held) == (0, 80)


# --- bursts past the limit ------------------------------------------------------------------

def test_a_burst_far_past_the_limit_sheds_the_excess_and_the_state_is_what_the_admitted_did(
        start_server):
    server = start_server(extra_args=("--admission-operations", "4",
                                      "--metrics-listen", "127.0.0.1:0"))
    for round_index in range(BURST_ROUNDS_MAX):
        user = f"burst-{round_index}"
        subscribe(server.address, user, plan_with(10**9))
        reserved = asyncio.run(_burst(server.address, [_reserve(user, 3)] * BURST_CALLS))
        holds = [answer for answer in reserved if isinstance(answer, pb.ReserveResponse)]
        for answer in reserved:
            if not isinstance(answer, pb.ReserveResponse):
                _assert_shed(answer)
        assert all(hold.allowed for hold in holds) and holds
        commits = asyncio.run(_burst(server.address, [
            pb.CommitRequest(reservation_id=hold.reservation_id, amount=2) for hold in holds],
            "Commit"))
        committed = [answer for answer in commits if isinstance(answer, pb.CommitResponse)]
        for answer in commits:
            if not isinstance(answer, pb.CommitResponse):
                _assert_shed(answer)
        (counter,) = usage(server.address, user).counters
        assert counter.used == 2 * len(committed)
        assert counter.held == 3 * (len(holds) - len(committed))
        shed = BURST_CALLS - len(holds) + len(holds) - len(committed)
        print(f"\nround {round_index}: {len(holds)} of {BURST_CALLS} reserves admitted, "
              f"{len(committed)} of {len(holds)} commits; {shed} calls shed")
        if shed:
            break
    else:
        pytest.fail(f"no call of {BURST_ROUNDS_MAX} bursts of {BURST_CALLS} was shed")
    samples = _scrape(server.last("serving")["metrics"])
    assert sum(samples.get(f'quotad_shed_calls_total{{method="{method}",reason="overloaded"}}', 0)
               for method in ("Reserve", "Commit")) >= shed > 0  # a round may shed commits alone
    assert samples["quotad_admitted_operations"] == 0


def test_watch_streams_and_health_checks_are_not_counted_and_are_served_under_overload(
        start_server):
    server = start_server(extra_args=("--admission-operations", "1"))
    subscribe(server.address, "watched", plan_with(10**9))

    async def run() -> tuple[int, list, int, list]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            quota = stubs.QuotaServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            watches = [quota.WatchUsage(pb.WatchUsageRequest(user_id="watched"),
                                        timeout=CALL_TIMEOUT_S) for _ in range(3)]
            for watch in watches:  # each first sends the counters as they are
                await asyncio.wait_for(watch.read(), CALL_TIMEOUT_S)
            for _ in range(BURST_ROUNDS_MAX):
                burst = asyncio.gather(*(quota.Reserve(_reserve("watched"), timeout=CALL_TIMEOUT_S)
                                         for _ in range(BURST_CALLS)), return_exceptions=True)
                checks = await asyncio.gather(*(health.Check(health_pb2.HealthCheckRequest(),
                                                             timeout=CALL_TIMEOUT_S)
                                                for _ in range(20)))
                answers = await burst
                if any(isinstance(answer, grpc.aio.AioRpcError) for answer in answers):
                    break
            held = sum(1 for answer in answers if isinstance(answer, pb.ReserveResponse))
            update = await asyncio.wait_for(watches[0].read(), CALL_TIMEOUT_S)
            for watch in watches:
                watch.cancel()
            return held, checks, update.counters[0].held, answers

    held, checks, watched_held, answers = asyncio.run(run())
    assert all(check.status == health_pb2.HealthCheckResponse.SERVING for check in checks)
    assert held >= 1, "three open watches must not take the only admission slot"
    assert watched_held >= 1  # the watch saw the admitted reserves
    for answer in answers:
        if not isinstance(answer, pb.ReserveResponse):
            _assert_shed(answer)
    assert any(not isinstance(answer, pb.ReserveResponse) for answer in answers)


# --- grpc's queue in front of the handlers ----------------------------------------------------

def test_the_data_path_is_registered_with_grpc_so_each_of_its_methods_has_its_own_queue():
    """Registered, grpc's core keeps one queue of received calls per method (bounded by
    --pending-calls-per-method): Commits never wait behind Reserves, nor WatchUsage behind
    either. The other methods share the queue of unregistered calls; every RPC is served."""
    services = method_handlers(Gate(), Admission())
    assert set(services) == set(SERVICE_NAMES)
    for service in SERVICE_NAMES:
        descriptor = pb.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]
        assert set(services[service]) == {method.name for method in descriptor.methods}
    assert set(REGISTERED_METHODS) == {"quotad.v1.QuotaService"}
    assert REGISTERED_METHODS["quotad.v1.QuotaService"] == {
        "Reserve", "Commit", "Release", "Extend", "Track", "GetUsage", "Batch", "WatchUsage"}
    assert REGISTERED_METHODS["quotad.v1.QuotaService"] < set(services["quotad.v1.QuotaService"])


def test_the_pending_calls_limit_is_checked_at_its_bounds_and_is_grpcs_backlog_options():
    for good in (limits.PENDING_CALLS_PER_METHOD_MIN, limits.PENDING_CALLS_PER_METHOD_MAX):
        assert Config(pending_calls_per_method=good).pending_calls_per_method == good
    for bad in (limits.PENDING_CALLS_PER_METHOD_MIN - 1, limits.PENDING_CALLS_PER_METHOD_MAX + 1):
        with pytest.raises(ValueError, match="--pending-calls-per-method"):
            Config(pending_calls_per_method=bad)
    assert Config().pending_calls_per_method == limits.PENDING_CALLS_PER_METHOD
    # grpc queues every call while fewer than the soft limit + 1 wait, refuses at random
    # below the hard limit, and every call from it: one apart, the limit is exact
    assert pending_calls_options(256) == [("grpc.server.max_pending_requests", 255),
                                          ("grpc.server.max_pending_requests_hard_limit", 256)]
    assert pending_calls_options(limits.PENDING_CALLS_PER_METHOD_MIN) == [
        ("grpc.server.max_pending_requests", 0),
        ("grpc.server.max_pending_requests_hard_limit", 1)]


def test_quotad_serve_refuses_a_pending_calls_limit_past_its_bounds_naming_the_flag(tmp_path):
    for bad in (limits.PENDING_CALLS_PER_METHOD_MIN - 1, limits.PENDING_CALLS_PER_METHOD_MAX + 1):
        result = subprocess.run(
            [sys.executable, "-m", "quotad", "serve", "--data-dir", str(tmp_path / "data"),
             "--pending-calls-per-method", str(bad)],
            capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
        assert result.returncode == 2
        assert "--pending-calls-per-method must be" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was opened


def _refusal_kind(error: grpc.aio.AioRpcError) -> str:
    """How a call of a burst was refused: by grpc's queue (CANCELLED, before any handler ran)
    or by admission (RESOURCE_EXHAUSTED OVERLOADED with its RetryInfo)."""
    if error.code() == grpc.StatusCode.CANCELLED:
        return "grpc queue"
    _assert_shed(error)
    return "admission"


def test_a_burst_past_grpcs_queue_and_admission_is_refused_and_nothing_is_half_applied(
        start_server, tmp_path):
    """The smallest queue grpc may hold (1 call per method) and admission limit (1): a burst
    of 400 Reserves is refused, by grpc's queue or by admission, except what was served;
    each answered hold is held, no refused one; the server then serves, and a restart
    recovers exactly the state the server had (nothing applied without its record)."""
    data_dir = tmp_path / "data"
    flags = ("--pending-calls-per-method", str(limits.PENDING_CALLS_PER_METHOD_MIN),
             "--admission-operations", "1")
    server = start_server(data_dir, extra_args=flags)
    subscribe(server.address, "flood", plan_with(10**9))
    served, refusals = 0, Counter()
    for _ in range(BURST_ROUNDS_MAX):
        answers = asyncio.run(_burst(server.address, [_reserve("flood", 3)] * BURST_CALLS))
        served += sum(1 for answer in answers if isinstance(answer, pb.ReserveResponse))
        refusals.update(_refusal_kind(answer) for answer in answers
                        if not isinstance(answer, pb.ReserveResponse))
        if refusals:
            break
    print(f"\n{served} served, refused: {dict(refusals)}")
    assert refusals, f"no call of {BURST_ROUNDS_MAX} bursts of {BURST_CALLS} was refused"
    (counter,) = usage(server.address, "flood").counters
    assert (counter.used, counter.held) == (0, 3 * served)

    status, hold, before = asyncio.run(_serves_then_digest(server.address, "flood"))
    assert status == health_pb2.HealthCheckResponse.SERVING and hold.allowed
    assert server.stop() == 0
    restarted = start_server(data_dir, extra_args=flags)
    after = asyncio.run(_digest(restarted.address))
    assert (after.digest, after.sequence) == (before.digest, before.sequence)


async def _serves_then_digest(address: str, user: str) -> tuple[
        int, pb.ReserveResponse, pb.GetStateDigestResponse]:
    """A health check, a Reserve of 3 for `user`, then the state digest."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        hold = await stubs.QuotaServiceStub(channel).Reserve(_reserve(user, 3),
                                                             timeout=CALL_TIMEOUT_S)
    return health.status, hold, await _digest(address)


async def _digest(address: str) -> pb.GetStateDigestResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await stubs.AdminServiceStub(channel).GetStateDigest(
            pb.GetStateDigestRequest(), timeout=CALL_TIMEOUT_S)


def test_a_watch_opens_while_grpcs_queue_of_reserves_overflows(start_server):
    """WatchUsage has its own queue in grpc: Reserves refused by theirs (CANCELLED) do not
    hold a watch back."""
    server = start_server(extra_args=("--pending-calls-per-method",
                                      str(limits.PENDING_CALLS_PER_METHOD_MIN)))
    subscribe(server.address, "watched-flood", plan_with(10**9))

    async def run() -> tuple[int, Counter]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            quota = stubs.QuotaServiceStub(channel)
            burst = asyncio.gather(*(quota.Reserve(_reserve("watched-flood"),
                                                   timeout=CALL_TIMEOUT_S)
                                     for _ in range(BURST_CALLS)), return_exceptions=True)
            watch = quota.WatchUsage(pb.WatchUsageRequest(user_id="watched-flood"),
                                     timeout=CALL_TIMEOUT_S)
            first = await asyncio.wait_for(watch.read(), CALL_TIMEOUT_S)
            watch.cancel()
            answers = await burst
            return len(first.counters), Counter(
                "OK" if isinstance(answer, pb.ReserveResponse) else answer.code().name
                for answer in answers)

    for _ in range(BURST_ROUNDS_MAX):
        counters, codes = asyncio.run(run())
        assert counters == 1
        assert set(codes) <= {"OK", "CANCELLED"}, codes
        if codes["CANCELLED"]:
            print(f"\nthe watch opened beside a burst answered {dict(codes)}")
            return
    pytest.fail(f"no Reserve of {BURST_ROUNDS_MAX} bursts of {BURST_CALLS} overflowed the queue")


# --- deadlines ------------------------------------------------------------------------------

def test_the_writer_applies_nothing_for_a_call_whose_deadline_has_passed(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)

    async def run() -> tuple[str, int, str, int, int]:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail)
        writer.start()
        before = state_digest(writer.core), writer.core.sequence
        command = Track(app="a", user_id="u", event_type="e", amount=1)
        with pytest.raises(DeadlinePassed):
            await writer.execute_many([command, command], time.monotonic() - 1.0)
        after = state_digest(writer.core), writer.core.sequence
        applied = await writer.execute_many([], time.monotonic() + 60.0)
        await writer.close()
        return (*before, *after, len(applied))

    digest_before, sequence_before, digest_after, sequence_after, applied = asyncio.run(run())
    wal.close()
    assert (digest_after, sequence_after) == (digest_before, sequence_before)
    assert applied == 0


def test_a_call_whose_deadline_passes_before_it_is_applied_changes_nothing(start_server):
    """A Batch of 1,000 Tracks with a deadline of a few ms: sending and converting its
    operations takes about that long, so its deadline passes at the server, in gRPC's queue
    (the handler sheds it at its start) or before the writer applies it. Whether gRPC hands
    the call to the handler at all once its deadline has passed depends on the machine's
    load, so rounds go through a few short deadlines again and again until the server
    reports shedding one for its deadline; that Batch's user must then be untouched."""
    server = start_server(extra_args=("--metrics-listen", "127.0.0.1:0"))
    metrics = server.last("serving")["metrics"]
    key = 'quotad_shed_calls_total{method="Batch",reason="deadline"}'

    async def send(user: str, timeout_s: float) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await channel.channel_ready()
            try:
                await stubs.QuotaServiceStub(channel).Batch(pb.BatchRequest(operations=[
                    pb.BatchOperation(track=pb.TrackRequest(
                        user_id=user, event_type="x", amount=1, metadata={"n": str(index)}))
                    for index in range(limits.BATCH_OPERATIONS_MAX)]), timeout=timeout_s)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

    for round_index in range(DEADLINE_ROUNDS_MAX):
        timeout_s = DEADLINES_S[round_index % len(DEADLINES_S)]
        user = f"late-{round_index}"
        subscribe(server.address, user, plan_with(10**6))
        shed_before = _scrape(metrics).get(key, 0)
        code = asyncio.run(send(user, timeout_s))
        if _scrape(metrics).get(key, 0) > shed_before:
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            (counter,) = usage(server.address, user).counters
            assert (counter.used, counter.held) == (0, 0)
            print(f"\nshed for its deadline with a {timeout_s * 1e3:g} ms deadline")
            return
    pytest.fail(f"none of {DEADLINE_ROUNDS_MAX} Batches reached the server and was shed "
                "for its deadline")


# --- the clients ----------------------------------------------------------------------------

def test_a_shed_call_tells_the_client_to_retry_after_the_servers_delay_plus_backoff():
    def received(refusal: Exception) -> qc.QuotadError:  # as the server sends it
        status = status_proto_of(refusal)
        return error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, status.message, status)

    refusal = received(overloaded("shed", 0.1))
    assert isinstance(refusal, qc.ResourceExhausted) and shed_delay_s(refusal) == 0.1
    other = received(ResourceExhausted(ErrorReason.TOO_MANY_HOLDS, "holds"))
    too_big = received(overloaded("a Batch over the whole limit", None))
    assert shed_delay_s(other) is None and shed_delay_s(too_big) is None
    policy = RetryPolicy(retries=2, initial_backoff_s=0.05, jitter=0.5)
    now = 100.0
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    first = policy.next_wait(retry=0, code=code, retryable=False, deadline=now + 10, now=now,
                             shed_delay_s=0.1)
    assert first is not None and 0.1 + 0.025 <= first <= 0.1 + 0.05  # unsafe calls too
    assert policy.next_wait(retry=2, code=code, retryable=True, deadline=now + 10, now=now,
                            shed_delay_s=0.1) is None  # retries used up
    assert policy.next_wait(retry=0, code=code, retryable=True, deadline=now + 0.1, now=now,
                            shed_delay_s=0.1) is None  # no time left for it
    assert policy.next_wait(retry=0, code=code, retryable=True, deadline=now + 10,
                            now=now) is None  # any other RESOURCE_EXHAUSTED is final


def test_the_async_client_retries_shed_calls_until_each_lands_exactly_once(start_server):
    """Mutations without idempotency keys too: a shed call did nothing, so it cannot land
    twice. Every call of the burst ends up answered, and the counters add up exactly."""
    server = start_server(extra_args=("--admission-operations", "2",
                                      "--metrics-listen", "127.0.0.1:0"))
    subscribe(server.address, "retried", plan_with(10**9))
    calls = 200

    async def run() -> int:
        policy = RetryPolicy(retries=100, initial_backoff_s=0.01, max_backoff_s=0.2)
        async with qc.AsyncQuotaClient(server.address, coalesce=False,
                                       auto_idempotency_keys=False, retry_policy=policy,
                                       timeout_s=CALL_TIMEOUT_S) as client:
            tracks = await asyncio.gather(*(client.track("retried", "x", 5)
                                            for _ in range(calls)))
        return len(tracks)

    key = 'quotad_shed_calls_total{method="Track",reason="overloaded"}'
    for round_index in range(BURST_ROUNDS_MAX):
        assert asyncio.run(run()) == calls
        (counter,) = usage(server.address, "retried").counters
        assert counter.used == 5 * calls * (round_index + 1)
        shed = _scrape(server.last("serving")["metrics"]).get(key, 0)
        if shed:
            print(f"\n{shed:.0f} shed calls retried")
            return
    pytest.fail(f"no call of {BURST_ROUNDS_MAX} bursts of {calls} was shed")
