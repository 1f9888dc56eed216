"""What every shard of a cluster shares, kept in etcd: apps' plans and API keys (the catalog).

An admin call that changes it (UpsertPlan, DeletePlan, CreateKey, RevokeKey) sent to any
shard is checked there against that shard's state, written to etcd in one call, and answered
once that shard has applied it. Every shard follows the catalog with one watch and applies
each change through its writer as a logged command tagged with the change's etcd revision
(the core records it, applied or refused: see Core._apply_catalog_change). The last revision
applied is thus part of the shard's state, replayed from its log: a shard that restarts
follows the catalog on from the revision after it, and so applies exactly the changes it
missed. When etcd has compacted that revision away, the shard reads the whole catalog,
applies every key changed after it, then deletes what it holds that the catalog no longer
does (the delete etcd no longer remembers), as the watch would have.

Keys, under /quotad/NAME/:
- catalog/plans/APP NUL PLAN_ID: a quotad.v1.Plan message (the contract's form);
- catalog/keys/KEY_ID: an API key as the shards store it, JSON (never the key itself: its
  SHA-256, and for an sk key the HMAC key that signs and verifies its user tokens), with when
  it was made and, once revoked, when it was revoked. A revoked key stays, revoked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from quotad.cluster.etcd import Etcd, EtcdCompacted, EtcdUnavailable, KeyValue
from quotad.cluster.limits import (
    CATALOG_CATCH_UP_TIMEOUT_S, CATALOG_RESULTS_KEPT, CATALOG_VALUE_BYTES_MAX, ETCD_RETRY_S,
)
from quotad.core.commands import CreateKey, DeletePlan, RevokeKey, UpsertPlan
from quotad.core.errors import AlreadyExists, NotFound, QuotaError, Refusal
from quotad.core.machine import KeyState
from quotad.core.plans import Plan, validate_plan
from quotad.core.values import replace
from quotad_contract.shards import EtcdTarget

log = logging.getLogger("quotad.cluster")

CATALOG = b"catalog/"
PLANS = b"plans/"
KEYS = b"keys/"
KEY_FIELDS = ("app", "key_id", "kind", "name", "secret_sha256", "token_signing_key",
              "created_at_ns", "revoked_at_ns")
"""An API key's value in etcd: these fields, no other (revoked_at_ns 0: not revoked)."""


class CatalogUnavailable(Refusal):
    """etcd did not take the change, or this shard did not apply it in time."""

    code = "UNAVAILABLE"


class CatalogBehind(ValueError):
    """This shard's state has applied a later catalog revision than etcd has: its data
    directory belongs with another etcd (or etcd lost its data)."""


def key_value(key: CreateKey | KeyState, revoked_at_ns: int = 0) -> bytes:
    """An API key as the catalog stores it (a key being made, or one a shard holds)."""
    assert key.created_at_ns, "a key in the catalog says when it was made"
    return json.dumps({
        "app": key.app, "key_id": key.key_id, "kind": key.kind, "name": key.name,
        "secret_sha256": key.secret_sha256, "token_signing_key": key.token_signing_key,
        "created_at_ns": key.created_at_ns, "revoked_at_ns": revoked_at_ns,
    }, sort_keys=True).encode()


def key_command(value: bytes, key_id: str, revision: int) -> CreateKey | RevokeKey:
    """The command that applies a key's value from the catalog (InvalidArgument or
    ValueError when it is not one)."""
    fields = json.loads(value)
    if not isinstance(fields, dict) or sorted(fields) != sorted(KEY_FIELDS):
        raise ValueError(f"an API key in the catalog has exactly the fields {KEY_FIELDS}")
    if fields["key_id"] != key_id:
        raise ValueError(f"the key at catalog/keys/{key_id} names key id {fields['key_id']!r}")
    if fields["revoked_at_ns"]:
        return RevokeKey(app="", key_id=key_id, revoked_at_ns=fields["revoked_at_ns"],
                         catalog_revision=revision)
    return CreateKey(app=fields["app"], key_id=key_id, kind=fields["kind"],
                     name=fields["name"], secret_sha256=fields["secret_sha256"],
                     token_signing_key=fields["token_signing_key"],
                     created_at_ns=fields["created_at_ns"], catalog_revision=revision)


