"""Log records and audit events to bytes and back, with a checksum checked on every read.

A record's LMDB key is its sequence number (8 bytes, big-endian, so keys sort by sequence).
Its value is a 12-byte header and a `quotad.internal.Record` (protos/quotad/internal/log.proto):

    checksum   4 bytes  CRC-32 of the key, the time and the message
    now_ns     8 bytes  the server time the command was applied at
    message             the command as the request carried it, with what the server chose

A record holds the audit events it made. The event index files each under its user: the key
is the user number (4 bytes), and each event is one fixed-size duplicate of it, its tail (the
time, the record's sequence, the event's index in the record: 18 bytes), which sorts a user's
events by time and is appended, so the index's pages stay full.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import struct
import types
import typing
import zlib
from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

from quotad.core import limits
from quotad.core.commands import (
    AUDIT_KINDS, AuditEvent, Command, Commit, CommitResult, CounterView, CreateKey, DeletePlan,
    ExpiredGrant, ExpiredHold, ExpireHolds, Extend, ExtendResult, GrantCredits, GrantResult,
    GrantView, Record, Release, ReleaseResult, Reserve, ReserveResult, RevokeKey, Track,
    TrackResult, UpsertPlan, UpsertSubscription,
    RESULT_TYPES, AdoptSlots, ForgetSlots, FreezeSlots, MovedKey, MovedUser, ThawSlots,
    SetIdempotencyRetention,
)
from quotad.core.balances import Balance, Grant
from quotad.core.holds import HoldState
from quotad.core.machine import (
    CounterState, HoldRef, IdempotencyEntry, Reservation, UserState,
)
from quotad.core.memo import remember
from quotad.core.values import is_value_type, value_fields
from quotad.core.plans import (
    Cost, Kind, LimitGroup, Match, MetadataMatch, Plan, RecurringGrant, Subscription, Window,
)
from quotad.storage import log_pb2 as pb
from quotad_contract.limits import SLOT_HEX_DIGITS

_HEADER = struct.Struct(">IQ")
_KEY = struct.Struct(">Q")
_EVENT_TAIL = struct.Struct(">QQH")
EVENT_TAIL_BYTES = _EVENT_TAIL.size
"""An event's entry under its user in the event index (time, sequence, index): also a page
cursor."""
RESERVATION_ID_PREFIX = "rsv_"
COMPACT_HOLD_AGE_NS_MAX = limits.IDEMPOTENCY_RETENTION_NS_MIN // 2
"""A finished hold's row leaves out what its Reserve record says when that record is younger
than this: the log keeps every record at least IDEMPOTENCY_RETENTION_NS_MIN, so it is there for
as long as the row (which is pruned with it)."""


class CorruptRecord(Exception):
    """A log record that fails its checksum or cannot be read: the data directory's fault,
    never the caller's. A start refuses it (unless it is a torn tail); a read that meets it is
    answered INTERNAL with `message`, having changed nothing; a write's lookup that meets it
    stops the server (Writer.execute_many)."""

    def __init__(self, sequence: int, reason: str) -> None:
        super().__init__(f"log record {sequence}: {reason}")
        self.sequence = sequence
        self.reason = reason
        self.message = (f"quotad cannot read its log record {sequence} ({reason}): nothing "
                        "was done; `quotad verify --data-dir DIR` on a stopped server names "
                        "every such record")


def record_key(sequence: int) -> bytes:
    return _KEY.pack(sequence)


def key_sequence(key: bytes) -> int:
    return _KEY.unpack(key)[0]


IDEMPOTENCY_TIME_HEX_DIGITS = 12
"""A key that begins with this many hex digits (the clients' keys begin with the
milliseconds since the epoch) files its row under them: keys made at about the same time
sit side by side in the table."""
_NO_TIME = bytes(IDEMPOTENCY_TIME_HEX_DIGITS // 2)


def idempotency_row_key(app: str, rpc: str, idempotency_key: str) -> bytes:
    """The idempotency table's key of a key: the key's first 12 hex digits as 6 bytes
    (6 zero bytes when it does not begin with 12 hex digits), then 8 bytes of BLAKE2b of
    app, RPC and key. The row names the record that first used the key, whose own fields
    confirm it (a different key with the same 14 bytes is no match).

    The time first: with the clients' keys, each transaction's new rows go to the table's
    last pages, where a digest alone sent each to a page of its own anywhere in the table
    (in a table of a million rows, one 4 KiB page written per key: ~8 us of CPU, most of it
    the kernel's, against ~1 us for rows in key order: `python -m bench.lmdb_inserts`)."""
    text = f"{app}\0{rpc}\0{idempotency_key}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(text, digest_size=8).digest()
    head = idempotency_key[:IDEMPOTENCY_TIME_HEX_DIGITS]
    try:
        time_part = bytes.fromhex(head)
    except ValueError:
        return _NO_TIME + digest
    if len(time_part) != len(_NO_TIME):  # fromhex skips spaces between digit pairs
        return _NO_TIME + digest
    return time_part + digest


def record_idempotency_row_key(
        record: Record, computed: Callable[[tuple[str, str, str], None], bytes | None]
        | None = None) -> bytes | None:
    """The idempotency row a record makes: one for a command with an idempotency key whose
    first answer it holds (a record migrated from format 3 has none: its key is answered
    from the snapshot's memory for its 24 h). computed: (app, RPC, key) -> the row key
    already computed for them, or None."""
    command = record.command
    key = getattr(command, "idempotency_key", "")
    if not key or record.answer is None:
        return None
    rpc = type(command).__name__
    row = None if computed is None else computed((command.app, rpc, key), None)
    return row if row is not None else idempotency_row_key(command.app, rpc, key)


def event_user_key(user_number: int) -> bytes:
    """The event index's key of a user's events."""
    return user_number.to_bytes(4, "big")


def event_tail(now_ns: int, sequence: int, index: int) -> bytes:
    """An event's entry under its user's key in the event index."""
    return _EVENT_TAIL.pack(now_ns, sequence, index)


def event_tail_fields(tail: bytes) -> tuple[int, int, int]:
    """(now_ns, sequence, index) of an event's entry."""
    return _EVENT_TAIL.unpack(tail)


# --- records ------------------------------------------------------------------------------


class CounterShape(NamedTuple):
    """What a counter in an answer shows that is its group's definition, the same in every
    answer until a plan changes it: stored once, in the shapes table, under its id."""

    key: str
    label: str
    unit: str
    window: Window
    quota: int
    kind: Kind


ShapeId = Callable[[CounterShape], bytes | None]
"""The id under which the shapes table holds a shape, which the caller stores with the
record; None: the counter is stored whole."""
ShapeLookup = Callable[[bytes], CounterShape]
"""The stored shape of an id (raises if the shapes table has none)."""
CounterHeads = dict[tuple[object, ...], bytes]
"""A stored counter's unchanging part (its group's definition and its window's bounds, as
_unchanging_part names them) -> the bytes it encodes to in a record's answer: its shape's id
(or the shape whole) and the window's start and reset. Kept by the log's writer, for the
shapes its table holds (see encode_record)."""


def encode_counter_shape(shape: CounterShape) -> tuple[bytes, bytes]:
    """(its id: 8 bytes of BLAKE2b of the message, the message) of a shape."""
    message = pb.CounterShape(key=shape.key, label=shape.label, unit=shape.unit,
                              window=int(shape.window), quota=shape.quota)
    if shape.kind is not Kind.QUOTA:
        message.kind = int(shape.kind)
    value = message.SerializeToString(deterministic=True)
    return hashlib.blake2b(value, digest_size=8).digest(), value


def decode_counter_shape(value: bytes) -> CounterShape:
    m = pb.CounterShape.FromString(value)
    return CounterShape(m.key, m.label, m.unit, Window(m.window), m.quota,
                        Kind(m.kind or Kind.QUOTA))


def encode_record(record: Record, shape_id: ShapeId | None = None,
                  heads: CounterHeads | None = None) -> bytes:
    """shape_id: the id of each counter shape its answer shows (see ShapeId); None: the
    answer's counters are stored whole. heads: the encoded unchanging parts of the counters
    encoded before with this shape_id, copied in rather than encoded again (~0.6 us less per
    counter, bench.core_cost), and remembered here as they are made: only for a shape_id
    whose ids hold for as long as heads is kept (the caller empties it when a write fails)."""
    message = pb.Record()
    _ENCODERS[type(record.command)](message, record.command)
    message.event_users.extend(record.event_users)
    assert len(record.events) == len(record.event_users), record
    for event in record.events:
        _encode_event(message.events.add(), event, record.command)
    if record.answer is not None:
        assert heads is None or shape_id is not None, "heads name the shapes of a shape_id"
        _encode_answer(message.answer, record.answer, record, shape_id, heads)
    body = message.SerializeToString()
    time_bytes = record.now_ns.to_bytes(8, "big")
    checksum = zlib.crc32(body, zlib.crc32(time_bytes, zlib.crc32(_KEY.pack(record.sequence))))
    return checksum.to_bytes(4, "big") + time_bytes + body


def _checked_message(key: bytes, value: bytes) -> tuple[int, int, Any]:
    sequence = key_sequence(key)
    if len(value) < _HEADER.size:
        raise CorruptRecord(sequence, f"{len(value)} bytes, shorter than a header")
    checksum, now_ns = _HEADER.unpack_from(value)
    if zlib.crc32(value[4:], zlib.crc32(key)) != checksum:
        raise CorruptRecord(sequence, "checksum mismatch")
    try:
        message = pb.Record.FromString(value[_HEADER.size:])
    except Exception as error:  # a checksummed payload we cannot read is corruption too
        raise CorruptRecord(sequence, f"unreadable payload: {error!r}") from error
    return sequence, now_ns, message


def decode_record(key: bytes, value: bytes, shape: ShapeLookup | None = None, *,
                  with_events: bool = False) -> Record:
    """shape: the shapes table's lookup; without it, a record whose answer's counters name
    shapes is read without its answer (for readers of the command alone). Its audit events
    only if asked (replay needs none), each with the command's app and an empty user id (the
    event index names the user, by number). Reserve, Commit, Release, Extend and Track are
    built unchecked: they passed their checks before they were written, and the record's
    checksum holds (replay and repeats then skip checks that cost ~2 µs a record)."""
    sequence, now_ns, message = _checked_message(key, value)
    try:
        command = _DECODERS[message.WhichOneof("command")](message)
        answer = None
        if message.HasField("answer") and (shape is not None or not any(
                counter.shape for counter in message.answer.counters)):
            answer = _ANSWER_DECODERS[type(command)](message.answer, command, now_ns, shape)
        app = getattr(command, "app", "")
        events = tuple(decode_event(event, app, "", lambda: command)
                       for event in message.events) if with_events else ()
    except Exception as error:
        raise CorruptRecord(sequence, f"unreadable command: {error!r}") from error
    if with_events and len(events) != len(message.event_users):
        raise CorruptRecord(sequence, f"{len(events)} audit events for "
                            f"{len(message.event_users)} users")
    return Record(sequence, now_ns, command, events, tuple(message.event_users), answer)


def record_now_ns(value: bytes) -> int:
    """The server time of a stored record, from its header alone."""
    return _HEADER.unpack_from(value)[1]


_KEYED_COMMANDS = {"reserve": "Reserve", "commit": "Commit", "release": "Release",
                   "extend": "Extend", "track": "Track", "grant_credits": "GrantCredits"}
"""The record's oneof field -> its RPC, for the commands that take an idempotency key."""


def stored_event_entries(key: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    """A stored record's event index entries (user key, tail), from one read of it."""
    sequence, now_ns, message = _checked_message(key, value)
    return [(event_user_key(user), event_tail(now_ns, sequence, index))
            for index, user in enumerate(message.event_users)]


def stored_record_rows(key: bytes, value: bytes) -> tuple[bytes | None, bytes | None]:
    """What else a stored record put in the log that goes with it, from one read of it: its
    idempotency row key (a keyed command holding its first answer) and the reservation id
    bytes of a Reserve (its hold's row). Its event index entries go apart, in sweeps
    (WriteAheadLog.prune)."""
    _, _, message = _checked_message(key, value)
    kind = message.WhichOneof("command")
    row = None
    if kind in _KEYED_COMMANDS and message.HasField("answer"):
        idempotency_key = _idempotency_key(getattr(message, kind))
        if idempotency_key:
            row = idempotency_row_key(message.app, _KEYED_COMMANDS[kind], idempotency_key)
    return row, message.reserve.reservation_id if kind == "reserve" else None


def reservation_bytes(reservation_id: str) -> bytes:
    return bytes.fromhex(reservation_id[len(RESERVATION_ID_PREFIX):])


RESERVATION_TIME_HEX_DIGITS = 9
"""A reservation id's hex digits after its slot's: the milliseconds since the epoch it was
made at, modulo 16^9 (they wrap every ~2.2 years)."""
_TIME_FROM, _TIME_TO = SLOT_HEX_DIGITS, SLOT_HEX_DIGITS + RESERVATION_TIME_HEX_DIGITS


def hold_row_key(reservation_id_bytes: bytes) -> bytes:
    """The holds table's key of a hold: its reservation id with the time first, then the
    slot and the rest. Holds made at about the same time sit side by side, so that the rows
    a transaction writes share the table's last pages, where the slot first spread them
    over the whole table (a 4 KiB page written per finished hold: `python -m
    bench.lmdb_inserts`). A slot's holds are then read in one pass over the table."""
    text = reservation_id_bytes.hex()
    return bytes.fromhex(text[_TIME_FROM:_TIME_TO] + text[:_TIME_FROM] + text[_TIME_TO:])


def hold_row_reservation_bytes(key: bytes) -> bytes:
    """The reservation id's bytes of a holds table key (hold_row_key's inverse)."""
    text = key.hex()
    slot_to = RESERVATION_TIME_HEX_DIGITS + SLOT_HEX_DIGITS
    return bytes.fromhex(text[RESERVATION_TIME_HEX_DIGITS:slot_to]
                         + text[:RESERVATION_TIME_HEX_DIGITS] + text[slot_to:])


def hold_row_slot(key: bytes) -> int:
    """The slot of a holds table key: the 12 bits after the time's 36 (its bytes 4 and 5)."""
    return ((key[4] & 0xF) << 8) | key[5]


if (SLOT_HEX_DIGITS, RESERVATION_TIME_HEX_DIGITS) != (3, 9):
    raise AssertionError("hold_row_slot reads the slot at bits 36-47 of a holds table key")


def _reservation_id(raw: bytes) -> str:
    return RESERVATION_ID_PREFIX + raw.hex()


def _set_idempotency_key(part: Any, idempotency_key: str) -> None:
    """Lowercase hex digits, even in number, as the bytes they spell (half the size; .hex()
    gives the same text back); any other key as it was sent. A key is such digits exactly
    when the bytes it spells give it back (.hex() writes nothing else; fromhex also takes
    capitals and spaces, which it does not give back)."""
    try:
        spelled = bytes.fromhex(idempotency_key)
    except ValueError:
        part.idempotency_key = idempotency_key
        return
    if spelled.hex() == idempotency_key:
        part.idempotency_key_hex = spelled
    else:
        part.idempotency_key = idempotency_key


def _idempotency_key(part: Any) -> str:
    return part.idempotency_key or part.idempotency_key_hex.hex()


def _set_metadata(repeated: Any, metadata: tuple[tuple[str, str], ...]) -> None:
    for key, value in metadata:
        entry = repeated.add()
        entry.key = key
        entry.value = value


def _metadata(repeated: Any) -> tuple[tuple[str, str], ...]:
    return tuple((entry.key, entry.value) for entry in repeated)


_NS_PER_S = 10**9


def _whole_s(ns: int) -> int | None:
    """ns in seconds when whole (a varint of seconds is 4 bytes shorter), else None."""
    seconds, rest = divmod(ns, _NS_PER_S)
    return seconds if rest == 0 else None


def _set_ttl(part: Any, ttl_ns: int) -> None:
    ttl_s = _whole_s(ttl_ns)
    if ttl_s is None:
        part.ttl_ns = ttl_ns
    else:
        part.ttl_s = ttl_s


def _ttl_ns(part: Any) -> int:
    return part.ttl_ns or part.ttl_s * _NS_PER_S


def _encode_reserve(message: Any, command: Reserve) -> None:
    message.app = command.app
    part = message.reserve
    part.user_id = command.user_id
    part.event_type = command.event_type
    part.amount = command.amount
    _set_metadata(part.metadata, command.metadata)
    _set_ttl(part, command.ttl_ns)
    _set_idempotency_key(part, command.idempotency_key)
    part.reservation_id = reservation_bytes(command.reservation_id)


def _decode_reserve(message: Any) -> Reserve:
    part = message.reserve
    return Reserve.unchecked(
        app=message.app, user_id=part.user_id, event_type=part.event_type, amount=part.amount,
        metadata=_metadata(part.metadata), ttl_ns=_ttl_ns(part),
        idempotency_key=_idempotency_key(part), reservation_id=_reservation_id(part.reservation_id))


def _encode_commit(message: Any, command: Commit) -> None:
    message.app = command.app
    part = message.commit
    part.reservation_id = reservation_bytes(command.reservation_id)
    if command.amount is not None:
        part.amount = command.amount
    _set_idempotency_key(part, command.idempotency_key)


def _decode_commit(message: Any) -> Commit:
    part = message.commit
    return Commit.unchecked(app=message.app, reservation_id=_reservation_id(part.reservation_id),
                            amount=part.amount if part.HasField("amount") else None,
                            idempotency_key=_idempotency_key(part))


def _encode_release(message: Any, command: Release) -> None:
    message.app = command.app
    part = message.release
    part.reservation_id = reservation_bytes(command.reservation_id)
    _set_idempotency_key(part, command.idempotency_key)


def _decode_release(message: Any) -> Release:
    part = message.release
    return Release.unchecked(app=message.app,
                             reservation_id=_reservation_id(part.reservation_id),
                             idempotency_key=_idempotency_key(part))


def _encode_extend(message: Any, command: Extend) -> None:
    message.app = command.app
    part = message.extend
    part.reservation_id = reservation_bytes(command.reservation_id)
    _set_ttl(part, command.ttl_ns)
    _set_idempotency_key(part, command.idempotency_key)


def _decode_extend(message: Any) -> Extend:
    part = message.extend
    return Extend.unchecked(app=message.app, reservation_id=_reservation_id(part.reservation_id),
                            ttl_ns=_ttl_ns(part), idempotency_key=_idempotency_key(part))


def _encode_track(message: Any, command: Track) -> None:
    message.app = command.app
    part = message.track
    part.user_id = command.user_id
    part.event_type = command.event_type
    part.amount = command.amount
    _set_metadata(part.metadata, command.metadata)
    _set_idempotency_key(part, command.idempotency_key)
    part.enforce = command.enforce


def _decode_track(message: Any) -> Track:
    part = message.track
    return Track.unchecked(app=message.app, user_id=part.user_id, event_type=part.event_type,
                           amount=part.amount, metadata=_metadata(part.metadata),
                           idempotency_key=_idempotency_key(part), enforce=part.enforce)


def _encode_expire_holds(message: Any, command: ExpireHolds) -> None:
    part = message.expire_holds
    part.SetInParent()  # an empty sweep is still this command
    for hold in command.expired:
        entry = part.expired.add()
        entry.app = hold.app
        entry.reservation_id = reservation_bytes(hold.reservation_id)
        entry.user_id = hold.user_id
    for grant in command.grants:
        entry = part.grants.add()
        entry.app, entry.user_id = grant.app, grant.user_id
        entry.group_key, entry.grant_id = grant.group_key, grant.grant_id


def _decode_expire_holds(message: Any) -> ExpireHolds:
    return ExpireHolds(expired=tuple(
        ExpiredHold(app=hold.app, reservation_id=_reservation_id(hold.reservation_id),
                    user_id=hold.user_id)
        for hold in message.expire_holds.expired), grants=tuple(
        ExpiredGrant(app=grant.app, user_id=grant.user_id, group_key=grant.group_key,
                     grant_id=grant.grant_id)
        for grant in message.expire_holds.grants))


def _encode_grant_credits(message: Any, command: GrantCredits) -> None:
    message.app = command.app
    part = message.grant_credits
    part.user_id, part.group_key, part.amount = (command.user_id, command.group_key,
                                                 command.amount)
    if command.expires_at_ns is not None:
        part.expires_at_ns = command.expires_at_ns
    part.priority = command.priority
    _set_idempotency_key(part, command.idempotency_key)


def _decode_grant_credits(message: Any) -> GrantCredits:
    part = message.grant_credits
    return GrantCredits(
        app=message.app, user_id=part.user_id, group_key=part.group_key, amount=part.amount,
        expires_at_ns=part.expires_at_ns if part.HasField("expires_at_ns") else None,
        priority=part.priority, idempotency_key=_idempotency_key(part))


def plan_to_message(plan: Plan, message: Any) -> None:
    message.id = plan.id
    message.name = plan.name
    for group in plan.limit_groups:
        part = message.limit_groups.add()
        part.key, part.label, part.unit = group.key, group.label, group.unit
        part.quota, part.window = group.quota, int(group.window)
        part.event_types.extend(group.match.event_types)
        for match in group.match.metadata:
            entry = part.metadata.add()
            entry.key = match.key
            entry.values.extend(match.values)
        part.soft = not group.enforce
        if group.kind is not Kind.QUOTA:
            part.kind, part.period_ns = int(group.kind), group.period_ns
        if group.cost is not None:
            _cost_to_message(group.cost, part.cost)
        if group.grant is not None:
            recurring = part.grant
            recurring.amount, recurring.every = group.grant.amount, int(group.grant.every)
            recurring.rollover_max = group.grant.rollover_max
            recurring.priority = group.grant.priority


def _cost_to_message(cost: Cost, message: Any) -> None:
    message.by = cost.by
    for value, rate in cost.rates:
        entry = message.rates.add()
        entry.value, entry.rate = value, rate
    if cost.default_rate is not None:
        message.default_rate = cost.default_rate


def _cost_from_message(message: Any) -> Cost:
    return Cost(by=message.by, rates=tuple((entry.value, entry.rate) for entry in message.rates),
                default_rate=message.default_rate if message.HasField("default_rate") else None)


def plan_from_message(message: Any) -> Plan:
    return Plan(id=message.id, name=message.name, limit_groups=tuple(
        LimitGroup(key=group.key, label=group.label, unit=group.unit, quota=group.quota,
                   window=Window(group.window), match=Match(
                       event_types=tuple(group.event_types),
                       metadata=tuple(MetadataMatch(key=m.key, values=tuple(m.values))
                                      for m in group.metadata)),
                   enforce=not group.soft,
                   cost=_cost_from_message(group.cost) if group.HasField("cost") else None,
                   kind=Kind(group.kind or Kind.QUOTA), period_ns=group.period_ns,
                   grant=RecurringGrant(amount=group.grant.amount, every=Window(group.grant.every),
                                        rollover_max=group.grant.rollover_max,
                                        priority=group.grant.priority)
                   if group.HasField("grant") else None)
        for group in message.limit_groups))


def _encode_upsert_plan(message: Any, command: UpsertPlan) -> None:
    message.app = command.app
    message.catalog_revision = command.catalog_revision
    plan_to_message(command.plan, message.upsert_plan.plan)


def _decode_upsert_plan(message: Any) -> UpsertPlan:
    return UpsertPlan(app=message.app, plan=plan_from_message(message.upsert_plan.plan),
                      catalog_revision=message.catalog_revision)


def _encode_delete_plan(message: Any, command: DeletePlan) -> None:
    message.app = command.app
    message.catalog_revision = command.catalog_revision
    message.delete_plan.plan_id = command.plan_id


def _decode_delete_plan(message: Any) -> DeletePlan:
    return DeletePlan(app=message.app, plan_id=message.delete_plan.plan_id,
                      catalog_revision=message.catalog_revision)


def _encode_upsert_subscription(message: Any, command: UpsertSubscription) -> None:
    message.app = command.app
    part = message.upsert_subscription
    part.user_id, part.plan_id, part.time_zone = (command.user_id, command.plan_id,
                                                  command.time_zone)
    if command.billing_customer_id is not None:
        part.billing_customer_id = command.billing_customer_id


def _decode_upsert_subscription(message: Any) -> UpsertSubscription:
    part = message.upsert_subscription
    return UpsertSubscription(
        app=message.app, user_id=part.user_id, plan_id=part.plan_id, time_zone=part.time_zone,
        billing_customer_id=(part.billing_customer_id if part.HasField("billing_customer_id")
                             else None))


def _encode_create_key(message: Any, command: CreateKey) -> None:
    message.app = command.app
    part = message.create_key
    part.key_id, part.kind, part.name = command.key_id, command.kind, command.name
    part.secret_sha256 = command.secret_sha256
    part.token_signing_key = command.token_signing_key
    part.created_at_ns = command.created_at_ns
    message.catalog_revision = command.catalog_revision


def _decode_create_key(message: Any) -> CreateKey:
    part = message.create_key
    return CreateKey(app=message.app, key_id=part.key_id, kind=part.kind, name=part.name,
                     secret_sha256=part.secret_sha256, token_signing_key=part.token_signing_key,
                     created_at_ns=part.created_at_ns, catalog_revision=message.catalog_revision)


def _encode_revoke_key(message: Any, command: RevokeKey) -> None:
    message.app = command.app
    message.revoke_key.key_id = command.key_id
    message.revoke_key.revoked_at_ns = command.revoked_at_ns
    message.catalog_revision = command.catalog_revision


def _decode_revoke_key(message: Any) -> RevokeKey:
    return RevokeKey(app=message.app, key_id=message.revoke_key.key_id,
                     revoked_at_ns=message.revoke_key.revoked_at_ns,
                     catalog_revision=message.catalog_revision)


def _encode_slots_only(field: str) -> Callable[[Any, Any], None]:
    def encode(message: Any, command: Any) -> None:
        part = getattr(message, field)
        part.slots.extend(command.slots)
    return encode


def _decode_slots_only(field: str, command_type: type) -> Callable[[Any], Any]:
    return lambda message: command_type(slots=tuple(getattr(message, field).slots))


def _encode_set_idempotency_retention(message: Any, command: SetIdempotencyRetention) -> None:
    message.set_idempotency_retention.retention_ns = command.retention_ns


def _decode_set_idempotency_retention(message: Any) -> SetIdempotencyRetention:
    return SetIdempotencyRetention(retention_ns=message.set_idempotency_retention.retention_ns)


def _encode_adopt_slots(message: Any, command: AdoptSlots) -> None:
    part = message.adopt_slots
    part.slots.extend(command.slots)
    part.first = command.first
    part.state = encode_slot_state(command.users, command.holds, command.keys)


def _decode_adopt_slots(message: Any) -> AdoptSlots:
    part = message.adopt_slots
    users, holds, keys = decode_slot_state(part.state)
    return AdoptSlots(slots=tuple(part.slots), first=part.first, users=users, holds=holds,
                      keys=keys)


# --- a moved slot set's state (AdoptSlots records, ExportSlots messages) ------------------


def slot_state_items(users: Any, holds: Any, keys: Any) -> list[bytes]:
    """Each user, hold and idempotency entry as one JSON item (in that order: a hold after
    its user), for chunks of at most limits.MOVE_CHUNK_BYTES_MAX (slot_state_chunk)."""
    items = [_json_item(["user", user.app, user.user_id, to_plain(user.subscription),
                         [[key, window.name, to_plain(counter)]
                          for key, window, counter in user.counters]]) for user in users]
    items += [_json_item(["hold", to_plain(hold)]) for hold in holds]
    items += [_json_item(["key", key.app, key.rpc, key.key, key.request,
                          type(key.result).__name__, to_plain(key.result), key.created_at_ns,
                          key.slot]) for key in keys]
    return items


def _json_item(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def slot_state_chunk(items: list[bytes]) -> bytes:
    """Items (slot_state_items) as one chunk: a JSON list."""
    return b"[" + b",".join(items) + b"]"


def encode_slot_state(users: Any, holds: Any, keys: Any) -> bytes:
    return slot_state_chunk(slot_state_items(users, holds, keys))


def decode_slot_state(state: bytes) -> tuple[tuple[MovedUser, ...], tuple[Reservation, ...],
                                             tuple[MovedKey, ...]]:
    """The users, holds and idempotency entries of a chunk; ValueError (naming what) if it
    is not one."""
    try:
        items = json.loads(state)
        if type(items) is not list:
            raise ValueError("a chunk is a JSON list")
        users, holds, keys = [], [], []
        for item in items:
            kind = item[0]
            if kind == "user":
                _, app, user_id, subscription, counters = item
                users.append(MovedUser(
                    app=app, user_id=user_id, subscription=from_plain(subscription, Subscription),
                    counters=tuple((key, Window[window], _counter_from_plain(dict(counter)))
                                   for key, window, counter in counters)))
            elif kind == "hold":
                holds.append(from_plain(item[1], Reservation))
            elif kind == "key":
                _, app, rpc, key, request, result_type, result, created_at_ns, slot = item
                if type(request) is not str or type(created_at_ns) is not int or (
                        type(slot) is not int):
                    raise ValueError("an idempotency entry's request, time or slot")
                keys.append(MovedKey(app=app, rpc=rpc, key=key, request=request,
                                     result=from_plain(result, RESULT_TYPES[result_type]),
                                     created_at_ns=created_at_ns, slot=slot))
            else:
                raise ValueError(f"an item of kind {kind!r}")
    except (ValueError, TypeError, KeyError, IndexError, AssertionError) as error:
        raise ValueError(f"not a slot state chunk: {error!r}") from error
    return tuple(users), tuple(holds), tuple(keys)


def _counter_from_plain(plain: dict[str, Any]) -> CounterState:
    balance = plain.pop("balance", None)
    if balance is not None:
        grants = [Grant(**grant) for grant in balance.pop("grants")]
        balance = Balance(grants=grants, **balance)
    counter = CounterState(**plain, balance=balance)
    if not all(type(getattr(counter, name)) is int for name in (
            "window_start_ns", "used", "held", "threshold_percent_fired", "refilled_at_ns",
            "refill_carry")) or not (counter.window_end_ns is None
                                     or type(counter.window_end_ns) is int):
        raise ValueError("a counter's fields are integers")
    return counter


_ENCODERS: dict[type, Callable[[Any, Any], None]] = {
    Reserve: _encode_reserve, Commit: _encode_commit, Release: _encode_release,
    Extend: _encode_extend, Track: _encode_track, ExpireHolds: _encode_expire_holds,
    UpsertPlan: _encode_upsert_plan, DeletePlan: _encode_delete_plan,
    UpsertSubscription: _encode_upsert_subscription, CreateKey: _encode_create_key,
    RevokeKey: _encode_revoke_key, GrantCredits: _encode_grant_credits,
    FreezeSlots: _encode_slots_only("freeze_slots"), ThawSlots: _encode_slots_only("thaw_slots"),
    ForgetSlots: _encode_slots_only("forget_slots"), AdoptSlots: _encode_adopt_slots,
    SetIdempotencyRetention: _encode_set_idempotency_retention,
}
"""Only commands that change the state are logged: reads never make a record."""
_DECODERS: dict[str, Callable[[Any], Command]] = {
    "reserve": _decode_reserve, "commit": _decode_commit, "release": _decode_release,
    "extend": _decode_extend, "track": _decode_track, "expire_holds": _decode_expire_holds,
    "upsert_plan": _decode_upsert_plan, "delete_plan": _decode_delete_plan,
    "upsert_subscription": _decode_upsert_subscription, "create_key": _decode_create_key,
    "revoke_key": _decode_revoke_key, "grant_credits": _decode_grant_credits,
    "freeze_slots": _decode_slots_only("freeze_slots", FreezeSlots),
    "thaw_slots": _decode_slots_only("thaw_slots", ThawSlots),
    "forget_slots": _decode_slots_only("forget_slots", ForgetSlots),
    "adopt_slots": _decode_adopt_slots,
    "set_idempotency_retention": _decode_set_idempotency_retention,
}


# --- first answers (of commands with an idempotency key) ---------------------------------


def _encode_answer(message: Any, result: Any, record: Record, shape_id: ShapeId | None,
                   heads: CounterHeads | None) -> None:
    """An allowed Reserve's reservation id and expiry are its command's id and its time plus
    its TTL: left out (from_record), the decoder takes them from there. A counter names its
    shape (shape_id) rather than repeat it, and its reset is an offset from its window's
    start."""
    message.SetInParent()
    counters = (result.counter,) if type(result) is GrantResult else getattr(
        result, "counters", ())
    for view in counters:
        counter = message.counters.add()
        head = None if heads is None else _unchanging_part(view)
        encoded = None if head is None else heads.get(head)
        if encoded is not None:
            counter.MergeFromString(encoded)
        else:
            _set_counter_head(counter, view, shape_id)
            if head is not None:
                remember(heads, head, counter.SerializeToString(),
                         limits.COUNTER_HEADS_REMEMBERED_MAX)
        _set_counter_usage(counter, view)
    if getattr(result, "fits_at_ns", None) is not None:
        message.fits_at_ns = result.fits_at_ns
    kind = type(result)
    if kind is ReserveResult:
        message.allowed, message.denied_by = result.allowed, result.denied_by
        command = record.command
        if result.allowed and (result.reservation_id, result.expires_at_ns) == (
                command.reservation_id, record.now_ns + command.ttl_ns):
            message.from_record = True
        else:
            message.expires_at_ns = result.expires_at_ns
            message.reservation_id = result.reservation_id
    elif kind is TrackResult:
        message.allowed, message.denied_by = result.allowed, result.denied_by
    elif kind is CommitResult:
        message.committed, message.returned = result.committed, result.returned
        message.expired = result.expired
    elif kind is ExtendResult:
        message.expires_at_ns = result.expires_at_ns
    elif kind is GrantResult:
        grant, part = result.grant, message.grant
        part.grant_id, part.amount, part.remaining = grant.grant_id, grant.amount, grant.remaining
        part.granted_at_ns, part.priority = grant.granted_at_ns, grant.priority
        if grant.expires_at_ns is not None:
            part.expires_at_ns = grant.expires_at_ns
        part.expired, part.recurring = grant.expired, grant.recurring
    else:
        assert kind is ReleaseResult, kind


def _unchanging_part(view: CounterView) -> tuple[object, ...]:
    """What a stored counter shows that only its plan and window change: all but its usage."""
    return (view.key, view.label, view.unit, view.window, view.quota, view.kind,
            view.window_start_ns, view.resets_at_ns)


def _set_counter_head(counter: Any, view: CounterView, shape_id: ShapeId | None) -> None:
    found = None if shape_id is None else shape_id(CounterShape(
        view.key, view.label, view.unit, view.window, view.quota, view.kind))
    if found is not None:
        counter.shape = found
    else:
        counter.key, counter.label, counter.unit = view.key, view.label, view.unit
        counter.window, counter.quota = int(view.window), view.quota
        if view.kind is not Kind.QUOTA:
            counter.kind = int(view.kind)
    window_start_s = _whole_s(view.window_start_ns)
    if window_start_s is None:
        counter.window_start_ns = view.window_start_ns
    else:
        counter.window_start_s = window_start_s
    if view.resets_at_ns is not None:
        resets_after_ns = view.resets_at_ns - view.window_start_ns
        resets_after_s = _whole_s(resets_after_ns)
        if resets_after_s is None:
            counter.resets_after_ns = resets_after_ns
        else:
            counter.resets_after_s = resets_after_s


def _set_counter_usage(counter: Any, view: CounterView) -> None:
    counter.used, counter.held = view.used, view.held
    if view.full_at_ns is not None:
        counter.full_at_ns = view.full_at_ns


def _counters(message: Any, shape: ShapeLookup | None) -> tuple[CounterView, ...]:
    views = []
    for c in message.counters:  # read once each: a field of a upb message costs ~50 ns
        shape_id, has_field = c.shape, c.HasField
        if shape_id:
            assert shape is not None, "decode_record reads shaped counters only with a lookup"
            key, label, unit, window, quota, kind = shape(shape_id)
        else:  # stored whole (records written before shapes, or a shape id taken)
            key, label, unit, window, quota, kind = (
                c.key, c.label, c.unit, Window(c.window), c.quota, Kind(c.kind or Kind.QUOTA))
        window_start_ns = c.window_start_ns or c.window_start_s * _NS_PER_S
        if has_field("resets_after_s"):
            resets_at_ns = window_start_ns + c.resets_after_s * _NS_PER_S
        elif has_field("resets_after_ns"):
            resets_at_ns = window_start_ns + c.resets_after_ns
        else:
            resets_at_ns = c.resets_at_ns if has_field("resets_at_ns") else None
        used, held = c.used, c.held
        remaining = quota - used - held
        views.append(CounterView(
            key=key, label=label, unit=unit, window=window, quota=quota, used=used,
            held=held, remaining=remaining if remaining > 0 else 0,
            window_start_ns=window_start_ns, resets_at_ns=resets_at_ns, kind=kind,
            full_at_ns=c.full_at_ns if has_field("full_at_ns") else None))
    return tuple(views)


def _fits_at(message: Any) -> int | None:
    return message.fits_at_ns if message.HasField("fits_at_ns") else None


def _reserve_answer(m: Any, command: Reserve, now_ns: int,
                    shape: ShapeLookup | None) -> ReserveResult:
    if m.from_record:
        reservation_id, expires_at_ns = command.reservation_id, now_ns + command.ttl_ns
    else:
        reservation_id, expires_at_ns = m.reservation_id, m.expires_at_ns
    return ReserveResult(allowed=m.allowed, reservation_id=reservation_id,
                         expires_at_ns=expires_at_ns, counters=_counters(m, shape),
                         denied_by=m.denied_by, fits_at_ns=_fits_at(m))


_ANSWER_DECODERS: dict[type, Callable[[Any, Any, int, ShapeLookup | None], Any]] = {
    Reserve: _reserve_answer,
    Commit: lambda m, command, now_ns, shape: CommitResult(
        counters=_counters(m, shape), committed=m.committed, returned=m.returned,
        expired=m.expired),
    Release: lambda m, command, now_ns, shape: ReleaseResult(counters=_counters(m, shape)),
    Extend: lambda m, command, now_ns, shape: ExtendResult(expires_at_ns=m.expires_at_ns),
    Track: lambda m, command, now_ns, shape: TrackResult(
        allowed=m.allowed, counters=_counters(m, shape), denied_by=m.denied_by,
        fits_at_ns=_fits_at(m)),
    GrantCredits: lambda m, command, now_ns, shape: GrantResult(grant=GrantView(
        grant_id=m.grant.grant_id, group_key=command.group_key, amount=m.grant.amount,
        remaining=m.grant.remaining, granted_at_ns=m.grant.granted_at_ns,
        expires_at_ns=m.grant.expires_at_ns if m.grant.HasField("expires_at_ns") else None,
        priority=m.grant.priority, expired=m.grant.expired, recurring=m.grant.recurring),
        counter=_counters(m, shape)[0]),
}


# --- finished holds (the holds table) ----------------------------------------------------

_HOLD_STATES = tuple(HoldState)


def encode_finished_hold(hold: Reservation, sequence: int, expired_sequence: int,
                         now_ns: int, reserve_expires_at_ns: int = 0) -> bytes:
    """A finished hold's row, written by record `sequence` at now_ns. What its Reserve record
    says is left out when that record is sure to outlive the row: it was made less than the
    log's shortest retention ago (the row is pruned with it). Then so are the time it finished
    when that is now_ns (the writing record's time), and its expiry when that is
    reserve_expires_at_ns, the one its Reserve record set (its time plus its ttl_ns; 0: not
    known)."""
    message = pb.FinishedHold()
    # a hold a move brought in (sequence 0) has no Reserve record here: it is stored whole
    compact = hold.sequence > 0 and now_ns - hold.created_at_ns < COMPACT_HOLD_AGE_NS_MAX
    if compact:
        message.from_reserve_record = True
    else:
        message.app, message.user_id = hold.app, hold.user_id
        message.event_type, message.amount = hold.event_type, hold.amount
        _set_metadata(message.metadata, hold.metadata)
        message.created_at_ns = hold.created_at_ns
    for ref in hold.holds:
        hold_ref_to_message(ref, message.holds.add())
    message.reserve_sequence = hold.sequence
    if not (compact and hold.expires_at_ns == reserve_expires_at_ns):
        message.expires_at_ns = hold.expires_at_ns
    message.status = _HOLD_STATES.index(hold.status)
    if not (compact and hold.finished_at_ns == now_ns):
        message.finished_at_ns = hold.finished_at_ns
    message.sequence, message.expired_sequence = sequence, expired_sequence
    return message.SerializeToString()


def hold_ref_to_message(ref: HoldRef, message: Any) -> None:
    message.key, message.window = ref.key, int(ref.window)
    window_start_s = _whole_s(ref.window_start_ns)
    if window_start_s is None:
        message.window_start_ns = ref.window_start_ns
    else:
        message.window_start_s = window_start_s
    if ref.rate != 1:
        message.rate = ref.rate


def hold_ref_from_message(message: Any) -> HoldRef:
    return HoldRef(message.key, Window(message.window),
                   message.window_start_ns or message.window_start_s * _NS_PER_S,
                   message.rate or 1)


def finished_hold_row(value: bytes) -> tuple[HoldState, int, int]:
    """(state, the sequence that wrote it, the sequence that expired it or 0) of a row."""
    message = pb.FinishedHold.FromString(value)
    return _HOLD_STATES[message.status], message.sequence, message.expired_sequence


def decode_finished_hold(reservation_id_bytes: bytes, value: bytes, as_of_sequence: int,
                         reserve_record: Callable[[int], Record | None],
                         record_time_ns: Callable[[int], int | None]) -> Reservation | None:
    """The hold as it was once record as_of_sequence was applied; None if it was still live
    then (a replay from before it finished). reserve_record(sequence): the stored record;
    record_time_ns(sequence): its time alone (None for either: no such record)."""
    message = pb.FinishedHold.FromString(value)
    status = _HOLD_STATES[message.status]
    if message.sequence > as_of_sequence:
        if not (status is HoldState.COMMITTED and 0 < message.expired_sequence <= as_of_sequence):
            return None
        status = HoldState.EXPIRED  # committed later; expired as of then
    holds = tuple(hold_ref_from_message(ref) for ref in message.holds)
    reservation_id = _reservation_id(reservation_id_bytes)
    if message.from_reserve_record:
        record = reserve_record(message.reserve_sequence)
        if record is None or type(record.command) is not Reserve:
            raise CorruptRecord(message.reserve_sequence,
                                f"the Reserve record of {reservation_id} is missing")
        command = record.command
        if message.HasField("finished_at_ns"):
            finished_at_ns = message.finished_at_ns
        else:
            written_at_ns = record_time_ns(message.sequence)
            if written_at_ns is None:
                raise CorruptRecord(message.sequence,
                                    f"the record that finished {reservation_id} is missing")
            finished_at_ns = written_at_ns
        return Reservation(
            app=command.app, reservation_id=reservation_id, user_id=command.user_id,
            event_type=command.event_type, amount=command.amount, metadata=command.metadata,
            holds=holds, sequence=message.reserve_sequence, created_at_ns=record.now_ns,
            expires_at_ns=(message.expires_at_ns if message.HasField("expires_at_ns")
                           else record.now_ns + command.ttl_ns),
            status=status, finished_at_ns=finished_at_ns)
    return Reservation(
        app=message.app, reservation_id=reservation_id,
        user_id=message.user_id, event_type=message.event_type, amount=message.amount,
        metadata=_metadata(message.metadata), holds=holds,
        sequence=message.reserve_sequence, created_at_ns=message.created_at_ns,
        expires_at_ns=message.expires_at_ns, status=status,
        finished_at_ns=message.finished_at_ns)


# --- audit events -------------------------------------------------------------------------

_KIND_NUMBERS = {kind: number for number, kind in enumerate(AUDIT_KINDS)}


def _encode_event(message: Any, event: AuditEvent, command: Command) -> None:
    """An event as its record stores it: without its app and user, which the event index's
    key names, nor what the record's own command says: the reservation id of a Reserve,
    Commit, Release or Extend, and the event type, amount and metadata of a Reserve or
    Track."""
    message.kind = _KIND_NUMBERS[event.kind]
    from_record = _from_command(event, command)
    if from_record:
        message.from_record = True
    if not (from_record and type(command) in _SOURCE_COMMANDS):
        message.event_type = event.event_type
        message.amount = event.amount
        _set_metadata(message.metadata, event.metadata)
    if event.reservation_id and not from_record:
        message.reservation_id = reservation_bytes(event.reservation_id)
    if not event.allowed:  # each field set only when not its default: the same bytes, sooner
        message.denied = True
    if event.kind == "threshold":  # only a threshold names these two (AuditEvent checks)
        message.limit_group_key = event.limit_group_key
        message.threshold_percent = event.threshold_percent
    if event.window_start_ns:
        message.window_start_ns = event.window_start_ns


_SOURCE_COMMANDS = (Reserve, Track)
"""Commands whose event type, amount and metadata are their events'."""
_HOLD_COMMANDS = (Reserve, Commit, Release, Extend)
"""Commands naming the hold their events are about."""


def _from_command(event: AuditEvent, command: Command) -> bool:
    if event.kind == "threshold":
        return False
    kind = type(command)
    if kind not in _SOURCE_COMMANDS and kind not in _HOLD_COMMANDS:
        return False
    if event.reservation_id != getattr(command, "reservation_id", ""):
        return False
    return kind not in _SOURCE_COMMANDS or (
        event.event_type == command.event_type and event.amount == command.amount
        and event.metadata == command.metadata)


def record_event(key: bytes, value: bytes, index: int, app: str, user_id: str) -> AuditEvent:
    """Event number index of a stored record, as app's user_id's (the event index's)."""
    sequence, _, message = _checked_message(key, value)
    if index >= len(message.events):
        raise CorruptRecord(sequence, f"audit event {index} is missing")
    try:
        return decode_event(message.events[index], app, user_id,
                            lambda: _DECODERS[message.WhichOneof("command")](message))
    except Exception as error:
        raise CorruptRecord(sequence, f"unreadable audit event {index}: {error!r}") from error


def decode_event(message: Any, app: str, user_id: str,
                 record_command: Callable[[], Command]) -> AuditEvent:
    """message: a `quotad.internal.Event`; record_command(): the event's record's command,
    read only for an event that needs it."""
    event_type, amount = message.event_type, message.amount
    metadata = _metadata(message.metadata)
    reservation_id = _reservation_id(message.reservation_id) if message.reservation_id else ""
    if message.from_record:
        command = record_command()
        kind = type(command)
        if kind not in _SOURCE_COMMANDS and kind not in _HOLD_COMMANDS:
            raise ValueError(f"an audit event points at a {kind.__name__} record")
        reservation_id = getattr(command, "reservation_id", "")
        if kind in _SOURCE_COMMANDS:
            event_type, amount, metadata = command.event_type, command.amount, command.metadata
    return AuditEvent(
        kind=AUDIT_KINDS[message.kind], app=app, user_id=user_id, event_type=event_type,
        amount=amount, metadata=metadata, reservation_id=reservation_id,
        allowed=not message.denied, limit_group_key=message.limit_group_key,
        threshold_percent=message.threshold_percent, window_start_ns=message.window_start_ns)


# --- plain data (snapshots, the state digest) ---------------------------------------------

_PRIMITIVE_TYPES = frozenset({str, int, float, bool, type(None)})


@cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    """The fields of a dataclass or a value type (None for any other class)."""
    if is_value_type(cls):
        return value_fields(cls)
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    return None


@cache
def _omitted_when_empty(cls: type) -> tuple[str, ...]:
    """The fields a dataclass marks `metadata={"plain": "omit_empty"}`: left out of its plain
    form while empty, so that a state without them reads (and digests) as it did before they
    existed."""
    if is_value_type(cls):
        return ()
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.metadata.get("plain") == "omit_empty")


def to_plain(value: Any) -> Any:
    """Dataclasses, enums, tuples, dicts and sorted containers as JSON-able values.
    Dicts become [key, value] pairs sorted by key, so equal states give equal output."""
    cls = type(value)
    if cls in _PRIMITIVE_TYPES:
        return value
    if cls is tuple or cls is list:
        return [to_plain(item) for item in value]
    if cls is IdempotencyEntry:  # as a snapshot keeps it, so that a state read back is equal
        value = value.fingerprinted()
    if cls is UserState:  # its counters as the dict of them they were: the same digest
        return {"subscription": to_plain(value.subscription), "number": value.number,
                "counters": to_plain(dict(value.counter_items())),
                "live_holds": value.live_holds}
    names = _field_names(cls)
    if names is not None:
        plain = {name: to_plain(getattr(value, name)) for name in names}
        for name in _omitted_when_empty(cls):
            if not plain[name]:
                del plain[name]
        return plain
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
    if dataclasses.is_dataclass(hint) or is_value_type(hint):
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


def _optional_state(core: Any) -> dict[str, Any]:
    """What only a shard of a cluster holds, and a retention set longer than the least: left
    out of the digest while empty, so a state without any digests as it did before it
    existed."""
    return {"catalog_revision": core.catalog_revision,
            "frozen_slots": sorted(core.frozen_slots),
            "incoming_slots": sorted(core.incoming_slots),
            "moved_key_slots": core.moved_key_slots,
            "idempotency_retention_ns": 0 if core.idempotency_retention_ns
            == limits.IDEMPOTENCY_RETENTION_NS_MIN else core.idempotency_retention_ns}


def state_digest(core: Any) -> str:
    """A digest of everything the core holds: equal digests, equal states."""
    plain = to_plain({"apps": core.apps, "sequence": core.sequence,
                      "last_record_ns": core.last_record_ns, "expiry": core.expiry,
                      "forget": core.forget, "keys": core.keys}
                     | {name: value for name, value in _optional_state(core).items() if value})
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
