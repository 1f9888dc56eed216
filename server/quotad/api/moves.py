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
from collections.abc import AsyncIterator
from typing import Any

import grpc

from quotad.api import requests
from quotad.api.admission import Admission
from quotad.api.gate import Gate
from quotad.core import commands as c
from quotad.core import limits
from quotad.core.errors import FieldViolation, InvalidArgument
from quotad.core.machine import IdempotencyEntry, command_slot, moved_key
from quotad.storage.codec import decode_slot_state, slot_state_chunk, slot_state_items
from quotad_contract.shards import ShardMapError, format_slots, parse_slots
from quotad_contract.v1 import quotad_pb2 as pb

MOVE_RPCS = ("FreezeSlots", "ExportSlots", "AdoptSlots", "ForgetSlots", "ThawSlots")


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


def _unary(gate: Gate, admission: Admission, rpc: str) -> Any:
    from quotad.api.service import _answering

    async def answer(request: Any, call: Any) -> Any:
        slots = requested_slots(request.slots)
        if rpc == "FreezeSlots":
            _check_owned(gate, slots, owned=True)
            result = await call.writer.execute(c.FreezeSlots(slots=slots), call.deadline_s)
            return pb.FreezeSlotsResponse(step=_step(result))
        if rpc == "ThawSlots":
            _check_owned(gate, slots, owned=True)
            result = await call.writer.execute(c.ThawSlots(slots=slots), call.deadline_s)
            return pb.ThawSlotsResponse(step=_step(result))
        if rpc == "ForgetSlots":
            _check_owned(gate, slots, owned=False)
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


async def export_chunks(writer: Any, slots: tuple[int, ...]) -> AsyncIterator[
        pb.ExportSlotsResponse]:
    """The frozen slots' state in chunks of at most MOVE_CHUNK_BYTES_MAX bytes and
    MOVE_CHUNK_ITEMS_MAX items: users first, then holds, then idempotency entries (a hold's
    user always in an earlier chunk or its own)."""
    core, wal = writer.core, writer.wal
    wanted = frozenset(slots)
    now_ns = writer.clock.now_ns()
    users, holds, keys = core.export_slots(wanted, now_ns)  # InvalidArgument unless frozen
    as_of_sequence = core.sequence
    txn = wal.env.begin(buffers=False)  # no await since the export of memory: one picture
    try:
        known_holds = {hold.reservation_id for hold in holds}
        read = 0
        for hold in wal.slot_holds(txn, wanted, as_of_sequence):
            if hold.reservation_id not in known_holds and (
                    now_ns < hold.finished_at_ns + limits.RESERVATION_RETENTION_NS):
                holds.append(hold)
            read += 1
            if read % limits.MOVE_SCAN_ROWS_PER_PAGE == 0:
                await asyncio.sleep(0)
        known_keys = {(key.app, key.rpc, key.key) for key in keys}
        for record in wal.keyed_records(txn, as_of_sequence):
            command = record.command
            slot = command_slot(command)
            place = (command.app, type(command).__name__, command.idempotency_key)
            if (slot in wanted and place not in known_keys and record.answer is not None
                    and now_ns < record.now_ns + limits.IDEMPOTENCY_RETENTION_NS):
                keys.append(moved_key(command.app, place[1:], IdempotencyEntry(
                    command, record.answer, record.now_ns), slot))
                known_keys.add(place)
            read += 1
            if read % limits.MOVE_SCAN_ROWS_PER_PAGE == 0:
                await asyncio.sleep(0)
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


def _export_handler(gate: Gate) -> grpc.RpcMethodHandler:
    from quotad.api.service import (
        _REFUSALS, Malformed, _safe_parser, caller_of, full_method, open_call, status_of,
    )
    method = full_method("ExportSlots")

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = context.invocation_metadata() or ()
        try:
            call = open_call(gate, metadata, "ExportSlots")
            if isinstance(request, Malformed):
                raise InvalidArgument([FieldViolation(
                    "request", f"cannot be parsed: {request.error}")])
            slots = requested_slots(request.slots)
            _check_owned(gate, slots, owned=True)
            async for message in export_chunks(call.writer, slots):
                yield message
        except _REFUSALS as error:
            status = status_of(error)
            requests.refused(method, status.code.name, status.details,
                             **caller_of(gate, metadata, context))
            await context.abort(status.code, status.details, status.trailing_metadata)
    return grpc.unary_stream_rpc_method_handler(
        handle, request_deserializer=_safe_parser(pb.ExportSlotsRequest),
        response_serializer=lambda message: message.SerializeToString())


def method_handlers(gate: Gate, admission: Admission) -> dict[str, Any]:
    """The move RPCs' handlers, by method name (of the AdminService)."""
    from quotad.api.service import _safe_parser
    table: dict[str, Any] = {"ExportSlots": _export_handler(gate)}
    for rpc in ("FreezeSlots", "AdoptSlots", "ForgetSlots", "ThawSlots"):
        table[rpc] = grpc.unary_unary_rpc_method_handler(
            _unary(gate, admission, rpc),
            request_deserializer=_safe_parser(getattr(pb, f"{rpc}Request")),
            response_serializer=lambda message: message.SerializeToString())
    return table
