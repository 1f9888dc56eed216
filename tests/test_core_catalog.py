"""Changes of a cluster's catalog (plans, API keys) in the pure core: each tagged with its etcd
revision, recorded whether this server applies or refuses it, so that the last revision
applied is part of the state (replayed from the log, kept by snapshots)."""

from __future__ import annotations

import pytest

from core_helpers import APP, S, Harness, group, plan, replay_all
from quotad.core.commands import (
    CreateKey, DeletePlan, GetPlan, ListKeys, RevokeKey, UpsertPlan,
    UpsertSubscription,
)
from quotad.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from quotad.core.limits import CATALOG_REVISION_MAX
from quotad.storage.codec import decode_record, encode_record, record_key, state_digest
from quotad.storage.snapshot import core_from_snapshot, snapshot_of

SHA = "ab" * 32
SIGNING = "cd" * 32


def _key(key_id: str = "aaaaaaaaaaaa", revision: int = 0, created_at_ns: int = 0) -> CreateKey:
    return CreateKey(app=APP, key_id=key_id, kind="secret", name="n", secret_sha256=SHA,
                     token_signing_key=SIGNING, created_at_ns=created_at_ns,
                     catalog_revision=revision)


def test_each_catalog_change_is_recorded_with_its_revision_applied_or_refused() -> None:
    h = Harness()
    h.run(UpsertPlan(app=APP, plan=plan("p", group("t", 10)), catalog_revision=5))
    assert h.core.catalog_revision == 5 and len(h.records) == 1
    h.run(UpsertPlan(app=APP, plan=plan("p", group("t", 10)), catalog_revision=7))
    assert h.core.catalog_revision == 7 and len(h.records) == 2, "unchanged, yet recorded"
    h.run(UpsertSubscription(app=APP, user_id="u", plan_id="p"))
    refused = h.apply(DeletePlan(app=APP, plan_id="p", catalog_revision=9))
    assert isinstance(refused.error, FailedPrecondition) and len(refused.records) == 1
    assert h.core.catalog_revision == 9 and h.run(GetPlan(app=APP, plan_id="p")).plan.id == "p"
    unknown = h.apply(RevokeKey(app="", key_id="bbbbbbbbbbbb", catalog_revision=10))
    assert isinstance(unknown.error, NotFound) and h.core.catalog_revision == 10
    replayed = replay_all(h.records)
    assert replayed.catalog_revision == 10 and state_digest(replayed) == state_digest(h.core)


def test_a_change_older_than_the_last_applied_is_refused_and_not_recorded() -> None:
    h = Harness()
    h.run(UpsertPlan(app=APP, plan=plan("p", group("t", 10)), catalog_revision=8))
    stale = h.apply(DeletePlan(app=APP, plan_id="p", catalog_revision=7))
    assert isinstance(stale.error, AlreadyExists) and stale.records == ()
    assert h.core.catalog_revision == 8 and h.run(GetPlan(app=APP, plan_id="p")).plan.id == "p"
    h.run(DeletePlan(app=APP, plan_id="p", catalog_revision=8))  # same revision: a txn's 2nd
    assert isinstance(h.apply(GetPlan(app=APP, plan_id="p")).error, NotFound)


def test_a_key_from_the_catalog_keeps_its_times_and_applying_it_again_changes_nothing() -> None:
    h = Harness()
    h.run(_key(revision=3, created_at_ns=1_000 * S))
    again = h.apply(_key(revision=4, created_at_ns=1_000 * S))
    assert again.error is None and again.result.key.created_at_ns == 1_000 * S
    h.run(RevokeKey(app="", key_id="aaaaaaaaaaaa", revoked_at_ns=2_000 * S, catalog_revision=6))
    (key,) = h.run(ListKeys(app=APP)).keys
    assert (key.created_at_ns, key.revoked_at_ns) == (1_000 * S, 2_000 * S)
    other = h.apply(CreateKey(app="other", key_id="aaaaaaaaaaaa", kind="public",
                              secret_sha256=SHA, catalog_revision=7))
    assert isinstance(other.error, AlreadyExists), "a key id of another app stays taken"
    assert isinstance(h.apply(_key()).error, AlreadyExists), "a server's own: refused as ever"


def test_the_revision_survives_the_log_and_a_snapshot() -> None:
    h = Harness()
    h.run(_key(revision=12))
    (record,) = h.records
    assert decode_record(record_key(1), encode_record(record)) == record
    restored = core_from_snapshot(snapshot_of(h.core))
    assert restored.catalog_revision == 12
    assert state_digest(restored) == state_digest(h.core)


@pytest.mark.parametrize("revision", [-1, CATALOG_REVISION_MAX + 1])
def test_a_revision_outside_int64_is_refused(revision: int) -> None:
    with pytest.raises(InvalidArgument, match="catalog_revision"):
        UpsertPlan(app=APP, plan=plan("p", group("t", 1)), catalog_revision=revision)
    UpsertPlan(app=APP, plan=plan("p", group("t", 1)), catalog_revision=CATALOG_REVISION_MAX)


def test_catalog_entries_are_every_plan_and_every_key_not_revoked_and_change_nothing() -> None:
    h = Harness()
    h.run(UpsertPlan(app=APP, plan=plan("p", group("t", 10)), catalog_revision=3))
    h.run(UpsertPlan(app="other", plan=plan("q", group("t", 10))))
    h.run(_key("aaaaaaaaaaaa", revision=4))
    h.run(_key("bbbbbbbbbbbb", revision=5))
    h.run(RevokeKey(app="", key_id="bbbbbbbbbbbb", catalog_revision=6))
    before = state_digest(h.core)
    assert h.core.catalog_entries() == ([(APP, "p"), ("other", "q")], ["aaaaaaaaaaaa"])
    assert state_digest(h.core) == before
