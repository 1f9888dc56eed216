"""The event index is filed in bulk: the entries of the records written since it was last
filed wait in memory (read again from those records when the log is opened), and go into
the table together. ListEvents answers from both, in order, each event once, across pages
and time ranges, before and after a crash. Over a real LMDB log and the real writer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from quotad.core import limits
from quotad.core.commands import Reserve, Track, UpsertPlan, UpsertSubscription
from quotad.core.machine import Core
from quotad.core.plans import LimitGroup, Plan, Window
from quotad.engine.recovery import recover
from quotad.engine.writer import Writer
from quotad.storage.codec import event_tail, event_tail_fields, key_sequence
from quotad.storage.snapshot import snapshot_of
from quotad.storage.wal import EVENTS_INDEXED_THROUGH_KEY, Retention, Snapshot, WriteAheadLog

PLAN = Plan(id="p", limit_groups=(
    LimitGroup(key="tokens", label="Tokens", unit="tokens", quota=10**6, window=Window.MONTH),))
BUFFERED_RECORDS_MAX = 8
USERS = ("ann", "bob")


def _expected(wal: WriteAheadLog, number: int) -> list[bytes]:
    """Every entry of the user's the records (those left) hold, oldest first."""
    return [event_tail(record.now_ns, record.sequence, index)
            for record in wal.records(max(0, wal.first_sequence() - 1))
            for index, user in enumerate(record.event_users) if user == number]


def _listed(wal: WriteAheadLog, user_id: str, number: int, *, start_ns: int = 0,
            end_ns: int = limits.END_OF_TIME_NS, page: int = 1000) -> list[bytes]:
    """Every entry ListEvents gives, page after page."""
    listed: list[bytes] = []
    while True:
        found = wal.list_events("a", user_id, number, start_ns, end_ns,
                                listed[-1] if listed else b"", page)
        assert all(stored.event.user_id == user_id for stored in found)
        listed += [stored.cursor for stored in found]
        if len(found) < page:
            return listed


def _filed(wal: WriteAheadLog) -> tuple[int, int]:
    """(entries in the table, the sequence meta says it holds every record's entries to)."""
    with wal.env.begin() as txn:
        stored = txn.get(EVENTS_INDEXED_THROUGH_KEY, db=wal.meta_db)
        return txn.stat(wal.event_index_db)["entries"], key_sequence(stored) if stored else 0


async def _writer(wal: WriteAheadLog) -> Writer:
    writer = Writer(recover(wal), wal, on_failure=lambda error: None)
    writer.start()
    return writer


def test_entries_wait_in_memory_are_filed_together_and_listed_once_in_order(tmp_path: Path):
    wal = WriteAheadLog(tmp_path, events_buffered_records_max=BUFFERED_RECORDS_MAX)

    async def run() -> dict[str, int]:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        for user_id in USERS:
            await writer.execute(UpsertSubscription(app="a", user_id=user_id, plan_id="p"))
        numbers = {user_id: writer.core.user_number("a", user_id) for user_id in USERS}
        filed_while_pending = 0
        for n in range(3 * BUFFERED_RECORDS_MAX + 3):  # one record (one append) each
            user_id = USERS[n % 3 == 0]
            if n % 2:
                await writer.execute(Track(app="a", user_id=user_id, event_type="x", amount=n))
            else:
                await writer.execute(Reserve(app="a", user_id=user_id, event_type="x",
                                             amount=n + 1, reservation_id=f"rsv_{n:024x}"))
            entries, through = _filed(wal)
            last = writer.core.sequence
            assert last - through < BUFFERED_RECORDS_MAX  # filed once that many wait
            filed_while_pending += entries > 0 and through < last
            for user_id, number in numbers.items():
                assert _listed(wal, user_id, number) == _expected(wal, number)
        assert filed_while_pending > 0  # listed from the table and from memory at once
        return numbers
    numbers = asyncio.run(run())
    for user_id, number in numbers.items():
        expected = _expected(wal, number)
        assert len(expected) > BUFFERED_RECORDS_MAX
        assert _listed(wal, user_id, number, page=3) == expected  # pages of 3
        start_ns, end_ns = (int.from_bytes(expected[at][:8], "big") for at in (2, -2))
        assert _listed(wal, user_id, number, start_ns=start_ns, end_ns=end_ns, page=2) == [
            tail for tail in expected if start_ns <= int.from_bytes(tail[:8], "big") < end_ns]
    entries, through = _filed(wal)
    assert 0 < through < wal.last_sequence() and entries > 0
    wal.close()  # as a crash leaves it: no snapshot, the last entries not filed

    reopened = WriteAheadLog(tmp_path, events_buffered_records_max=BUFFERED_RECORDS_MAX)
    for user_id, number in numbers.items():  # the entries in memory, read from the records
        assert _listed(reopened, user_id, number) == _expected(reopened, number)

    async def stop_cleanly() -> None:
        writer = await _writer(reopened)
        await writer.execute(Track(app="a", user_id="ann", event_type="x", amount=1))
        await writer.close()  # its snapshot files every entry
    asyncio.run(stop_cleanly())
    entries, through = _filed(reopened)
    assert through == reopened.last_sequence()
    assert entries == sum(len(record.event_users) for record in reopened.records())
    for user_id, number in numbers.items():
        assert _listed(reopened, user_id, number) == _expected(reopened, number)
    reopened.close()


