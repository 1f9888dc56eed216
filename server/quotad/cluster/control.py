"""A shard's part in its cluster's control plane, etcd: the shard map it loads and follows,
and the lease of its shard id without which it serves nothing (fencing).

Nothing here is on the path of a call: the map's watch replaces the Ownership the calls
read, and the lease's renewals move the time until which the Gate lets calls through.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

from quotad.cluster import Ownership
from quotad.cluster.catalog import Catalog
from quotad.cluster.etcd import Etcd, EtcdUnavailable
from quotad.cluster.limits import (
    ETCD_CONNECT_TIMEOUT_S, ETCD_RETRY_S, KEEP_ALIVES_PER_TTL, LEASE_SAFETY_FRACTION,
    LEASE_WAIT_POLL_S, SHARD_MAP_VALUE_BYTES_MAX,
)
from quotad_contract.shards import EtcdTarget, ShardMap, ShardMapError, split_evenly

log = logging.getLogger("quotad.cluster")

NS_PER_S = 1_000_000_000


class ShardMapExists(ShardMapError):
    """`cluster init` found a map already there (and was not told to replace it)."""


def decode_map(value: bytes, target: EtcdTarget) -> ShardMap:
    if len(value) > SHARD_MAP_VALUE_BYTES_MAX:
        raise ShardMapError(f"the shard map at {target} is over {SHARD_MAP_VALUE_BYTES_MAX} "
                            "bytes")
    try:
        return ShardMap.from_json(value.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ShardMapError(f"the shard map at {target} is not UTF-8: {error}") from error


async def load_map(etcd: Etcd, target: EtcdTarget) -> tuple[ShardMap, int]:
    """The map in etcd and the revision it was read at. ShardMapError when there is none or
    it breaks a rule; EtcdUnavailable when etcd does not answer."""
    found, revision = await etcd.get(target.shard_map_key)
    if found is None:
        raise ShardMapError(f"there is no shard map at {target}: write one with "
                            f"`quotad cluster init --cluster {target} --shards N --address ...`")
    try:
        return decode_map(found.value, target), revision
    except ShardMapError as error:
        raise ShardMapError(f"the shard map at {target}: {error}") from None


async def init_map(etcd: Etcd, target: EtcdTarget, addresses: Sequence[str], *,
                   replace: bool) -> ShardMap:
    """Writes a map of one shard per address with the slots split evenly, in one etcd
    transaction: only if there is none (ShardMapExists otherwise, nothing written), or with
    replace, over the map as it was read (a map changed meanwhile is not overwritten)."""
    shard_map = split_evenly(addresses)
    value = shard_map.to_json().encode()
    created, found = await etcd.create(target.shard_map_key, value)
    if created:
        return shard_map
    assert found is not None
    if not replace:
        raise ShardMapExists(f"a shard map is already at {target} (written at etcd revision "
                             f"{found.mod_revision}); nothing was changed. --replace "
                             "overwrites it")
    swapped, _ = await etcd.replace(target.shard_map_key, value, found.mod_revision)
    if not swapped:
        raise ShardMapError(f"the shard map at {target} changed while it was being replaced; "
                            "nothing was changed: try again")
    return shard_map


async def connect(target: EtcdTarget) -> Etcd:
    """A client of the target's etcd that answered a read within ETCD_CONNECT_TIMEOUT_S;
    EtcdUnavailable otherwise."""
    etcd = Etcd(target.endpoint)
    deadline = time.monotonic() + ETCD_CONNECT_TIMEOUT_S
    while True:
        try:
            await etcd.get(target.shard_map_key)
            return etcd
        except EtcdUnavailable:
            if time.monotonic() + ETCD_RETRY_S >= deadline:
                await etcd.close()
                raise EtcdUnavailable(f"etcd at {target.endpoint} did not answer within "
                                      f"{ETCD_CONNECT_TIMEOUT_S:g} s") from None
            await asyncio.sleep(ETCD_RETRY_S)


class MapFollower:
    """Follows the map in etcd: each change replaces what the shard owns. A map deleted or
    broken in etcd is logged and the last good one kept."""

    def __init__(self, etcd: Etcd, target: EtcdTarget, ownership: Ownership,
                 revision: int) -> None:
        self.etcd, self.target, self.ownership = etcd, target, ownership
        self.revision = revision
        """The revision up to which the map is followed."""

    async def run(self) -> None:
        failing = False
        while True:
            try:
                if failing:  # catch up with what changed while etcd was away
                    shard_map, self.revision = await load_map(self.etcd, self.target)
                    self._follow(shard_map, self.revision)
                    log.info("following the shard map again", extra={"revision": self.revision})
                    failing = False
                async for event in self.etcd.watch(self.target.shard_map_key, self.revision + 1):
                    self.revision = event.revision
                    if event.value is None:
                        log.error("the shard map was deleted from etcd; keeping the last one",
                                  extra={"revision": event.revision})
                        continue
                    try:
                        self._follow(decode_map(event.value, self.target), event.revision)
                    except ShardMapError as error:
                        log.error("a shard map in etcd breaks a rule; keeping the last one",
                                  extra={"revision": event.revision, "error": str(error)})
            except (EtcdUnavailable, ShardMapError) as error:
                if not failing:
                    log.warning("cannot follow the shard map in etcd; retrying",
                                extra={"error": str(error)})
                failing = True
                await asyncio.sleep(ETCD_RETRY_S)

    def _follow(self, shard_map: ShardMap, revision: int) -> None:
        if shard_map == self.ownership.shard_map:
            return
        self.ownership.follow(shard_map)
        log.info("shard map changed", extra={"revision": revision,
                                             "shard_id": self.ownership.shard_id,
                                             "slots_owned": len(self.ownership.owned)})


class ShardLease:
    """The etcd lease of one shard id, which this process must hold to serve (fencing).

    Held: the key /quotad/NAME/shards/ID/lease exists, attached to this process's lease
    (checked with each renewal). A second process with the same id finds the key attached to
    another lease and waits. Each
    renewal moves `held_until_ns` to its send time + TTL * (1 - LEASE_SAFETY_FRACTION): etcd
    counts the TTL from when it receives the renewal, later, so a shard that cannot renew
    stops serving before its lease can expire in etcd and another process take the id."""

    def __init__(self, etcd: Etcd, target: EtcdTarget, shard_id: int, ttl_s: int, *,
                 holder: dict[str, object], on_change: Callable[[bool], None]) -> None:
        self.etcd, self.target, self.shard_id, self.ttl_s = etcd, target, shard_id, ttl_s
        self.key = target.lease_key(shard_id)
        self.holder = json.dumps({**holder, "pid": os.getpid()}).encode()
        self.on_change = on_change
        self.lease_id = 0
        self.held_until_ns = 0
        """time.monotonic_ns() before which this process holds the shard id."""
        self.acquired = asyncio.Event()
        """Set the first time the lease is held."""
        self._published = False
        self._timer: asyncio.TimerHandle | None = None
        self._interval_s = ttl_s / KEEP_ALIVES_PER_TTL

    def held(self) -> bool:
        return time.monotonic_ns() < self.held_until_ns

    def refusal(self) -> str:
        return (f"shard {self.shard_id} does not hold its lease in etcd (another process "
                "holds it, or etcd cannot be reached): it serves nothing until it does")

    async def run(self) -> None:
        failing = False
        while True:
            try:
                await self._hold()
                failing = False
            except EtcdUnavailable as error:
                if not failing:
                    log.warning("cannot reach etcd for the shard's lease; retrying",
                                extra={"shard_id": self.shard_id, "error": str(error),
                                       "serving_for_s": round(max(
                                           0, self.held_until_ns - time.monotonic_ns())
                                           / NS_PER_S, 3)})
                failing = True
                await asyncio.sleep(ETCD_RETRY_S)

    async def _hold(self) -> None:
        """Takes the key (waiting while another lease holds it), then renews until the lease
        is gone (returns: take it again) or etcd fails (EtcdUnavailable)."""
        if not self.lease_id:
            self.lease_id, _ = await self.etcd.grant_lease(self.ttl_s)
        waiting_logged = False
        while True:
            created, found = await self.etcd.create(self.key, self.holder,
                                                    lease_id=self.lease_id)
            if created or (found is not None and found.lease == self.lease_id):
                break
            if not waiting_logged:
                log.warning("another process holds this shard id's lease; waiting for it",
                            extra={"shard_id": self.shard_id,
                                   "holder": found.value.decode("utf-8", "replace")
                                   if found is not None else ""})
                waiting_logged = True
            await asyncio.sleep(LEASE_WAIT_POLL_S)
            if await self.etcd.renew_lease(self.lease_id, self._interval_s) == 0:
                self.lease_id = 0
                return
        while True:
            sent_ns = time.monotonic_ns()
            ttl_s = await self.etcd.renew_lease(self.lease_id, self._interval_s)
            if ttl_s == 0:
                log.warning("the shard's lease expired in etcd; taking it again",
                            extra={"shard_id": self.shard_id})
                self.lease_id = 0
                self._extend(0, 0)
                return
            found, _ = await self.etcd.get(self.key)  # still this lease's key?
            if found is None or found.lease != self.lease_id:
                log.warning("the shard's lease key was deleted or taken in etcd; taking it "
                            "again", extra={"shard_id": self.shard_id})
                self._extend(0, 0)
                return
            self._extend(sent_ns, ttl_s)
            await asyncio.sleep(self._interval_s)

    def _extend(self, sent_ns: int, ttl_s: int) -> None:
        self.held_until_ns = (sent_ns + int(ttl_s * NS_PER_S * (1 - LEASE_SAFETY_FRACTION))
                              if ttl_s else 0)
        self._publish()
        if self._timer is not None:
            self._timer.cancel()
        self._arm_lapse()

    def _arm_lapse(self) -> None:
        """A timer for when the lease lapses unrenewed, to publish it (health follows)."""
        if self.held_until_ns:
            delay_s = (self.held_until_ns - time.monotonic_ns()) / NS_PER_S
            self._timer = asyncio.get_running_loop().call_later(max(0.0, delay_s) + 0.001,
                                                                self._lapse_due)

    def _lapse_due(self) -> None:
        """The lapse timer fired. A loop's timer may fire a little before the monotonic
        clock reaches its time (uvloop counts whole milliseconds), and held() reads that
        clock: still held, the timer is set again for what is left rather than dropped, which
        would leave health SERVING while the gate refuses every call."""
        self._publish()
        if self.held():
            self._arm_lapse()

    def _publish(self) -> None:
        held = self.held()
        if held == self._published:
            return
        self._published = held
        if held:
            self.acquired.set()
            log.info("holding the shard's lease: serving its slots",
                     extra={"shard_id": self.shard_id, "lease_id": self.lease_id,
                            "ttl_s": self.ttl_s})
        else:
            log.warning("the shard's lease was not renewed in time: serving nothing",
                        extra={"shard_id": self.shard_id})
        self.on_change(held)

    async def release(self) -> None:
        """Stops holding: revokes the lease (its key goes with it), so that another process
        may take the shard id at once. etcd unreachable: the lease expires on its own."""
        self.held_until_ns = 0
        if self._timer is not None:
            self._timer.cancel()
        if self.lease_id:
            try:
                await self.etcd.revoke_lease(self.lease_id)
            except EtcdUnavailable as error:
                log.warning("cannot revoke the shard's lease; it expires on its own",
                            extra={"shard_id": self.shard_id, "error": str(error)})
            self.lease_id = 0


class ControlPlane:
    """A shard's link to etcd: the map it follows and the lease it holds, each a task."""

    def __init__(self, etcd: Etcd, target: EtcdTarget, ownership: Ownership, revision: int,
                 ttl_s: int) -> None:
        self.etcd, self.target, self.ownership = etcd, target, ownership
        self.follower = MapFollower(etcd, target, ownership, revision)
        self.ttl_s = ttl_s
        self.lease: ShardLease | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, target: EtcdTarget, shard_id: int, ttl_s: int) -> ControlPlane:
        """Connected, with the map loaded and this shard id in it. ValueError naming what is
        wrong (etcd unreachable, no map, no such shard) otherwise."""
        try:
            etcd = await connect(target)
        except EtcdUnavailable as error:
            raise ValueError(f"--cluster {target}: {error}") from None
        try:
            shard_map, revision = await load_map(etcd, target)
            return cls(etcd, target, Ownership.of(shard_map, shard_id), revision, ttl_s)
        except (EtcdUnavailable, ShardMapError) as error:
            await etcd.close()
            raise ValueError(f"--cluster {target}: {error}") from None

    def start(self, *, holder: dict[str, object], on_change: Callable[[bool], None]) -> ShardLease:
        """Follows the map and takes the lease (both in the background); the lease, whose
        `acquired` is set once held."""
        self.lease = ShardLease(self.etcd, self.target, self.ownership.shard_id, self.ttl_s,
                                holder=holder, on_change=on_change)
        self._tasks = [asyncio.create_task(self.follower.run(), name="shard-map-follower"),
                       asyncio.create_task(self.lease.run(), name="shard-lease")]
        return self.lease

    def follow_catalog(self, catalog: Catalog) -> None:
        self._tasks.append(catalog.following())

    async def close(self) -> None:
        """Stops following, gives the lease back (revoked: another process may take the
        shard id at once) and closes the connection."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.lease is not None:
            await self.lease.release()
        await self.etcd.close()
