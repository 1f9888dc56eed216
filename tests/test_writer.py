"""The single writer over a real LMDB log: group commit, durability before answers, fail-stop,
recovery. No gRPC here; the server process is tested in test_server_e2e.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core_helpers import T0

from quotad.core import limits
from quotad.storage.codec import state_digest
from quotad.core.commands import Track, UpsertPlan, UpsertSubscription
from quotad.core.plans import LimitGroup, Plan, Window
from quotad.storage.wal import DataDirLocked, WriteAheadLog
from quotad.engine.clock import ServerClock
from quotad.engine.recovery import recover
from quotad.engine.writer import Writer, WriterStopped

PLAN = Plan(id="p", limit_groups=(LimitGroup(key="units", quota=10**15, window=Window.LIFETIME),))


async def _writer_on(wal: WriteAheadLog, failures: list[BaseException],
                     **writer_args: Any) -> Writer:
    """A writer on wal with the plan and its user in place (two lone calls)."""
    writer = Writer(recover(wal), wal, on_failure=failures.append, **writer_args)
    writer.start()
    await writer.execute(UpsertPlan(app="a", plan=PLAN))
    await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
    return writer


def _track(key: str, pad: str = "") -> Track:
    return Track(app="a", user_id="u", event_type="e", amount=1, idempotency_key=key,
                 metadata=(("pad", pad),) if pad else ())


async def _track_durably(writer: Writer, wal: WriteAheadLog, key: str,
                         answered: list[str]) -> None:
    """A Track under key, answered (noted in answered) only once it is on disk."""
    await writer.execute(_track(key))
    answered.append(key)
    assert key in {getattr(r.command, "idempotency_key", "") for r in wal.records()}


def test_concurrent_commands_share_transactions_and_each_is_on_disk_before_its_answer(
        tmp_path: Path):
    wal = WriteAheadLog(tmp_path)

    async def run() -> Writer:
        writer = await _writer_on(wal, [])

        async def one(index: int) -> None:
            key = f"k{index}"
            await writer.execute(_track(key))
            on_disk = {getattr(r.command, "idempotency_key", "") for r in wal.records()}
            assert key in on_disk, f"{key} answered before it was durable"

        await asyncio.gather(*(one(i) for i in range(200)))
        await writer.close()
        return writer

    writer = asyncio.run(run())
    print(f"\n{writer.records_written} records in {writer.batches} transactions")
    assert writer.records_written == 202
    assert writer.batches < writer.records_written
    wal.close()


def test_recovery_replays_the_log_into_the_same_state(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)

    async def run() -> str:
        writer = await _writer_on(wal, [])
        for index in range(50):
            await writer.execute(_track(f"k{index}"))
        await writer.close()
        return state_digest(writer.core)

    live_digest = asyncio.run(run())
    assert state_digest(recover(wal)) == live_digest
    wal.close()


def test_a_full_map_stops_the_writer_and_nothing_after_it_is_answered(tmp_path: Path):
    wal = WriteAheadLog(tmp_path, map_size_bytes=1024**2)
    failures: list[BaseException] = []

    async def run() -> int:
        writer = await _writer_on(wal, failures)
        acknowledged = 0
        with pytest.raises(WriterStopped):
            for index in range(50_000):
                await writer.execute(_track(f"k{index}", pad="p" * 200))
                acknowledged += 1
        with pytest.raises(WriterStopped):
            await writer.execute(_track("after"))
        await writer.close()
        return acknowledged

    acknowledged = asyncio.run(run())
    assert len(failures) == 1
    assert sum(1 for r in wal.records() if isinstance(r.command, Track)) == acknowledged
    wal.close()


def test_one_data_directory_takes_one_log_at_a_time(tmp_path: Path):
    first = WriteAheadLog(tmp_path)
    with pytest.raises(DataDirLocked):
        WriteAheadLog(tmp_path)
    first.close()
    WriteAheadLog(tmp_path).close()


def test_server_time_is_strictly_increasing_even_when_the_wall_clock_steps_back():
    wall = iter([1_000, 2_000, 1_500, 1_500, 5_000])
    clock = ServerClock(floor_ns=1_200, wall_ns=lambda: next(wall))
    times = [clock.now_ns() for _ in range(5)]
    assert times == [1_201, 2_000, 2_001, 2_002, 5_000]


def test_a_forked_child_makes_the_snapshots_while_the_writer_keeps_serving(tmp_path: Path):
    """Periodic snapshots come from a child process: the writer goes on applying commands
    meanwhile, stores each child's snapshot once the records it covers are durable, and a
    restart from it (and the log after it) is the same state. No partial file is left."""
    wal = WriteAheadLog(tmp_path)

    async def run() -> tuple[str, Writer]:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail, fork_snapshots=True,
                        snapshot_every_records=50)
        writer.start()
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        for round_ in range(400):  # bounded; children take longer on a busy machine
            await asyncio.gather(*(writer.execute(_track(f"k{round_}-{i}")) for i in range(20)))
            if writer.snapshots >= 3:
                break
            await asyncio.sleep(0.005)  # a finished child is collected on the event loop
        for _ in range(500):  # bounded: the last child's snapshot reaches the log
            if writer._child is None and writer._ready is None:
                break
            await writer.execute(_track(f"tail-{_}"))
            await asyncio.sleep(0.01)
        stored = wal.snapshot_sequence()
        digest = state_digest(writer.core)
        assert stored > 0 and writer.snapshots >= 3, (stored, writer.snapshots)
        assert writer.snapshot_children_failed == 0
        await writer.close()
        return digest, writer

    digest, writer = asyncio.run(run())
    assert not list(tmp_path.glob("snapshot-*.partial"))
    wal.close()
    reopened = WriteAheadLog(tmp_path)
    assert state_digest(recover(reopened)) == digest
    reopened.close()


def test_a_snapshot_child_that_is_killed_is_reported_and_the_next_one_is_due(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)

    async def run() -> Writer:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail, fork_snapshots=True,
                        snapshot_every_records=10)
        writer.start()
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        killed: set[int] = set()
        for i in range(3000):  # bounded: kill children until one dies at work, then let
            await writer.execute(_track(f"k{i}"))  # a later one succeed
            child = writer._child
            if child is not None and not writer.snapshot_children_failed and \
                    child.pid not in killed:
                killed.add(child.pid)
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it ended (and was reaped) already: the next one, then
            if writer.snapshot_children_failed and writer.snapshots:
                break
            await asyncio.sleep(0.002)
        await writer.close()
        return writer

    writer = asyncio.run(run())
    assert writer.snapshot_children_failed >= 1 and writer.snapshots >= 1
    assert not list(tmp_path.glob("snapshot-*.partial"))
    wal.close()


def test_an_in_process_snapshot_never_covers_records_a_later_transaction_writes(tmp_path: Path):
    """With more records pending than one transaction takes, the snapshot waits: a crash
    between two transactions must never leave a snapshot ahead of the log."""
    wal = WriteAheadLog(tmp_path)
    appended: list[tuple[int, int | None]] = []
    append = wal.append

    def recording_append(records, snapshot=None):
        appended.append((records[-1].sequence if records else 0,
                         snapshot.sequence if snapshot else None))
        append(records, snapshot)

    wal.append = recording_append

    async def run() -> None:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail, batch_records_max=4,
                        snapshot_every_records=3)
        writer.start()
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        for round_ in range(5):
            await asyncio.gather(*(writer.execute(_track(f"k{round_}-{i}")) for i in range(9)))
        await writer.close()

    asyncio.run(run())
    with_snapshot = [(last, covered) for last, covered in appended if covered is not None]
    assert with_snapshot, appended
    assert all(covered <= last for last, covered in with_snapshot if last), appended
    wal.close()


def test_a_batch_of_inline_batch_records_min_is_written_on_the_loop_one_fewer_on_the_log_thread(
        tmp_path: Path):
    """Both ways write the same records, durable before their answers."""
    wal = WriteAheadLog(tmp_path)

    async def run() -> Writer:
        writer = await _writer_on(wal, [])
        small_before = writer.batches_on_log_thread
        await writer.execute(_track("alone"))
        assert writer.batches_on_log_thread == small_before + 1
        fewer = [_track(f"fewer-{index}")  # one short of inline: the log thread's
                 for index in range(limits.INLINE_BATCH_RECORDS_MIN - 1)]
        assert all(outcome.error is None for outcome in await writer.execute_many(fewer))
        assert writer.batches_on_log_thread == small_before + 2
        many = [_track(f"many-{index}") for index in range(limits.INLINE_BATCH_RECORDS_MIN)]
        outcomes = await writer.execute_many(many)
        assert all(outcome.error is None for outcome in outcomes)
        assert writer.batches_on_log_thread == small_before + 2  # that one went inline
        on_disk = {getattr(r.command, "idempotency_key", "") for r in wal.records()}
        assert {"alone", *(command.idempotency_key for command in [*fewer, *many])} <= on_disk
        await writer.close()
        return writer

    writer = asyncio.run(run())
    assert writer.records_written == 2 + 1 + 2 * limits.INLINE_BATCH_RECORDS_MIN - 1
    wal.close()


def test_calls_that_come_one_at_a_time_are_written_inline_but_for_a_probe_every_so_often(
        tmp_path: Path):
    """LONE_CALL_QUIET_FLUSHES lone calls in a row on the log thread, and the next are written
    on the loop (by the call itself); after LONE_CALL_PROBE_EVERY_FLUSHES of those, one goes to
    the log thread; a batch of more than one record (one call's) goes there too, and the count
    starts over. Every call is on disk before its answer either way."""
    wal = WriteAheadLog(tmp_path)
    keys: list[str] = []

    async def lone(key: str) -> None:
        await _track_durably(writer, wal, key, keys)

    async def run() -> None:
        nonlocal writer
        writer = await _writer_on(wal, [])  # two lone calls already, each on the log thread
        for index in range(limits.LONE_CALL_QUIET_FLUSHES - 2):
            await lone(f"quiet-{index}")
        assert writer.batches_on_log_thread == writer.batches == limits.LONE_CALL_QUIET_FLUSHES
        for index in range(limits.LONE_CALL_PROBE_EVERY_FLUSHES):
            await lone(f"inline-{index}")
        assert writer.batches_on_log_thread == limits.LONE_CALL_QUIET_FLUSHES
        await lone("probe")
        assert writer.batches_on_log_thread == limits.LONE_CALL_QUIET_FLUSHES + 1
        await lone("after-a-quiet-probe")  # still alone: inline again
        assert writer.batches_on_log_thread == limits.LONE_CALL_QUIET_FLUSHES + 1
        together = [f"together-{index}" for index in range(3)]
        await writer.execute_many([_track(key) for key in together])
        keys.extend(together)
        assert writer.batches_on_log_thread == limits.LONE_CALL_QUIET_FLUSHES + 2
        await lone("alone-again")  # counted from none again: the log thread's
        assert writer.batches_on_log_thread == limits.LONE_CALL_QUIET_FLUSHES + 3
        await writer.close()

    writer: Writer
    asyncio.run(run())
    assert keys[-1] == "alone-again"
    on_disk = [getattr(r.command, "idempotency_key", "") for r in wal.records()]
    assert on_disk[2:] == keys  # in order, once each
    wal.close()


def test_a_probe_that_ends_with_calls_waiting_writes_small_batches_on_the_log_thread_again(
        tmp_path: Path):
    """A call that arrives while the probe's sync runs shows that calls no longer come alone:
    from then on small batches go to the log thread, until LONE_CALL_QUIET_FLUSHES quiet ones
    in a row again."""
    import threading

    wal = WriteAheadLog(tmp_path)
    append = wal.append
    in_probe, go_on = threading.Event(), threading.Event()

    def append_held(records, snapshot=None):
        if any(getattr(r.command, "idempotency_key", "") == "probe" for r in records):
            in_probe.set()
            assert go_on.wait(10)
        append(records, snapshot)

    wal.append = append_held

    async def run() -> Writer:
        writer = await _writer_on(wal, [])
        for index in range(limits.LONE_CALL_QUIET_FLUSHES - 2
                           + limits.LONE_CALL_PROBE_EVERY_FLUSHES):
            await writer.execute(_track(f"lone-{index}"))
        on_log_thread = writer.batches_on_log_thread
        probe = asyncio.create_task(writer.execute(_track("probe")))
        assert await asyncio.to_thread(in_probe.wait, 10)
        meanwhile = asyncio.create_task(writer.execute(_track("meanwhile")))
        await asyncio.sleep(0)  # applied: pending while the probe's sync runs
        go_on.set()
        await asyncio.gather(probe, meanwhile)
        # the probe, and the one after it (the first quiet one of a new count)
        assert writer.batches_on_log_thread == on_log_thread + 2
        for index in range(limits.LONE_CALL_QUIET_FLUSHES - 1):
            await writer.execute(_track(f"quiet-again-{index}"))
        again = on_log_thread + 1 + limits.LONE_CALL_QUIET_FLUSHES
        assert writer.batches_on_log_thread == again
        await writer.execute(_track("inline-again"))
        assert writer.batches_on_log_thread == again
        await writer.close()
        return writer

    asyncio.run(run())
    on_disk = {getattr(r.command, "idempotency_key", "") for r in wal.records()}
    assert {"probe", "meanwhile", "inline-again"} <= on_disk
    wal.close()


def test_a_commit_delay_is_taken_while_it_fills_probed_while_it_does_not_and_lone_calls_never_wait(
        tmp_path: Path):
    """With commit_delay_s, while calls overlap, a small batch is written at once until a
    probe (every COMMIT_DELAY_PROBE_EVERY_MIN batches) waits and takes what was applied
    meanwhile; one that gathers COMMIT_DELAY_JOINED_PER_MS_MIN records a millisecond turns the
    wait on, one in one transaction with its joiners. Waits that gather nothing turn it off
    again, and the probes then come twice as far apart. Calls that come alone never wait.
    Every call is on disk before its answer, in the order applied."""
    wal = WriteAheadLog(tmp_path)
    delay_s = limits.COMMIT_DELAY_MS_MAX / 1000
    fills = int(limits.COMMIT_DELAY_JOINED_PER_MS_MIN * limits.COMMIT_DELAY_MS_MAX)
    issued: list[str] = []

    async def pair(tag: str) -> None:
        """Two records in one call: a batch of more than one, so calls overlap."""
        keys = [f"{tag}-a", f"{tag}-b"]
        issued.extend(keys)
        await writer.execute_many([_track(key) for key in keys])
        on_disk = {getattr(r.command, "idempotency_key", "") for r in wal.records()}
        assert set(keys) <= on_disk, f"{tag} answered before it was durable"

    async def taken_by_the_flush_task() -> None:
        for _ in range(100):
            await asyncio.sleep(0)
            if not writer._pending:
                return
        raise AssertionError("the flush task did not take the batch")

    async def run() -> None:
        nonlocal writer
        writer = await _writer_on(wal, failures, commit_delay_s=delay_s)
        for index in range(limits.COMMIT_DELAY_PROBE_EVERY_MIN):  # from the first on, overlapping
            await pair(f"at-once-{index}")
        assert writer.lingered_batches == 0
        batches = writer.batches
        probe = asyncio.create_task(pair("probe"))
        await taken_by_the_flush_task()  # it waits for more now
        joiners = [f"joined-{index}" for index in range(fills)]
        issued.extend(joiners)
        await asyncio.gather(probe, writer.execute_many([_track(key) for key in joiners]))
        assert (writer.batches, writer.lingered_batches) == (batches + 1, 1)
        assert writer.lingered_records == fills
        await pair("waits")  # the wait fills: taken, nobody joins, the average falls
        assert (writer.batches, writer.lingered_batches) == (batches + 2, 2)
        for index in range(2 * limits.COMMIT_DELAY_PROBE_EVERY_MIN - 1):
            await pair(f"off-{index}")  # off: at once, the next probe twice as far
        assert writer.lingered_batches == 2
        await pair("second-probe")
        assert writer.lingered_batches == 3
        for index in range(limits.LONE_CALL_QUIET_FLUSHES + 3):  # alone: at once
            await _track_durably(writer, wal, f"alone-{index}", issued)
        assert writer.lingered_batches == 3
        assert writer.batches_on_log_thread <= writer.batches
        await writer.close()

    writer: Writer
    failures: list[BaseException] = []
    asyncio.run(run())
    assert failures == []
    on_disk = [getattr(r.command, "idempotency_key", "") for r in wal.records()][2:]
    assert on_disk == issued
    wal.close()


def test_probes_of_a_delay_that_never_fills_come_twice_as_far_apart_up_to_their_cap(
        tmp_path: Path):
    """Overlapping batches whose waits gather nothing: a probe after
    COMMIT_DELAY_PROBE_EVERY_MIN of them, then twice as far apart each time, never further
    than COMMIT_DELAY_PROBE_EVERY_MAX."""
    wal = WriteAheadLog(tmp_path)
    gaps: list[int] = []

    async def run() -> None:
        writer = await _writer_on(wal, failures, commit_delay_s=0.001)
        await writer.execute_many([_track("overlap-a"), _track("overlap-b")])  # from here on
        since, lingered = 0, writer.lingered_batches
        while len(gaps) < 8:
            await writer.execute_many([_track(f"{len(gaps)}-{since}-{half}")
                                       for half in ("a", "b")])
            since += 1
            if writer.lingered_batches > lingered:
                gaps.append(since)
                since, lingered = 0, writer.lingered_batches
        assert writer.lingered_records == 0
        await writer.close()

    failures: list[BaseException] = []
    asyncio.run(run())
    assert failures == []
    first, cap = limits.COMMIT_DELAY_PROBE_EVERY_MIN, limits.COMMIT_DELAY_PROBE_EVERY_MAX
    assert gaps == [min(first * 2**index, cap) for index in range(8)]
    assert gaps[-2:] == [cap, cap]
    wal.close()


def test_a_commit_delay_is_checked_at_its_bounds_and_refused_naming_the_flag(tmp_path: Path):
    from quotad.server import Config

    for good in (0, limits.COMMIT_DELAY_MS_MAX):
        assert Config(commit_delay_ms=good).commit_delay_ms == good
    assert Config().commit_delay_ms == limits.COMMIT_DELAY_MS_DEFAULT > 0
    for bad in (-1, limits.COMMIT_DELAY_MS_MAX + 1):
        with pytest.raises(ValueError, match="--commit-delay-ms must be 0 to"):
            Config(commit_delay_ms=bad)
        result = subprocess.run(
            [sys.executable, "-m", "quotad", "serve", "--data-dir", str(tmp_path / "data"),
             "--commit-delay-ms", str(bad)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert f"--commit-delay-ms must be 0 to {limits.COMMIT_DELAY_MS_MAX}" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was opened


@pytest.mark.parametrize("fork_snapshots", [False, True])
def test_snapshots_stay_due_and_made_while_lone_calls_are_written_inline(
        tmp_path: Path, fork_snapshots: bool):
    """A lone call writes its own record only when no snapshot is due: a due one goes through
    the flush task, which makes it (in-process, or by a forked child) as with any batch."""
    wal = WriteAheadLog(tmp_path)
    every = 5

    async def run() -> Writer:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail, snapshot_every_records=every,
                        fork_snapshots=fork_snapshots)
        writer.start()
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        calls = 2 * (limits.LONE_CALL_QUIET_FLUSHES + limits.LONE_CALL_PROBE_EVERY_FLUSHES)
        for index in range(calls):
            await writer.execute(_track(f"k{index}"))
            if fork_snapshots:
                await asyncio.sleep(0.002)  # a child gets time to finish now and then
        assert writer.batches - writer.batches_on_log_thread > limits.LONE_CALL_QUIET_FLUSHES
        assert writer.snapshots >= 2
        assert wal.snapshot_sequence() > calls // 2  # made well after lone calls went inline
        if not fork_snapshots:  # made as soon as due, with the record that made it due
            assert writer.core.sequence - wal.snapshot_sequence() < every
        digest = state_digest(writer.core)
        await writer.close()
        return digest

    digest = asyncio.run(run())
    wal.close()
    wal = WriteAheadLog(tmp_path)
    assert state_digest(recover(wal)) == digest
    wal.close()


def test_a_close_while_the_flush_task_waits_on_the_log_thread_is_not_a_storage_failure(
        tmp_path: Path):
    """close() ends the flush task once all is durable; if that task is then waiting for the
    log thread (here: the prune that follows each snapshot), its cancellation is the stop,
    not a failure of the storage (which would make the server exit 1)."""
    wal = WriteAheadLog(tmp_path)
    failures: list[BaseException] = []

    async def run() -> Writer:
        writer = Writer(recover(wal), wal, on_failure=failures.append, snapshot_every_records=1)
        writer.start()
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        tracked = asyncio.create_task(writer.execute(_track("k")))
        await asyncio.sleep(0)  # applied; its batch and snapshot go to the log thread
        await writer.close()  # durable, then the flush task waits for the prune
        await tracked
        return writer

    writer = asyncio.run(run())
    assert failures == [] and not writer.failed
    assert writer.snapshots >= 2  # the Track's batch went with a snapshot, then its prune
    wal.close()
    reopened = WriteAheadLog(tmp_path)
    assert state_digest(recover(reopened)) == state_digest(writer.core)
    reopened.close()


CLOSE_POINTS = 24
"""Loop turns after which close() is called, one writer each: from before the first call is
applied to after the last answer."""
CALLS = 40
CALL_WAVES = 8
"""The calls are applied over this many turns of the loop, so that batches, snapshots and
prunes follow one another while close() comes."""


@pytest.mark.parametrize("fork_snapshots", [False, True], ids=["in-process", "forked"])
def test_a_close_at_any_point_of_a_busy_flush_stops_cleanly_with_every_answer_durable(
        tmp_path: Path, fork_snapshots: bool):
    """Calls in flight, a snapshot due at every record and a prune after each one stored (an
    hour of server time between calls, so that records pass the keys' retention): wherever
    close() lands, the writer does not fail, every call it applied is answered and counted,
    and the log recovers to the state the writer closed with."""
    hour_ns = 3600 * limits.NS_PER_S
    for turns in range(CLOSE_POINTS):
        wal = WriteAheadLog(tmp_path / str(turns))
        failures: list[BaseException] = []
        wall = iter(range(T0, T0 + 10_000 * hour_ns, hour_ns))

        async def run() -> tuple[Writer, list[str]]:
            writer = Writer(recover(wal), wal, on_failure=failures.append,
                            snapshot_every_records=1, audit_retention_bytes=1,
                            fork_snapshots=fork_snapshots, wall_ns=lambda: next(wall))
            writer.start()
            await writer.execute(UpsertPlan(app="a", plan=PLAN))
            await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
            answered: list[str] = []

            async def one(index: int) -> None:
                for _ in range(index % CALL_WAVES):
                    await asyncio.sleep(0)
                try:
                    await writer.execute(_track(f"k{index}", pad="p" * 100))
                except WriterStopped:  # came after close() began: refused, nothing applied
                    return
                answered.append(f"k{index}")

            calls = [asyncio.create_task(one(index)) for index in range(CALLS)]
            for _ in range(turns):
                await asyncio.sleep(0)
            await writer.close()
            await asyncio.gather(*calls)
            return writer, answered

        writer, answered = asyncio.run(run())
        assert failures == [] and not writer.failed, (turns, failures)
        assert writer.durable_sequence == writer.core.sequence, turns
        usage = writer.core.usage("a", "u", writer.clock.last_ns)
        assert usage.counters[0].used == len(answered), turns  # each applied call answered
        wal.close()
        reopened = WriteAheadLog(tmp_path / str(turns))
        assert state_digest(recover(reopened)) == state_digest(writer.core), turns
        reopened.close()


@pytest.mark.parametrize("fork_snapshots", [False, True])
def test_snapshots_are_deltas_while_few_users_change_and_a_restart_reads_them(
        tmp_path: Path, fork_snapshots: bool):
    """400 subscribers, of whom 2 then change: after the whole snapshots that cover the
    subscriptions, each snapshot holds those 2 alone (a delta), until the log holds
    SNAPSHOT_WHOLE_EVERY_CADENCES cadences of records after the whole one (before their
    deltas cost a whole one): the next is whole again. A restart reads the whole one and
    the latest delta over it."""
    wal = WriteAheadLog(tmp_path)
    wholes_wanted = 2

    async def run() -> tuple[str, Writer, list[int]]:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail, snapshot_every_records=5,
                        fork_snapshots=fork_snapshots)
        writer.start()
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        for n in range(400):
            await writer.execute(UpsertSubscription(app="a", user_id=f"u{n}", plan_id="p"))
        wholes_seen = [wal.whole_snapshot_sequence()]
        for index in range(3000):  # bounded; children take longer on a busy machine
            await writer.execute(Track(app="a", user_id=f"u{index % 2}", event_type="e",
                                       amount=1))
            if fork_snapshots:
                await asyncio.sleep(0.002)  # a finished child is collected on the event loop
            if wal.whole_snapshot_sequence() != wholes_seen[-1]:
                wholes_seen.append(wal.whole_snapshot_sequence())
            if (len(wholes_seen) > wholes_wanted + 1
                    and wal.snapshot_sequence() > wal.whole_snapshot_sequence()):
                break  # and a delta of the last whole one is stored
        assert writer.snapshot_children_failed == 0
        digest = state_digest(writer.core)
        await writer.close()
        return digest, writer, wholes_seen

    digest, writer, wholes_seen = asyncio.run(run())
    assert len(wholes_seen) > wholes_wanted + 1, (wholes_seen, writer.snapshot_deltas)
    whole_every = 5 * limits.SNAPSHOT_WHOLE_EVERY_CADENCES
    assert writer.snapshot_deltas >= 1
    # the last whole one came once the log held whole_every records after the one before;
    # in-process, as soon as that was so (a child may be at work when it is due)
    gap = wholes_seen[-1] - wholes_seen[-2]
    assert gap == whole_every if not fork_snapshots else gap >= whole_every, wholes_seen
    if not fork_snapshots:  # a delta every 5 records in between
        assert writer.snapshot_deltas >= limits.SNAPSHOT_WHOLE_EVERY_CADENCES - 1
    assert wal.first_sequence() == 1  # nothing is past the retention: all kept
    wal.close()
    reopened = WriteAheadLog(tmp_path)
    delta = reopened.load_delta()
    assert delta is not None and delta.sequence > reopened.whole_snapshot_sequence()
    recovered = recover(reopened)
    assert state_digest(recovered) == digest
    assert set(recovered.users_changed["a"]) <= {"u0", "u1"}
    reopened.close()


@pytest.mark.parametrize("changed, delta", [(8, True), (9, False)])
def test_a_delta_is_taken_while_the_deltas_cost_less_than_a_whole_snapshot(
        tmp_path: Path, changed: int, delta: bool):
    """40 subscribers, a whole snapshot of them, then `changed` of them changed: the
    snapshot at a clean stop is a delta while its users times SNAPSHOT_DELTA_USER_COST are
    at most all the users (8 x 5 = 40), and whole past it (9)."""
    assert limits.SNAPSHOT_DELTA_USER_COST == 5
    wal = WriteAheadLog(tmp_path)

    async def run() -> str:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail, snapshot_every_records=41)
        writer.start()
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        for n in range(40):  # the 41st record: a whole snapshot of them
            await writer.execute(UpsertSubscription(app="a", user_id=f"u{n}", plan_id="p"))
        assert wal.whole_snapshot_sequence() == 41 and wal.load_delta() is None
        for n in range(changed):
            await writer.execute(Track(app="a", user_id=f"u{n}", event_type="e", amount=1))
        digest = state_digest(writer.core)
        await writer.close()  # a snapshot of the last records
        return digest

    digest = asyncio.run(run())
    assert wal.snapshot_sequence() == 41 + changed
    assert (wal.load_delta() is not None) is delta
    assert wal.whole_snapshot_sequence() == (41 if delta else 41 + changed)
    assert state_digest(recover(wal)) == digest
    wal.close()


def test_deltas_are_taken_until_together_they_would_cost_a_whole_snapshot(tmp_path: Path):
    """40 subscribers and a whole snapshot of them; then the same 4 users change before each
    snapshot. Each delta holds them (4 x SNAPSHOT_DELTA_USER_COST = 20 of the 40 users' worth):
    two deltas cost 40, a whole snapshot's worth, so the third snapshot is whole."""
    wal = WriteAheadLog(tmp_path)

    async def set_up() -> None:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail)
        writer.start()
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        for n in range(40):
            await writer.execute(UpsertSubscription(app="a", user_id=f"u{n}", plan_id="p"))
        await writer.close()  # a whole snapshot at a clean stop, the first

    async def run() -> list[tuple[int, bool]]:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail, snapshot_every_records=4)
        writer.start()
        seen = []
        for _ in range(3):
            for n in range(4):
                await writer.execute(Track(app="a", user_id=f"u{n}", event_type="e", amount=1))
            seen.append((wal.whole_snapshot_sequence(), wal.load_delta() is not None))
        await writer.close()
        return seen

    asyncio.run(set_up())
    assert wal.whole_snapshot_sequence() == 41 and wal.load_delta() is None
    assert asyncio.run(run()) == [(41, True), (41, True), (53, False)]
    wal.close()