def test_a_snapshot_files_the_waiting_entries_before_it_prunes_their_records(tmp_path: Path):
    # the default limit: nothing filed by count here; a sweep with every pruning transaction
    wal = WriteAheadLog(tmp_path, event_sweep_records=1)

    async def run() -> tuple[int, int]:
        writer = await _writer(wal)
        await writer.execute(UpsertPlan(app="a", plan=PLAN))
        await writer.execute(UpsertSubscription(app="a", user_id="ann", plan_id="p"))
        for n in range(5):
            await writer.execute(Track(app="a", user_id="ann", event_type="x", amount=n + 1))
        return writer.core.user_number("a", "ann"), writer.core.sequence
    number, sequence = asyncio.run(run())
    assert _filed(wal) == (0, 0)  # every entry waits in memory
    assert len(_listed(wal, "ann", number)) == 5
    snapshot = Snapshot(sequence, snapshot_of(recover(wal)))
    wal.append([], snapshot)
    wal.prune(sequence, Retention(before_ns=2**63))  # every record old and covered
    assert wal.first_sequence() == 0
    assert _filed(wal) == (0, sequence)  # filed, then deleted with their records
    assert _listed(wal, "ann", number) == []
    wal.close()
    reopened = WriteAheadLog(tmp_path)  # nothing to read again: no record after the filing
    assert _listed(reopened, "ann", number) == []
    reopened.close()


def _stale_entries(wal: WriteAheadLog, numbers: list[int]) -> list[int]:
    """Each user's entries in the table of records the log no longer holds."""
    first = wal.first_sequence()
    stale = dict.fromkeys(numbers, 0)
    with wal.env.begin() as txn:
        for user, tail in txn.cursor(db=wal.event_index_db):
            if event_tail_fields(tail)[1] < first:
                stale[int.from_bytes(user, "big")] += 1
    return [stale[number] for number in numbers]


