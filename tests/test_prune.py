"""Pruning the log over a real LMDB directory: by the audit retention, by the bound on its live
data (never into the keys' 24 h), in transactions of bounded size, between the writer's
batches. Time is the server's: the core and the writer take it as input."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from quotad.core import limits
from quotad.core.commands import Track, UpsertPlan, UpsertSubscription
from quotad.core.machine import Core
from quotad.core.plans import LimitGroup, Plan, Window
from quotad.engine.recovery import recover
from quotad.engine.writer import Writer, prune_records
from quotad.server import Config
from quotad.storage.codec import state_digest
from quotad.storage.snapshot import snapshot_of
from quotad.storage.wal import Retention, Snapshot, WriteAheadLog
from server_process import refused_serve

PLAN = Plan(id="p", limit_groups=(LimitGroup(key="units", quota=10**15, window=Window.LIFETIME),))
HOUR_NS = 3600 * limits.NS_PER_S
START_NS = 1_800_000_000 * limits.NS_PER_S
PAD = "x" * 200
"""Metadata that makes each record a few hundred bytes, so that a few hundred fill pages."""


def _track(n: int) -> Track:
    return Track(app="a", user_id="u", event_type="e", amount=1, idempotency_key=f"k{n}",
                 metadata=(("pad", PAD),))


def _hourly_log(wal: WriteAheadLog, hours: int) -> Core:
    """A subscriber, then one keyed Track an hour for `hours` hours (sequence 3 at hour 0),
    all written; then a snapshot of it all."""
    core = Core()
    records = []
    for offset_ns, command in ((0, UpsertPlan(app="a", plan=PLAN)),
                               (1, UpsertSubscription(app="a", user_id="u", plan_id="p"))):
        records += core.apply(command, START_NS - HOUR_NS + offset_ns).records
    for hour in range(hours):
        records += core.apply(_track(hour), START_NS + hour * HOUR_NS).records
    wal.append(records)
    wal.append([], Snapshot(core.sequence, snapshot_of(core)))
    return core


def _hour_of_first(wal: WriteAheadLog) -> int:
    return (wal.record_now_ns(wal.first_sequence()) - START_NS) // HOUR_NS


def test_the_retention_prunes_what_is_older_and_covered_in_bounded_transactions(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    core = _hourly_log(wal, 100)
    before_ns = START_NS + 50 * HOUR_NS  # the records of hours 0 to 49 (and the set-up) go
    first = wal.prune(core.sequence, Retention(before_ns=before_ns), records_max=20)
    assert (first.records, first.beyond_retention, first.more) == (20, 0, True)
    assert wal.first_sequence() == 21
    total = first.records
    for _ in range(10):  # bounded: 32 more records, 20 a transaction
        pruned = wal.prune(core.sequence, Retention(before_ns=before_ns), records_max=20)
        total += pruned.records
        if not pruned.more:
            break
    assert total == 52 and not pruned.more and pruned.beyond_retention == 0
    assert _hour_of_first(wal) == 50 and pruned.oldest_ns == START_NS + 50 * HOUR_NS
    assert wal.prune(core.sequence, Retention(before_ns=before_ns)).records == 0
    assert wal.idempotency_record("a", "Track", "k49", core.sequence) is None
    assert wal.idempotency_record("a", "Track", "k50", core.sequence) is not None
    number = core.user_number("a", "u")
    events = wal.list_events("a", "u", number, 0, 2**64 - 1, b"", 1000)
    assert [event.now_ns for event in events] == [START_NS + hour * HOUR_NS
                                                  for hour in range(50, 100)]
    wal.close()
    reopened = WriteAheadLog(tmp_path)  # the snapshot and the log after it: the same state
    assert state_digest(recover(reopened)) == state_digest(core)
    reopened.close()


def test_a_transaction_prunes_pruned_records_per_transaction_max_at_most(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    most = limits.PRUNED_RECORDS_PER_TRANSACTION_MAX
    core = _hourly_log(wal, most - 1)  # with the set-up's 2 records: one more than a transaction
    everything = Retention(before_ns=2**63)
    first = wal.prune(core.sequence, everything)
    assert (first.records, first.more) == (most, True)
    last = wal.prune(core.sequence, everything)
    assert (last.records, last.more, last.oldest_ns) == (1, False, None)
    wal.close()


def test_after_a_batch_the_writer_prunes_a_transaction_or_twice_the_batch_when_larger(
        tmp_path: Path):
    """5,002 records all past the retention: a lone call's batch is followed by one full
    transaction of pruning, batches of 513 and 900 records (just past half a transaction, and
    far) by twice theirs, in two transactions each, a last lone call's by a transaction again."""
    assert (limits.PRUNED_RECORDS_PER_RECORD_WRITTEN,
            limits.PRUNED_RECORDS_PER_TRANSACTION_MAX) == (2, 1024)
    wal = WriteAheadLog(tmp_path)
    core = _hourly_log(wal, 5000)
    wall = iter(range(START_NS + 7000 * HOUR_NS, START_NS + 7001 * HOUR_NS))
    pruned_after = []

    async def run() -> None:
        writer = Writer(core, wal, on_failure=pytest.fail, wall_ns=lambda: next(wall))
        writer.start()
        keys = iter(range(10_000, 20_000))  # keys of their own: each Track a new record
        for tracks in (1, 513, 900, 1):
            done = writer.records_pruned
            await writer.execute_many([_track(next(keys)) for _ in range(tracks)])
            for _ in range(200):  # bounded: the pruning after the batch ends on the log thread
                if writer.records_pruned > done:
                    break
                await asyncio.sleep(0.01)
            pruned_after.append(writer.records_pruned - done)
        await writer.close()
    asyncio.run(run())
    assert pruned_after == [1024, 1026, 1800, 1024]
    assert wal.first_sequence() == 1 + sum(pruned_after)
    wal.close()


