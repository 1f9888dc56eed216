"""The write-ahead log in LMDB: one write transaction per batch of records, synced on commit.

Every option is explicit: a large map, sync and metasync on, writemap off. py-lmdb write
transactions belong to the thread that opened them: the writer calls `append` one batch at
a time, which opens, fills and commits its transaction on one thread (the event loop's, or
the log thread). The data directory is locked exclusively (one server each).

Databases:
    log        sequence (8 bytes BE) -> record (codec.py: header + protobuf, with the audit
               events it made)
    snapshot   b"latest" -> checksum, sequence, the core (snapshot.py; before: zlib'd JSON)
    event_index  user number (4 bytes) -> time, sequence, index: one fixed-size duplicate per
               event of the user's, in time order; appended, so its pages stay full
               (ListEvents). Filed in bulk: the entries of the records after
               meta's events_indexed_through are in memory (read again from those records
               when the log is opened), and go in all at once with the batch that passes
               limits.EVENT_INDEX_BUFFERED_RECORDS_MAX records, or that carries a snapshot.
               Deleted in bulk too: the entries of pruned records stay (never listed)
               until a sweep, every limits.EVENT_INDEX_SWEEP_RECORDS records pruned, takes
               each user's together
    holds      reservation id (12 bytes, its time first: hold_row_key) -> a finished hold
               (written with the record that finished it; removed with its Reserve
               record). A young hold's row leaves out what its Reserve record says, when it
               finished (its writing record's time) and, unless extended, its expiry
    idempotency  the key's first 12 hex digits as 6 bytes (a client's key: the time it was
               made), then 8 bytes of BLAKE2b(app, rpc, key) -> the sequence of the record
               that first used the key, which holds the first answer (written with that
               record, in key order: new keys fill the table's last pages)
    shapes     8 bytes of BLAKE2b of a counter shape -> the shape (a group's key, label,
               unit, window, quota and kind), which first answers name instead of repeating
               it; written with the first record that names it. Never pruned: one row per
               distinct group definition ever answered (a few dozen bytes each)
    meta       format_version; batch_first_sequence (where the last batch began);
               events_indexed_through (the event index holds the entries of every record
               up to this sequence; absent: 0)

Pruning (`prune`) deletes, oldest first, records a stored snapshot covers that are older than
the audit retention, or that the log's size bound (Retention.live_bytes_max) no longer has
room for, never one younger than the keys and finished holds they answer for: so the log
always reaches back to the snapshot. It goes in transactions of at most
limits.PRUNED_RECORDS_PER_TRANSACTION_MAX records, between the writer's batches.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from quotad.storage.codec import (
    EVENT_TAIL_BYTES, CorruptRecord, CounterHeads, CounterShape, ShapeLookup,
    decode_counter_shape, decode_finished_hold, decode_record, encode_counter_shape,
    encode_finished_hold, encode_record, event_tail, event_tail_fields, event_user_key,
    finished_hold_row, hold_row_key, hold_row_reservation_bytes, hold_row_slot,
    idempotency_row_key, key_sequence, record_event, record_idempotency_row_key, record_key,
    record_now_ns, reservation_bytes, stored_event_entries, stored_record_rows,
)
from quotad.core import limits
from quotad.core.holds import HoldState
from quotad.core.memo import remember
from quotad.core.commands import (
    AUDIT_KINDS, EVENT_CURSOR_BYTES, AuditEvent, Commit, Record, Reserve, Track,
)

FORMAT_VERSION = b"7"
"""7: the event index is filed in bulk (meta's events_indexed_through says how far). 6: the
idempotency table files a key's row under the time its key begins with, and the
holds table a hold under the time its reservation id holds. 5: records are protobuf messages
holding their audit events; the event index files them under their users. `quotad migrate`
brings 6 (every entry filed with its record), 5 (rows under a digest alone, holds under
their slot), 4 (events in an index of their own, keyed by user, time and record) and 3 (JSON
records, events stored twice) to it."""
MIGRATABLE_FORMAT_VERSIONS = (b"3", b"4", b"5", b"6")
MAP_SIZE_BYTES_DEFAULT = 1024**4
"""The most the LMDB file may grow to by default (1 TiB): address space, not disk (the file
grows as pages are used), so that the disk, not the map, bounds the log by default."""
LMDB_OPTIONS: dict[str, Any] = dict(
    subdir=True, readonly=False, create=True, max_dbs=8, max_readers=126, sync=True,
    metasync=True, writemap=False, map_async=False, lock=True, readahead=False, meminit=False,
    mode=0o600)
"""Every lmdb.open option of the log, explicit: a synced commit is durable."""
LOCK_FILE_NAME = "quotad.lock"
SNAPSHOT_KEY = b"latest"
DELTA_KEY = b"delta"
"""The latest delta snapshot (of the whole one under SNAPSHOT_KEY), if any since that one."""
EVENTS_INDEXED_THROUGH_KEY = b"events_indexed_through"
FAULT_ENV = "QUOTAD_FAULT_INJECT"
"""Test hook: "write-error@N" fails the Nth append before its commit, "sync-error@N" after
it (as a failed sync would). Unset in production."""

_SNAPSHOT_HEADER = struct.Struct(">16sQ")
if EVENT_TAIL_BYTES != EVENT_CURSOR_BYTES:  # the size a ListEvents page token names
    raise AssertionError((EVENT_TAIL_BYTES, EVENT_CURSOR_BYTES))


class DataDirLocked(Exception):
    pass


class DataFormatMismatch(Exception):
    """The directory holds data of another format version than this server reads."""


class CorruptSnapshot(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Snapshot:
    sequence: int
    encoded: bytes
    """The stored form: checksum, sequence, body (encode_snapshot)."""
    delta_of_sequence: int = 0
    """0: a whole snapshot. Else a delta of the whole one stored at that sequence."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    now_ns: int
    sequence: int
    event: AuditEvent
    cursor: bytes
    """Where a page that ends with this event continues from."""


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """A commit or track audit event, for export: its record's sequence, its index in that
    record, and the user number the index files it under (its event's user_id is empty)."""

    sequence: int
    index: int
    now_ns: int
    user_number: int
    event: AuditEvent


@dataclass(frozen=True, slots=True)
class Retention:
    """What pruning keeps of the records a snapshot covers."""

    before_ns: int
    """Records older than this go (the audit retention)."""
    live_bytes_max: int = 0
    """While the log's live data (every table's pages in use) is over this, older records
    go too, the oldest first; 0: no bound ..."""
    kept_from_ns: int = 0
    """... but never one at or after this: the keys' first answers and finished holds they
    hold for their retention."""


class Pruned(NamedTuple):
    """What one pruning transaction did."""

    records: int
    beyond_retention: int
    """Of them, those younger than Retention.before_ns: gone for the size bound."""
    more: bool
    """It stopped at its most records with more due, or a sweep of the event index goes on:
    prune again."""
    held_by_keys: bool
    """It stopped, over the size bound, at a record of the keys' retention
    (Retention.kept_from_ns): the bound cannot hold."""
    live_bytes: int
    """The live data after it."""
    oldest_ns: int | None
    """The time of the oldest record left (None: none)."""


class LogPruned(Exception):
    """The log no longer holds the record a read must start at."""

    def __init__(self, wanted_sequence: int, first_sequence: int) -> None:
        super().__init__(f"the log starts at sequence {first_sequence}, record "
                         f"{wanted_sequence} was pruned past the audit retention or the log's size "
                         f"bound (--audit-retention-days, --audit-retention-gib)")
        self.first_sequence = first_sequence


_USAGE_KINDS = frozenset(AUDIT_KINDS.index(kind) for kind in ("commit", "track"))


class WriteAheadLog:
    def __init__(self, data_dir: Path, *, map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT,
                 events_buffered_records_max: int = limits.EVENT_INDEX_BUFFERED_RECORDS_MAX,
                 event_sweep_records: int = limits.EVENT_INDEX_SWEEP_RECORDS,
                 event_sweep_users: int = limits.EVENT_INDEX_SWEEP_USERS_PER_TRANSACTION
                 ) -> None:
        assert events_buffered_records_max >= 1 and event_sweep_records >= 1
        assert event_sweep_users >= 1
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self._lock_file = _lock_exclusively(data_dir / LOCK_FILE_NAME)
        self.env = lmdb.open(str(data_dir), map_size=map_size_bytes, **LMDB_OPTIONS)
        self.env.reader_check()  # clears reader slots left by a process that died
        self.meta_db = self.env.open_db(b"meta", create=True)
        self.log_db = self.env.open_db(b"log", create=True)
        self.snapshot_db = self.env.open_db(b"snapshot", create=True)
        with self.env.begin(write=True, db=self.meta_db) as txn:
            version = txn.get(b"format_version")
            if version is None:
                txn.put(b"format_version", FORMAT_VERSION)
            elif version != FORMAT_VERSION:
                how = (f"; `quotad migrate --data-dir {data_dir}` brings it to format "
                       f"{FORMAT_VERSION.decode()}" if version in MIGRATABLE_FORMAT_VERSIONS
                       else "")
                mismatch = DataFormatMismatch(
                    f"{data_dir}: holds data format {version.decode(errors='replace')}, this "
                    f"server reads format {FORMAT_VERSION.decode()}; nothing was changed{how}")
        if version is not None and version != FORMAT_VERSION:
            self.close()
            raise mismatch
        self.idempotency_db = self.env.open_db(b"idempotency", create=True)  # new in format 4
        self.holds_db = self.env.open_db(b"holds", create=True)  # new in format 4
        self.event_index_db = self.env.open_db(  # new in format 5
            b"event_index", create=True, dupsort=True, dupfixed=True)
        self.shapes_db = self.env.open_db(b"shapes", create=True)
        self._shapes_stored: dict[CounterShape, bytes] = {}
        """Shapes the shapes table holds -> their ids (appends only)."""
        self._counter_heads: CounterHeads = {}
        """The encoded unchanging parts of the counters in answers written (encode_record's
        heads), each naming a shape the shapes table holds: emptied when a write fails."""
        self._shapes_read: dict[bytes, CounterShape] = {}
        """Ids -> shapes read from the shapes table (the readers'; a shape never changes)."""
        self._reserve_expiries_ns: dict[str, int] = {}
        """Reservation id -> the expiry its Reserve record set, until the hold's row is
        written (appends only; at most RESERVE_EXPIRIES_REMEMBERED_MAX)."""
        self._rows_looked_up: dict[tuple[str, str, str], bytes] = {}
        """(app, RPC, idempotency key) -> its row key, for keys looked up and not found: the
        record a new key makes then files its row without computing the key again (at most
        IDEMPOTENCY_ROWS_REMEMBERED_MAX; a refused command leaves its entry until then)."""
        self._fault = _parse_fault(os.environ.get(FAULT_ENV, ""))
        self._appends = 0
        self._read_txn: lmdb.Transaction | None = None
        self._events_buffered_records_max = events_buffered_records_max
        self._events_pending: dict[int, bytearray] | None = None
        """User number -> the event index entries (event_tail) of the durable records after
        _events_indexed_through, oldest first; None until read from the log (on first use,
        after recovery has dropped any torn tail). Replaced whole when they are filed, never
        changed in place but by extending a user's entries (readers copy them)."""
        self._events_indexed_through = 0
        self._last_written_sequence = 0
        self._events_loading = threading.Lock()
        self._event_sweep_records = event_sweep_records
        self._event_sweep_users = event_sweep_users
        self._pruned_since_sweep = event_sweep_records
        """Records pruned since the last sweep of the event index began; as it opens, as if
        a pass were due, so that the first pruning begins one: what an earlier run left is
        swept however often the server restarts."""
        self._sweep_from: bytes | None = None
        """The user key the sweep in progress goes on at; None: none in progress."""
        self._sweep_below = 0
        """The sweep in progress deletes the entries of the records before this sequence
        (the log's first as it began)."""

    # --- writing (the writer only: one append at a time) -------------------------------

    def append(self, records: list[Record], snapshot: Snapshot | None = None) -> None:
        """Writes the records (and a snapshot) in one transaction and syncs it; their event
        index entries wait in memory, or go into the table with every entry waiting once
        EVENT_INDEX_BUFFERED_RECORDS_MAX records have gathered, or with a snapshot (so that
        pruning finds the entries of what it deletes in the table). Raises on any failure;
        the caller must then stop."""
        assert records or snapshot
        pending = self._loaded_events_pending()
        self._appends += 1
        fault_kind, fault_at = self._fault
        shapes_stored: dict[CounterShape, bytes] = {}
        rows: list[tuple[bytes, bytes]] = []
        events: list[tuple[int, bytes]] = []
        last_sequence = records[-1].sequence if records else self._last_written_sequence
        file_events = (snapshot is not None or last_sequence - self._events_indexed_through
                       >= self._events_buffered_records_max)
        with self._counter_heads_kept_if_written(), self.env.begin(write=True) as txn:
            # cursors of the tables: a call through one costs about half a transaction's
            log, holds = txn.cursor(db=self.log_db), txn.cursor(db=self.holds_db)

            def shape_id(shape: CounterShape) -> bytes | None:
                found = self._shapes_stored.get(shape) or shapes_stored.get(shape)
                if found is None:
                    found = self._store_shape(txn, shape)
                    if found is not None:
                        shapes_stored[shape] = found
                return found
            for record in records:
                stored = log.put(record_key(record.sequence),
                                 encode_record(record, shape_id, self._counter_heads),
                                 append=True, overwrite=False)
                assert stored, f"log already holds sequence {record.sequence}"
                for index, user in enumerate(record.event_users):
                    events.append((user, event_tail(record.now_ns, record.sequence, index)))
                row = record_idempotency_row_key(record, self._rows_looked_up.pop)
                if row is not None:
                    rows.append((row, record_key(record.sequence)))
                if type(record.command) is Reserve:
                    self._remember_reserve_expiry(record)
                for hold in record.finished:
                    self._put_finished_hold(holds, hold, record.sequence, record.now_ns)
            self._put_idempotency_rows(txn, rows)
            if file_events:
                self._file_events(txn, pending, events, last_sequence)
            if records:
                txn.put(b"batch_first_sequence", record_key(records[0].sequence),
                        db=self.meta_db)
            if snapshot is not None:
                self._put_snapshot(txn, snapshot)
            if fault_kind == "write-error" and self._appends == fault_at:
                raise OSError(errno.EIO, "injected write error (QUOTAD_FAULT_INJECT)")
        self._last_written_sequence = last_sequence
        if file_events:
            self._events_pending, self._events_indexed_through = {}, last_sequence
        else:
            for user, tail in events:
                found = pending.get(user)
                if found is None:
                    pending[user] = bytearray(tail)
                else:
                    found += tail
        if shapes_stored:  # committed: the table holds them
            if (len(self._shapes_stored) + len(shapes_stored)
                    > limits.COUNTER_SHAPES_REMEMBERED_MAX):
                self._shapes_stored.clear()
            self._shapes_stored.update(shapes_stored)
        if fault_kind == "sync-error" and self._appends == fault_at:
            raise OSError(errno.EIO, "injected sync error (QUOTAD_FAULT_INJECT)")

    @contextmanager
    def _counter_heads_kept_if_written(self) -> Iterator[None]:
        """A write that fails may have remembered heads naming shapes it stored: forgotten."""
        try:
            yield
        except BaseException:
            self._counter_heads.clear()
            raise

    def _put_snapshot(self, txn: lmdb.Transaction, snapshot: Snapshot) -> None:
        """A whole snapshot replaces the last and any delta of it; a delta replaces the
        last delta, and must be one of the whole snapshot stored."""
        assert _SNAPSHOT_HEADER.unpack_from(snapshot.encoded)[1] == snapshot.sequence
        if not snapshot.delta_of_sequence:
            txn.put(SNAPSHOT_KEY, snapshot.encoded, db=self.snapshot_db)
            txn.delete(DELTA_KEY, db=self.snapshot_db)
            return
        whole_sequence = self._stored_sequence(txn.get(SNAPSHOT_KEY, db=self.snapshot_db))
        if whole_sequence != snapshot.delta_of_sequence:
            raise ValueError(f"a delta snapshot of sequence {snapshot.delta_of_sequence}, "
                             f"but the whole snapshot stored is at {whole_sequence}")
        txn.put(DELTA_KEY, snapshot.encoded, db=self.snapshot_db)

    def _file_events(self, txn: lmdb.Transaction, pending: dict[int, bytearray],
                     events: list[tuple[int, bytes]], through_sequence: int) -> None:
        """Puts the pending entries and the batch's in the event index, in key order: each at
        the end of its user's (time and sequence only grow), a page of the user's written
        once for them all."""
        entries = [(event_user_key(user), tail)
                   for user, tails in pending.items() for tail in _tails(tails)]
        entries.extend((event_user_key(user), tail) for user, tail in events)
        entries.sort()
        assert through_sequence >= self._events_indexed_through, through_sequence
        consumed, added = txn.cursor(db=self.event_index_db).putmulti(
            entries, dupdata=True, append=True)
        assert consumed == added == len(entries), (consumed, added, len(entries))
        txn.put(EVENTS_INDEXED_THROUGH_KEY, record_key(through_sequence), db=self.meta_db)

    def _loaded_events_pending(self) -> dict[int, bytearray]:
        """The entries not yet filed, read from their records the first time (at most
        events_buffered_records_max records, and the snapshot's batch files them all)."""
        pending = self._events_pending
        if pending is not None:
            return pending
        with self._events_loading:
            if self._events_pending is None:
                pending = {}
                with self.env.begin(buffers=False) as txn:
                    stored = txn.get(EVENTS_INDEXED_THROUGH_KEY, db=self.meta_db)
                    through = key_sequence(stored) if stored else 0
                    last = self.last_sequence_in(txn)
                    cursor = txn.cursor(db=self.log_db)
                    more = cursor.set_range(record_key(through + 1))
                    while more:
                        for user, tail in stored_event_entries(cursor.key(), cursor.value()):
                            pending.setdefault(int.from_bytes(user, "big"),
                                               bytearray()).extend(tail)
                        more = cursor.next()
                # every record may be pruned (the snapshot covers them): through is then last
                self._events_indexed_through = through
                self._last_written_sequence = max(last, through)
                self._events_pending = pending
            return self._events_pending

    def _store_shape(self, txn: lmdb.Transaction, shape: CounterShape) -> bytes | None:
        """Puts a shape in the shapes table (unless it is there): its id; None if another
        shape has that id (its counters are then stored whole)."""
        found, value = encode_counter_shape(shape)
        stored = txn.get(found, db=self.shapes_db)
        if stored is None:
            txn.put(found, value, db=self.shapes_db)
        elif stored != value:
            return None
        return found

    def _shape_lookup(self, txn: lmdb.Transaction) -> ShapeLookup:
        """The shapes table's lookup for decode_record, in this read transaction."""
        def shape(found: bytes) -> CounterShape:
            known = self._shapes_read.get(found)
            if known is None:
                value = txn.get(found, db=self.shapes_db)
                if value is None:
                    raise ValueError(f"counter shape {found.hex()} is missing")
                known = decode_counter_shape(value)
                remember(self._shapes_read, found, known, limits.COUNTER_SHAPES_REMEMBERED_MAX)
            return known
        return shape

    def _put_idempotency_rows(self, txn: lmdb.Transaction,
                              rows: list[tuple[bytes, bytes]]) -> None:
        """In key order: the clients' keys, made just now, sort after every row the table
        holds, and rows put at its end in order fill its last pages (LMDB then splits a
        full page at the new row rather than in the middle)."""
        rows.sort()
        put = txn.cursor(db=self.idempotency_db).put
        for row, sequence_key in rows:
            put(row, sequence_key)

    def _put_finished_hold(self, holds: lmdb.Cursor, hold: Any, sequence: int,
                           now_ns: int) -> None:
        """A hold's row; a committed one that had expired keeps when it expired, so that a
        replay from before the commit reads it as expired."""
        key = hold_row_key(reservation_bytes(hold.reservation_id))
        expired_sequence = 0
        if holds.set_key(key):
            state, written_by, _ = finished_hold_row(holds.value())
            if state is HoldState.EXPIRED:
                expired_sequence = written_by
        reserve_expires_at_ns = self._reserve_expiries_ns.pop(hold.reservation_id, 0)
        holds.put(key, encode_finished_hold(hold, sequence, expired_sequence, now_ns,
                                            reserve_expires_at_ns))

    def _remember_reserve_expiry(self, record: Record) -> None:
        command = record.command  # a hold forgotten here stores its expiry in its row
        remember(self._reserve_expiries_ns, command.reservation_id,
                 record.now_ns + command.ttl_ns, limits.RESERVE_EXPIRIES_REMEMBERED_MAX)

    def prune(self, up_to_sequence: int, retention: Retention,
              records_max: int = limits.PRUNED_RECORDS_PER_TRANSACTION_MAX) -> Pruned:
        """Deletes, in one synced transaction, at most records_max log records (with their
        events, idempotency and hold rows) at or below up_to_sequence (a stored snapshot's)
        that the retention lets go: the oldest first, so the log stays contiguous. Past the
        size bound, the records to go beyond the time retention are estimated from the
        average record's share of the live data, again at each call (so successive calls
        converge on the bound). Raises on any failure; the caller must then stop."""
        assert records_max >= 1
        self._loaded_events_pending()
        assert up_to_sequence <= self._events_indexed_through, (  # their entries are filed
            up_to_sequence, self._events_indexed_through)
        with self.env.begin(write=True) as txn:
            live_bytes = self._live_bytes(txn)
            beyond_max = 0
            if retention.live_bytes_max and live_bytes > retention.live_bytes_max:
                records = txn.stat(self.log_db)["entries"]
                over = live_bytes - retention.live_bytes_max
                beyond_max = -(-over * records // live_bytes)  # rounded up
            pruned, beyond, stop = self._prune(
                txn, up_to_sequence, retention.before_ns, records_max,
                beyond_max, retention.kept_from_ns)
            cursor = txn.cursor(db=self.log_db)
            oldest = cursor.first()
            oldest_ns = record_now_ns(cursor.value()) if oldest else None
            self._pruned_since_sweep += pruned
            if self._sweep_from is None and self._pruned_since_sweep >= self._event_sweep_records:
                self._pruned_since_sweep = 0
                self._sweep_from = b""
                self._sweep_below = key_sequence(cursor.key()) if oldest else 2**64 - 1
            if self._sweep_from is not None:
                self._sweep_event_index(txn)
            return Pruned(pruned, beyond, stop == "records_max" or self._sweep_from is not None,
                          stop == "kept_from_ns", self._live_bytes(txn), oldest_ns)

    def _sweep_event_index(self, txn: lmdb.Transaction) -> None:
        """One step of the sweep in progress: the entries of pruned records (sequence below
        _sweep_below) of at most _event_sweep_users users, from _sweep_from on; the pass is
        over (_sweep_from None) once it passes the last user."""
        assert self._sweep_from is not None
        cursor = txn.cursor(db=self.event_index_db)
        below = self._sweep_below
        found = cursor.set_range(self._sweep_from)
        for _ in range(self._event_sweep_users):
            if not found:
                break
            user = cursor.key()
            while cursor.key() == user and event_tail_fields(cursor.value())[1] < below:
                cursor.delete()  # moves to the next entry, the user's or the next user's
            found = cursor.next_nodup() if cursor.key() == user else bool(cursor.key())
        self._sweep_from = cursor.key() if found else None

    def _live_bytes(self, txn: lmdb.Transaction) -> int:
        """Bytes of every table's pages in use (free pages, which LMDB reuses, not counted)."""
        pages = 0
        for db in (None, self.meta_db, self.log_db, self.snapshot_db, self.idempotency_db,
                   self.holds_db, self.event_index_db, self.shapes_db):
            stat = txn.stat(db) if db is not None else self.env.stat()
            pages += stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return pages * stat["psize"]

    def _prune(self, txn: lmdb.Transaction, up_to_sequence: int, before_ns: int,
               records_max: int, beyond_max: int = 0, kept_from_ns: int = 0
               ) -> tuple[int, int, str]:
        """(records deleted, of them younger than before_ns, what stopped it: "records_max",
        "kept_from_ns" (with more over the size bound), or "" (nothing more due))."""
        cursor = txn.cursor(db=self.log_db)
        pruned = beyond = 0
        if not cursor.first():
            return 0, 0, ""
        up_to_key = record_key(up_to_sequence)  # keys sort as their sequences
        delete = txn.delete
        rows = txn.cursor(db=self.idempotency_db)  # a row looked up and deleted in one descent
        while True:
            key = cursor.key()
            if not key:  # the last record was deleted
                break
            if pruned == records_max:
                return pruned, beyond, "records_max"
            if key > up_to_key:
                break
            value = cursor.value()
            now_ns = record_now_ns(value)
            if now_ns >= before_ns:
                if beyond == beyond_max:
                    break
                if now_ns >= kept_from_ns:
                    return pruned, beyond, "kept_from_ns"
                beyond += 1
            row, reserved = stored_record_rows(key, value)  # its events: swept later
            if row is not None and rows.set_key(row) and rows.value() == key:
                rows.delete()  # unless the key was used anew since
            if reserved is not None:
                delete(hold_row_key(reserved), db=self.holds_db)  # goes with its Reserve
            cursor.delete()  # moves to the next record
            pruned += 1
        return pruned, beyond, ""

    def drop_tail(self, from_sequence: int) -> int:
        """Deletes records from from_sequence on (a torn tail that was never acknowledged)."""
        dropped = 0
        with self.env.begin(write=True, db=self.log_db) as txn:
            cursor = txn.cursor()
            if cursor.set_range(record_key(from_sequence)):
                while cursor.delete():
                    dropped += 1
            stored = txn.get(EVENTS_INDEXED_THROUGH_KEY, db=self.meta_db)
            if stored and key_sequence(stored) >= from_sequence:
                txn.put(EVENTS_INDEXED_THROUGH_KEY, record_key(from_sequence - 1),
                        db=self.meta_db)
        self._events_pending = None  # read again from the records left
        return dropped

    # --- reading --------------------------------------------------------------------------

    def load_snapshot(self) -> Snapshot | None:
        """The latest whole snapshot, its checksum checked (CorruptSnapshot), or None."""
        return self._load_snapshot(SNAPSHOT_KEY)

    def load_delta(self) -> Snapshot | None:
        """The latest delta snapshot of the whole one (load_snapshot), its checksum checked
        (CorruptSnapshot), or None. Its delta_of_sequence is left 0: it is in its body."""
        return self._load_snapshot(DELTA_KEY)

    def _load_snapshot(self, key: bytes) -> Snapshot | None:
        with self.env.begin(db=self.snapshot_db, buffers=False) as txn:
            value = txn.get(key)
        if value is None:
            return None
        return Snapshot(verify_snapshot(value), value)

    def snapshot_sequence(self) -> int:
        """The sequence the latest snapshot, whole or delta, covers (0: none), without
        reading it whole."""
        with self.env.begin(db=self.snapshot_db, buffers=True) as txn:
            return max(map(self._stored_sequence, (txn.get(SNAPSHOT_KEY), txn.get(DELTA_KEY))))

    def whole_snapshot_sequence(self) -> int:
        """The sequence the latest whole snapshot covers (0: none): records up to it may be
        pruned; those after it stay, so that it and the log alone rebuild the state."""
        with self.env.begin(db=self.snapshot_db, buffers=True) as txn:
            return self._stored_sequence(txn.get(SNAPSHOT_KEY))

    @staticmethod
    def _stored_sequence(value: Any) -> int:
        # a view into the map: the header alone is read
        return _SNAPSHOT_HEADER.unpack_from(value)[1] if value is not None else 0

    def record_now_ns(self, sequence: int) -> int | None:
        """The server time of one log record; None if there is none (pruned, or not yet)."""
        with self.env.begin(db=self.log_db, buffers=False) as txn:
            value = txn.get(record_key(sequence))
        return None if value is None else record_now_ns(value)

    def records(self, after_sequence: int = 0) -> Iterator[Record]:
        """Every record after the given sequence, checked (checksum, order, no gaps)."""
        expected = after_sequence + 1
        with self.env.begin(db=self.log_db, buffers=False) as txn:
            cursor = txn.cursor()
            shape = self._shape_lookup(txn)
            if not cursor.first():
                return
            if key_sequence(cursor.key()) > expected:
                raise RuntimeError(f"log gap: the log starts at {key_sequence(cursor.key())}, "
                                   f"replay needs {expected}")
            if not cursor.set_range(record_key(expected)):
                return
            for key, value in cursor:
                if key_sequence(key) != expected:
                    raise RuntimeError(f"log gap: expected sequence {expected}, "
                                       f"found {key_sequence(key)}")
                yield decode_record(key, value, shape)
                expected += 1

    def export_range(self, after_sequence: int | None) -> tuple[int, int]:
        """(after, through): an export after `after` (None: before the oldest record kept)
        runs through the last durable record. LogPruned if the log no longer holds the
        record after `after`."""
        with self.env.begin(db=self.log_db) as txn:
            cursor = txn.cursor()
            first = key_sequence(cursor.key()) if cursor.first() else 0
            last = key_sequence(cursor.key()) if cursor.last() else 0
        if last == 0:  # every record pruned (or none yet): the snapshot covers them all
            last = self.snapshot_sequence()
            first = last + 1
        after = first - 1 if after_sequence is None else after_sequence
        if after + 1 < first:
            raise LogPruned(after + 1, first)
        return after, last

    def usage_entries(self, app: str, after_sequence: int, through_sequence: int,
                      end_ns: int, records_max: int) -> tuple[list[UsageEntry], int, bool]:
        """The allowed commit and track events of app's records after after_sequence, through
        through_sequence and before end_ns, reading at most records_max records: the entries,
        the sequence of the last record read (where the next read continues), and whether
        the range is done. LogPruned if the log no longer holds the first record."""
        entries: list[UsageEntry] = []
        expected = after_sequence + 1
        with self.env.begin(buffers=False) as txn:
            cursor = txn.cursor(db=self.log_db)
            if expected > through_sequence:
                return entries, after_sequence, True
            if not (cursor.set_range(record_key(expected))
                    and key_sequence(cursor.key()) == expected):
                raise LogPruned(expected, key_sequence(cursor.key()) if cursor.first() else 0)
            for key, value in cursor:
                sequence = key_sequence(key)
                if record_now_ns(value) >= end_ns or sequence > through_sequence:
                    return entries, expected - 1, True
                if sequence - after_sequence > records_max:
                    return entries, expected - 1, False
                assert sequence == expected, f"log gap: expected {expected}, found {sequence}"
                _usage_of(decode_record(key, value, with_events=True), app, entries)
                expected += 1
        return entries, expected - 1, True

    def idempotency_record(self, app: str, rpc: str, idempotency_key: str,
                           as_of_sequence: int) -> Record | None:
        """The record that first used this idempotency key, if it is at or before
        as_of_sequence (a replay must not see what later records did) and is that key's (not
        another's with the same row key). Called on the event loop: one or two page lookups,
        and one more for a counter shape not read before."""
        row = idempotency_row_key(app, rpc, idempotency_key)
        txn = self._read_txn  # a new key's lookup is the common case: no context manager
        if txn is None:
            with self.env.begin(buffers=False) as txn:
                record = self._row_record(txn, row, as_of_sequence)
        else:
            record = self._row_record(txn, row, as_of_sequence)
        if record is None:
            remember(self._rows_looked_up, (app, rpc, idempotency_key), row,
                     limits.IDEMPOTENCY_ROWS_REMEMBERED_MAX)
            return None
        command = record.command
        if (type(command).__name__ != rpc or command.app != app
                or command.idempotency_key != idempotency_key):
            return None
        return record

    def _row_record(self, txn: lmdb.Transaction, row: bytes,
                    as_of_sequence: int) -> Record | None:
        key = txn.get(row, db=self.idempotency_db)
        if key is None or key_sequence(key) > as_of_sequence:
            return None
        value = txn.get(key, db=self.log_db)
        if value is None:  # pruned with its record
            return None
        return decode_record(key, value, self._shape_lookup(txn))

    def finished_hold(self, reservation_id: str, as_of_sequence: int) -> Any:
        """The finished hold (a core Reservation) as of that sequence, or None. Called on the
        event loop: one page lookup."""
        reservation = reservation_bytes(reservation_id)
        with self._reader() as txn:
            value = txn.get(hold_row_key(reservation), db=self.holds_db)
            if value is None:
                return None
            return decode_finished_hold(reservation, value, as_of_sequence,
                                        *self._hold_lookups(txn))

    def _hold_lookups(self, txn: lmdb.Transaction) -> tuple[
            Callable[[int], Record | None], Callable[[int], int | None]]:
        """What decode_finished_hold reads of the log, in this transaction: a record by its
        sequence (a young hold's Reserve record), and a record's time alone."""
        def reserve_record(sequence: int) -> Record | None:
            stored = txn.get(record_key(sequence), db=self.log_db)
            return None if stored is None else decode_record(
                record_key(sequence), stored, self._shape_lookup(txn))

        def record_time_ns(sequence: int) -> int | None:
            stored = txn.get(record_key(sequence), db=self.log_db)
            return None if stored is None else record_now_ns(stored)
        return reserve_record, record_time_ns

    # --- a moved slot set's rows (ExportSlots) ----------------------------------------------

    def slot_holds(self, txn: lmdb.Transaction, slots: frozenset[int],
                   as_of_sequence: int) -> Iterator[Any | None]:
        """The finished holds of these slots in the holds table, as of that sequence (core
        Reservations), in one pass over the whole table, since a row's key begins with its
        reservation id's time (hold_row_key): one item per row, so that the caller can pace
        the pass, None for a row of another slot (or a hold still live as of that sequence).
        Each row costs a B-tree step, a hold of these slots a decode, and a young one's one
        more read and decode of its Reserve record."""
        lookups = self._hold_lookups(txn)
        for key, value in txn.cursor(db=self.holds_db):
            if hold_row_slot(key) not in slots:
                yield None
                continue
            yield decode_finished_hold(hold_row_reservation_bytes(key), value, as_of_sequence,
                                       *lookups)

    def keyed_records(self, txn: lmdb.Transaction, as_of_sequence: int) -> Iterator[Record]:
        """The record holding the first answer of every idempotency key the table keeps (at
        or before that sequence): the whole table, each row one read and decode of its record
        (a row's key is its key's time and a digest of app, RPC and key, which name no
        user)."""
        shape = self._shape_lookup(txn)
        for _, sequence_key in txn.cursor(db=self.idempotency_db):
            if key_sequence(sequence_key) > as_of_sequence:
                continue
            stored = txn.get(sequence_key, db=self.log_db)
            if stored is not None:  # else pruned with its record
                yield decode_record(bytes(sequence_key), stored, shape)

    def last_sequence_in(self, txn: lmdb.Transaction) -> int:
        """The last record's sequence a read transaction sees (0: none)."""
        cursor = txn.cursor(db=self.log_db)
        return key_sequence(cursor.key()) if cursor.last() else 0

    def records_in(self, txn: lmdb.Transaction, after_sequence: int,
                   through_sequence: int) -> Iterator[Record]:
        """The records after one sequence through another that a read transaction sees."""
        shape = self._shape_lookup(txn)
        cursor = txn.cursor(db=self.log_db)
        if not cursor.set_range(record_key(after_sequence + 1)):
            return
        for key, value in cursor:
            if key_sequence(key) > through_sequence:
                return
            yield decode_record(bytes(key), value, shape)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """The idempotency and finished-hold lookups made inside share one read transaction
        (one Batch's commands), instead of one each. The event loop's thread only; what it
        sees is what was durable when it began, which covers every key and hold memory
        already forgot (they are forgotten only once durable, never while it is open)."""
        if self._read_txn is not None:  # nested: the outer one serves
            yield
            return
        self._read_txn = self.env.begin(buffers=False)
        try:
            yield
        finally:
            txn, self._read_txn = self._read_txn, None
            txn.abort()

    @contextmanager
    def _reader(self) -> Iterator[lmdb.Transaction]:
        if self._read_txn is not None:
            yield self._read_txn
        else:
            with self.env.begin(buffers=False) as txn:
                yield txn

    def batch_first_sequence(self) -> int:
        with self.env.begin(db=self.meta_db) as txn:
            value = txn.get(b"batch_first_sequence")
        return key_sequence(value) if value else 0

    def first_sequence(self) -> int:
        with self.env.begin(db=self.log_db) as txn:
            cursor = txn.cursor()
            return key_sequence(cursor.key()) if cursor.first() else 0

    def last_sequence(self) -> int:
        with self.env.begin(db=self.log_db) as txn:
            return self.last_sequence_in(txn)

    def list_events(self, app: str, user_id: str, user_number: int, start_ns: int, end_ns: int,
                    after: bytes, limit: int) -> list[StoredEvent]:
        """A user's audit events with start_ns <= time < end_ns, after the cursor, oldest
        first, at most limit of them. user_number: the core's for (app, user_id)."""
        user_key = event_user_key(user_number)
        first = after or event_tail(start_ns, 0, 0)
        found: list[StoredEvent] = []
        # Copied before the read begins, so that it sees every record these name; entries
        # filed meanwhile are in both, and are taken once (from the table).
        pending = bytes(self._loaded_events_pending().get(user_number, b""))
        with self.env.begin(buffers=False) as txn:
            oldest = txn.cursor(db=self.log_db)
            if not oldest.first():
                return found  # every record pruned: no event listed
            # from the oldest record on (entries sort by time, then record): what is before
            # it was pruned, even a record of the same time (a command's expiries come
            # first), and its entries wait for the event index's next sweep
            first = max(first, event_tail(record_now_ns(oldest.value()),
                                          key_sequence(oldest.key()), 0))
            cursor = txn.cursor(db=self.event_index_db)
            filed: Iterator[bytes] = iter(())
            if cursor.set_range_dup(user_key, first):
                filed = cursor.iternext_dup(keys=False, values=True)
            last_filed = first
            for tails in (filed, _tails(pending)):
                for tail in tails:
                    if len(found) >= limit:
                        return found
                    if tail < last_filed or tail == after:
                        continue
                    now_ns, sequence, index = event_tail_fields(tail)
                    if now_ns >= end_ns:
                        return found
                    key = record_key(sequence)
                    stored = txn.get(key, db=self.log_db)
                    if stored is None:
                        raise CorruptRecord(sequence, "an audit event's record is missing")
                    found.append(StoredEvent(
                        now_ns, sequence, record_event(key, stored, index, app, user_id), tail))
                    last_filed = tail + b"\0"  # just past it: a pending copy is skipped
        return found

    def used_bytes(self) -> int:
        """Bytes of the LMDB file in use: its high-water mark (pages freed by pruning are
        reused below it). Two meta-page reads."""
        return (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]

    def live_bytes(self) -> int:
        """Bytes of every table's pages in use: what pruning keeps under its size bound."""
        with self.env.begin() as txn:
            return self._live_bytes(txn)

    def map_bytes(self) -> int:
        """The most the LMDB file may grow to (--map-size-gib)."""
        return int(self.env.info()["map_size"])

    def disk_free_bytes(self) -> int:
        """Bytes free on the data directory's file system, for an unprivileged writer."""
        stat = os.statvfs(self.data_dir)
        return stat.f_bavail * stat.f_frsize

    def close(self) -> None:
        self.env.close()
        self._lock_file.close()


def _tails(entries: bytes | bytearray) -> Iterator[bytes]:
    """Each event index entry (event_tail) of a user's run of them in memory."""
    for at in range(0, len(entries), EVENT_TAIL_BYTES):
        yield bytes(entries[at:at + EVENT_TAIL_BYTES])


def _usage_of(record: Record, app: str, entries: list[UsageEntry]) -> None:
    command = record.command
    if not isinstance(command, (Commit, Track)) or command.app != app:
        return
    for index, (event, user) in enumerate(zip(record.events, record.event_users, strict=True)):
        if event.allowed and AUDIT_KINDS.index(event.kind) in _USAGE_KINDS:
            entries.append(UsageEntry(record.sequence, index, record.now_ns, user, event))


def recover_records(wal: WriteAheadLog, after_sequence: int, *, drop_torn_tail: bool) -> Iterator[Record]:
    """The records to replay. A corrupt record inside the last batch written (which may never
    have been acknowledged) is a torn tail: TornTail is raised, after dropping it and what
    follows if asked to. A corrupt record before that was acknowledged: CorruptRecord."""
    tail_start = wal.batch_first_sequence()
    iterator = wal.records(after_sequence)
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except CorruptRecord as error:
            if error.sequence < tail_start:
                raise
            dropped = wal.drop_tail(error.sequence) if drop_torn_tail else 0
            raise TornTail(error.sequence, dropped, error.reason) from error
        yield record


class TornTail(Exception):
    def __init__(self, sequence: int, dropped: int, reason: str) -> None:
        super().__init__(f"a torn, unacknowledged tail from sequence {sequence} ({reason}); "
                         f"{dropped} records dropped")
        self.sequence = sequence
        self.dropped = dropped


def verify_snapshot(value: bytes) -> int:
    """The sequence an encoded snapshot covers, once its checksum holds; else CorruptSnapshot."""
    if len(value) < _SNAPSHOT_HEADER.size:
        raise CorruptSnapshot("the snapshot is shorter than its header")
    checksum, sequence = _SNAPSHOT_HEADER.unpack_from(value)
    if hashlib.blake2b(value[16:], digest_size=16).digest() != checksum:
        raise CorruptSnapshot(f"the snapshot at sequence {sequence} fails its checksum")
    return sequence


def encode_snapshot(sequence: int, body: bytes) -> bytes:
    """The stored form of a snapshot: checksum, sequence, the body (snapshot.py)."""
    unsigned = struct.pack(">Q", sequence) + body
    return hashlib.blake2b(unsigned, digest_size=16).digest() + unsigned


def snapshot_body(encoded: bytes) -> bytes:
    """What follows a stored snapshot's header (check it first: verify_snapshot)."""
    return encoded[_SNAPSHOT_HEADER.size:]


def _parse_fault(text: str) -> tuple[str, int]:
    if not text:
        return "", 0
    kind, _, at = text.partition("@")
    if kind not in ("write-error", "sync-error") or not at.isdigit() or int(at) < 1:
        raise ValueError(f"{FAULT_ENV}={text!r}: expected write-error@N or sync-error@N")
    return kind, int(at)


def _lock_exclusively(path: Path):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirLocked(f"{path.parent} is in use by another quotad process") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
