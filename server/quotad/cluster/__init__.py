"""A shard of a cluster: where its shard map comes from, and the check that refuses users
of other shards (FAILED_PRECONDITION WRONG_SHARD) before anything changes.

The slots and the map itself are values of the contract (quotad_contract.shards), which the
clients share. Nothing here does I/O but a ShardMapSource's load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from quotad.core.errors import FailedPrecondition
from quotad_contract.errors import ErrorReason
from quotad_contract.shards import (
    ShardMap, ShardMapError, slot_of, slot_of_reservation,
)

__all__ = ["FileShardMapSource", "Ownership", "ShardMapError", "ShardMapSource", "wrong_shard"]


class ShardMapSource(Protocol):
    """Where a shard's map comes from when it is a file (etcd's is quotad.cluster.control)."""

    def load(self) -> ShardMap:
        """The map as the source holds it now; ShardMapError naming what is wrong with it."""
        ...


@dataclass(frozen=True, slots=True)
class FileShardMapSource:
    """A JSON file (ShardMap.to_json's form)."""

    path: Path

    def load(self) -> ShardMap:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as error:
            raise ShardMapError(f"cannot read {self.path}: {error.strerror}") from error
        return ShardMap.from_json(text)


def wrong_shard(slot: int, owner_id: int, owner_address: str) -> FailedPrecondition:
    """The refusal of a user whose slot is another shard's (nothing changed), naming it."""
    return FailedPrecondition(
        ErrorReason.WRONG_SHARD,
        f"slot {slot} belongs to shard {owner_id} at {owner_address}: send the call there",
        metadata={"slot": str(slot), "shard_id": str(owner_id), "address": owner_address})


@dataclass(slots=True)
class Ownership:
    """What this shard owns: its id in the map. Without a map (a server alone) it is the one
    shard of a map of its own and owns every slot."""

    shard_map: ShardMap
    shard_id: int
    clustered: bool
    """Started with a shard map: only then are other shards' users refused."""
    _owned: frozenset[int] = field(default=frozenset())

    @classmethod
    def of(cls, shard_map: ShardMap, shard_id: int) -> Ownership:
        shard = shard_map.shard(shard_id)  # ShardMapError when the map has no such shard
        return cls(shard_map, shard_id, True, shard.slots)

    @property
    def owned(self) -> frozenset[int]:
        return self._owned

    def follow(self, shard_map: ShardMap) -> None:
        """The map changed (in etcd): own what it gives this shard id from now on; nothing
        when it no longer names this shard (every call is then refused with the owner's
        address)."""
        self.shard_map = shard_map
        try:
            self._owned = shard_map.shard(self.shard_id).slots
        except ShardMapError:
            self._owned = frozenset()

    @classmethod
    def alone(cls, address: str) -> Ownership:
        shard_map = ShardMap.single(address)
        return cls(shard_map, 0, False, shard_map.shards[0].slots)

    def check_slot(self, slot: int) -> None:
        if self.clustered and slot not in self._owned:
            owner = self.shard_map.owner(slot)
            raise wrong_shard(slot, owner.shard_id, owner.address)

    def check_user(self, app: str, user_id: str) -> None:
        """FailedPrecondition WRONG_SHARD when the user belongs to another shard. An empty user id is let through:
        the request's own check refuses it."""
        if self.clustered and user_id:
            self.check_slot(slot_of(app, user_id))

    def check_reservation(self, reservation_id: str) -> None:
        """FailedPrecondition WRONG_SHARD when the id's slot is another shard's. An id not of the contract's form
        is let through: the request's own check refuses it."""
        if self.clustered:
            slot = slot_of_reservation(reservation_id)
            if slot is not None:
                self.check_slot(slot)
