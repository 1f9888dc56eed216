"""How long idempotency keys are remembered is the server's choice, 24 h to 90 days
(--idempotency-retention-hours), and a logged one: the core answers a repeat by the retention
in force, replay answers it as it was answered, snapshots keep it, and the log keeps the
keys' records for as long. Time is passed in: the core takes it, the writer's wall clock is
a function of the test's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from quotad.core import limits
from quotad.core.commands import (
    SetIdempotencyRetention, Track, TrackResult, UpsertPlan, UpsertSubscription,
)
from quotad.core.errors import InvalidArgument
from quotad.core.machine import Core
from quotad.core.plans import LimitGroup, Plan, Window
from quotad.engine.recovery import recover
from quotad.engine.writer import Writer
from quotad.server import Config
from quotad.storage.codec import decode_record, encode_record, record_key, state_digest
from quotad.storage.snapshot import decode_core, encode_core
from quotad.storage.wal import WriteAheadLog
from server_process import refused_serve
from writer_helpers import stop_without_final_snapshot

HOUR_NS = 3600 * limits.NS_PER_S
T0 = 1_800_000_000 * limits.NS_PER_S
PLAN = Plan(id="p", limit_groups=(LimitGroup(key="units", quota=10**15, window=Window.LIFETIME),))


def _track(key: str = "k", amount: int = 1) -> Track:
    return Track(app="a", user_id="u", event_type="e", amount=amount, idempotency_key=key)


def _subscribed_core() -> Core:
    core = Core()
    core.apply(UpsertPlan(app="a", plan=PLAN), T0 - 2)
    core.apply(UpsertSubscription(app="a", user_id="u", plan_id="p"), T0 - 1)
    return core


def _used(core: Core, now_ns: int) -> int:
    return core.usage("a", "u", now_ns).counters[0].used


def test_a_longer_retention_answers_a_repeat_past_24_h_and_a_shorter_one_forgets_it():
    core = _subscribed_core()
    first = core.apply(_track(), T0)
    assert first.records and _used(core, T0) == 1
    longer = core.apply(SetIdempotencyRetention(retention_ns=48 * HOUR_NS), T0 + 1)
    assert [type(r.command) for r in longer.records] == [SetIdempotencyRetention]
    assert (longer.result.previous_ns, longer.result.retention_ns) == (
        limits.IDEMPOTENCY_RETENTION_NS_MIN, 48 * HOUR_NS)
    # 30 h on: a repeat under 48 h, the first answer and nothing changed; the key is still
    # in a core alone's memory though its first forget time (24 h) has passed
    repeat = core.apply(_track(), T0 + 30 * HOUR_NS)
    assert repeat.result == first.result and repeat.records == ()
    assert ("Track", "k") in core.apps["a"].idempotency
    assert _used(core, T0 + 30 * HOUR_NS) == 1
    # 48 h on: past it, the key is used anew and forgotten from memory in its turn
    anew = core.apply(_track(), T0 + 48 * HOUR_NS)
    assert anew.records and _used(core, T0 + 48 * HOUR_NS) == 2
    core.apply(_track("other"), T0 + 96 * HOUR_NS)
    assert ("Track", "k") not in core.apps["a"].idempotency
    # back to 24 h: a key 30 h old is a new one
    core.apply(_track("late"), T0 + 100 * HOUR_NS)
    shorter = core.apply(SetIdempotencyRetention(
        retention_ns=limits.IDEMPOTENCY_RETENTION_NS_MIN), T0 + 101 * HOUR_NS)
    assert shorter.records and shorter.result.previous_ns == 48 * HOUR_NS
    assert core.apply(_track("late"), T0 + 130 * HOUR_NS).records  # 30 h: used anew
    assert _used(core, T0 + 130 * HOUR_NS) == 5


def test_the_retention_in_force_makes_no_record_and_one_outside_its_range_is_refused():
    core = _subscribed_core()
    same = core.apply(SetIdempotencyRetention(retention_ns=limits.IDEMPOTENCY_RETENTION_NS_MIN), T0)
    assert same.records == () and same.error is None
    for retention_ns in (limits.IDEMPOTENCY_RETENTION_NS_MIN - 1,
                         limits.IDEMPOTENCY_RETENTION_NS_MAX + 1, 0, 48.0 * HOUR_NS):
        with pytest.raises(InvalidArgument) as refused:
            SetIdempotencyRetention(retention_ns=retention_ns)  # type: ignore[arg-type]
        assert refused.value.violations[0].field == "retention_ns"
    at_edges = [SetIdempotencyRetention(retention_ns=limits.IDEMPOTENCY_RETENTION_NS_MAX),
                SetIdempotencyRetention(retention_ns=limits.IDEMPOTENCY_RETENTION_NS_MIN)]
    assert all(core.apply(command, T0 + n + 1).records for n, command in enumerate(at_edges))


def test_the_retention_goes_through_the_log_and_the_snapshot_and_back():
    core = _subscribed_core()
    core.apply(_track(), T0)
    (record,) = core.apply(SetIdempotencyRetention(retention_ns=72 * HOUR_NS), T0 + 1).records
    assert decode_record(record_key(record.sequence), encode_record(record)) == record
    restored = decode_core(encode_core(core))
    assert restored.idempotency_retention_ns == 72 * HOUR_NS
    assert state_digest(restored) == state_digest(core)
    # the least, 24 h, is what a snapshot without the field (every one before it) means
    plain = _subscribed_core()
    assert decode_core(encode_core(plain)).idempotency_retention_ns == (
        limits.IDEMPOTENCY_RETENTION_NS_MIN)
    assert state_digest(plain) != state_digest(restored)


def _writer(wal: WriteAheadLog, clock_ns: list[int], **options: int) -> Writer:
    writer = Writer(recover(wal), wal, on_failure=pytest.fail, wall_ns=lambda: clock_ns[0],
                    **options)
    writer.start()
    return writer


def _keyed_then_50_h(wal: WriteAheadLog, clock_ns: list[int],
                     retention_ns: int) -> tuple[TrackResult, TrackResult, Writer, str]:
    """A keyed Track at T0, the retention set, then (50 h on) snapshots with pruning behind
    each (a 1-day audit retention) and the same Track again: both answers, the writer and
    its state digest."""

    async def run() -> tuple[TrackResult, TrackResult, Writer, str]:
        writer = _writer(wal, clock_ns, audit_retention_ns=24 * HOUR_NS,
                         snapshot_every_records=4)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        first = await writer.execute(_track(amount=3))
        await writer.execute(SetIdempotencyRetention(retention_ns=retention_ns))
        clock_ns[0] = T0 + 50 * HOUR_NS
        assert not writer.core.apps["a"].idempotency  # durable: the log answers for it
        for n in range(8):
            await writer.execute(_track(f"tick{n}"))
        assert wal.snapshot_sequence() > 4
        again = await writer.execute(_track(amount=3))
        digest = state_digest(writer.core)
        await writer.close()
        return first, again, writer, digest
    return asyncio.run(run())


def test_a_writer_answers_a_repeat_from_the_log_for_the_longer_retention_across_restarts(
        tmp_path: Path):
    """Over a real LMDB log: under 72 h a repeat 50 h on is answered from the log, the key's
    record outlives the 1-day audit retention, and a restart has the same state and answers
    the same; under 24 h (the control) the repeat is a new Track and the record is pruned."""
    clock_ns = [T0]
    wal = WriteAheadLog(tmp_path / "72h")
    first, again, writer, digest = _keyed_then_50_h(wal, clock_ns, 72 * HOUR_NS)
    assert again == first and writer.records_pruned == 0
    assert wal.first_sequence() == 1 and wal.idempotency_record("a", "Track", "k", 10**9)

    async def restarted() -> None:
        writer = _writer(wal, clock_ns)
        assert writer.core.idempotency_retention_ns == 72 * HOUR_NS
        assert state_digest(writer.core) == digest
        assert await writer.execute(_track(amount=3)) == first
        assert _used(writer.core, clock_ns[0]) == 3 + 8
        await writer.close()

    clock_ns[0] = T0 + 60 * HOUR_NS
    asyncio.run(restarted())
    wal.close()

    control_clock_ns = [T0]
    control = WriteAheadLog(tmp_path / "24h")
    first, again, writer, _ = _keyed_then_50_h(control, control_clock_ns,
                                               limits.IDEMPOTENCY_RETENTION_NS_MIN)
    assert again != first and _used(writer.core, control_clock_ns[0]) == 3 + 8 + 3
    assert writer.records_pruned >= 3 and control.first_sequence() > 3
    control.close()


def test_no_keyed_record_finds_an_earlier_use_of_its_key_in_the_log_so_replay_skips_it(
        tmp_path: Path):
    """Why replay never asks the log for a key (Core.replay): each keyed record in the log is
    its key's first use or a use past the first's retention, and the idempotency table names
    a key's latest use, so the log's lookup as of the record before finds nothing for any of
    them. Repeats within the retention made no record; a restart replays to the same state."""
    clock_ns = [T0]
    wal = WriteAheadLog(tmp_path)

    async def run() -> str:
        writer = _writer(wal, clock_ns)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        first = await writer.execute(_track("k", amount=2))
        await writer.execute(_track("j", amount=5))
        clock_ns[0] = T0 + HOUR_NS  # repeats within the retention: answered, no record
        sequence = writer.core.sequence
        assert await writer.execute(_track("k", amount=2)) == first
        assert writer.core.sequence == sequence
        clock_ns[0] = T0 + 25 * HOUR_NS  # past it: used anew, a record each
        second = await writer.execute(_track("k", amount=2))
        assert second != first
        await writer.execute(_track("j", amount=5))
        await writer.execute(SetIdempotencyRetention(retention_ns=48 * HOUR_NS))
        clock_ns[0] = T0 + 50 * HOUR_NS  # 25 h after the second use, within 48: from the log
        assert await writer.execute(_track("k", amount=2)) == second
        clock_ns[0] = T0 + 74 * HOUR_NS  # 49 h after it: used anew
        third = await writer.execute(_track("k", amount=2))
        assert writer.core.sequence == sequence + 4 and third.counters[0].used == 2 + 5 + 2 + 5 + 2
        digest = state_digest(writer.core)
        await stop_without_final_snapshot(writer)  # a restart replays all
        return digest

    digest = asyncio.run(run())
    keyed = [record for record in wal.records() if getattr(record.command, "idempotency_key", "")]
    assert [record.command.idempotency_key for record in keyed] == ["k", "j", "k", "j", "k"]
    for record in keyed:
        assert wal.idempotency_record("a", "Track", record.command.idempotency_key,
                                      record.sequence - 1) is None
    latest = wal.idempotency_record("a", "Track", "k", keyed[-1].sequence)
    assert latest is not None and latest.sequence == keyed[-1].sequence
    wal.close()
    wal = WriteAheadLog(tmp_path)
    asked = []
    lookup = wal.idempotency_record
    wal.idempotency_record = lambda *key: asked.append(key) or lookup(*key)  # type: ignore
    try:
        core = recover(wal, repair=False)  # each record made again exactly, asking nothing
        assert state_digest(core) == digest and core.idempotency_retention_ns == 48 * HOUR_NS
        assert asked == [] and not core.apps["a"].idempotency
    finally:
        wal.close()


def test_the_flag_takes_24_to_2160_hours_and_refuses_the_rest_having_made_nothing(
        tmp_path: Path):
    assert Config().idempotency_retention_ns == limits.IDEMPOTENCY_RETENTION_NS_MIN
    assert Config(idempotency_retention_ns=limits.IDEMPOTENCY_RETENTION_NS_MAX)
    for hours in ("23.9", "2161", "-1"):
        refused = refused_serve(tmp_path / "d", "--idempotency-retention-hours", hours)
        assert "--idempotency-retention-hours must be 24 to 2,160" in refused
