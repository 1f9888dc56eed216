"""Reads a data directory of format 3 (JSON records, events stored twice), for `quotad
migrate` only: nothing here writes, and the server never reads format 3.

Format 3's log record: BLAKE2b-16 of the rest, the sequence (8 bytes), the time (8 bytes),
then JSON {"type", "fields", "events"}; its snapshot: BLAKE2b-16, the sequence, zlib'd JSON of
the core (snapshot format 1, whose users have no number yet).
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb

from quotad.core.commands import COMMAND_TYPES, AuditEvent, Command
from quotad.storage.codec import from_plain, key_sequence

FORMAT_VERSION = b"3"
_HEADER = struct.Struct(">16sQQ")
_SNAPSHOT_HEADER = struct.Struct(">16sQ")
SNAPSHOT_FORMAT_VERSION = 1


class Unreadable(Exception):
    """The directory is not a whole, readable format-3 directory."""


@dataclass(frozen=True, slots=True)
class OldRecord:
    sequence: int
    now_ns: int
    command: Command
    events: tuple[AuditEvent, ...]


def read_records(txn: lmdb.Transaction, log_db: Any) -> Iterator[OldRecord]:
    """Every record of the log, checked (checksum, sequence, no gaps), oldest first."""
    expected = None
    for key, value in txn.cursor(db=log_db):
        sequence = key_sequence(key)
        if expected is not None and sequence != expected:
            raise Unreadable(f"log gap: expected sequence {expected}, found {sequence}")
        checksum, stored_sequence, now_ns = _HEADER.unpack_from(value)
        if hashlib.blake2b(value[16:], digest_size=16).digest() != checksum:
            raise Unreadable(f"log record {sequence}: checksum mismatch")
        if stored_sequence != sequence:
            raise Unreadable(f"log record {sequence}: holds sequence {stored_sequence}")
        document = json.loads(value[_HEADER.size:].decode("utf-8"))
        command = from_plain(document["fields"], COMMAND_TYPES[document["type"]])
        events = from_plain(document.get("events", []), tuple[AuditEvent, ...])
        yield OldRecord(sequence, now_ns, command, events)
        expected = sequence + 1


def read_snapshot(value: bytes | None) -> tuple[int, dict[str, Any] | None]:
    """(the sequence it covers, its plain form) of a format-3 snapshot; (0, None) for none."""
    if value is None:
        return 0, None
    checksum, sequence = _SNAPSHOT_HEADER.unpack_from(value)
    if hashlib.blake2b(value[16:], digest_size=16).digest() != checksum:
        raise Unreadable(f"the snapshot at sequence {sequence} fails its checksum")
    plain = json.loads(zlib.decompress(value[_SNAPSHOT_HEADER.size:]))
    if plain.get("format_version") != SNAPSHOT_FORMAT_VERSION:
        raise Unreadable(f"snapshot format {plain.get('format_version')!r}, expected "
                         f"{SNAPSHOT_FORMAT_VERSION}")
    return sequence, plain


def number_users(plain: dict[str, Any]) -> dict[str, Any]:
    """A format-1 snapshot's plain form as format 2: every user gets a number, in the order
    the snapshot lists them (apps sorted by id, users as stored)."""
    numbered = 0
    apps = {}
    for app_id, app in sorted(plain["apps"].items()):
        users = []
        for user_id, subscription, live_holds, counters in app["users"]:
            numbered += 1
            users.append([user_id, numbered, subscription, live_holds, counters])
        apps[app_id] = {**app, "users": users}
    return {**plain, "format_version": 2, "apps": apps, "users_numbered": numbered}
