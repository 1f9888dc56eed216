"""Slots and the shard map of a cluster, as values server and clients share.

A user belongs to slot `crc32(app + "\\0" + user_id) % SLOTS`; a reservation id's first
SLOT_HEX_DIGITS hex digits are its user's slot, so a hold is routed without a lookup. A shard
map names each shard (its id and HOST:PORT) and the slots it owns; every slot is owned by
exactly one shard. Slot sets are written as ranges: "0-1364,4000-4095".

Standard library only: the server's pure core may import this module too.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from quotad_contract.limits import (
    CLUSTER_NAME_BYTES_MAX, PORT_MAX, SHARD_ADDRESS_BYTES_MAX, SHARD_ID_MAX, SHARDS_MAX,
    SLOT_HEX_DIGITS, SLOTS,
)

RESERVATION_ID_PREFIX = "rsv_"
_RESERVATION_ID = re.compile(r"rsv_[0-9a-f]{24}")
_ADDRESS = re.compile(r"\S+:([0-9]{1,5})")
"""HOST:PORT as a server's --listen takes it: any host without spaces (a name, an address,
[v6]), a port 1 ... 65535."""
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
ETCD_SCHEME = "etcd://"
_ETCD_TARGET = re.compile(r"etcd://([^/\s]+):([0-9]{1,5})/([A-Za-z0-9][A-Za-z0-9._-]*)")


class ShardMapError(ValueError):
    """A shard map or slot ranges that break a rule; the message names the problem."""


def slot_of(app: str, user_id: str) -> int:
    """The slot a user belongs to."""
    return zlib.crc32((app + "\0" + user_id).encode("utf-8", "surrogatepass")) % SLOTS


def slot_of_reservation(reservation_id: str) -> int | None:
    """The slot a reservation id names (its first hex digits); None when it is not an id of
    the contract's form (the server refuses it as an invalid argument)."""
    if not _RESERVATION_ID.fullmatch(reservation_id):
        return None
    start = len(RESERVATION_ID_PREFIX)
    return int(reservation_id[start: start + SLOT_HEX_DIGITS], 16)


def parse_slots(text: str) -> frozenset[int]:
    """The slots "0-1364,4000-4095" names: comma-separated ranges FIRST-LAST (or one slot),
    each within 0 ... SLOTS - 1, FIRST <= LAST, none overlapping."""
    slots: set[int] = set()
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        if match is None:
            raise ShardMapError(f"slot range {part.strip()!r} is not FIRST-LAST or one slot")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if not 0 <= first <= last < SLOTS:
            raise ShardMapError(f"slot range {part.strip()!r} must be within 0-{SLOTS - 1}, "
                                "first <= last")
        span = set(range(first, last + 1))
        if slots & span:
            raise ShardMapError(f"slot range {part.strip()!r} overlaps another")
        slots |= span
    return frozenset(slots)


def slot_ranges(slots: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """The slots as (first, last) ranges, in order, adjacent slots joined."""
    ranges: list[list[int]] = []
    for slot in sorted(slots):
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1][1] = slot
        else:
            ranges.append([slot, slot])
    return tuple((first, last) for first, last in ranges)


def format_slots(slots: Iterable[int]) -> str:
    """The slots as text parse_slots reads back: "0-1364,4000-4095" (one slot alone: "7")."""
    return ",".join(str(first) if first == last else f"{first}-{last}"
                    for first, last in slot_ranges(slots))


def check_address(address: str) -> None:
    match = _ADDRESS.fullmatch(address)
    if (match is None or not 1 <= int(match.group(1)) <= PORT_MAX
            or len(address.encode("utf-8", "surrogatepass")) > SHARD_ADDRESS_BYTES_MAX):
        raise ShardMapError(f"address {address!r} is not HOST:PORT (at most "
                            f"{SHARD_ADDRESS_BYTES_MAX} bytes)")


@dataclass(frozen=True, slots=True)
class Shard:
    """One shard: its id, the HOST:PORT it serves, and the slots it owns."""

    shard_id: int
    address: str
    slots: frozenset[int]


