"""Idempotency keys live in the log, not the heap: once a keyed command's record is durable,
memory forgets the key, and a repeat is answered from the record (its first answer), across
a restart too; the same key for another request is still ALREADY_EXISTS. Over a real LMDB log
and the real writer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from quotad.core.commands import (
    Commit, Extend, Release, Reserve, Track, UpsertPlan, UpsertSubscription,
)
from quotad.core.errors import AlreadyExists, FailedPrecondition, PermissionDenied
from quotad.core import limits
from quotad.core.holds import HoldState
from quotad.core.machine import Core
from quotad.core.plans import LimitGroup, Match, Plan, Window
from quotad.engine.recovery import recover
from quotad.engine.writer import Writer
from quotad.storage import log_pb2
from quotad.storage.codec import (
    hold_row_key, idempotency_row_key, reservation_bytes, state_digest,
)
from quotad.storage.snapshot import snapshot_of
from quotad.storage.wal import FAULT_ENV, Retention, Snapshot, WriteAheadLog
from writer_helpers import stop_without_final_snapshot

PLAN = Plan(id="p", limit_groups=(
    LimitGroup(key="tokens", label="Tokens", unit="tokens", quota=1000, window=Window.MONTH,
               match=Match(event_types=("openai.*",))),
    LimitGroup(key="all", quota=10**9, window=Window.LIFETIME),
))
KEYS = 500


def _rid(n: int) -> str:
    return f"rsv_{n:024x}"


async def _writer(wal: WriteAheadLog) -> Writer:
    writer = Writer(recover(wal), wal, on_failure=lambda error: None)
    writer.start()
    return writer


def _keyed_memory(writer: Writer) -> int:
    return sum(len(app.idempotency) for app in writer.core.apps.values())


def test_durable_keys_leave_memory_and_a_repeat_still_gets_the_first_answer(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)

    async def first_run() -> dict:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        answers = {}
        for n in range(KEYS):
            answers[f"r{n}"] = await writer.execute(Reserve(
                app="a", user_id="u", event_type="openai.chat", amount=1,
                idempotency_key=f"r{n}", reservation_id=_rid(n)))
        answers["c0"] = await writer.execute(Commit(app="a", reservation_id=_rid(0),
                                                    amount=0, idempotency_key="c0"))
        answers["t0"] = await writer.execute(Track(app="a", user_id="u", event_type="x",
                                                   amount=-5, idempotency_key="t0"))
        answers["l1"] = await writer.execute(Release(app="a", reservation_id=_rid(1),
                                                     idempotency_key="l1"))
        assert _keyed_memory(writer) == 0  # every record durable: nothing keyed in memory
        sequence = writer.core.sequence
        # repeats: the first answers, from the log, and nothing new is written
        for n in (0, 7, KEYS - 1):
            again = await writer.execute(Reserve(
                app="a", user_id="u", event_type="openai.chat", amount=1,
                idempotency_key=f"r{n}", reservation_id=_rid(KEYS + n)))
            assert again == answers[f"r{n}"]
        assert await writer.execute(Commit(app="a", reservation_id=_rid(0), amount=0,
                                           idempotency_key="c0")) == answers["c0"]
        assert writer.core.sequence == sequence
        with pytest.raises(AlreadyExists):
            await writer.execute(Track(app="a", user_id="u", event_type="x", amount=-6,
                                       idempotency_key="t0"))
        await writer.close()
        return answers

    answers = asyncio.run(first_run())
    wal.close()

    wal = WriteAheadLog(tmp_path)

    async def after_restart() -> None:
        writer = await _writer(wal)
        assert _keyed_memory(writer) == 0
        assert await writer.execute(Release(app="a", reservation_id=_rid(1),
                                            idempotency_key="l1")) == answers["l1"]
        assert await writer.execute(Track(app="a", user_id="u", event_type="x", amount=-5,
                                          idempotency_key="t0")) == answers["t0"]
        await writer.close()

    asyncio.run(after_restart())
    wal.close()


def test_a_replay_does_not_take_a_later_record_for_an_earlier_first_use(tmp_path: Path):
    """Recovery without a snapshot replays every keyed record while the idempotency table
    already names them all: each must replay as a first use, as it was."""
    wal = WriteAheadLog(tmp_path)

    async def run() -> str:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        for n in range(20):
            await writer.execute(Track(app="a", user_id="u", event_type="openai.chat",
                                       amount=3, idempotency_key=f"k{n}"))
        digest = state_digest(writer.core)
        await stop_without_final_snapshot(writer)  # a restart replays all
        return digest

    digest = asyncio.run(run())
    wal.close()
    wal = WriteAheadLog(tmp_path)
    try:
        core = recover(wal, repair=False)  # replay checks each record is made again exactly
        assert core.sequence == 22 and state_digest(core) == digest
    finally:
        wal.close()


def test_pruning_a_record_removes_its_events_idempotency_row_and_finished_hold(tmp_path: Path):
    wal = WriteAheadLog(tmp_path, event_sweep_records=1)  # events swept with every pruning

    async def run() -> tuple[int, int, dict]:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        await writer.execute(Reserve(app="a", user_id="u", event_type="openai.chat", amount=2,
                                     idempotency_key="r", reservation_id=_rid(1)))
        await writer.execute(Release(app="a", reservation_id=_rid(1), idempotency_key="l"))
        await writer.close()
        core = writer.core
        return core.user_number("a", "u"), core.sequence, snapshot_of(core)

    number, sequence, encoded = asyncio.run(run())
    assert wal.finished_hold(_rid(1), sequence) is not None
    assert wal.idempotency_record("a", "Reserve", "r", sequence) is not None
    assert len(wal.list_events("a", "u", number, 0, 2**64 - 1, b"", 10)) == 2
    wal.append([], Snapshot(sequence, encoded))
    wal.prune(sequence, Retention(before_ns=2**63))  # all old, all covered
    assert wal.first_sequence() == 0  # every record pruned
    assert wal.finished_hold(_rid(1), 10**6) is None
    assert wal.idempotency_record("a", "Reserve", "r", 10**6) is None
    assert wal.idempotency_record("a", "Release", "l", 10**6) is None
    assert wal.list_events("a", "u", number, 0, 2**64 - 1, b"", 10) == []
    with wal.env.begin() as txn:
        for db in (wal.holds_db, wal.idempotency_db, wal.event_index_db):
            assert txn.stat(db)["entries"] == 0
    wal.close()


def test_a_finished_hold_leaves_memory_once_durable_and_answers_from_the_log(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)

    async def run() -> None:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        await writer.execute(UpsertPlan(app="b", plan=PLAN))
        for n in range(3):
            await writer.execute(Reserve(app="a", user_id="u", event_type="openai.chat",
                                         amount=10, reservation_id=_rid(n)))
        await writer.execute(Commit(app="a", reservation_id=_rid(0), amount=4))
        await writer.execute(Release(app="a", reservation_id=_rid(1)))
        app = writer.core.apps["a"]
        assert set(app.reservations) == {_rid(2)}  # only the live one in memory
        with pytest.raises(FailedPrecondition):  # committed, from the log
            await writer.execute(Commit(app="a", reservation_id=_rid(0)))
        with pytest.raises(FailedPrecondition):  # released, from the log
            await writer.execute(Commit(app="a", reservation_id=_rid(1)))
        again = await writer.execute(Release(app="a", reservation_id=_rid(1)))  # a no-op
        assert again.counters[0].held == 10 and again.counters[0].used == 4
        with pytest.raises(PermissionDenied):
            await writer.execute(Release(app="b", reservation_id=_rid(1)))
        await writer.close()

    asyncio.run(run())
    wal.close()


def test_a_finished_hold_row_reads_its_finish_and_expiry_from_its_records(tmp_path: Path):
    """A young hold's row leaves out when it finished (its writing record's time) and, for a
    hold never extended, its expiry (its Reserve's time plus TTL): read back, they are those."""
    wal = WriteAheadLog(tmp_path)

    async def run() -> dict[str, int]:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        at = {}
        for n in range(2):
            await writer.execute(Reserve(app="a", user_id="u", event_type="openai.chat",
                                         amount=10, ttl_ns=30 * 10**9, reservation_id=_rid(n)))
            at[f"reserve{n}"] = writer.core.sequence
        await writer.execute(Extend(app="a", reservation_id=_rid(1), ttl_ns=90 * 10**9))
        at["extend"] = writer.core.sequence
        await writer.execute(Commit(app="a", reservation_id=_rid(0), amount=4))
        at["commit"] = writer.core.sequence
        await writer.execute(Release(app="a", reservation_id=_rid(1)))
        at["release"] = writer.core.sequence
        await writer.close()
        return at

    at = asyncio.run(run())
    rows = _hold_rows(wal, 2)
    assert all(row.from_reserve_record and not row.HasField("finished_at_ns") for row in rows)
    assert not rows[0].HasField("expires_at_ns") and rows[1].HasField("expires_at_ns")
    time_ns = wal.record_now_ns
    committed = wal.finished_hold(_rid(0), at["release"])
    assert committed.status is HoldState.COMMITTED
    assert committed.finished_at_ns == time_ns(at["commit"])
    assert committed.expires_at_ns == time_ns(at["reserve0"]) + 30 * 10**9
    released = wal.finished_hold(_rid(1), at["release"])
    assert released.status is HoldState.RELEASED
    assert released.finished_at_ns == time_ns(at["release"])
    assert released.expires_at_ns == time_ns(at["extend"]) + 90 * 10**9
    wal.close()
    wal = WriteAheadLog(tmp_path)  # what a restart reads back is what the writer had
    try:
        core = recover(wal, repair=False)
        assert wal.finished_hold(_rid(0), core.sequence) == committed
    finally:
        wal.close()


def _hold_rows(wal: WriteAheadLog, count: int) -> list:
    """The holds table's rows of holds _rid(0) to _rid(count - 1), as stored."""
    with wal.env.begin(db=wal.holds_db) as txn:
        return [log_pb2.FinishedHold.FromString(txn.get(hold_row_key(reservation_bytes(
            _rid(n))))) for n in range(count)]


def test_past_the_reserve_expiries_remembered_a_hold_row_keeps_its_expiry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The log remembers each Reserve's expiry until its hold's row is written, at most
    RESERVE_EXPIRIES_REMEMBERED_MAX of them: a hold it forgot writes its expiry in its row,
    one it remembers leaves it out, and both read back the same."""
    monkeypatch.setattr(limits, "RESERVE_EXPIRIES_REMEMBERED_MAX", 1)
    wal = WriteAheadLog(tmp_path)

    async def run() -> dict[str, int]:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        at = {}
        for n in range(2):  # the second Reserve's append forgets the first's expiry
            await writer.execute(Reserve(app="a", user_id="u", event_type="openai.chat",
                                         amount=10, ttl_ns=30 * 10**9, reservation_id=_rid(n)))
            at[f"reserve{n}"] = writer.core.sequence
        for n in range(2):
            await writer.execute(Commit(app="a", reservation_id=_rid(n)))
        at["end"] = writer.core.sequence
        await writer.close()
        return at

    at = asyncio.run(run())
    rows = _hold_rows(wal, 2)
    assert [row.HasField("expires_at_ns") for row in rows] == [True, False]
    for n in range(2):
        hold = wal.finished_hold(_rid(n), at["end"])
        assert hold.expires_at_ns == wal.record_now_ns(at[f"reserve{n}"]) + 30 * 10**9
    wal.close()


@pytest.mark.parametrize("rows_remembered_max", [limits.IDEMPOTENCY_ROWS_REMEMBERED_MAX, 2])
def test_a_new_keys_row_is_filed_under_the_key_its_lookup_computed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows_remembered_max: int):
    """The lookup of a new key remembers its row key for the record it makes, at most
    IDEMPOTENCY_ROWS_REMEMBERED_MAX of them: a refused command's lookup makes no record,
    and memory forgets its row key at the limit. Every row is filed under its key's
    idempotency_row_key, remembered or computed again, and answers a repeat."""
    monkeypatch.setattr(limits, "IDEMPOTENCY_ROWS_REMEMBERED_MAX", rows_remembered_max)
    wal = WriteAheadLog(tmp_path)
    keys = [f"k{n}" for n in range(40)]

    async def run() -> None:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        answers = {}
        for n, key in enumerate(keys):
            if n % 4 == 0:  # refused after its lookup: no subscription
                with pytest.raises(FailedPrecondition):
                    await writer.execute(Track(app="a", user_id="nobody", event_type="x",
                                               amount=1, idempotency_key=f"refused {key}"))
            answers[key] = await writer.execute(Track(app="a", user_id="u", event_type="x",
                                                      amount=1, idempotency_key=key))
            assert len(wal._rows_looked_up) <= rows_remembered_max
        assert _keyed_memory(writer) == 0
        sequence = writer.core.sequence
        for key in keys:
            assert await writer.execute(Track(app="a", user_id="u", event_type="x", amount=1,
                                              idempotency_key=key)) == answers[key]
        assert writer.core.sequence == sequence  # each a repeat: nothing written
        await writer.close()

    asyncio.run(run())
    with wal.env.begin() as txn:
        rows = {bytes(row) for row, _ in txn.cursor(db=wal.idempotency_db)}
    wal.close()
    assert rows == {idempotency_row_key("a", "Track", key) for key in keys}


@pytest.mark.parametrize("shapes_remembered_max", [limits.COUNTER_SHAPES_REMEMBERED_MAX, 1])
def test_a_first_answer_reads_its_counters_shapes_back_after_a_plan_changed_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shapes_remembered_max: int):
    """First answers store each counter's group definition once, in the shapes table: a
    repeat after a restart, with nothing in memory, gets exactly the first answer, the one a
    plan that changed the group since did not change. With room in memory for one shape,
    written or read, the table and the answers are the same."""
    monkeypatch.setattr(limits, "COUNTER_SHAPES_REMEMBERED_MAX", shapes_remembered_max)
    wal = WriteAheadLog(tmp_path)
    renamed = Plan(id="p", limit_groups=(
        LimitGroup(key="tokens", label="Tokens (new)", unit="tokens", quota=2000,
                   window=Window.MONTH, match=Match(event_types=("openai.*",))),
        PLAN.limit_groups[1],
    ))

    async def first_run() -> dict:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        answers = {}
        for n in range(3):
            answers[f"old{n}"] = await writer.execute(Reserve(
                app="a", user_id="u", event_type="openai.chat", amount=1,
                idempotency_key=f"{n:032x}", reservation_id=_rid(n)))
        await writer.execute(UpsertPlan(app="a", plan=renamed))
        answers["new"] = await writer.execute(Reserve(
            app="a", user_id="u", event_type="openai.chat", amount=1,
            idempotency_key="new", reservation_id=_rid(9)))
        answers["commit"] = await writer.execute(Commit(app="a", reservation_id=_rid(0),
                                                        idempotency_key="c0"))
        await writer.close()
        return answers

    answers = asyncio.run(first_run())
    assert answers["old0"].counters[0].label == "Tokens"
    assert answers["new"].counters[0].label == "Tokens (new)"
    with wal.env.begin() as txn:
        assert txn.stat(wal.shapes_db)["entries"] == 3  # two groups, one of them changed
        counters = [counter for _, value in txn.cursor(db=wal.log_db)
                    for counter in log_pb2.Record.FromString(value[12:]).answer.counters]
    assert len(counters) == 3 * 2 + 2 + 2 and all(
        counter.shape and not counter.key for counter in counters)
    wal.close()

    wal = WriteAheadLog(tmp_path)

    async def after_restart() -> None:
        writer = await _writer(wal)
        assert _keyed_memory(writer) == 0
        for n in range(3):
            assert await writer.execute(Reserve(
                app="a", user_id="u", event_type="openai.chat", amount=1,
                idempotency_key=f"{n:032x}", reservation_id=_rid(20 + n))) == answers[f"old{n}"]
        assert await writer.execute(Reserve(
            app="a", user_id="u", event_type="openai.chat", amount=1,
            idempotency_key="new", reservation_id=_rid(30))) == answers["new"]
        assert await writer.execute(Commit(app="a", reservation_id=_rid(0),
                                           idempotency_key="c0")) == answers["commit"]
        await writer.close()

    asyncio.run(after_restart())
    wal.close()


def test_keys_that_begin_with_their_time_are_filed_in_the_order_they_were_made(
        tmp_path: Path):
    """The clients' keys begin with the milliseconds they were made at: their rows go to the
    table's last pages, which fill. A key from a client whose clock is behind, and a key
    with no time at all, are filed in their place and answered all the same."""
    wal = WriteAheadLog(tmp_path)
    made_at_ms = 1_800_000_000_000
    keys = [f"{made_at_ms + n // 8:012x}{n:020x}" for n in range(2000)]
    keys[1000:1010] = [f"{made_at_ms - 60_000 + n:012x}{n:020x}" for n in range(10)]  # behind
    keys[1500:1505] = [f"no time {n}" for n in range(5)]

    async def run() -> None:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        answers = {}
        for at in range(0, len(keys), 100):  # 100 at a time: the writer groups them
            done = await asyncio.gather(*(writer.execute(Track(
                app="a", user_id="u", event_type="x", amount=1, idempotency_key=key))
                for key in keys[at:at + 100]))
            answers.update(zip(keys[at:at + 100], done))
        assert _keyed_memory(writer) == 0
        sequence = writer.core.sequence
        for key in keys[::97] + keys[1000:1010] + keys[1500:1505]:
            again = await writer.execute(Track(app="a", user_id="u", event_type="x", amount=1,
                                               idempotency_key=key))
            assert again == answers[key], key
        assert writer.core.sequence == sequence  # each a repeat: nothing written
        await writer.close()

    asyncio.run(run())
    with wal.env.begin() as txn:
        rows = [bytes(row) for row, _ in txn.cursor(db=wal.idempotency_db)]
        stat = txn.stat(wal.idempotency_db)
    wal.close()
    assert len(rows) == len(keys)
    assert sum(row.startswith(bytes(6)) for row in rows) == 5  # the keys with no time
    # then the others by the time they begin with: the clock behind's first
    assert [row[:6].hex() for row in rows[5:15]] == [key[:12] for key in keys[1000:1010]]
    # 14-byte key, 8-byte value, 8 bytes of node and 2 of pointer: 127 rows per 4 KiB page
    assert stat["leaf_pages"] <= len(keys) // 127 + 2, stat  # full: split where they grow


def test_a_slot_sets_finished_holds_are_read_in_one_pass_with_an_item_per_row(tmp_path: Path):
    """The holds table files holds by time, so a move reads its slots' holds in a pass over
    the whole table: one item per row (None for another slot's), so that the pass can let
    the server serve other calls every so many rows, whichever slots the rows belong to."""
    wal = WriteAheadLog(tmp_path)
    ids = [f"rsv_{slot:03x}{n:021x}" for n in range(12) for slot in (5, 9, 4095)]

    async def run() -> None:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="u", plan_id="p"))
        for rid in ids:
            await writer.execute(Reserve(app="a", user_id="u", event_type="openai.chat",
                                         amount=1, reservation_id=rid))
            await writer.execute(Commit(app="a", reservation_id=rid, amount=1))
        await writer.close()

    asyncio.run(run())
    with wal.env.begin(buffers=False) as txn:
        items = list(wal.slot_holds(txn, frozenset({9, 4095}), wal.last_sequence()))
        none_yet = list(wal.slot_holds(txn, frozenset({9}), 1))  # before any finished
    wal.close()
    assert len(items) == len(ids)  # an item per row
    found = sorted(hold.reservation_id for hold in items if hold is not None)
    assert found == sorted(rid for rid in ids if rid[4:7] in ("009", "fff"))
    assert all(hold.status is HoldState.COMMITTED for hold in items if hold is not None)
    assert len(none_yet) == len(ids) and not any(none_yet)


def test_a_write_that_fails_leaves_the_next_one_to_store_the_counter_shapes_it_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The log copies a counter's unchanging part into each answer it stores from the bytes
    it encoded to the first time, which name the counter's shape in the shapes table. The
    first write naming a shape stores it; if that write fails, the next one must store it
    again, or its answers would name a shape the table never held."""
    monkeypatch.setenv(FAULT_ENV, "write-error@2")
    wal = WriteAheadLog(tmp_path)
    core = Core()
    now_ns = 1_800_000_000 * 10**9

    def applied(command) -> list:
        nonlocal now_ns
        now_ns += 1000
        outcome = core.apply(command, now_ns)
        assert outcome.error is None, outcome.error
        return list(outcome.records)

    wal.append(applied(UpsertPlan(app="a", plan=PLAN))
               + applied(UpsertSubscription(app="a", user_id="u", plan_id="p")))
    keyed = applied(Reserve(app="a", user_id="u", event_type="openai.chat", amount=5,
                            idempotency_key="k1", reservation_id=_rid(1)))
    assert keyed[0].answer.counters, "an answer showing counters, so naming their shapes"
    with pytest.raises(OSError, match="injected write error"):
        wal.append(keyed)  # the shapes it stored are undone with it
    wal.append(keyed)  # the server stops at a failed write; the log itself recovers here
    committed = applied(Commit(app="a", reservation_id=_rid(1), idempotency_key="k2"))
    wal.append(committed)
    wal.close()
    monkeypatch.delenv(FAULT_ENV)
    reopened = WriteAheadLog(tmp_path)
    try:  # each answer read back whole, its counters' shapes from the table
        assert [record.answer for record in list(reopened.records())[-2:]] == [
            keyed[0].answer, committed[0].answer]
    finally:
        reopened.close()
