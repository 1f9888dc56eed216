"""The admin RPCs that move slots between shards: FreezeSlots, ExportSlots, AdoptSlots and
ForgetSlots (`quotactl cluster move-slots` calls them in that order), and ThawSlots (with
ForgetSlots on the target: `--abort`, a move given up before its flip).

Each step but the export is a logged command applied by the writer and answered once durable.
The export reads the frozen users from memory and, in the same event-loop turn, opens a read
transaction of the log for the rest (finished holds and idempotency entries memory no longer
keeps): both are one still picture, since nothing of frozen slots changes but their holds'
expiry, which memory (newer) wins over.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from quotad.api.admission import Admission
from quotad.api.gate import Gate
from quotad.core import commands as c
from quotad.core.commands import Record
from quotad.core import limits
from quotad.core.errors import FieldViolation, InvalidArgument
from quotad.core.machine import IdempotencyEntry, command_slot, moved_key
from quotad.storage.codec import decode_slot_state, slot_state_chunk, slot_state_items
from quotad_contract.shards import ShardMapError, format_slots, parse_slots
from quotad_contract.v1 import quotad_pb2 as pb

T = TypeVar("T")
MOVE_RPCS = ("FreezeSlots", "ExportSlots", "AdoptSlots", "ForgetSlots", "ThawSlots")


@dataclass(frozen=True, slots=True)
class KeyScan:
    """The records holding the first answers of the slots' idempotency keys, as the log's
    idempotency table named them through one sequence: read before the freeze (a pass over
    the whole table, while the slots still serve), so that the export, frozen, reads only
    the records after it."""

    through_sequence: int
    records: tuple[Record, ...]


class KeyScans:
    """The latest scans, by slot set (at most MOVE_KEY_SCANS_MAX: a move's steps come one
    after another, and a scan dropped only makes its export read the whole table again)."""

    def __init__(self) -> None:
        self._scans: dict[tuple[int, ...], KeyScan] = {}

    def get(self, slots: tuple[int, ...]) -> KeyScan | None:
        return self._scans.get(slots)

    def put(self, slots: tuple[int, ...], scan: KeyScan) -> None:
        self._scans.pop(slots, None)
        if len(self._scans) >= limits.MOVE_KEY_SCANS_MAX:
            del self._scans[next(iter(self._scans))]
        self._scans[slots] = scan

    def drop(self, slots: tuple[int, ...]) -> None:
        self._scans.pop(slots, None)


def _keyed(record: Record) -> bool:
    """A record whose command first used an idempotency key: its answer is the key's."""
    return bool(getattr(record.command, "idempotency_key", "")) and record.answer is not None


async def _paced(rows: Iterator[T]) -> AsyncIterator[T]:
    """The rows (records, holds), letting the event loop serve other calls every
    MOVE_SCAN_ROWS_PER_PAGE."""
    for read, row in enumerate(rows, 1):
        yield row
        if read % limits.MOVE_SCAN_ROWS_PER_PAGE == 0:
            await asyncio.sleep(0)


async def scan_keys(wal: Any, wanted: frozenset[int]) -> KeyScan:
    """The slots' keyed records the idempotency table names now (a pass over all of it)."""
    txn = wal.env.begin(buffers=False)
    try:
        through = wal.last_sequence_in(txn)
        found = [record async for record in _paced(wal.keyed_records(txn, through))
                 if command_slot(record.command) in wanted]
    finally:
        txn.abort()
    return KeyScan(through, tuple(found))


def requested_slots(text: str) -> tuple[int, ...]:
    """The slots a request names; InvalidArgument naming `slots` for anything else."""
    if len(text.encode("utf-8", "surrogatepass")) > limits.MOVE_SLOTS_TEXT_BYTES_MAX:
        raise InvalidArgument([FieldViolation(
            "slots", f"at most {limits.MOVE_SLOTS_TEXT_BYTES_MAX} bytes")])
    try:
        slots = parse_slots(text)
    except ShardMapError as error:
        raise InvalidArgument([FieldViolation("slots", str(error))]) from None
    return tuple(sorted(slots))


