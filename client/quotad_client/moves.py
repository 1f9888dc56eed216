"""Moving slots, with their users' state, from one shard of a cluster in etcd to another
(`quotactl cluster move-slots`).

The steps, each safe to run again after a crash of the mover at any point:

1. read the map and its etcd mod revision; check the slots are all the source's (or all the
   target's already: the flip was done, go on at 5);
2. FreezeSlots on the source: from then on it refuses the slots' users' calls UNAVAILABLE
   SLOTS_MOVING (nothing done; clients send them again shortly), durably;
3. ExportSlots from the source, each chunk to AdoptSlots on the target, which logs it (the
   first chunk drops whatever the target held of the slots, so a move run again starts
   afresh);
4. the map flips in one etcd transaction that compares the map key's mod revision with the
   one read in 1: a map changed meanwhile is not overwritten (nothing flipped; run again);
5. once both shards follow the new map, ForgetSlots on the source.

A move given up before its flip (`abort_move`) thaws the slots on the source and has the
target forget what it adopted of them; after the flip it can only be finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from quotad_contract.shards import EtcdTarget, Shard, ShardMap, ShardMapError, format_slots
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc

from ._errors import error_from_rpc_error
from ._etcd import read_shard_map_revision, swap_shard_map

FOLLOW_POLL_S = 0.05
"""How often the mover asks the shards whether they follow the new map yet."""
FOLLOW_WAIT_S_MAX = 30.0
"""How long the shards have to follow the new map (a watch: well under a second)."""


class MoveRefused(ValueError):
    """The move cannot be made as asked (a bad argument, or the map does not allow it):
    nothing was changed."""


@dataclass
class MoveReport:
    frozen_slots: int = 0
    users: int = 0
    holds: int = 0
    keys: int = 0
    chunks: int = 0
    flipped_at_revision: int = 0
    """0: the map already gave the slots to the target (an earlier run flipped it)."""
    forgotten_users: int = 0


def moved_map(shard_map: ShardMap, slots: frozenset[int], from_id: int, to_id: int) -> ShardMap:
    return ShardMap.of([
        Shard(shard.shard_id, shard.address,
              shard.slots - slots if shard.shard_id == from_id
              else shard.slots | slots if shard.shard_id == to_id else shard.slots)
        for shard in shard_map.shards])


def move_slots(target: EtcdTarget, from_id: int, to_id: int, slots: frozenset[int], *,
               metadata: tuple[tuple[str, str], ...] = (), timeout_s: float = 10.0,
               credentials: grpc.ChannelCredentials | None = None,
               progress: Callable[[str], None] = lambda line: None) -> MoveReport:
    """Moves the slots from shard from_id to shard to_id (the steps above). MoveRefused,
    nothing changed, for a move that cannot be made; QuotadError for a shard's refusal."""
    if from_id == to_id:
        raise MoveRefused(f"--from and --to are both shard {from_id}: nothing to move")
    if not slots:
        raise MoveRefused("no slots to move")
    shard_map, revision = read_shard_map_revision(target, timeout_s)
    try:
        source, destination = shard_map.shard(from_id), shard_map.shard(to_id)
    except ShardMapError as error:
        raise MoveRefused(f"{error} (shards: "
                          f"{', '.join(str(s.shard_id) for s in shard_map.shards)})") from None
    report = MoveReport()
    text = format_slots(slots)
    with _channel(source.address, credentials) as source_channel, \
            _channel(destination.address, credentials) as target_channel:
        from_admin = quotad_pb2_grpc.AdminServiceStub(source_channel)
        to_admin = quotad_pb2_grpc.AdminServiceStub(target_channel)

        def call(stub_method, request):
            try:
                return stub_method(request, timeout=timeout_s, metadata=metadata)
            except grpc.RpcError as error:
                raise error_from_rpc_error(error) from error

        if slots <= destination.slots:
            progress(f"the map already gives slots {text} to shard {to_id}: the flip was done")
        else:
            stray = sorted(slots - source.slots)
            if stray:
                owner = shard_map.owner(stray[0])
                raise MoveRefused(f"{len(stray)} of the slots are not shard {from_id}'s "
                                  f"(slot {stray[0]} is shard {owner.shard_id}'s): nothing "
                                  "was changed")
            step = call(from_admin.FreezeSlots, pb.FreezeSlotsRequest(slots=text)).step
            report.frozen_slots = len(slots)
            progress(f"frozen on shard {from_id}: {len(slots)} slots ({step.slots_changed} "
                     f"newly), {step.users} users, {step.holds} live holds")
            try:
                chunks = from_admin.ExportSlots(pb.ExportSlotsRequest(slots=text),
                                                timeout=timeout_s, metadata=metadata)
                for index, chunk in enumerate(chunks):
                    call(to_admin.AdoptSlots, pb.AdoptSlotsRequest(
                        slots=text, first=index == 0, state=chunk.state))
                    report.users += chunk.users
                    report.holds += chunk.holds
                    report.keys += chunk.keys
                    report.chunks += 1
                    progress(f"chunk {index + 1} adopted by shard {to_id}: {chunk.users} "
                             f"users, {chunk.holds} holds, {chunk.keys} idempotency keys "
                             f"({len(chunk.state)} bytes)")
            except grpc.RpcError as error:
                raise error_from_rpc_error(error) from error
            progress(f"exported from shard {from_id} and adopted by shard {to_id}: "
                     f"{report.users} users, {report.holds} holds, {report.keys} "
                     f"idempotency keys in {report.chunks} chunks")
            flipped = swap_shard_map(target, moved_map(shard_map, slots, from_id, to_id),
                                     revision, timeout_s)
            if flipped is None:
                raise MoveRefused(f"the shard map at {target} changed since it was read "
                                  f"(revision {revision}): nothing was flipped; slots {text} "
                                  f"stay frozen on shard {from_id}: run the move again")
            report.flipped_at_revision = flipped
            progress(f"map flipped at etcd revision {flipped}: slots {text} are shard "
                     f"{to_id}'s")
        for name, stub in ((f"shard {from_id}", from_admin), (f"shard {to_id}", to_admin)):
            _wait_following(quotad_pb2_grpc.QuotaServiceStub(
                source_channel if stub is from_admin else target_channel), slots, to_id,
                metadata, timeout_s)
            progress(f"{name} follows the new map")
        step = call(from_admin.ForgetSlots, pb.ForgetSlotsRequest(slots=text)).step
        if not report.flipped_at_revision and not (
                step.slots_changed or step.users or step.holds or step.keys):
            raise MoveRefused(f"slots {text} are not shard {from_id}'s: shard {to_id} owns "
                              "them, and no move of them was under way; nothing was changed")
        report.forgotten_users = step.users
        progress(f"forgotten on shard {from_id}: {step.users} users, {step.holds} holds, "
                 f"{step.keys} idempotency keys kept in memory")
    return report


