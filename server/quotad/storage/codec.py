"""Log records to bytes and back, with a checksum checked on every read.

A record's LMDB key is its sequence number (8 bytes, big-endian, so keys sort by sequence).
Its value is a fixed header and a JSON payload of the command:

    checksum  16 bytes  BLAKE2b over everything after it
    sequence   8 bytes  must equal the key
    now_ns     8 bytes  the server time the command was applied at
    payload             {"type": "Reserve", "fields": {...}}, UTF-8 JSON
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import struct
import types
import typing
from collections.abc import Callable
from functools import cache
from typing import Any

from quotad.core.commands import COMMAND_TYPES, AuditEvent, Record

_HEADER = struct.Struct(">16sQQ")
_KEY = struct.Struct(">Q")
CHECKSUM_BYTES = 16


class CorruptRecord(Exception):
    def __init__(self, sequence: int, reason: str) -> None:
        super().__init__(f"log record {sequence}: {reason}")
        self.sequence = sequence
        self.reason = reason


def record_key(sequence: int) -> bytes:
    return _KEY.pack(sequence)


def key_sequence(key: bytes) -> int:
    return _KEY.unpack(key)[0]


def encode_record_and_events(record: Record) -> tuple[bytes, list[bytes]]:
    """The record's value, and each of its audit events as JSON (for the events index).
    Each event is encoded once and spliced into the record's payload, which comes out the
    same as json.dumps of {"type", "fields", "events"} with compact separators."""
    events = [_dumps(_plain_fields(event)).encode("utf-8") for event in record.events]
    payload = b'{"type":"%s","fields":%s' % (
        type(record.command).__name__.encode(),
        _dumps(_plain_fields(record.command)).encode("utf-8"))
    if events:
        payload += b',"events":[' + b",".join(events) + b"]"
    body = _HEADER.pack(b"", record.sequence, record.now_ns)[CHECKSUM_BYTES:] + payload + b"}"
    return _checksum(body) + body, events


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                          check_circular=False).encode
"""json.dumps(value, separators=(",", ":"), ensure_ascii=False), without making an encoder
per call (and without its check for cycles: records are trees)."""


def _plain_fields(value: Any) -> Any:
    """to_plain(value), skipped for the dataclasses whose fields JSON takes as they are."""
    names = _flat_field_names(type(value))
    if names is None:
        return to_plain(value)
    return {name: getattr(value, name) for name in names}


@cache
def _flat_field_names(cls: type) -> tuple[str, ...] | None:
    """The field names of a dataclass whose fields are all str, int, bool, None or tuples of
    those (JSON writes a tuple as to_plain's list); None for any other type."""
    if not dataclasses.is_dataclass(cls):
        return None
    hints = _hints(cls)
    for name in (f.name for f in dataclasses.fields(cls)):
        if not _is_flat(hints[name]):
            return None
    return _field_names(cls)


def _is_flat(hint: Any) -> bool:
    if hint in (str, int, bool, type(None)):
        return True
    origin = typing.get_origin(hint)
    if origin in (tuple, types.UnionType, typing.Union):
        return all(arg is Ellipsis or _is_flat(arg) for arg in typing.get_args(hint))
    return False


def decode_record(key: bytes, value: bytes) -> Record:
    sequence = key_sequence(key)
    if len(value) < _HEADER.size:
        raise CorruptRecord(sequence, f"{len(value)} bytes, shorter than a header")
    checksum, stored_sequence, now_ns = _HEADER.unpack_from(value)
    if _checksum(value[CHECKSUM_BYTES:]) != checksum:
        raise CorruptRecord(sequence, "checksum mismatch")
    if stored_sequence != sequence:
        raise CorruptRecord(sequence, f"holds sequence {stored_sequence}")
    try:
        document = json.loads(value[_HEADER.size:].decode("utf-8"))
        command_type = COMMAND_TYPES[document["type"]]
        command = from_plain(document["fields"], command_type)
        events = from_plain(document.get("events", []), tuple[AuditEvent, ...])
    except Exception as error:  # a checksummed payload we cannot read is corruption too
        raise CorruptRecord(sequence, f"unreadable payload: {error!r}") from error
    return Record(sequence, now_ns, command, events)


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=CHECKSUM_BYTES).digest()


_PRIMITIVE_TYPES = frozenset({str, int, float, bool, type(None)})


@cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    return None


def to_plain(value: Any) -> Any:
    """Dataclasses, enums, tuples, dicts and sorted containers as JSON-able values.
    Dicts become [key, value] pairs sorted by key, so equal states give equal output."""
    cls = type(value)
    if cls in _PRIMITIVE_TYPES:
        return value
    if cls is tuple or cls is list:
        return [to_plain(item) for item in value]
    names = _field_names(cls)
    if names is not None:
        return {name: to_plain(getattr(value, name)) for name in names}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, dict):
        pairs = [[to_plain(k), to_plain(v)] for k, v in value.items()]
        return sorted(pairs, key=lambda pair: json.dumps(pair[0], sort_keys=True))
    assert cls.__name__ == "SortedList", cls
    return [to_plain(item) for item in value]


def from_plain(value: Any, hint: Any) -> Any:
    """The inverse of to_plain for commands and the values in them, led by type hints."""
    return _decoder(hint)(value)


@cache
def _decoder(hint: Any) -> Callable[[Any], Any]:
    """A function that rebuilds values of this type from plain data, made once per type."""
    if dataclasses.is_dataclass(hint):
        fields = {name: _decoder(field_hint) for name, field_hint in _hints(hint).items()}
        return lambda value: hint(**{name: fields[name](item) for name, item in value.items()})
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return lambda value: hint[value]
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            item_decoder = _decoder(args[0])
            return lambda value: tuple(item_decoder(item) for item in value)
        decoders = [_decoder(arg) for arg in args]
        return lambda value: tuple(d(item) for d, item in zip(decoders, value, strict=True))
    if origin in (types.UnionType, typing.Union):
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        inner_decoder = _decoder(inner)
        return lambda value: None if value is None else inner_decoder(value)
    assert hint in (str, int, bool), hint

    def primitive(value: Any) -> Any:
        assert type(value) is hint, (value, hint)
        return value
    return primitive


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def state_digest(core: Any) -> str:
    """A digest of everything the core holds: equal digests, equal states."""
    plain = to_plain({"apps": core.apps, "sequence": core.sequence,
                      "last_record_ns": core.last_record_ns, "expiry": core.expiry,
                      "forget": core.forget, "keys": core.keys})
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