def _clustered_ownership(gate: Gate) -> Any:
    ownership = gate.ownership
    if ownership is None or not ownership.clustered:
        raise InvalidArgument([FieldViolation(
            "slots", "this server is not a shard of a cluster: it has no slots to move")])
    return ownership


def _check_owned(gate: Gate, slots: tuple[int, ...], owned: bool) -> None:
    """That the shard map (as this shard follows it) gives every slot to this shard (owned),
    or none of them; else InvalidArgument naming the first slot that is not so."""
    ownership = _clustered_ownership(gate)
    wrong = [slot for slot in slots if (slot in ownership.owned) != owned]
    if wrong:
        owner = ownership.shard_map.owner(wrong[0])
        raise InvalidArgument([FieldViolation(
            "slots", f"{len(wrong)} of them (slot {wrong[0]} the first, of shard "
                     f"{owner.shard_id}) are {'not ' if owned else ''}this shard's "
                     f"(shard {ownership.shard_id}) in its map")])


def _step(result: c.SlotsResult) -> pb.SlotsStepResponse:
    return pb.SlotsStepResponse(slots_changed=result.slots, users=result.users,
                                holds=result.holds, keys=result.keys)


def _unary(gate: Gate, admission: Admission, rpc: str, scans: KeyScans) -> Any:
    from quotad.api.service import _answering

    async def answer(request: Any, call: Any) -> Any:
        slots = requested_slots(request.slots)
        if rpc == "FreezeSlots":
            _check_owned(gate, slots, owned=True)
            if not frozenset(slots) <= call.writer.core.frozen_slots:  # before the freeze
                scans.put(slots, await scan_keys(call.writer.wal, frozenset(slots)))
            result = await call.writer.execute(c.FreezeSlots(slots=slots), call.deadline_s)
            return pb.FreezeSlotsResponse(step=_step(result))
        if rpc == "ThawSlots":
            _check_owned(gate, slots, owned=True)
            scans.drop(slots)
            result = await call.writer.execute(c.ThawSlots(slots=slots), call.deadline_s)
            return pb.ThawSlotsResponse(step=_step(result))
        if rpc == "ForgetSlots":
            _check_owned(gate, slots, owned=False)
            scans.drop(slots)
            result = await call.writer.execute(c.ForgetSlots(slots=slots), call.deadline_s)
            return pb.ForgetSlotsResponse(step=_step(result))
        assert rpc == "AdoptSlots", rpc
        _check_owned(gate, slots, owned=False)
        try:
            users, holds, keys = decode_slot_state(request.state)
        except ValueError as error:
            raise InvalidArgument([FieldViolation("state", str(error)[:512])]) from None
        command = c.AdoptSlots(slots=slots, first=request.first, users=users, holds=holds,
                               keys=keys)
        result = await call.writer.execute(command, call.deadline_s)
        return pb.AdoptSlotsResponse(step=_step(result))
    return _answering(gate, admission, rpc, answer)


