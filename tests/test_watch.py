"""WatchUsage: counters pushed per durable change in log order, thresholds once per window,
resumable by sequence across restarts, bounded queues. Real servers, a real writer and log;
the window timer is driven against the real core with a fake clock."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import quotad_client as qc
from quotad_client._watch import RECONNECT_ATTEMPTS_MAX, Resume
from core_helpers import DAY, HOUR, MINUTE, T0, Harness, group, plan
from quotad.core import limits
from quotad.core.commands import Track, UpsertPlan, UpsertSubscription, WatchUsage
from quotad.core.machine import Core
from quotad.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from quotad.core.plans import Window
from quotad_contract.v1 import quotad_pb2 as pb
from quotad.storage.wal import WriteAheadLog
from quotad.api.auth import Principal, UsageGrant
from quotad.api.watch import Update, WatchHub, Watcher, next_reset_ns
from quotad.engine.writer import Writer
from server_process import ServerProcess
from test_server_e2e import admin, plan_with, quota, subscribe

WAIT_S = 20.0
"""Bound of every wait for a message (never reached unless something is broken)."""


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the tests that each use their own users."""
    process = ServerProcess(tmp_path_factory.mktemp("watch") / "data").start()
    try:
        yield process
    finally:
        process.close()


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


# --- end to end: one server -----------------------------------------------------------------


def test_the_stream_sees_every_change_in_order_with_the_counters_get_usage_answers(
        shared_server):
    subscribe(shared_server.address, "ordered", plan_with(10))
    with qc.QuotaClient(shared_server.address, timeout_s=WAIT_S) as client:
        watch = client.watch_usage("ordered")
        initial = next(watch)
        assert (initial.reason, initial.thresholds) == ("initial", ())
        assert initial.counters == client.usage("ordered").counters
        last = initial.sequence
        steps = [lambda: client.track("ordered", "render", 3),
                 lambda: client.reserve("ordered", "render", 4).commit(2),
                 lambda: client.reserve("ordered", "render", 1).release(),
                 lambda: client.track("ordered", "render", -1)]
        for step in steps:
            step()
            seen = client.usage("ordered")
            for update in _updates_until(watch, seen.counters):
                assert update.reason == "change" and update.sequence > last
                last = update.sequence
        watch.close()


def _updates_until(watch, counters) -> list[qc.WatchUpdate]:
    """The updates up to the one that shows these counters (a hold is two changes)."""
    updates = []
    for _ in range(10):
        updates.append(next(watch))
        if updates[-1].counters == counters:
            return updates
    raise AssertionError(f"no update showed {counters}: {updates}")