@dataclass(frozen=True, slots=True)
class ShardMap:
    """Every shard of a cluster; every slot owned by exactly one of them. Built only through
    `of`, which checks that."""

    shards: tuple[Shard, ...]
    owners: tuple[int, ...]
    """owners[slot]: the index in `shards` of the shard that owns the slot."""

    @classmethod
    def of(cls, shards: Iterable[Shard]) -> ShardMap:
        listed = tuple(sorted(shards, key=lambda shard: shard.shard_id))
        if not 1 <= len(listed) <= SHARDS_MAX:
            raise ShardMapError(f"a shard map holds 1 to {SHARDS_MAX} shards, got {len(listed)}")
        owners: list[int | None] = [None] * SLOTS
        seen: set[int] = set()
        for index, shard in enumerate(listed):
            if not 0 <= shard.shard_id <= SHARD_ID_MAX:
                raise ShardMapError(f"shard id {shard.shard_id} is not 0 to {SHARD_ID_MAX}")
            if shard.shard_id in seen:
                raise ShardMapError(f"shard id {shard.shard_id} appears twice")
            seen.add(shard.shard_id)
            check_address(shard.address)
            if not shard.slots:
                raise ShardMapError(f"shard {shard.shard_id} owns no slot")
            for slot in shard.slots:
                if not 0 <= slot < SLOTS:
                    raise ShardMapError(f"shard {shard.shard_id}: slot {slot} is not 0 to "
                                        f"{SLOTS - 1}")
                owner = owners[slot]
                if owner is not None:
                    raise ShardMapError(f"slot {slot} is owned by shards "
                                        f"{listed[owner].shard_id} and {shard.shard_id}")
                owners[slot] = index
        unowned = [slot for slot, owner in enumerate(owners) if owner is None]
        if unowned:
            raise ShardMapError(f"slots {format_slots(unowned)} are owned by no shard")
        return cls(listed, tuple(owner for owner in owners if owner is not None))

    @classmethod
    def single(cls, address: str) -> ShardMap:
        """One shard, id 0, owning every slot: what a server without a map is."""
        return cls.of([Shard(0, address, frozenset(range(SLOTS)))])

    def owner(self, slot: int) -> Shard:
        assert 0 <= slot < SLOTS, slot
        return self.shards[self.owners[slot]]

    def shard(self, shard_id: int) -> Shard:
        for shard in self.shards:
            if shard.shard_id == shard_id:
                return shard
        raise ShardMapError(f"the shard map has no shard {shard_id}")

    def to_json(self) -> str:
        return json.dumps({"shards": [
            {"id": shard.shard_id, "address": shard.address, "slots": format_slots(shard.slots)}
            for shard in self.shards]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ShardMap:
        """The map `to_json` writes: {"shards": [{"id": 0, "address": "HOST:PORT",
        "slots": "0-1364,4000-4095"}, ...]}."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ShardMapError(f"not JSON: {error}") from error
        if not isinstance(document, Mapping) or set(document) != {"shards"} \
                or not isinstance(document["shards"], list):
            raise ShardMapError('must be an object {"shards": [...]}')
        shards = []
        for index, entry in enumerate(document["shards"]):
            if not isinstance(entry, Mapping) or set(entry) != {"id", "address", "slots"}:
                raise ShardMapError(f'shards[{index}] must be an object with "id", "address" '
                                    'and "slots" (and nothing else)')
            shard_id, address, slots = entry["id"], entry["address"], entry["slots"]
            if not isinstance(shard_id, int) or isinstance(shard_id, bool):
                raise ShardMapError(f"shards[{index}].id must be an integer")
            if not isinstance(address, str):
                raise ShardMapError(f"shards[{index}].address must be a string HOST:PORT")
            if not isinstance(slots, str):
                raise ShardMapError(f'shards[{index}].slots must be a string like "0-1364"')
            try:
                shards.append(Shard(shard_id, address, parse_slots(slots)))
            except ShardMapError as error:
                raise ShardMapError(f"shards[{index}]: {error}") from error
        return cls.of(shards)


@dataclass(frozen=True, slots=True)
class EtcdTarget:
    """A cluster whose control plane is etcd: etcd://HOST:PORT/NAME. Its keys are under
    /quotad/NAME/: the shard map at /quotad/NAME/shard-map (ShardMap.to_json's form), each
    shard's lease key at /quotad/NAME/shards/ID/lease."""

    host: str
    port: int
    name: str

    @classmethod
    def parse(cls, target: str) -> EtcdTarget:
        """ShardMapError naming what is wrong with the target."""
        match = _ETCD_TARGET.fullmatch(target)
        if match is None or not 1 <= int(match.group(2)) <= PORT_MAX:
            raise ShardMapError(f"cluster target {target!r} is not etcd://HOST:PORT/NAME "
                                "(NAME: letters, digits, '.', '_', '-')")
        name = match.group(3)
        if len(name) > CLUSTER_NAME_BYTES_MAX:
            raise ShardMapError(f"cluster target {target!r}: NAME is over "
                                f"{CLUSTER_NAME_BYTES_MAX} characters")
        return cls(match.group(1), int(match.group(2)), name)

    @staticmethod
    def is_etcd(target: str) -> bool:
        return target.startswith(ETCD_SCHEME)

    @property
    def endpoint(self) -> str:
        """etcd's HOST:PORT."""
        return f"{self.host}:{self.port}"

    @property
    def prefix(self) -> bytes:
        return f"/quotad/{self.name}/".encode()

    @property
    def shard_map_key(self) -> bytes:
        return self.prefix + b"shard-map"

    def lease_key(self, shard_id: int) -> bytes:
        return self.prefix + f"shards/{shard_id}/lease".encode()

    def __str__(self) -> str:
        return f"{ETCD_SCHEME}{self.endpoint}/{self.name}"


def split_evenly(addresses: Iterable[str]) -> ShardMap:
    """A map of one shard per address, ids 0, 1, ... in order, the slots split evenly in
    contiguous ranges (the first SLOTS % n shards own one slot more)."""
    listed = list(addresses)
    if not 1 <= len(listed) <= SHARDS_MAX:
        raise ShardMapError(f"a shard map holds 1 to {SHARDS_MAX} shards, got {len(listed)}")
    size, extra = divmod(SLOTS, len(listed))
    shards, first = [], 0
    for shard_id, address in enumerate(listed):
        count = size + (1 if shard_id < extra else 0)
        shards.append(Shard(shard_id, address, frozenset(range(first, first + count))))
        first += count
    return ShardMap.of(shards)