async def export_chunks(writer: Any, slots: tuple[int, ...],
                        scan: KeyScan | None = None) -> AsyncIterator[pb.ExportSlotsResponse]:
    """The frozen slots' state in chunks of at most MOVE_CHUNK_BYTES_MAX bytes and
    MOVE_CHUNK_ITEMS_MAX items: users first, then holds, then idempotency entries (a hold's
    user always in an earlier chunk or its own). The keys: those of the scan made before the
    freeze and of the log records after it; without one, a pass over the whole table."""
    core, wal = writer.core, writer.wal
    wanted = frozenset(slots)
    now_ns = writer.clock.now_ns()
    users, holds, keys = core.export_slots(wanted, now_ns)  # InvalidArgument unless frozen
    as_of_sequence = core.sequence
    txn = wal.env.begin(buffers=False)  # no await since the export of memory: one picture
    try:
        known_holds = {hold.reservation_id for hold in holds}
        async for hold in _paced(wal.slot_holds(txn, wanted, as_of_sequence)):
            if hold is not None and hold.reservation_id not in known_holds and (
                    now_ns < hold.finished_at_ns + limits.RESERVATION_RETENTION_NS):
                holds.append(hold)
        in_memory = {(key.app, key.rpc, key.key) for key in keys}
        if scan is None or scan.through_sequence > as_of_sequence:
            found = _paced(wal.keyed_records(txn, as_of_sequence))
        else:
            found = _paced(itertools.chain(scan.records, (
                record for record in wal.records_in(txn, scan.through_sequence,
                                                    as_of_sequence) if _keyed(record))))
        latest: dict[tuple[str, str, str], tuple[Record, int]] = {}
        async for record in found:  # in log order: a key used anew later wins
            command = record.command
            slot = command_slot(command)
            place = (command.app, type(command).__name__, command.idempotency_key)
            if slot in wanted and place not in in_memory and record.answer is not None:
                latest[place] = (record, slot)
        for (app, rpc, key), (record, slot) in latest.items():
            if now_ns < record.now_ns + core.idempotency_retention_ns:
                keys.append(moved_key(app, (rpc, key), IdempotencyEntry(
                    record.command, record.answer, record.now_ns), slot))
    finally:
        txn.abort()
    kinds = ["users"] * len(users) + ["holds"] * len(holds) + ["keys"] * len(keys)
    items = slot_state_items(users, holds, keys)
    chunk: list[bytes] = []
    counts = {"users": 0, "holds": 0, "keys": 0}
    size = 2
    for kind, item in zip(kinds, items, strict=True):
        if len(item) + 2 > limits.MOVE_CHUNK_BYTES_MAX:
            raise InvalidArgument([FieldViolation(
                "slots", f"one of their {kind} is {len(item)} bytes, past the "
                         f"{limits.MOVE_CHUNK_BYTES_MAX} of a chunk (MOVE_CHUNK_BYTES_MAX): "
                         f"it cannot be moved; `quotactl cluster move-slots --abort` gives "
                         f"slots {format_slots(slots)} back to this shard")])
        if chunk and (size + len(item) + 1 > limits.MOVE_CHUNK_BYTES_MAX
                      or len(chunk) == limits.MOVE_CHUNK_ITEMS_MAX):
            yield pb.ExportSlotsResponse(state=slot_state_chunk(chunk), **counts)
            chunk, counts, size = [], {"users": 0, "holds": 0, "keys": 0}, 2
        chunk.append(item)
        counts[kind] += 1
        size += len(item) + 1
    yield pb.ExportSlotsResponse(state=slot_state_chunk(chunk), **counts)


def _export_handler(gate: Gate, scans: KeyScans) -> grpc.RpcMethodHandler:
    from quotad.api.service import streaming_handler

    async def messages(request: Any, call: Any) -> AsyncIterator[Any]:
        slots = requested_slots(request.slots)
        _check_owned(gate, slots, owned=True)
        async for message in export_chunks(call.writer, slots, scans.get(slots)):
            yield message
    return streaming_handler(gate, "ExportSlots", pb.ExportSlotsRequest, messages)


def method_handlers(gate: Gate, admission: Admission) -> dict[str, Any]:
    """The move RPCs' handlers, by method name (of the AdminService)."""
    from quotad.api.service import _safe_parser
    scans = KeyScans()
    table: dict[str, Any] = {"ExportSlots": _export_handler(gate, scans)}
    for rpc in (rpc for rpc in MOVE_RPCS if rpc != "ExportSlots"):
        table[rpc] = grpc.unary_unary_rpc_method_handler(
            _unary(gate, admission, rpc, scans),
            request_deserializer=_safe_parser(getattr(pb, f"{rpc}Request")),
            response_serializer=lambda message: message.SerializeToString())
    return table