class Catalog:
    """One shard's view of its cluster's catalog in etcd.

    `decode_plan` turns a stored plan into the core's; `execute` applies a command through the
    shard's writer; `held` says what the shard's state holds that the catalog may (its core's
    catalog_entries). They are given by the server, which owns the conversions, the writer
    and the state. `applied_revision` is the last catalog revision the shard's state applied
    (its core's catalog_revision, as replayed). `own_plans`: (app, plan id) of the plans of
    the shard's own --plans file, which a whole read of the catalog never deletes."""

    def __init__(self, etcd: Etcd, target: EtcdTarget, *, decode_plan: Callable[[bytes], Plan],
                 execute: Callable[[Any], Awaitable[Any]], applied_revision: int,
                 held: Callable[[], tuple[Iterable[tuple[str, str]], Iterable[str]]] = (
                     lambda: ((), ())),
                 own_plans: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.etcd, self.decode_plan, self.execute = etcd, decode_plan, execute
        self.held, self.own_plans = held, own_plans
        self.prefix = target.prefix + CATALOG
        self.applied_revision = applied_revision
        """The etcd revision of the last catalog change this shard's log holds."""
        self.followed_revision = applied_revision
        """Every change of the catalog up to this etcd revision is applied on this shard."""
        self.changes_applied = 0
        """Catalog changes applied since this process started (each one log record)."""
        self.plans_read: frozenset[tuple[str, str]] = frozenset()
        """(app, plan id) of every plan in the catalog when catch_up read it."""
        self._deletes_awaited: set[bytes] = set()
        """Keys deleted while this shard was down whose deletes its catch-up waits for."""
        self._results: OrderedDict[int, Any] = OrderedDict()
        """What applying the change at each recent revision answered here (or the refusal)."""
        self._followed = asyncio.Condition()
        self._follower: asyncio.Task[None] | None = None

    def plan_key(self, app: str, plan_id: str) -> bytes:
        return self.prefix + PLANS + app.encode() + b"\0" + plan_id.encode()

    def api_key_key(self, key_id: str) -> bytes:
        return self.prefix + KEYS + key_id.encode()

    # --- writing: each answers what applying the change on this shard answered --------------

    async def upsert_plan(self, command: UpsertPlan, value: bytes, deadline_s: float) -> Any:
        validate_plan(command.plan)  # an invalid plan is refused here, before any shard sees it
        self._check_size(value)
        revision = await self._written(self.etcd.put(self.plan_key(command.app,
                                                                   command.plan.id), value))
        return await self._outcome(revision, deadline_s, "the plan")

    async def delete_plan(self, command: DeletePlan, deadline_s: float) -> Any:
        """Deletes the plan's key; a plan this shard holds that the catalog does not (loaded
        from its --plans file) is deleted on this shard alone."""
        deleted, revision = await self._written(
            self.etcd.delete_at(self.plan_key(command.app, command.plan_id)))
        if not deleted:
            return await self.execute(command)
        return await self._outcome(revision, deadline_s, "the plan's deletion")

    async def create_key(self, command: CreateKey, deadline_s: float) -> Any:
        if not command.created_at_ns:
            command = replace(command, created_at_ns=time.time_ns())
        revision = await self._written(self.etcd.create_at(self.api_key_key(command.key_id),
                                                           key_value(command)))
        if revision is None:
            raise AlreadyExists(f"key id {command.key_id!r} is taken in the catalog")
        return await self._outcome(revision, deadline_s, "the key")

    async def revoke_key(self, key: KeyState, deadline_s: float) -> Any:
        """key: the key to revoke, as this shard holds it."""
        revision = await self._written(self.etcd.put(
            self.api_key_key(key.key_id), key_value(key, revoked_at_ns=time.time_ns())))
        return await self._outcome(revision, deadline_s, "the revocation")

    @staticmethod
    def _check_size(value: bytes) -> None:
        if len(value) > CATALOG_VALUE_BYTES_MAX:
            raise CatalogUnavailable(f"a catalog value of {len(value)} bytes is over "
                                     f"{CATALOG_VALUE_BYTES_MAX}")

    @staticmethod
    async def _written(call: Awaitable[Any]) -> Any:
        try:
            return await call
        except EtcdUnavailable as error:
            raise CatalogUnavailable(f"the catalog in etcd cannot be written now: {error}") \
                from None

    async def _outcome(self, revision: int, deadline_s: float, what: str) -> Any:
        async with self._followed:
            try:
                await asyncio.wait_for(
                    self._followed.wait_for(lambda: self.followed_revision >= revision),
                    max(0.0, deadline_s - time.monotonic()))
            except TimeoutError:
                raise CatalogUnavailable(
                    f"{what} is in the catalog (etcd revision {revision}) but this shard "
                    "has not applied it yet; every shard applies it once it can") from None
        outcome = self._results.get(revision)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is None:
            raise CatalogUnavailable(f"{what} is in the catalog (etcd revision {revision}); "
                                     "its outcome here is no longer known: read it back")
        return outcome

    # --- following ----------------------------------------------------------------------

    async def catch_up(self) -> int:
        """Applies what changed in the catalog since this shard's last applied revision (the
        whole catalog when it has applied none), before the shard serves: the number of
        changes applied. CatalogBehind when the state is ahead of etcd."""
        stored, revision = await self.etcd.get_prefix(self.prefix)
        plans = self.prefix + PLANS
        self.plans_read = frozenset(
            (app.decode(errors="replace"), plan_id.decode(errors="replace"))
            for app, _, plan_id in (kv.key[len(plans):].partition(b"\0")
                                    for kv in stored if kv.key.startswith(plans)))
        if self.applied_revision > revision:
            raise CatalogBehind(
                f"this shard's data applied the catalog up to etcd revision "
                f"{self.applied_revision}, but etcd is at {revision}: the data directory "
                "belongs with another etcd")
        if self.applied_revision == 0:
            return await self._apply_stored(stored, revision)
        before = self.changes_applied
        newer = max((kv.mod_revision for kv in stored if kv.mod_revision > self.applied_revision),
                    default=0)
        try:  # the keys deleted since: the watch brings their deletes, at revisions unknown
            then, _ = await self.etcd.get_prefix(self.prefix, revision=self.applied_revision,
                                                 keys_only=True)
        except EtcdCompacted:  # the changes are gone: what was read is all there is
            self._log_compacted(0)
            await self._apply_stored(stored, revision, deletes_missed=True)
            return self.changes_applied - before
        self._deletes_awaited = {kv.key for kv in then} - {kv.key for kv in stored}
        await self._follow_until(newer)
        return self.changes_applied - before

    async def _follow_until(self, revision: int) -> None:
        """Follows until every change up to revision is applied and every delete awaited
        seen."""
        if self.followed_revision >= revision and not self._deletes_awaited:
            return
        waiter = asyncio.create_task(self._wait_followed(revision))
        done, _ = await asyncio.wait((waiter, self.following()),
                                     timeout=CATALOG_CATCH_UP_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()  # the follower goes on: stopped midway, it could apply a change twice
        await asyncio.gather(waiter, return_exceptions=True)
        if waiter not in done:  # etcd failed meanwhile: the shard follows on once it answers
            raise EtcdUnavailable(
                f"the catalog's changes up to etcd revision {revision} were not all applied "
                f"within {CATALOG_CATCH_UP_TIMEOUT_S:g} s (applied up to "
                f"{self.followed_revision})")

    async def _wait_followed(self, revision: int) -> None:
        async with self._followed:
            await self._followed.wait_for(
                lambda: self.followed_revision >= revision and not self._deletes_awaited)

    async def _apply_stored(self, stored: list[KeyValue], revision: int, *,
                            deletes_missed: bool = False) -> int:
        """Applies every key of a whole read of the catalog at revision changed after the
        last revision followed, oldest change first (so that a restart midway resumes after
        the last). deletes_missed: etcd compacted the changes since the last followed away,
        deletes too; each plan and key this shard holds that the read lacks is then deleted
        here as its watched delete would have been, tagged with the read's revision."""
        newer = sorted((kv for kv in stored if kv.mod_revision > self.followed_revision),
                       key=lambda kv: (kv.mod_revision, kv.key))
        for kv in newer:
            await self._apply(kv.key, kv.value, kv.mod_revision)
        vanished = self._vanished(stored) if deletes_missed else []
        for key in vanished:
            log.warning("deleting here what the catalog no longer holds: its delete is "
                        "compacted away in etcd", extra={
                            "revision": revision, "key": key.decode(errors="replace")})
            await self._apply(key, None, revision, answers=False)
        await self._advance(revision)
        return len(newer) + len(vanished)

    def _vanished(self, stored: list[KeyValue]) -> list[bytes]:
        """The catalog's key of each plan and key not revoked that this shard holds and a
        whole read of the catalog lacks, but for the plans of its own --plans file."""
        plans, key_ids = self.held()
        held = [self.plan_key(app, plan_id) for app, plan_id in plans
                if (app, plan_id) not in self.own_plans]
        held += [self.api_key_key(key_id) for key_id in key_ids]
        read = {kv.key for kv in stored}
        return [key for key in held if key not in read]

    def following(self) -> asyncio.Task[None]:
        """The one task that follows the catalog (`follow`), started the first time."""
        if self._follower is None:
            self._follower = asyncio.create_task(self.follow(), name="catalog-follower")
        return self._follower

    async def follow(self) -> None:
        """Applies each change of the catalog as it happens, in revision order, from the one
        after the last followed; when etcd has compacted that one away, reads the whole
        catalog and applies what changed after the last applied, then follows on."""
        failing = False
        while True:
            try:
                async for event in self.etcd.watch(self.prefix, self.followed_revision + 1,
                                                   prefix=True):
                    if failing:
                        log.info("following the catalog again",
                                 extra={"revision": event.revision})
                        failing = False
                    await self._apply(event.key, event.value, event.revision)
                    if event.value is None:
                        self._deletes_awaited.discard(event.key)
                    await self._advance(event.revision)
            except EtcdCompacted as error:
                self._deletes_awaited.clear()  # gone with the compacted revisions
                self._log_compacted(error.compact_revision)
                try:
                    stored, revision = await self.etcd.get_prefix(self.prefix)
                    await self._apply_stored(stored, revision, deletes_missed=True)
                except EtcdUnavailable:
                    await asyncio.sleep(ETCD_RETRY_S)
            except EtcdUnavailable as error:
                if not failing:
                    log.warning("cannot follow the catalog in etcd; retrying",
                                extra={"error": str(error)})
                failing = True
                await asyncio.sleep(ETCD_RETRY_S)

    def _log_compacted(self, compact_revision: int) -> None:
        log.warning("the catalog's changes since the last applied are compacted in etcd; "
                    "reading the whole catalog", extra={
                        "applied_revision": self.applied_revision,
                        "compact_revision": compact_revision})

    def _command(self, key: bytes, value: bytes | None, revision: int) -> Any:
        """The command that applies a change of one catalog key; None for a key that is not
        the catalog's (ValueError, InvalidArgument: a value that is not what its key holds)."""
        path = key[len(self.prefix):]
        if value is not None and len(value) > CATALOG_VALUE_BYTES_MAX:
            raise ValueError(f"{len(value)} bytes, over {CATALOG_VALUE_BYTES_MAX}")
        if path.startswith(PLANS):
            app, separator, plan_id = path[len(PLANS):].partition(b"\0")
            if not separator:
                return None
            if value is None:
                return DeletePlan(app=app.decode(), plan_id=plan_id.decode(),
                                  catalog_revision=revision)
            plan = self.decode_plan(value)
            if plan.id != plan_id.decode():
                raise ValueError(f"the plan at {plan_id.decode()!r} is plan {plan.id!r}")
            return UpsertPlan(app=app.decode(), plan=plan, catalog_revision=revision)
        if path.startswith(KEYS):
            key_id = path[len(KEYS):].decode()
            if value is None:  # deleted by hand: revoked on every shard
                return RevokeKey(app="", key_id=key_id, catalog_revision=revision)
            return key_command(value, key_id, revision)
        return None

    async def _apply(self, key: bytes, value: bytes | None, revision: int, *,
                     answers: bool = True) -> None:
        """Applies one change through the writer, logging a refusal. answers: what it
        answered is kept for a call waiting on its revision (not for a delete a whole read
        found missing: the revision is the read's, not the delete's)."""
        assert revision >= self.followed_revision, (
            "changes are applied in revision order", revision, self.followed_revision)
        outcome: Any
        try:
            command = self._command(key, value, revision)
        except Exception as error:  # noqa: BLE001 -- not what the key holds: logged, skipped
            log.error("a value in the catalog is not what its key holds; skipped",
                      extra={"revision": revision, "key": key.decode(errors="replace"),
                             "error": str(error)})
            outcome = CatalogUnavailable(f"the catalog's value is not valid: {error}")
        else:
            if command is None:
                log.warning("a key in the catalog's folder is not the catalog's; skipped",
                            extra={"revision": revision, "key": key.decode(errors="replace")})
                return
            try:
                outcome = await self.execute(command)
            except QuotaError as refused:  # refused by this shard's state, and recorded
                outcome = refused
            self.applied_revision = max(self.applied_revision, revision)
            self.changes_applied += 1
        if isinstance(outcome, Refusal):
            level = logging.INFO if isinstance(outcome, NotFound) else logging.ERROR
            log.log(level, "a change of the catalog was refused by this shard", extra={
                "revision": revision, "key": key.decode(errors="replace"),
                "error": str(outcome)})
        if answers:
            self._results[revision] = outcome
        while len(self._results) > CATALOG_RESULTS_KEPT:
            self._results.popitem(last=False)

    async def _advance(self, revision: int) -> None:
        async with self._followed:
            self.followed_revision = max(self.followed_revision, revision)
            self._followed.notify_all()