def test_a_budget_past_a_transaction_goes_in_transactions_of_the_max_until_none_is_due(
        tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    core = _hourly_log(wal, 2998)  # 3,000 records with the set-up's
    everything = Retention(before_ns=2**63)
    transactions = prune_records(wal, core.sequence, everything, 2500)
    assert [(t.records, t.more) for t in transactions] == [(1024, True), (1024, True),
                                                          (452, True)]
    transactions = prune_records(wal, core.sequence, everything, 2500)
    assert [(t.records, t.more) for t in transactions] == [(500, False)]  # none left
    assert prune_records(wal, core.sequence, everything, 64)[0].records == 0
    wal.close()


def test_nothing_after_the_snapshot_goes(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    _hourly_log(wal, 10)
    pruned = wal.prune(5, Retention(before_ns=2**63, live_bytes_max=1, kept_from_ns=2**63))
    assert pruned.records == 5 and wal.first_sequence() == 6
    wal.close()


def test_past_the_size_bound_the_oldest_go_inside_the_retention_never_inside_the_keys_day(
        tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    core = _hourly_log(wal, 200)
    live_bytes = wal.live_bytes()
    bound = live_bytes // 2
    kept_from_ns = START_NS + 190 * HOUR_NS
    retention = Retention(before_ns=START_NS - 2 * HOUR_NS, live_bytes_max=bound,
                          kept_from_ns=kept_from_ns)  # nothing is past the time retention
    beyond = 0
    for _ in range(20):  # bounded: each transaction re-estimates what is over the bound
        pruned = wal.prune(core.sequence, retention)
        beyond += pruned.beyond_retention
        if pruned.records == 0:
            break
    assert pruned.records == 0 and beyond > 50
    assert wal.live_bytes() == pruned.live_bytes <= bound < live_bytes
    assert _hour_of_first(wal) < 190  # it stopped at the bound, before the keys' day
    tiny = Retention(before_ns=0, live_bytes_max=1, kept_from_ns=kept_from_ns)
    for _ in range(20):
        pruned = wal.prune(core.sequence, tiny)
        if pruned.records == 0:
            break
    assert pruned.live_bytes > 1 and not pruned.more
    assert _hour_of_first(wal) == 190  # every record at or after kept_from_ns stays
    assert wal.idempotency_record("a", "Track", "k190", core.sequence) is not None
    wal.close()


def _writer_run(tmp_path: Path, retention_bytes: int, tracks: int, spacing_ns: int,
                monotonic_s: Callable[[], float] = time.monotonic,
                ) -> tuple[WriteAheadLog, Writer, str, int]:
    """A writer whose wall clock moves spacing_ns per call, over `tracks` calls with a
    snapshot every 100 records; its state digest and server time at the end."""
    wall = iter(range(START_NS, START_NS + (tracks + 10) * spacing_ns, spacing_ns))
    wal = WriteAheadLog(tmp_path)

    async def run() -> tuple[Writer, str, int]:
        writer = Writer(recover(wal), wal, on_failure=pytest.fail, snapshot_every_records=100,
                        audit_retention_bytes=retention_bytes, wall_ns=lambda: next(wall),
                        monotonic_s=monotonic_s)
        writer.start()
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        for n in range(tracks):
            await writer.execute(_track(n))
        digest, last_ns = state_digest(writer.core), writer.clock.last_ns
        await writer.close()
        return writer, digest, last_ns
    return wal, *asyncio.run(run())


def test_a_writer_keeps_its_log_under_the_bound_cutting_into_the_retention_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="quotad.writer")
    bound = 256 * 1024
    wal, writer, digest, last_ns = _writer_run(tmp_path, bound, 1500, 10 * 60 * limits.NS_PER_S)
    assert writer.records_pruned > 500  # 10 days of records, kept 30 days but for the bound
    assert wal.first_sequence() > 500
    # at most the records since the last snapshot (100, a few hundred bytes each) over it
    assert wal.live_bytes() <= bound + 100 * 1024
    trimmed = [r for r in caplog.records if "pruned inside --audit-retention-days" in r.getMessage()]
    assert len(trimmed) == 1  # said once, then at most every AUDIT_TRIMMED_WARN_REPEAT_S
    assert trimmed[0].live_bytes <= bound + 100 * 1024
    assert trimmed[0].audit_trail_kept_s < 10 * 24 * 3600
    wal.close()
    reopened = WriteAheadLog(tmp_path)
    assert state_digest(recover(reopened)) == digest
    assert reopened.record_now_ns(reopened.last_sequence()) == last_ns
    reopened.close()


def test_the_warning_is_said_again_after_audit_trimmed_warn_repeat_s_not_before(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The writer's monotonic clock is the test's: it reads 0 at the first warning due, then
    just under AUDIT_TRIMMED_WARN_REPEAT_S, then exactly it, then stays there."""
    caplog.set_level(logging.WARNING, logger="quotad.writer")
    repeat_s = limits.AUDIT_TRIMMED_WARN_REPEAT_S
    readings = iter((0.0, repeat_s - 0.001, repeat_s))
    clock_s = [0.0]

    def monotonic_s() -> float:
        clock_s[0] = next(readings, clock_s[0])
        return clock_s[0]

    _writer_run(tmp_path, 256 * 1024, 1500, 10 * 60 * limits.NS_PER_S, monotonic_s)
    trimmed = [r for r in caplog.records if "pruned inside --audit-retention-days" in r.getMessage()]
    assert len(trimmed) == 2  # at 0 and at repeat_s; not at repeat_s - 0.001, nor after
    assert next(readings, None) is None  # every reading was taken: more warnings were due


def test_a_bound_the_keys_day_does_not_fit_keeps_that_day_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="quotad.writer")
    spacing_ns = 20 * 60 * limits.NS_PER_S  # 72 records a day
    wal, writer, digest, last_ns = _writer_run(tmp_path, 16 * 1024, 400, spacing_ns)
    assert writer.records_pruned > 0
    first_ns = wal.record_now_ns(wal.first_sequence())
    assert first_ns <= last_ns - limits.IDEMPOTENCY_RETENTION_NS_MIN  # the last day is all there
    assert any("its records of the last 24 h stay" in r.getMessage() for r in caplog.records)
    wal.close()


def test_the_bound_defaults_to_three_quarters_of_the_disk_or_map_and_must_be_below_the_map(tmp_path: Path):
    gib = 1024**3
    assert Config(map_size_bytes=4 * gib).log_bytes_max(100 * gib) == 3 * gib  # the map's
    assert Config(map_size_bytes=4 * gib).log_bytes_max(2 * gib) == int(1.5 * gib)  # the disk's
    assert Config().log_bytes_max(100 * gib) == 75 * gib
    assert Config(map_size_bytes=4 * gib, audit_retention_bytes=10).log_bytes_max(gib) == 10
    for gib in ("1024", "-1"):
        refused = refused_serve(tmp_path / "d", "--audit-retention-gib", gib)
        assert "--audit-retention-gib must be" in refused
