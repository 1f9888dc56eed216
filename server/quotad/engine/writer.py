"""The single writer: one asyncio task world owns the core; group commit makes it durable.

`execute` applies a command at once (no await between check and update, so no locks), then
waits until the log is durable up to everything the command saw, and only then answers.
Records applied while a flush runs pile up and go to disk together in the next one: one LMDB
transaction and one sync per batch. A failed flush is fail-stop: the writer refuses
everything from then on and reports the failure to its owner.

Where a batch is written depends on its size (limits.INLINE_BATCH_RECORDS_MIN):
- A large batch (Batch RPCs) is written on the event loop's own thread, which waits for its
  sync (a fraction of a millisecond on a local SSD; see `python -m bench.fsync`). Written from
  a thread of its own, such a batch costs ~20 % more CPU per record (`python -m bench.batch
  --batch 32 --idempotency-keys`: 128 against 106 us per pair with every batch there): the
  two threads take turns with the GIL (py-lmdb keeps it through each put and lets it go for
  the commit's sync), and neither runs Python while the other holds it.
- A small batch (unary calls) is written on the log thread. gRPC hands the loop new calls
  only while the loop is free, about one per turn: it must go on taking them during the sync
  for the next batch to grow (written inline, such calls went one record per sync).
- Except when calls come one at a time (limits.LONE_CALL_QUIET_FLUSHES): then nobody joins
  the next batch anyway, and a batch of one record is written inline, sparing its call the
  hand-offs to the log thread and back; the call writes it itself, right after applying it,
  when nothing else is pending or being written and no snapshot is due (it then needs no
  turn of the loop to wake the flush task, nor one to be woken). Every so often one goes to
  the log thread all the same (limits.LONE_CALL_PROBE_EVERY_FLUSHES), to see whether calls
  now arrive during a sync.
- With a commit delay (`--commit-delay-ms`), a small batch on the log thread waits that long
  for more records while calls overlap and the wait fills, then takes them along: its calls
  wait that much longer, and each transaction's fixed cost (the sync, the commit, the hops
  between threads) is shared by more of them. While the wait would not fill (few callers,
  who all wait in the batch) only a rare probe waits; lone calls never do (_lingers).
- A batch that carries a snapshot (a large put) is written on the log thread too, so that
  serving goes on meanwhile.
Either way, one batch is written at a time. Once a whole snapshot is stored, the records it
covers that the retention lets go are pruned on the log thread after each batch until none
is due: a transaction of bounded size (limits.PRUNED_RECORDS_PER_TRANSACTION_MAX), or as many
as prune twice the records of a larger batch (prune_budget), so that the log shrinks while
anything is due; the next batch waits for them.

A snapshot is whole, or a delta of the last whole one: the users changed since (and every
other part whole), so that a snapshot's cost grows with the users that change rather than
with all of them. Deltas are taken until, together, they would have cost what a whole one
costs (limits.SNAPSHOT_DELTA_USER_COST: a rent-or-buy choice); restart reads the whole
snapshot and its latest delta over it. Records after the whole snapshot are never pruned, so
that it and the log alone rebuild the state should the delta be lost; a whole one is taken
at least every limits.SNAPSHOT_WHOLE_EVERY_CADENCES cadences of records, so that pruning
goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from quotad.core import limits
from quotad.storage.codec import state_digest
from quotad.core.commands import Command, ExpireHolds, Record
from quotad.core.errors import Refusal
from quotad.core.machine import Core, Outcome
from quotad.engine.clock import ServerClock
from quotad.storage import snapshot_child
from quotad.storage.snapshot import snapshot_of
from quotad.storage.wal import Pruned, Retention, WriteAheadLog, Snapshot

log = logging.getLogger("quotad.writer")

SNAPSHOT_EVERY_RECORDS_DEFAULT = 100_000
SNAPSHOT_EVERY_S_DEFAULT = 300.0
AUDIT_RETENTION_NS_DEFAULT = 30 * 24 * 3600 * limits.NS_PER_S
"""Log records (the audit trail) are kept at least this long (unless the log's size bound
needs their room); older ones that a snapshot covers are pruned once it is stored."""


class WriterStopped(Refusal):
    """The writer stopped (a storage failure, a broken invariant, or shutdown): nothing more
    is served from this process."""

    code = "UNAVAILABLE"


class DeadlinePassed(Refusal):
    """The call's deadline passed before its commands were applied: nothing was done."""

    code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def prune_budget(records_written: int) -> int:
    """The records that may be pruned after a batch of records_written: one transaction's,
    or more than the batch wrote, so that the log shrinks while anything is due whatever
    the batches' size."""
    assert records_written >= 0
    return max(limits.PRUNED_RECORDS_PER_RECORD_WRITTEN * records_written,
               limits.PRUNED_RECORDS_PER_TRANSACTION_MAX)


