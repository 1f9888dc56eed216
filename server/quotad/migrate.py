"""`quotad migrate --data-dir DIR`: brings a stopped server's data directory from format 3, 4,
5 or 6 to the format this server reads (7), offline.

It reads DIR (locked, never written), writes the new directory beside it (DIR.migrating), and
only once that is whole and synced swaps the two: DIR becomes the new one, and the old one is
kept as DIR.formatN (N: the old format) for the operator to delete. Interrupted at any point,
DIR is as it was (a leftover DIR.migrating is removed by the next run).

Every record keeps its sequence and time.
- From format 3: records the old snapshot covers keep the audit events the old log stored
  with them; the records after it are applied to the core again, and must make exactly the
  events the old log holds. The new directory starts with a snapshot of the whole state, so
  its first start replays nothing.
- From format 4: each record takes in its audit events from the old events index, and the
  snapshot and the finished holds are copied as they are (the holds under this format's
  keys). No record is applied again: the first start replays what the old one would have.
- From format 5: every table is copied as it is, byte for byte, the holds table's rows
  under this format's keys (the reservation id's time first).
- From format 6: every table is copied as it is, byte for byte.
- From formats 5 and 6, the event index holds every record's entries: meta says so
  (events_indexed_through is the last record's sequence).
- From formats 4 and 5, each idempotency row is filed again under this format's key of the
  key its record holds (a read and a decode of that record per row, ~10 us).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import lmdb

from quotad.core import limits
from quotad.core.commands import Record
from quotad.core.machine import Core
from quotad.core.values import replace
from quotad.storage import format3, log_pb2
from quotad.storage.codec import (
    CorruptRecord, decode_event, decode_record, event_tail, event_user_key, hold_row_key,
    idempotency_row_key, key_sequence, record_key,
)
from quotad.storage.snapshot import snapshot_of
from quotad.storage.snapshot_json import core_from_plain
from quotad.storage.wal import (
    EVENTS_INDEXED_THROUGH_KEY, FORMAT_VERSION, LOCK_FILE_NAME, MAP_SIZE_BYTES_DEFAULT,
    SNAPSHOT_KEY, DataFormatMismatch,
    CorruptSnapshot, Snapshot, WriteAheadLog, _lock_exclusively, verify_snapshot,
)

FORMAT_4 = b"4"
FORMAT_5 = b"5"
FORMAT_6 = b"6"
FORMAT_5_TABLES = ("log", "snapshot", "event_index", "holds", "shapes")
"""The tables format 5 and this format share, row for row (the idempotency table's keys
differ; meta holds the format). Format 6 shares the idempotency table too."""


class MigrationError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Migrated:
    records: int
    first_sequence: int
    last_sequence: int
    snapshot_sequence: int
    """The sequence of the format-3 snapshot it started from (0: none)."""
    backup: Path
    seconds: float


def migrate(data_dir: Path, *, map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT,
            progress: TextIO | None = sys.stderr) -> Migrated:
    if not (data_dir / "data.mdb").exists():
        raise MigrationError(f"{data_dir} holds no quotad data")
    target = data_dir.with_name(data_dir.name + ".migrating")
    started = time.monotonic()
    lock = _lock_exclusively(data_dir / LOCK_FILE_NAME)
    try:
        env = lmdb.open(str(data_dir), readonly=True, max_dbs=8, lock=False, subdir=True)
        try:
            version = _check_version(env, data_dir)
            backup = data_dir.with_name(f"{data_dir.name}.format{version.decode()}")
            if backup.exists():
                raise MigrationError(f"{backup} exists (an earlier migration's copy of the old "
                                     "data): move it away first")
            shutil.rmtree(target, ignore_errors=True)  # an interrupted run's: never swapped in
            copy = {FORMAT_4: _copy_format4, FORMAT_5: _copy_format5,
                    FORMAT_6: _copy_format6}.get(version, _copy)
            summary = copy(env, data_dir, target, map_size_bytes, progress)
        finally:
            env.close()
        data_dir.rename(backup)
        target.rename(data_dir)
    finally:
        lock.close()
    (backup / LOCK_FILE_NAME).unlink(missing_ok=True)
    return Migrated(*summary, backup=backup, seconds=round(time.monotonic() - started, 3))


def _check_version(env: lmdb.Environment, data_dir: Path) -> bytes:
    with env.begin() as txn:
        version = txn.get(b"format_version", db=env.open_db(b"meta", txn=txn, create=False))
    if version == FORMAT_VERSION:
        raise MigrationError(f"{data_dir} is already format {FORMAT_VERSION.decode()}: "
                             "nothing to do")
    if version not in (format3.FORMAT_VERSION, FORMAT_4, FORMAT_5, FORMAT_6):
        raise MigrationError(f"{data_dir} holds format {version!r}; only formats 3, 4, 5 "
                             "and 6 migrate")
    return version


class _Progress:
    """A line on stderr every MIGRATE_PROGRESS_EVERY_S: records (or keys) written of the
    total."""

    def __init__(self, total: int, out: TextIO | None, what: str = "records") -> None:
        self.total, self.out, self.what, self.shown_at = total, out, what, time.monotonic()

    def show(self, written: int) -> None:
        if self.out is None or time.monotonic() - self.shown_at < limits.MIGRATE_PROGRESS_EVERY_S:
            return
        self.shown_at = time.monotonic()
        print(f"migrating: {written:,} of {self.total:,} {self.what} "
              f"({100 * written // max(self.total, 1)} %)", file=self.out, flush=True)


def _copy(env: lmdb.Environment, data_dir: Path, target: Path, map_size_bytes: int,
          progress: TextIO | None) -> tuple[int, int, int, int]:
    with env.begin(buffers=False) as txn:
        log_db = env.open_db(b"log", txn=txn, create=False)
        snapshot_db = env.open_db(b"snapshot", txn=txn, create=False)
        snapshot_sequence, plain = format3.read_snapshot(txn.get(SNAPSHOT_KEY, db=snapshot_db))
        core = core_from_plain(format3.number_users(plain)) if plain is not None else Core()
        total = txn.stat(log_db)["entries"]
        wal = WriteAheadLog(target, map_size_bytes=map_size_bytes)
        try:
            first, last, written = 0, 0, 0
            batch: list[Record] = []
            shown = _Progress(total, progress)
            for old in format3.read_records(txn, log_db):
                batch.append(_record(core, old, snapshot_sequence))
                first, last, written = first or old.sequence, old.sequence, written + 1
                if len(batch) == limits.MIGRATE_RECORDS_PER_TRANSACTION:
                    wal.append(batch)
                    batch = []
                shown.show(written)
            if core.sequence != max(last, snapshot_sequence):
                raise MigrationError(f"the log ends at {last} but the state at {core.sequence}")
            wal.append(batch, Snapshot(core.sequence, snapshot_of(core)))
        except format3.Unreadable as error:
            raise MigrationError(f"{data_dir}: {error}") from error
        finally:
            wal.close()
    return written, first, last, snapshot_sequence


def _copy_format4(env: lmdb.Environment, data_dir: Path, target: Path, map_size_bytes: int,
                  progress: TextIO | None) -> tuple[int, int, int, int]:
    with env.begin(buffers=False) as txn:
        tables = {name: env.open_db(name.encode(), txn=txn, create=False)
                  for name in ("log", "snapshot", "events", "holds", "idempotency")}
        encoded = txn.get(SNAPSHOT_KEY, db=tables["snapshot"])
        try:
            snapshot = Snapshot(verify_snapshot(encoded), encoded) if encoded else None
        except CorruptSnapshot as error:
            raise MigrationError(f"{data_dir}: {error}") from error
        shown = _Progress(txn.stat(tables["log"])["entries"], progress)
        wal = WriteAheadLog(target, map_size_bytes=map_size_bytes)
        try:
            first, last, written = 0, 0, 0
            batch: list[Record] = []
            for key, value in txn.cursor(db=tables["log"]):
                record = _record_with_events(txn, tables["events"], key, value, data_dir)
                if last and record.sequence != last + 1:
                    raise MigrationError(f"{data_dir}: the log skips from record {last} to "
                                         f"{record.sequence}")
                batch.append(record)
                first, last, written = first or record.sequence, record.sequence, written + 1
                if len(batch) == limits.MIGRATE_RECORDS_PER_TRANSACTION:
                    wal.append(batch)
                    batch = []
                shown.show(written)
            _copy_table(txn, tables["holds"], wal, wal.holds_db, rekey=hold_row_key)
            _file_idempotency_rows(txn, tables["log"], tables["idempotency"], wal, data_dir,
                                   progress)
            if batch or snapshot is not None:
                wal.append(batch, snapshot)
        finally:
            wal.close()
    return written, first, last, snapshot.sequence if snapshot is not None else 0


def _copy_format5(env: lmdb.Environment, data_dir: Path, target: Path, map_size_bytes: int,
                  progress: TextIO | None) -> tuple[int, int, int, int]:
    return _copy_tables(env, data_dir, target, map_size_bytes, progress, refile=True)


def _copy_format6(env: lmdb.Environment, data_dir: Path, target: Path, map_size_bytes: int,
                  progress: TextIO | None) -> tuple[int, int, int, int]:
    return _copy_tables(env, data_dir, target, map_size_bytes, progress, refile=False)


def _copy_tables(env: lmdb.Environment, data_dir: Path, target: Path, map_size_bytes: int,
                 progress: TextIO | None, *, refile: bool) -> tuple[int, int, int, int]:
    """Formats 5 (refile: the idempotency and holds rows under this format's keys) and 6."""
    with env.begin(buffers=False) as txn:
        index = {"dupsort": True, "dupfixed": True}  # as WriteAheadLog opens it
        tables = {name: env.open_db(name.encode(), txn=txn, create=False,
                                    **(index if name == "event_index" else {}))
                  for name in (*FORMAT_5_TABLES, "idempotency", "meta")}
        encoded = txn.get(SNAPSHOT_KEY, db=tables["snapshot"])
        try:
            snapshot_sequence = verify_snapshot(encoded) if encoded else 0
        except CorruptSnapshot as error:
            raise MigrationError(f"{data_dir}: {error}") from error
        log = txn.cursor(db=tables["log"])
        first = key_sequence(log.key()) if log.first() else 0
        last = key_sequence(log.key()) if log.last() else 0
        written = txn.stat(tables["log"])["entries"]
        if written != (last - first + 1 if first else 0):
            raise MigrationError(f"{data_dir}: the log holds {written} records from {first} to "
                                 f"{last}: some are missing")
        wal = WriteAheadLog(target, map_size_bytes=map_size_bytes)
        try:
            shown = _Progress(written, progress)
            into = {"log": wal.log_db, "snapshot": wal.snapshot_db,
                    "event_index": wal.event_index_db, "holds": wal.holds_db,
                    "shapes": wal.shapes_db, "idempotency": wal.idempotency_db}
            for name in (*FORMAT_5_TABLES, *(() if refile else ("idempotency",))):
                _copy_table(txn, tables[name], wal, into[name], shown if name == "log" else None,
                            rekey=hold_row_key if name == "holds" and refile else None)
            batch_first = txn.get(b"batch_first_sequence", db=tables["meta"])
            with wal.env.begin(write=True, db=wal.meta_db) as out:
                if batch_first is not None:
                    out.put(b"batch_first_sequence", batch_first)
                out.put(EVENTS_INDEXED_THROUGH_KEY, record_key(max(last, snapshot_sequence)))
            if refile:
                _file_idempotency_rows(txn, tables["log"], tables["idempotency"], wal,
                                       data_dir, progress)
        finally:
            wal.close()
    return written, first, last, snapshot_sequence


def _file_idempotency_rows(txn: lmdb.Transaction, log_db: Any, idempotency_db: Any,
                           wal: WriteAheadLog, data_dir: Path, progress: TextIO | None) -> None:
    """Each old row again, under this format's key of the key its record holds; a row whose
    record was pruned (and so answers nothing) is left behind."""
    shown = _Progress(txn.stat(idempotency_db)["entries"], progress, "idempotency keys")
    cursor = txn.cursor(db=idempotency_db)
    more, read = cursor.first(), 0
    while more:
        rows = []
        while more and len(rows) < limits.MIGRATE_RECORDS_PER_TRANSACTION:
            sequence_key = cursor.value()
            stored = txn.get(sequence_key, db=log_db)
            if stored is not None:
                try:
                    command = decode_record(sequence_key, stored).command
                except CorruptRecord as error:
                    raise MigrationError(f"{data_dir}: {error}") from error
                rows.append((idempotency_row_key(command.app, type(command).__name__,
                                                 command.idempotency_key), sequence_key))
            more, read = cursor.next(), read + 1
        with wal.env.begin(write=True, db=wal.idempotency_db) as out:
            for row, sequence_key in sorted(rows):
                out.put(row, sequence_key)
        shown.show(read)


def _record_with_events(txn: lmdb.Transaction, events_db: Any, key: bytes, value: bytes,
                        data_dir: Path) -> Record:
    """A format-4 record with the audit events its events index held (key: the user number,
    then the time, the sequence and the index)."""
    try:
        record = decode_record(key, value)
    except CorruptRecord as error:
        raise MigrationError(f"{data_dir}: {error}") from error
    app = getattr(record.command, "app", "")
    events = []
    for index, user in enumerate(record.event_users):
        stored = txn.get(event_user_key(user) + event_tail(record.now_ns, record.sequence, index),
                         db=events_db)
        if stored is None:
            raise MigrationError(f"{data_dir}: audit event {index} of record "
                                 f"{record.sequence} is missing")
        events.append(decode_event(log_pb2.Event.FromString(stored), app, "",
                                   lambda: record.command))
    return replace(record, events=tuple(events))


def _copy_table(txn: lmdb.Transaction, source: Any, wal: WriteAheadLog, db: Any,
                shown: _Progress | None = None, copied: int = 0, *,
                rekey: Callable[[bytes], bytes] | None = None) -> int:
    """Every row of a table, as it is (or under rekey(its key)), in key order into an empty
    table (appended: its pages fill), in transactions of MIGRATE_RECORDS_PER_TRANSACTION;
    the rows copied so far."""
    cursor = txn.cursor(db=source)
    more = cursor.first()
    while more:
        with wal.env.begin(write=True, db=db) as out:
            put = out.cursor().put
            for _ in range(limits.MIGRATE_RECORDS_PER_TRANSACTION):
                if rekey is None:
                    appended = put(cursor.key(), cursor.value(), append=True)
                    assert appended, "a table's rows come in key order"
                else:
                    put(rekey(cursor.key()), cursor.value())
                copied += 1
                more = cursor.next()
                if not more:
                    break
        if shown is not None:
            shown.show(copied)
    return copied


def _record(core: Core, old: format3.OldRecord, snapshot_sequence: int) -> Record:
    """The record in this format: one the snapshot covers keeps its stored events; a later
    one is applied again and must make the same."""
    if old.sequence <= snapshot_sequence:
        return Record(old.sequence, old.now_ns, old.command, old.events, tuple(
            core.user_number(event.app, event.user_id) or 0 for event in old.events))
    outcome = core.apply(old.command, old.now_ns)
    if len(outcome.records) != 1 or outcome.records[0].sequence != old.sequence or \
            outcome.records[0].events != old.events:
        raise MigrationError(f"record {old.sequence} does not apply as the old server applied "
                             f"it: it made {outcome.records!r} ({outcome.error!r})")
    return outcome.records[0]


def run(data_dir: Path) -> int:
    """The command: one JSON line on success, one line on stderr and exit 2 when refused."""
    import json
    try:
        done = migrate(data_dir)
    except (MigrationError, DataFormatMismatch, OSError) as error:
        print(f"quotad migrate: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"migrated": str(data_dir), "format": FORMAT_VERSION.decode(),
                      "records": done.records, "first_sequence": done.first_sequence,
                      "last_sequence": done.last_sequence,
                      "old_snapshot_sequence": done.snapshot_sequence,
                      "old_data_kept_in": str(done.backup), "seconds": done.seconds}))
    return 0
