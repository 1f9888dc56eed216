"""The write-ahead log in LMDB: one write transaction per batch of records, synced on commit.

Every option is explicit: a large map, sync and metasync on, writemap off. py-lmdb write
transactions belong to the thread that opened them: `append` is only ever called from the
writer's one dedicated thread. The data directory is locked exclusively (one server each).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import lmdb

from .codec import decode_record, encode_record, key_sequence, record_key
from .commands import Record

FORMAT_VERSION = b"1"
MAP_SIZE_BYTES_DEFAULT = 64 * 1024**3
LOCK_FILE_NAME = "quotad.lock"


class DataDirLocked(Exception):
    pass


class Log:
    def __init__(self, data_dir: Path, *, map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self._lock_file = _lock_exclusively(data_dir / LOCK_FILE_NAME)
        self.env = lmdb.open(
            str(data_dir),
            map_size=map_size_bytes,
            subdir=True,
            readonly=False,
            create=True,
            max_dbs=4,
            max_readers=126,
            sync=True,
            metasync=True,
            writemap=False,
            map_async=False,
            lock=True,
            readahead=False,
            meminit=False,
            mode=0o600,
        )
        self.env.reader_check()  # clears reader slots left by a process that died
        self.meta_db = self.env.open_db(b"meta", create=True)
        self.log_db = self.env.open_db(b"log", create=True)
        with self.env.begin(write=True, db=self.meta_db) as txn:
            version = txn.get(b"format_version")
            if version is None:
                txn.put(b"format_version", FORMAT_VERSION)
            elif version != FORMAT_VERSION:
                raise RuntimeError(f"{data_dir}: log format {version!r}, this server reads "
                                   f"{FORMAT_VERSION!r}")

    def append(self, records: list[Record]) -> None:
        """Writes the records in one transaction and syncs it. Raises on any failure; the
        caller must then stop (what it holds in memory is ahead of the disk)."""
        assert records
        with self.env.begin(write=True, db=self.log_db) as txn:
            for record in records:
                stored = txn.put(record_key(record.sequence), encode_record(record),
                                 append=True, overwrite=False)
                assert stored, f"log already holds sequence {record.sequence}"

    def records(self, after_sequence: int = 0) -> Iterator[Record]:
        """Every record after the given sequence, checked (checksum, order, no gaps)."""
        expected = after_sequence + 1
        with self.env.begin(db=self.log_db, buffers=False) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(record_key(expected)):
                return
            for key, value in cursor:
                record = decode_record(key, value)
                if record.sequence != expected:
                    raise RuntimeError(f"log gap: expected sequence {expected}, "
                                       f"found {key_sequence(key)}")
                yield record
                expected += 1

    def last_sequence(self) -> int:
        with self.env.begin(db=self.log_db) as txn:
            cursor = txn.cursor()
            return key_sequence(cursor.key()) if cursor.last() else 0

    def close(self) -> None:
        self.env.close()
        self._lock_file.close()


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