def abort_move(target: EtcdTarget, from_id: int, to_id: int, slots: frozenset[int], *,
               metadata: tuple[tuple[str, str], ...] = (), timeout_s: float = 10.0,
               credentials: grpc.ChannelCredentials | None = None,
               progress: Callable[[str], None] = lambda line: None) -> None:
    """Gives up a move whose map was not flipped: ThawSlots on the source (it serves the
    slots' users again), ForgetSlots on the target (it drops what it adopted). MoveRefused,
    nothing changed, once the map gives the slots to the target (finish the move instead)."""
    if from_id == to_id:
        raise MoveRefused(f"--from and --to are both shard {from_id}: nothing to give up")
    shard_map, _ = read_shard_map_revision(target, timeout_s)
    try:
        source, destination = shard_map.shard(from_id), shard_map.shard(to_id)
    except ShardMapError as error:
        raise MoveRefused(str(error)) from None
    text = format_slots(slots)
    if not slots <= source.slots:
        raise MoveRefused(f"slots {text} are not all shard {from_id}'s in the map (a flip was "
                          "done, or they are another shard's): run the move itself again to "
                          "finish it; nothing was changed")
    with _channel(source.address, credentials) as source_channel, \
            _channel(destination.address, credentials) as target_channel:
        for name, channel, method, request in (
                (f"thawed on shard {from_id}", source_channel, "ThawSlots",
                 pb.ThawSlotsRequest(slots=text)),
                (f"forgotten on shard {to_id}", target_channel, "ForgetSlots",
                 pb.ForgetSlotsRequest(slots=text))):
            try:
                step = getattr(quotad_pb2_grpc.AdminServiceStub(channel), method)(
                    request, timeout=timeout_s, metadata=metadata).step
            except grpc.RpcError as error:
                raise error_from_rpc_error(error) from error
            progress(f"{name}: {step.slots_changed} slots, {step.users} users, {step.holds} "
                     f"holds, {step.keys} idempotency keys")


def _wait_following(quota: quotad_pb2_grpc.QuotaServiceStub, slots: frozenset[int],
                    to_id: int, metadata: tuple[tuple[str, str], ...], timeout_s: float) -> None:
    deadline = time.monotonic() + FOLLOW_WAIT_S_MAX
    while True:
        try:
            answer = quota.GetShardMap(pb.GetShardMapRequest(), timeout=timeout_s,
                                       metadata=metadata)
        except grpc.RpcError as error:
            raise error_from_rpc_error(error) from error
        owned = {slot for shard in answer.shards if shard.shard_id == to_id
                 for span in shard.slots for slot in range(span.first, span.last + 1)}
        if slots <= owned:
            return
        if time.monotonic() >= deadline:
            raise MoveRefused(f"shard {answer.shard_id} does not follow the new map after "
                              f"{FOLLOW_WAIT_S_MAX:g} s: run the move again once it does")
        time.sleep(FOLLOW_POLL_S)


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)
