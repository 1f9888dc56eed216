"""`quotad migrate --data-dir DIR`: brings a stopped server's data directory from format 3 to
the format this server reads, offline.

It reads DIR (locked, never written), writes the new directory beside it (DIR.migrating), and
only once that is whole and synced swaps the two: DIR becomes the new one, and the old one is
kept as DIR.format3 for the operator to delete. Interrupted at any point, DIR is as it was
(a leftover DIR.migrating is removed by the next run).

Every record keeps its sequence and time. Records the old snapshot covers keep the audit
events the old log stored with them; the records after it are applied to the core again, and
must make exactly the events the old log holds. The new directory starts with a snapshot of
the whole state, so its first start replays nothing.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import lmdb

from quotad.core import limits
from quotad.core.commands import Record
from quotad.core.machine import Core
from quotad.storage import format3
from quotad.storage.snapshot import snapshot_of
from quotad.storage.snapshot_json import core_from_plain
from quotad.storage.wal import (
    FORMAT_VERSION, LOCK_FILE_NAME, MAP_SIZE_BYTES_DEFAULT, SNAPSHOT_KEY, DataFormatMismatch,
    Snapshot, WriteAheadLog, _lock_exclusively,
)



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
    backup = data_dir.with_name(data_dir.name + ".format3")
    started = time.monotonic()
    lock = _lock_exclusively(data_dir / LOCK_FILE_NAME)
    try:
        env = lmdb.open(str(data_dir), readonly=True, max_dbs=8, lock=False, subdir=True)
        try:
            _check_version(env, data_dir)
            if backup.exists():
                raise MigrationError(f"{backup} exists (an earlier migration's copy of the old "
                                     "data): move it away first")
            shutil.rmtree(target, ignore_errors=True)  # an interrupted run's: never swapped in
            summary = _copy(env, data_dir, target, map_size_bytes, progress)
        finally:
            env.close()
        data_dir.rename(backup)
        target.rename(data_dir)
    finally:
        lock.close()
    (backup / LOCK_FILE_NAME).unlink(missing_ok=True)
    return Migrated(*summary, backup=backup, seconds=round(time.monotonic() - started, 3))


def _check_version(env: lmdb.Environment, data_dir: Path) -> None:
    with env.begin() as txn:
        version = txn.get(b"format_version", db=env.open_db(b"meta", txn=txn, create=False))
    if version == FORMAT_VERSION:
        raise MigrationError(f"{data_dir} is already format {FORMAT_VERSION.decode()}: "
                             "nothing to do")
    if version != format3.FORMAT_VERSION:
        raise MigrationError(f"{data_dir} holds format {version!r}; only format 3 migrates")


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
            shown_at = time.monotonic()
            for old in format3.read_records(txn, log_db):
                batch.append(_record(core, old, snapshot_sequence))
                first, last, written = first or old.sequence, old.sequence, written + 1
                if len(batch) == limits.MIGRATE_RECORDS_PER_TRANSACTION:
                    wal.append(batch)
                    batch = []
                if progress is not None and time.monotonic() - shown_at >= limits.MIGRATE_PROGRESS_EVERY_S:
                    shown_at = time.monotonic()
                    print(f"migrating: {written:,} of {total:,} records "
                          f"({100 * written // max(total, 1)} %)", file=progress, flush=True)
            if core.sequence != max(last, snapshot_sequence):
                raise MigrationError(f"the log ends at {last} but the state at {core.sequence}")
            wal.append(batch, Snapshot(core.sequence, snapshot_of(core)), prune_before_ns=0)
        except format3.Unreadable as error:
            raise MigrationError(f"{data_dir}: {error}") from error
        finally:
            wal.close()
    return written, first, last, snapshot_sequence


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