def test_pruned_records_entries_are_never_listed_and_go_in_sweeps_of_bounded_users(
        tmp_path: Path):
    """A pruned record's entries stay in the table, never listed, until a sweep (due once
    event_sweep_records are pruned) takes each user's together, event_sweep_users users a
    pruning transaction, the pass going on in the next ones."""
    wal = WriteAheadLog(tmp_path, event_sweep_records=10, event_sweep_users=2)
    users = ("ann", "bob", "cy", "di", "ed")
    core, now_ns, records = Core(), 1_800_000_000 * limits.NS_PER_S, []
    for command in (UpsertPlan(app="a", plan=PLAN),
                    *(UpsertSubscription(app="a", user_id=user, plan_id="p") for user in users),
                    *(Track(app="a", user_id=users[n % 5], event_type="x", amount=1)
                      for n in range(40))):
        now_ns += limits.NS_PER_S
        records += core.apply(command, now_ns).records
    wal.append(records)
    wal.append([], Snapshot(core.sequence, snapshot_of(core)))  # files every entry
    numbers = [core.user_number("a", user) for user in users]
    assert numbers == sorted(numbers)  # the sweep takes them in this order
    old_ns = records[6 + 15].now_ns  # the set-up and 15 Tracks, 3 of each user's, go

    def listed_as_held() -> bool:
        return all(_listed(wal, user, number) == _expected(wal, number)
                   for user, number in zip(users, numbers))

    pruned = wal.prune(core.sequence, Retention(before_ns=old_ns))
    assert pruned.records == 21 and pruned.more  # a pass began: 21 pruned, over 10
    assert _stale_entries(wal, numbers) == [0, 0, 3, 3, 3]  # two users swept
    assert listed_as_held()
    pruned = wal.prune(core.sequence, Retention(before_ns=old_ns))
    assert pruned.records == 0 and pruned.more
    assert _stale_entries(wal, numbers) == [0, 0, 0, 0, 3]
    assert listed_as_held()
    pruned = wal.prune(core.sequence, Retention(before_ns=old_ns))
    assert not pruned.more  # the pass is over
    assert _stale_entries(wal, numbers) == [0, 0, 0, 0, 0]
    with wal.env.begin() as txn:
        assert txn.stat(wal.event_index_db)["entries"] == 25  # the Tracks left, one each
    pruned = wal.prune(core.sequence, Retention(before_ns=records[6 + 20].now_ns))
    assert pruned.records == 5 and not pruned.more  # 5 since the pass began: none due
    assert _stale_entries(wal, numbers) == [1, 1, 1, 1, 1]
    assert listed_as_held()
    wal.close()
    reopened = WriteAheadLog(tmp_path, event_sweep_records=10, event_sweep_users=5)
    pruned = reopened.prune(core.sequence, Retention(before_ns=old_ns))  # nothing more due
    assert pruned.records == 0 and not pruned.more  # but a restart's first pruning sweeps
    assert _stale_entries(reopened, numbers) == [0, 0, 0, 0, 0]
    reopened.close()


def test_a_pruned_record_at_the_same_time_as_the_oldest_one_left_is_not_listed(
        tmp_path: Path):
    """A command that expires a hold makes two records at one time: the expiry, then the
    command. Pruning that stops between them leaves the expiry's entry (until a sweep) at
    the oldest record's time: it is not listed, and its missing record is no corruption."""
    wal = WriteAheadLog(tmp_path)
    core, now_ns, records = Core(), 1_800_000_000 * limits.NS_PER_S, []
    for command in (UpsertPlan(app="a", plan=PLAN),
                    UpsertSubscription(app="a", user_id="ann", plan_id="p"),
                    Reserve(app="a", user_id="ann", event_type="x", amount=1,
                            ttl_ns=limits.NS_PER_S, reservation_id=f"rsv_{1:024x}"),
                    Track(app="a", user_id="ann", event_type="x", amount=1)):
        now_ns += 10 * limits.NS_PER_S  # the hold expires before the Track
        records += core.apply(command, now_ns).records
    number = core.user_number("a", "ann")
    expiry, track = records[3], records[4]
    assert expiry.now_ns == track.now_ns and number in expiry.event_users
    wal.append(records)
    wal.append([], Snapshot(core.sequence, snapshot_of(core)))  # files every entry
    assert wal.prune(core.sequence, Retention(before_ns=2**63), records_max=1).records == 1
    pruned = wal.prune(core.sequence, Retention(before_ns=2**63), records_max=3)
    assert pruned.records == 3 and wal.first_sequence() == track.sequence
    assert _stale_entries(wal, [number]) == [2]  # the Reserve's and the expiry's, unswept
    assert _listed(wal, "ann", number) == _expected(wal, number) == [
        event_tail(track.now_ns, track.sequence, 0)]
    wal.close()