def test_80_and_100_percent_fire_exactly_once_and_list_events_shows_them(shared_server):
    subscribe(shared_server.address, "thresholds", plan_with(10))
    stub = quota(shared_server.address)
    stream = stub.WatchUsage(pb.WatchUsageRequest(user_id="thresholds"), timeout=WAIT_S)
    assert next(stream).reason == pb.WATCH_REASON_INITIAL
    crossed = []
    for amount in [1] * 7 + [1, 1, 1] + [1] * 5:  # 8 of 10, then 10, then well past it
        stub.Track(pb.TrackRequest(user_id="thresholds", event_type="render", amount=amount))
        update = next(stream)
        crossed += [(t.limit_group_key, t.percent, t.sequence) for t in update.thresholds]
        if update.thresholds:
            assert {t.sequence for t in update.thresholds} == {update.sequence}
    stream.cancel()
    assert [(key, percent) for key, percent, _ in crossed] == [("units", 80), ("units", 100)]

    events = quota_admin_events(shared_server.address, "thresholds")
    assert [(e.limit_group_key, e.threshold_percent, e.sequence, e.amount) for e in events] == [
        (key, percent, sequence, percent // 10) for key, percent, sequence in crossed]
    assert all(e.HasField("window_start") and e.event_type == "render" for e in events)


def quota_admin_events(address: str, user_id: str) -> list[pb.Event]:
    page = admin(address).ListEvents(pb.ListEventsRequest(user_id=user_id, page_size=1000))
    return [e for e in page.events if e.kind == pb.EVENT_KIND_THRESHOLD]


def test_a_watch_resumed_after_a_sequence_replays_only_the_thresholds_after_it(shared_server):
    subscribe(shared_server.address, "resumed", plan_with(10))
    stub = quota(shared_server.address)
    track = pb.TrackRequest(user_id="resumed", event_type="render", amount=4)
    stub.Track(track)
    stub.Track(track)  # 80 %
    middle = next(stub.WatchUsage(pb.WatchUsageRequest(user_id="resumed"), timeout=WAIT_S))
    stub.Track(track)  # 100 %
    everything = next(stub.WatchUsage(pb.WatchUsageRequest(
        user_id="resumed", after_sequence=1), timeout=WAIT_S))
    assert [t.percent for t in everything.thresholds] == [80, 100]
    since_middle = next(stub.WatchUsage(pb.WatchUsageRequest(
        user_id="resumed", after_sequence=middle.sequence), timeout=WAIT_S))
    assert [t.percent for t in since_middle.thresholds] == [100]
    assert since_middle.thresholds[0].sequence > middle.sequence
    assert since_middle.sequence == since_middle.thresholds[0].sequence
    nothing_new = next(stub.WatchUsage(pb.WatchUsageRequest(
        user_id="resumed", after_sequence=since_middle.sequence), timeout=WAIT_S))
    assert list(nothing_new.thresholds) == []


def test_an_unknown_user_has_no_plan_and_a_bad_user_id_or_request_is_invalid_argument(shared_server):
    stub = quota(shared_server.address)
    with pytest.raises(grpc.RpcError) as unknown:
        next(stub.WatchUsage(pb.WatchUsageRequest(user_id="nobody"), timeout=WAIT_S))
    assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # as GetUsage answers
    for bad in ("", "x" * (limits.USER_ID_BYTES_MAX + 1)):
        with pytest.raises(grpc.RpcError) as invalid:
            next(stub.WatchUsage(pb.WatchUsageRequest(user_id=bad), timeout=WAIT_S))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with qc.QuotaClient(shared_server.address, timeout_s=WAIT_S) as client:
        with pytest.raises(qc.FailedPrecondition):
            next(client.watch_usage("nobody"))
    raw = grpc.insecure_channel(shared_server.address).unary_stream(
        "/quotad.v1.QuotaService/WatchUsage", request_serializer=lambda data: data,
        response_deserializer=pb.WatchUsageResponse.FromString)
    with pytest.raises(grpc.RpcError) as malformed:
        next(raw(b"\xff\xff", timeout=WAIT_S))  # not a protobuf message
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_reader_that_falls_behind_is_ended_resource_exhausted_watch_queue_full(
        shared_server):
    """32 groups with long labels make each message ~10 KB: far more than any transport
    buffer holds before the queue bound is reached, while this reader reads nothing."""
    wide = pb.Plan(id="wide", name="wide", limit_groups=[pb.LimitGroup(
        key=f"g{i}", label="L" * limits.GROUP_LABEL_BYTES_MAX, unit="u", quota=10**12,
        window=pb.LIFETIME, match=pb.Match(event_types=["*"]))
        for i in range(limits.LIMIT_GROUPS_PER_PLAN_MAX)])
    subscribe(shared_server.address, "slow", wide)
    stub = quota(shared_server.address)
    stream = stub.WatchUsage(pb.WatchUsageRequest(user_id="slow"), timeout=WAIT_S)
    assert next(stream).reason == pb.WATCH_REASON_INITIAL
    track = pb.BatchOperation(track=pb.TrackRequest(user_id="slow", event_type="x", amount=1))
    for _ in range(3 * limits.WATCH_QUEUE_MESSAGES_MAX // 200 + 1):  # answers under 4 MiB
        stub.Batch(pb.BatchRequest(operations=[track] * 200))
    received = 0
    with pytest.raises(grpc.RpcError) as ended:
        for _ in stream:
            received += 1
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _reason(ended.value) == "WATCH_QUEUE_FULL"
    print(f"\n{received} messages reached the slow reader before it was ended")
    assert 0 < received < 3 * limits.WATCH_QUEUE_MESSAGES_MAX


# --- end to end: restarts -------------------------------------------------------------------


def test_the_client_reconnects_across_restarts_with_no_threshold_lost_or_repeated(
        start_server, tmp_path: Path):
    """Server 1 on port P, then server 2 on another port (the watcher cannot reach it: the
    100 % crossing happens while it is away), then server 3 on P again."""
    data = tmp_path / "restarted"
    first = start_server(data)
    address = first.address
    subscribe(address, "survivor", plan_with(10))
    updates: list[qc.WatchUpdate] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    watching = threading.Thread(target=_watch_in_a_loop, daemon=True,
                                args=(address, "survivor", updates, errors, stop))
    watching.start()
    _wait_for(lambda: updates, "the initial update")
    quota(address).Track(pb.TrackRequest(user_id="survivor", event_type="r", amount=8))
    _wait_for(lambda: any(u.thresholds for u in updates), "the 80 % crossing")
    assert first.stop() == 0

    second = start_server(data)
    assert second.address != address
    quota(second.address).Track(pb.TrackRequest(user_id="survivor", event_type="r", amount=3))
    assert second.stop() == 0

    start_server(data, listen=address)
    _wait_for(lambda: [u for u in updates if u.reason == "initial"][1:], "a reconnect")
    quota(address).Track(pb.TrackRequest(user_id="survivor", event_type="r", amount=1))
    _wait_for(lambda: updates[-1].counters[0].used == 12, "the change after the restart")
    stop.set()
    watching.join(timeout=WAIT_S)
    assert not errors, errors
    crossed = [(t.percent, t.sequence) for u in updates for t in u.thresholds]
    assert [percent for percent, _ in crossed] == [80, 100], updates
    resumed = [u for u in updates if u.reason == "initial"][1]
    assert [t.percent for t in resumed.thresholds] == [100]
    sequences = [u.sequence for u in updates]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


def _watch_in_a_loop(address: str, user_id: str, updates: list, errors: list,
                     stop: threading.Event) -> None:
    """The asyncio client's watch, on its own loop in this thread, until `stop` is set."""
    async def consume() -> None:
        async with qc.AsyncQuotaClient(address, timeout_s=WAIT_S) as client:
            async for update in client.watch_usage(user_id):
                updates.append(update)

    async def run() -> None:
        task = asyncio.create_task(consume())
        while not stop.is_set() and not task.done():
            await asyncio.sleep(0.02)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except BaseException as error:  # reported to the test
            errors.append(error)

    asyncio.run(run())


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {WAIT_S} s")


# --- the window timer, against the real core ---------------------------------------------


def test_a_window_reset_is_queued_when_the_first_window_ends_and_then_the_next():
    h = Harness().setup(plan("p", group("calls", 10, Window.MINUTE),
                             group("daily", 100, Window.DAY),
                             group("ever", 5, Window.LIFETIME)), "alice")
    h.track("alice", 3)
    h.advance(30 * 10**9)
    watcher = Watcher(h.app, "alice")
    watcher.push(Update(pb.WATCH_REASON_INITIAL, h.core.sequence,
                        h.core.usage(h.app, "alice", h.now)))
    assert watcher.reset_at_ns == T0 + MINUTE  # the minute ends first; lifetime never
    assert not watcher.reset_if_due(h.core, T0 + MINUTE - 1)
    assert watcher.reset_if_due(h.core, T0 + MINUTE)
    reset = watcher.queue[-1]
    assert reset.reason == pb.WATCH_REASON_WINDOW_RESET and reset.sequence == h.core.sequence
    counts = {v.key: (v.used, v.window_start_ns) for v in reset.usage.counters}
    assert counts == {"calls": (0, T0 + MINUTE), "daily": (3, T0 - 12 * HOUR), "ever": (3, 0)}
    assert watcher.reset_at_ns == T0 + 2 * MINUTE
    assert next_reset_ns(reset.usage.counters) == T0 + 2 * MINUTE


def test_a_change_in_the_new_window_does_not_swallow_the_reset_message():
    h = Harness().setup(plan("p", group("calls", 10, Window.MINUTE)), "alice")
    watcher = Watcher(h.app, "alice")
    watcher.push(Update(pb.WATCH_REASON_INITIAL, h.core.sequence,
                        h.core.usage(h.app, "alice", h.now)))
    h.at(T0 + MINUTE + 1)
    h.track("alice", 1)  # lands in the new window before the timer fired
    watcher.push(Update(pb.WATCH_REASON_CHANGE, h.core.sequence,
                        h.core.usage(h.app, "alice", h.now)))
    assert watcher.reset_at_ns == T0 + MINUTE
    assert watcher.reset_if_due(h.core, T0 + MINUTE + 2)
    assert watcher.reset_at_ns == T0 + 2 * MINUTE
    assert [u.reason for u in watcher.queue] == [
        pb.WATCH_REASON_INITIAL, pb.WATCH_REASON_CHANGE, pb.WATCH_REASON_WINDOW_RESET]


def test_next_reset_is_none_when_no_window_ends():
    h = Harness().setup(plan("p", group("ever", 5, Window.LIFETIME)), "alice")
    assert next_reset_ns(h.core.usage(h.app, "alice", h.now).counters) is None
    assert next_reset_ns(h.core.usage(h.app, "alice", h.now + DAY).counters) is None


def test_a_full_watcher_queue_ends_the_watch_and_frees_the_queue():
    h = Harness().setup(plan("p", group("calls", 10, Window.MINUTE)), "alice")
    watcher = Watcher(h.app, "alice", queue_messages_max=2)
    update = Update(pb.WATCH_REASON_CHANGE, 1, h.core.usage(h.app, "alice", h.now))
    watcher.push(update)
    watcher.push(update)
    assert watcher.ended is None
    watcher.push(update)
    assert isinstance(watcher.ended, ResourceExhausted)
    assert watcher.ended.reason == "WATCH_QUEUE_FULL" and not watcher.queue


# --- the hub over a real writer and log -----------------------------------------------------


def test_the_hub_refuses_a_watch_past_its_limit_and_forgets_ended_ones(tmp_path: Path):
    async def run() -> None:
        wal = WriteAheadLog(tmp_path / "data")
        writer = Writer(Core(), wal, on_failure=lambda error: None)
        writer.start()
        try:
            await writer.execute(UpsertPlan(app="a", plan=plan(
                "p", group("calls", 10, Window.MINUTE))))
            await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
            hub = WatchHub(lambda: writer, lambda: True, watchers_max=1)
            first = hub.watch(WatchUsage(app="a", user_id="u"))
            assert (await anext(first)).reason == pb.WATCH_REASON_INITIAL
            with pytest.raises(ResourceExhausted) as refused:
                await anext(hub.watch(WatchUsage(app="a", user_id="u")))
            assert refused.value.reason == "TOO_MANY_WATCHERS"
            with pytest.raises(FailedPrecondition):
                await anext(hub.watch(WatchUsage(app="a", user_id="nobody")))
            with pytest.raises(InvalidArgument):
                await anext(hub.watch(WatchUsage(app="a", user_id="")))
            await writer.execute(Track(app="a", user_id="u", event_type="x", amount=9))
            change = await anext(first)
            assert (change.reason, change.counters[0].used,
                    [t.percent for t in change.thresholds]) == (pb.WATCH_REASON_CHANGE, 9, [80])
            assert writer.durable_sequence >= change.sequence
            await first.aclose()
            assert writer.on_applied is None  # nobody watches: the writer skips the hook
            second = hub.watch(WatchUsage(app="a", user_id="u"))
            assert (await anext(second)).sequence == change.sequence
            await second.aclose()
        finally:
            await writer.close()
            wal.close()

    asyncio.run(run())


def test_each_watch_cap_refuses_one_more_at_its_edge_naming_itself(tmp_path: Path):
    """Per user, per key, per app and per server, each at its real value: one watch more
    than a cap allows is RESOURCE_EXHAUSTED TOO_MANY_WATCHERS naming that cap, while
    others, with room under every cap, still get theirs."""
    per_user, per_key = limits.WATCHERS_PER_USER_MAX, limits.WATCHERS_PER_KEY_MAX
    per_app, per_server = limits.WATCHERS_PER_APP_MAX, limits.WATCHERS_MAX
    apps = [f"app{index}" for index in range(per_server // per_app + 1)]
    users = [f"u{index}" for index in range(per_app // per_user + 1)]

    def grant(app: str, key: str) -> UsageGrant:
        return UsageGrant(Principal(app=app, kind="secret", key_id=key))

    async def run() -> None:
        wal = WriteAheadLog(tmp_path / "data")
        writer = Writer(Core(), wal, on_failure=lambda error: None)
        writer.start()
        streams = []
        try:
            for app in apps:
                await writer.execute(UpsertPlan(app=app, plan=plan(
                    "p", group("calls", 10, Window.MINUTE))))
                for user in users:
                    await writer.execute(UpsertSubscription(app=app, user_id=user, plan_id="p"))
            hub = WatchHub(lambda: writer, lambda: True)

            async def watch(app: str, user: str, key: str) -> None:
                stream = hub.watch(WatchUsage(app=app, user_id=user), grant(app, key))
                assert (await anext(stream)).reason == pb.WATCH_REASON_INITIAL
                streams.append(stream)

            async def refused(app: str, user: str, key: str) -> str:
                with pytest.raises(ResourceExhausted) as refusal:
                    await anext(hub.watch(WatchUsage(app=app, user_id=user), grant(app, key)))
                assert refusal.value.reason == "TOO_MANY_WATCHERS"
                assert refusal.value.metadata["limit"] in str(refusal.value)
                return refusal.value.metadata["limit"]

            async def fill(app: str) -> None:
                """The app at its cap: each user at its own, keys a and b at theirs."""
                for index, user in enumerate(users[:per_app // per_user]):
                    key = "a" if index < per_key // per_user else "b"
                    for _ in range(per_user):
                        await watch(app, user, f"{app}-{key}")

            for _ in range(per_user):
                await watch("app0", "u0", "app0-a")
            assert await refused("app0", "u0", "app0-a") == "WATCHERS_PER_USER_MAX"
            await watch("app0", "u1", "app0-a")  # the key and the app still have room
            await streams.pop().aclose()
            for user in users[1:per_key // per_user]:
                for _ in range(per_user):
                    await watch("app0", user, "app0-a")
            assert await refused("app0", users[-1], "app0-a") == "WATCHERS_PER_KEY_MAX"
            await watch("app0", users[-1], "app0-b")  # another key of the app has room
            await streams.pop().aclose()
            for user in users[per_key // per_user:per_app // per_user]:
                for _ in range(per_user):
                    await watch("app0", user, "app0-b")
            assert await refused("app0", users[-1], "app0-c") == "WATCHERS_PER_APP_MAX"
            for app in apps[1:-1]:
                await fill(app)
            assert len(streams) == per_server
            assert await refused(apps[-1], "u0", f"{apps[-1]}-a") == "WATCHERS_MAX"
            await streams.pop().aclose()  # one ends: its place is free again
            await watch(apps[-1], "u0", f"{apps[-1]}-a")
        finally:
            for stream in streams:
                await stream.aclose()
            await writer.close()
            wal.close()

    asyncio.run(run())


# --- the client's resume rules --------------------------------------------------------------


def _error(error_type, code: grpc.StatusCode, reason: str = ""):
    return error_type(code, "x", reason) if reason else error_type(code, "x")


def test_the_client_reconnects_only_after_unavailable_or_its_own_queue_overflow():
    resume = Resume("u", 5, qc.RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02),
                    reconnect=True)
    assert resume.request().after_sequence == 5
    unavailable = _error(qc.Unavailable, grpc.StatusCode.UNAVAILABLE)
    queue_full = _error(qc.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "WATCH_QUEUE_FULL")
    other_limit = _error(qc.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         "TOO_MANY_WATCHERS")
    assert 0 <= resume.next_wait(unavailable) <= 0.02
    assert resume.next_wait(queue_full) is not None
    assert resume.next_wait(other_limit) is None
    assert resume.next_wait(_error(qc.NotFound, grpc.StatusCode.NOT_FOUND)) is None
    for _ in range(RECONNECT_ATTEMPTS_MAX):
        resume.next_wait(unavailable)
    assert resume.next_wait(unavailable) is None  # gave up
    resume.saw(qc.WatchUpdate(reason="change", sequence=9, user_id="u", plan_id="p",
                              counters=(), thresholds=()))
    assert resume.request().after_sequence == 9 and resume.next_wait(unavailable) is not None
    assert Resume("u", 0, qc.RetryPolicy(), reconnect=False).next_wait(unavailable) is None
    with pytest.raises(ValueError):
        Resume("u", -1, qc.RetryPolicy(), reconnect=True)
