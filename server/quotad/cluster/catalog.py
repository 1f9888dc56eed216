"""The plans every shard of a cluster takes, kept in etcd: an UpsertPlan sent to any shard
writes the plan to etcd, and every shard follows the catalog with a watch, applying each
plan through its writer (a logged UpsertPlan, as any other), so that a plan upserted once is
every shard's. The call that wrote it answers once its own shard has applied it.

Keys: /quotad/NAME/catalog/plans/APP NUL PLAN_ID, each value a quotad.v1.Plan message (the
contract's form). A shard that starts applies the whole catalog, then follows it from the
revision it read: an upsert of an unchanged plan changes nothing and logs nothing, so a
restart re-applies only what changed while it was down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from quotad.cluster.etcd import Etcd, EtcdUnavailable
from quotad.cluster.limits import CATALOG_RESULTS_KEPT, ETCD_RETRY_S
from quotad.core.commands import UpsertPlan
from quotad.core.errors import Refusal
from quotad.core.plans import Plan, validate_plan
from quotad_contract.shards import EtcdTarget

log = logging.getLogger("quotad.cluster")

PLANS = b"catalog/plans/"


class CatalogUnavailable(Refusal):
    """etcd did not take the change, or this shard did not apply it in time."""

    code = "UNAVAILABLE"


class Catalog:
    """One shard's view of the cluster's plans in etcd.

    `decode` turns a stored value into (the core's plan, the app it is for is in the key);
    `execute` applies a command through the shard's writer. Both are given by the server,
    which owns the conversions and the writer."""

    def __init__(self, etcd: Etcd, target: EtcdTarget, *, decode: Callable[[bytes], Plan],
                 execute: Callable[[Any], Awaitable[Any]]) -> None:
        self.etcd, self.decode, self.execute = etcd, decode, execute
        self.prefix = target.prefix + PLANS
        self.applied_revision = 0
        """Every change of the catalog up to this etcd revision is applied on this shard."""
        self._results: OrderedDict[int, Any] = OrderedDict()
        """What applying the change at each recent revision answered here (or the refusal)."""
        self._applied = asyncio.Condition()

    def key(self, app: str, plan_id: str) -> bytes:
        return self.prefix + app.encode() + b"\0" + plan_id.encode()

    async def upsert(self, command: UpsertPlan, value: bytes, deadline_s: float) -> Any:
        """Writes the plan to etcd and answers what applying it on this shard answered, once
        it has (CatalogUnavailable when etcd does not take it, or by deadline_s)."""
        validate_plan(command.plan)  # an invalid plan is refused here, before any shard sees it
        try:
            revision = await self.etcd.put(self.key(command.app, command.plan.id), value)
        except EtcdUnavailable as error:
            raise CatalogUnavailable(f"the catalog in etcd cannot be written now: {error}") \
                from None
        async with self._applied:
            try:
                await asyncio.wait_for(
                    self._applied.wait_for(lambda: self.applied_revision >= revision),
                    max(0.0, deadline_s - time.monotonic()))
            except TimeoutError:
                raise CatalogUnavailable(
                    f"the plan is in the catalog (etcd revision {revision}) but this shard "
                    "has not applied it yet; every shard applies it once it can") from None
        outcome = self._results.get(revision)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is None:
            raise CatalogUnavailable(f"the plan is in the catalog (etcd revision {revision}); "
                                     "its outcome here is no longer known: read it back")
        return outcome

    async def sync(self) -> int:
        """Applies the whole catalog as etcd holds it now; the number of plans."""
        stored, revision = await self.etcd.get_prefix(self.prefix)
        for kv in stored:
            await self._apply(kv.key, kv.value, kv.mod_revision)
        await self._advance(revision)
        return len(stored)

    async def follow(self) -> None:
        """Applies each change of the catalog as it happens, in revision order; after a
        failure of etcd, applies the whole catalog again and follows on from there."""
        failing = self.applied_revision == 0  # never synced: the whole catalog first
        while True:
            try:
                if failing:
                    await self.sync()
                    failing = False
                async for event in self.etcd.watch(self.prefix, self.applied_revision + 1,
                                                   prefix=True):
                    await self._apply(event.key, event.value, event.revision)
                    await self._advance(event.revision)
            except EtcdUnavailable as error:
                if not failing:
                    log.warning("cannot follow the catalog in etcd; retrying",
                                extra={"error": str(error)})
                failing = True
                await asyncio.sleep(ETCD_RETRY_S)

    async def _apply(self, key: bytes, value: bytes | None, revision: int) -> None:
        app, _, plan_id = key[len(self.prefix):].partition(b"\0")
        if value is None:
            log.warning("a plan was deleted from the catalog in etcd; it stays on each shard "
                        "until deleted there", extra={"plan_id": plan_id.decode(errors="replace")})
            return
        outcome: Any
        try:
            plan = self.decode(value)
        except Exception as error:  # noqa: BLE001 -- not a plan: logged, skipped, remembered
            log.error("a value in the catalog is not a plan", extra={
                "revision": revision, "error": str(error)})
            outcome = CatalogUnavailable(f"the catalog's value is not a plan: {error}")
        else:
            try:
                outcome = await self.execute(UpsertPlan(app=app.decode(), plan=plan))
            except Refusal as refused:
                outcome = refused
        if isinstance(outcome, Refusal):
            log.error("a plan in the catalog was refused by this shard",
                      extra={"revision": revision, "plan_id": plan_id.decode(errors="replace"),
                             "error": str(outcome)})
        self._results[revision] = outcome
        while len(self._results) > CATALOG_RESULTS_KEPT:
            self._results.popitem(last=False)

    async def _advance(self, revision: int) -> None:
        async with self._applied:
            self.applied_revision = max(self.applied_revision, revision)
            self._applied.notify_all()