def prune_records(wal: WriteAheadLog, up_to_sequence: int, retention: Retention,
                  budget: int) -> list[Pruned]:
    """On the log thread: up to `budget` records pruned, in transactions of at most
    limits.PRUNED_RECORDS_PER_TRANSACTION_MAX, as many as the budget needs at most; stops
    once one finds nothing more due."""
    assert budget >= 1
    most = limits.PRUNED_RECORDS_PER_TRANSACTION_MAX
    transactions = []
    left = budget
    for _ in range(-(-budget // most)):
        pruned = wal.prune(up_to_sequence, retention, min(left, most))
        transactions.append(pruned)
        left -= pruned.records
        if not pruned.more or left <= 0:
            break
    return transactions


class Writer:
    def __init__(self, core: Core, wal: WriteAheadLog, *, on_failure: Callable[[BaseException], None],
                 batch_records_max: int = limits.BATCH_RECORDS_MAX,
                 snapshot_every_records: int = SNAPSHOT_EVERY_RECORDS_DEFAULT,
                 snapshot_every_s: float = SNAPSHOT_EVERY_S_DEFAULT,
                 audit_retention_ns: int = AUDIT_RETENTION_NS_DEFAULT,
                 audit_retention_bytes: int = 0,
                 on_flush: Callable[[int, float, int], None] | None = None,
                 fork_snapshots: bool = False,
                 commit_delay_s: float = 0.0,
                 wall_ns: Callable[[], int] = time.time_ns,
                 monotonic_s: Callable[[], float] = time.monotonic) -> None:
        assert snapshot_every_records >= 1 and snapshot_every_s > 0 and audit_retention_ns >= 0
        assert audit_retention_bytes >= 0
        assert 0 <= commit_delay_s <= limits.COMMIT_DELAY_MS_MAX / 1000, commit_delay_s
        self.core = core
        self.clock = ServerClock(core.last_record_ns, wall_ns)
        self.durable_sequence = core.sequence
        self._wal = wal
        self._on_failure = on_failure
        self._batch_records_max = batch_records_max
        self._pending: list[Record] = []
        self._has_pending = asyncio.Event()
        self._flushed = asyncio.Event()
        self._failure: BaseException | None = None
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quotad-log")
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        self.batches_on_log_thread = 0
        """Of those, the ones written on the log thread (the small ones, but a lone call's while
        calls come one at a time, and every one that carries a snapshot)."""
        self._flushing = False
        """The flush task is at work (from its waking until it waits again): only it writes
        then. Between the event that wakes it and its waking, the records pending keep a
        lone call from writing (it writes only when its own record is all there is)."""
        self._quiet_flushes = 0
        """Flushes in a row on the log thread of one record each, nothing pending at their end."""
        self._lone_inline_flushes = 0
        """Batches of a lone call written inline since the last one on the log thread."""
        self.records_written = 0
        self._commit_delay_s = commit_delay_s
        """How long a small batch on the log thread waits for more records while calls
        overlap and the wait fills (_lingers); 0: it is written at once."""
        self._calls_overlap = False
        """The last batch on the log thread held more than one record, or records were
        pending when it was written: the next small one may wait commit_delay_s."""
        self.lingered_batches = 0
        """Batches that waited commit_delay_s for more records."""
        self.lingered_records = 0
        """Records that joined those batches while they waited."""
        self._delay_fills = False
        """The delay gathers enough records to be worth its wait (_linger): small batches wait
        while calls overlap. Otherwise only a probe every _probe_every batches does."""
        self._joined_average = 0.0
        """Records a wait gathered, a moving average (a probe's alone when off)."""
        self._probe_every = limits.COMMIT_DELAY_PROBE_EVERY_MIN
        """While the delay does not fill, one small batch in this many waits as a probe."""
        self._unwaited_batches = 0
        """Small batches written at once while calls overlap, since the last wait."""
        self._on_flush = on_flush
        """Called with (records, seconds, last sequence) after each durable flush."""
        self.on_applied: Callable[[tuple[Record, ...]], None] | None = None
        """Called right after the core made records, with the core as of them (before they
        are durable; no await in between): how WatchUsage reads the counters a record left.
        It must not raise and must not block; None (nobody watches) costs nothing."""
        self._snapshot_every_records = snapshot_every_records
        self._snapshot_every_s = snapshot_every_s
        self._audit_retention_ns = audit_retention_ns
        self._audit_retention_bytes = audit_retention_bytes
        """The log's live data is kept under this (0: no bound): past it, the oldest records
        go even inside the audit retention, never inside the keys' and holds' retention."""
        self._prune_due = True
        """Records a stored snapshot covers may be due for pruning (at start: what the last
        run left)."""
        self._monotonic_s = monotonic_s
        """Times the pruning warnings' repeats (AUDIT_TRIMMED_WARN_REPEAT_S)."""
        self._trimmed_warned_at = -limits.AUDIT_TRIMMED_WARN_REPEAT_S
        """monotonic_s() at the last warning that the size bound cut the audit trail."""
        self.records_pruned = 0
        self._snapshot_sequence = wal.snapshot_sequence()
        """The sequence of the latest snapshot started (what "due" counts from)."""
        self._stored_sequence = self._snapshot_sequence
        """The sequence of the latest snapshot in the log: a later one never gives way to an
        older one."""
        self._whole_sequence = wal.whole_snapshot_sequence()
        """The sequence of the latest whole snapshot in the log: what records may be pruned
        up to, and what a delta is a delta of."""
        self._users_changed_since = self._whole_sequence
        """The sequence the core's users_changed count from (recover() leaves them counting
        from the whole snapshot it loaded). A delta is made only of a whole snapshot stored
        at that sequence: while a whole one is being made, or after one failed, none is."""
        self.snapshot_deltas = 0
        """How many of the snapshots stored were deltas."""
        self._delta_users_taken = 0
        """The users the deltas taken since the latest whole snapshot taken held, summed
        (each holds every user changed since it). Not known across a restart: 0 there."""
        self._snapshot_at = time.monotonic()
        self.snapshots = 0
        self.snapshot_stall_s_max = 0.0
        """Longest time the event loop spent on a snapshot: copying the state in-process, or
        forking the child that does (fork_snapshots)."""
        self._fork_snapshots = fork_snapshots
        """Periodic snapshots are made by a child process (snapshot_child); the one at a clean
        stop is made in-process, nothing being served then."""
        self._child: snapshot_child.Child | None = None
        """The snapshot child at work."""
        self._child_task: asyncio.Task[None] | None = None
        self._ready: Snapshot | None = None
        """A child's snapshot waiting to be stored with the next flush."""
        self.snapshot_children_failed = 0
        self.snapshot_children_cpu_s = 0.0
        """CPU time (user + system) of every snapshot child that made its snapshot: the
        state's size times the snapshots' rate, paid beside the server's own CPU."""

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._flush_loop(), name="quotad-flush"),
                       asyncio.create_task(self._expiry_loop(), name="quotad-expiry")]

    @property
    def wal(self) -> WriteAheadLog:
        return self._wal

    @property
    def failed(self) -> bool:
        return self._failure is not None

    async def execute(self, command: Command, deadline_s: float | None = None) -> Any:
        """Applies the command and answers once all it saw is durable. Raises the command's
        QuotaError, WriterStopped, or DeadlinePassed."""
        (outcome,) = await self.execute_many([command], deadline_s)
        if outcome.error is not None:
            raise outcome.error
        return outcome.result

    async def execute_many(self, commands: list[Command],
                           deadline_s: float | None = None) -> list[Outcome]:
        """Applies the commands in order, one after another with no await between, then
        answers them all once everything they saw is durable (one flush for all).
        DeadlinePassed, applying none, if time.monotonic() is past deadline_s; once applied,
        they are answered whatever the time."""
        if self._failure is not None or self._closing:
            raise WriterStopped("the server is stopping" if self._closing else
                                f"storage failed: {self._failure!r}")
        if deadline_s is not None and time.monotonic() >= deadline_s:
            raise DeadlinePassed("the call's deadline passed before it was applied: "
                                 "nothing was done")
        outcomes = []
        with self._wal.reading():  # no await inside: memory forgets nothing meanwhile
            for command in commands:
                try:
                    outcome = self.core.apply(command, self.clock.now_ns())
                except Exception as error:  # a broken invariant: the state is not trusted
                    self._fail(error)
                    raise WriterStopped(f"internal invariant failed: {error!r}") from error
                if outcome.records:
                    self._pending.extend(outcome.records)
                    if self.on_applied is not None:
                        self.on_applied(outcome.records)
                outcomes.append(outcome)
        if self._pending:
            if self._wrote_alone():
                return outcomes
            self._has_pending.set()
        await self.wait_durable(self.core.sequence)
        return outcomes

    def _wrote_alone(self) -> bool:
        """Writes the record just applied here and now, if it is all there is to write and a
        lone call's record is written inline (_inline): the call then needs no turn of the
        loop for the flush task, nor another for its own answer. Anything else (more records,
        a batch being written, a snapshot due) is left to the flush task."""
        if (self._flushing or len(self._pending) != 1 or not self._inline(self._pending, None)
                or self._ready is not None or self._due()):
            return False
        batch, self._pending = self._pending, []
        self._count_small(batch, inline=True)
        assert batch[0].sequence == self.durable_sequence + 1, (batch, self.durable_sequence)
        started = time.perf_counter()
        try:
            self._wal.append(batch)
        except BaseException as error:  # fail-stop: memory is ahead of disk
            self._fail(error)
            raise WriterStopped(f"storage failed: {error!r}") from error
        self._written(batch, started, on_log_thread=False)
        return True

    async def wait_durable(self, sequence: int) -> None:
        while self.durable_sequence < sequence:
            if self._failure is not None:
                raise WriterStopped(f"storage failed: {self._failure!r}")
            await self._flushed.wait()

    async def state_digest(self) -> tuple[str, int]:
        """A digest of the state and its last sequence, once all of it is durable."""
        if self._failure is not None or self._closing:
            raise WriterStopped("the server is stopping or failed")
        sequence = self.core.sequence
        digest = state_digest(self.core)  # no await since reading sequence: consistent
        await self.wait_durable(sequence)
        return digest, sequence

    async def expire_due(self) -> None:
        await self.execute(ExpireHolds())

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._flushing = False
            await self._has_pending.wait()
            self._has_pending.clear()
            self._flushing = True
            while self._pending or self._ready is not None:
                if self._fork_snapshots:
                    self._start_child_if_due()
                else:  # before the batch is cut: it must cover only what this one writes
                    copied = self._snapshot_if_due()
                batch = self._pending[: self._batch_records_max]
                del self._pending[: self._batch_records_max]
                snapshot = self._ready_snapshot(batch) if self._fork_snapshots else copied
                if not batch and snapshot is None:
                    break  # a child's snapshot waits for records it covers to be written
                started = time.perf_counter()
                try:
                    on_log_thread = not self._inline(batch, snapshot)
                    if snapshot is None:
                        self._count_small(batch, inline=not on_log_thread)
                    if on_log_thread:
                        if snapshot is None and self._lingers():
                            await self._linger(batch)
                        await loop.run_in_executor(self._executor, self._wal.append, batch,
                                                   snapshot)
                    else:
                        self._wal.append(batch)
                except asyncio.CancelledError:  # close(), all durable: the thread ends the
                    raise                       # write and close() waits for the thread
                except BaseException as error:  # fail-stop: memory is ahead of disk
                    self._fail(error)
                    return
                if snapshot is not None:
                    self._stored(snapshot)
                if batch:
                    if on_log_thread and snapshot is None:
                        quiet = len(batch) == 1 and not self._pending
                        self._quiet_flushes = self._quiet_flushes + 1 if quiet else 0
                        self._calls_overlap = not quiet
                    self._written(batch, started, on_log_thread)
                if self._prune_due and self._whole_sequence:
                    try:
                        transactions = await loop.run_in_executor(
                            self._executor, prune_records, self._wal, self._whole_sequence,
                            self._retention(), prune_budget(len(batch)))
                    except asyncio.CancelledError:  # close(), as above: not a failure
                        raise
                    except BaseException as error:  # fail-stop, as for a batch
                        self._fail(error)
                        return
                    for pruned in transactions:
                        self._pruned(pruned)

    def _lingers(self) -> bool:
        """Whether a small batch waits commit_delay_s for more records before it is written:
        with a delay set, while calls overlap (the last batch on the log thread was not a
        lone record with nothing pending after it) and the delay fills (_linger), or as a
        probe of whether it would. Calls that come one at a time do not wait (nobody would
        join them). Called once per small batch on the log thread: one that overlaps and does
        not wait counts towards the next probe."""
        if not (self._commit_delay_s > 0 and self._calls_overlap):
            return False
        if self._delay_fills:
            return True
        self._unwaited_batches += 1
        return self._unwaited_batches >= self._probe_every

    async def _linger(self, batch: list[Record]) -> None:
        """Waits commit_delay_s, then takes into the batch what was applied meanwhile (up to
        batch_records_max): its calls wait that much longer, and each transaction's fixed
        cost (the sync, the commit, the hops between threads) is shared by more records.
        The wait goes on being taken while it gathers at least
        COMMIT_DELAY_JOINED_PER_MS_MIN records per millisecond, on average: with few callers
        it would not (they wait in the batch, and nobody else comes), and then only a probe
        waits, every COMMIT_DELAY_PROBE_EVERY_MIN small batches, twice as far apart after
        each probe that did not fill, up to COMMIT_DELAY_PROBE_EVERY_MAX."""
        probing = not self._delay_fills
        await asyncio.sleep(self._commit_delay_s)
        more = self._pending[: self._batch_records_max - len(batch)]
        del self._pending[: len(more)]
        batch.extend(more)
        self.lingered_batches += 1
        self.lingered_records += len(more)
        self._unwaited_batches = 0
        self._joined_average = len(more) if probing else self._joined_average + (
            len(more) - self._joined_average) * limits.COMMIT_DELAY_JOINED_AVERAGE_WEIGHT
        self._delay_fills = self._joined_average >= (
            limits.COMMIT_DELAY_JOINED_PER_MS_MIN * self._commit_delay_s * 1000)
        self._probe_every = limits.COMMIT_DELAY_PROBE_EVERY_MIN if self._delay_fills else min(
            2 * self._probe_every, limits.COMMIT_DELAY_PROBE_EVERY_MAX)

    def _stored(self, snapshot: Snapshot) -> None:
        self._stored_sequence = snapshot.sequence
        if snapshot.delta_of_sequence:
            self.snapshot_deltas += 1
        else:
            self._whole_sequence = snapshot.sequence
            self._prune_due = True
        if self._fork_snapshots:
            self.snapshots += 1

    def _written(self, batch: list[Record], started: float, on_log_thread: bool) -> None:
        """After a batch is durable: memory forgets what the log now answers for, and the
        calls waiting for it are woken."""
        self.durable_sequence = batch[-1].sequence
        self.core.forget_durable(self.durable_sequence)
        if self._on_flush is not None:
            self._on_flush(len(batch), time.perf_counter() - started, self.durable_sequence)
        self.batches += 1
        self.batches_on_log_thread += on_log_thread
        self.records_written += len(batch)
        flushed, self._flushed = self._flushed, asyncio.Event()
        flushed.set()

    def _inline(self, batch: list[Record], snapshot: Snapshot | None) -> bool:
        """Whether this batch is written on the loop's thread (see the module's docstring)."""
        if snapshot is not None:
            return False
        if len(batch) >= limits.INLINE_BATCH_RECORDS_MIN:
            return True
        return (len(batch) == 1 and self._quiet_flushes >= limits.LONE_CALL_QUIET_FLUSHES
                and self._lone_inline_flushes < limits.LONE_CALL_PROBE_EVERY_FLUSHES)

    def _count_small(self, batch: list[Record], inline: bool) -> None:
        """Counts a small batch (no snapshot) towards the next probe: one written inline adds
        one; one on the log thread (a probe, or calls that do not come alone) starts over."""
        if len(batch) < limits.INLINE_BATCH_RECORDS_MIN:
            self._lone_inline_flushes = self._lone_inline_flushes + 1 if inline else 0

    def _due(self) -> bool:
        since = self.core.sequence - self._snapshot_sequence
        return since > 0 and (since >= self._snapshot_every_records
                              or time.monotonic() - self._snapshot_at >= self._snapshot_every_s)

    def _snapshot_if_due(self, force: bool = False) -> Snapshot | None:
        """A copy of the state, every so many records or seconds. It must travel in the same
        transaction as every record it includes that is not yet durable, so it waits while
        more than one batch is pending."""
        if len(self._pending) > self._batch_records_max:
            return None
        if not (self._due() or (force and self.core.sequence > self._stored_sequence)):
            return None
        started = time.perf_counter()
        delta_of_sequence = self._delta_of()
        snapshot = Snapshot(self.core.sequence, snapshot_of(self.core, delta_of_sequence),
                            delta_of_sequence)
        self._taken(delta_of_sequence)
        if not force:  # the one at a clean stop stalls nothing: nothing is served then
            self.snapshot_stall_s_max = max(self.snapshot_stall_s_max,
                                            time.perf_counter() - started)
        self._snapshot_sequence, self._snapshot_at = self.core.sequence, time.monotonic()
        self.snapshots += 1
        return snapshot

    def _start_child_if_due(self) -> None:
        """Forks a snapshot child when one is due and none is at work. Between two commands
        (no await since the last apply), so the child sees a whole state."""
        if self._child is not None or self._ready is not None or not self._due():
            return
        started = time.perf_counter()
        delta_of_sequence = self._delta_of()
        try:
            self._child = snapshot_child.start(self.core, self._wal.data_dir, delta_of_sequence)
        except OSError as error:  # no fork (memory, process limits): try again when due
            log.warning("cannot fork a snapshot child", extra={"error": str(error)})
            self._snapshot_at = time.monotonic()
            return
        self._taken(delta_of_sequence)
        self.snapshot_stall_s_max = max(self.snapshot_stall_s_max, time.perf_counter() - started)
        self._snapshot_sequence, self._snapshot_at = self._child.sequence, time.monotonic()
        self._child_task = asyncio.create_task(self._await_child(), name="quotad-snapshot")

    def _delta_of(self) -> int:
        """The sequence of the whole snapshot the one to take now is a delta of; 0 for a
        whole one: when no whole one is stored that the users changed count from, when the
        deltas since it, this one included, would cost more than a whole one
        (limits.SNAPSHOT_DELTA_USER_COST), or when the log holds
        limits.SNAPSHOT_WHOLE_EVERY_CADENCES cadences of records since."""
        whole_every = limits.SNAPSHOT_WHOLE_EVERY_CADENCES * self._snapshot_every_records
        if (not self._whole_sequence or self._users_changed_since != self._whole_sequence
                or self.core.sequence - self._whole_sequence >= whole_every):
            return 0
        held = self._delta_users_taken + self.core.users_changed_count()
        if held * limits.SNAPSHOT_DELTA_USER_COST > self.core.users_count():
            return 0
        return self._whole_sequence

    def _taken(self, delta_of_sequence: int) -> None:
        """A snapshot of the core as it is now is being made; a whole one: the users changed
        count from here."""
        if delta_of_sequence:
            self._delta_users_taken += self.core.users_changed_count()
            return
        self.core.clear_users_changed()
        self._users_changed_since = self.core.sequence
        self._delta_users_taken = 0

    async def _await_child(self) -> None:
        child = self._child
        assert child is not None
        try:
            made = await asyncio.get_running_loop().run_in_executor(
                None, snapshot_child.finish, child)
        except (snapshot_child.SnapshotChildFailed, OSError) as error:
            if not self._closing:  # at close it was stopped on purpose
                self.snapshot_children_failed += 1
                log.warning("a snapshot child failed; the next one is due as usual",
                            extra={"error": str(error)})
        else:
            self.snapshot_children_cpu_s += made.cpu_s
            log.info("snapshot made", extra={
                "sequence": child.sequence, "delta_of_sequence": child.delta_of_sequence,
                "bytes": len(made.encoded),
                "child_cpu_s": round(made.cpu_s, 3),
                "child_s": round(time.monotonic() - child.forked_at_s, 3)})
            self._ready = Snapshot(child.sequence, made.encoded, child.delta_of_sequence)
            self._has_pending.set()
        finally:  # reaped: from here close() must not signal it (see snapshot_child)
            snapshot_child.close(child)
            self._child = None

    def _ready_snapshot(self, batch: list[Record]) -> Snapshot | None:
        """The child's snapshot, once every record it covers is durable or in this batch."""
        ready = self._ready
        if ready is None or ready.sequence > (batch[-1].sequence if batch
                                              else self.durable_sequence):
            return None
        self._ready = None
        return ready if ready.sequence > self._stored_sequence else None

    def kept_ns(self) -> int:
        """How long every record stays, whatever the size bound: the keys and finished holds
        it answers for are remembered that long."""
        return max(limits.LOG_KEPT_NS_MIN, self.core.idempotency_retention_ns)

    def _retention(self) -> Retention:
        """What pruning keeps: records younger than the audit retention, and past the size
        bound only those younger than the keys and finished holds they answer for."""
        kept_from_ns = self.clock.last_ns - self.kept_ns()
        return Retention(before_ns=min(kept_from_ns,
                                       self.clock.last_ns - self._audit_retention_ns),
                         live_bytes_max=self._audit_retention_bytes, kept_from_ns=kept_from_ns)

    def _pruned(self, pruned: Pruned) -> None:
        """After a pruning transaction: due again only if it stopped at its bound; a warning
        while the size bound cuts into the audit retention or cannot hold."""
        self._prune_due = pruned.more
        self.records_pruned += pruned.records
        if not (pruned.beyond_retention or pruned.held_by_keys):
            return
        now_s = self._monotonic_s()
        if now_s - self._trimmed_warned_at < limits.AUDIT_TRIMMED_WARN_REPEAT_S:
            return
        self._trimmed_warned_at = now_s
        kept_s = (None if pruned.oldest_ns is None
                  else round((self.clock.last_ns - pruned.oldest_ns) / limits.NS_PER_S))
        extra = {"live_bytes": pruned.live_bytes,
                 "audit_retention_bytes": self._audit_retention_bytes,
                 "audit_trail_kept_s": kept_s,
                 "audit_retention_s": self._audit_retention_ns // limits.NS_PER_S}
        if pruned.held_by_keys:
            log.warning("the log's live data is over --audit-retention-gib and its records of "
                        "the last %d h stay (idempotency keys' first answers, for "
                        "--idempotency-retention-hours, and finished holds): raise "
                        "--audit-retention-gib (and the disk under it) or lower "
                        "--idempotency-retention-hours, or the log fills its disk or map",
                        self.kept_ns() // (3600 * limits.NS_PER_S),
                        extra=extra)
        else:
            log.warning("the audit trail was pruned inside --audit-retention-days to keep the "
                        "log under --audit-retention-gib: it now reaches back %s s; raise "
                        "--audit-retention-gib (and the disk) to keep it longer", kept_s,
                        extra=extra)

    def _fail(self, error: BaseException) -> None:
        log.critical("stopping: %r", error)
        self._failure = error
        self._flushed.set()  # wakes every waiter, who then sees the failure
        self._on_failure(error)

    async def _expiry_loop(self) -> None:
        while self._failure is None:
            next_ns = self.core.next_expiry_ns()
            delay_s = limits.EXPIRY_POLL_S_MAX
            if next_ns is not None:
                delay_s = min(delay_s, max(0.0, (next_ns - time.time_ns()) / 1e9))
            await asyncio.sleep(delay_s)
            next_ns = self.core.next_expiry_ns()
            if next_ns is not None and next_ns <= time.time_ns() and not self._closing:
                try:
                    await self.expire_due()
                except WriterStopped:
                    return

    async def close(self) -> None:
        """Flushes what is pending, then stops the tasks and the log thread."""
        self._closing = True
        if self._child is not None:  # the final snapshot below makes it redundant
            snapshot_child.stop(self._child)
        if self._child_task is not None:
            await asyncio.gather(self._child_task, return_exceptions=True)
        self._ready = None
        if self._failure is None:
            await self.wait_durable(self.core.sequence)
            snapshot = self._snapshot_if_due(force=True)  # so that a restart replays nothing
            if snapshot is not None:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._wal.append, [], snapshot)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)
