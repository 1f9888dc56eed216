"""Recovery over a real LMDB log: replay makes every record again (answers included), keeps
none of the durable keys and finished holds the log answers for, and ends in the state the
run ended with; and from a snapshot taken midway too."""

from __future__ import annotations

import gc
from collections import deque
from pathlib import Path

import pytest

from core_helpers import DAY, S, T0, group, plan, rid
from quotad.core.commands import (
    Commit, ExpireHolds, Release, Reserve, Track, UpsertPlan, UpsertSubscription,
)
from quotad.core.machine import Core
from quotad.core.plans import Window
from quotad.engine.recovery import durable_idempotency, recover
from quotad.storage.codec import state_digest
from quotad.storage.snapshot import snapshot_of
from quotad.storage.wal import Snapshot, WriteAheadLog

APP = "a"


class _Run:
    """A core driven as the writer drives it: each command's records made durable in their
    own transaction, then what the log answers for leaves memory."""

    def __init__(self, wal: WriteAheadLog) -> None:
        self.wal = wal
        self.core = Core()
        self.core.durable_idempotency = durable_idempotency(wal)
        self.core.durable_hold = wal.finished_hold
        self.now = T0

    def apply(self, command: object, *, advance_ns: int = S) -> object:
        self.now += advance_ns
        outcome = self.core.apply(command, self.now)
        if outcome.records:
            self.wal.append(list(outcome.records))
            self.core.forget_durable(self.core.sequence)
        return outcome


def _busy_log(wal: WriteAheadLog) -> tuple[_Run, bytes]:
    run = _Run(wal)
    run.apply(UpsertPlan(app=APP, plan=plan("p", group("tokens", 1000, Window.DAY),
                                            group("all", 10**9, Window.LIFETIME))))
    for user in ("u1", "u2"):
        run.apply(UpsertSubscription(app=APP, user_id=user, plan_id="p"))
    keyed = Reserve(app=APP, user_id="u1", event_type="chat", amount=10, ttl_ns=5 * S,
                    idempotency_key="k1", reservation_id=rid(1))
    assert run.apply(keyed).error is None
    run.apply(Reserve(app=APP, user_id="u2", event_type="chat", amount=20,
                      reservation_id=rid(2)))
    run.apply(Release(app=APP, reservation_id=rid(2), idempotency_key="l2"))
    midway = snapshot_of(run.core)
    assert not run.apply(keyed).records  # a retry: the first answer, from the log
    run.apply(ExpireHolds(), advance_ns=10 * S)  # rid(1) expires
    assert run.apply(Commit(app=APP, reservation_id=rid(1), amount=7)).error is None
    assert run.apply(Commit(app=APP, reservation_id=rid(2))).error is not None  # released
    run.apply(Release(app=APP, reservation_id=rid(2), idempotency_key="l2"))  # retry: no-op
    run.apply(Track(app=APP, user_id="u2", event_type="chat", amount=5, idempotency_key="t1"))
    assert run.apply(Track(app=APP, user_id="u2", event_type="chat", amount=6,
                           idempotency_key="t1")).error is not None  # another request
    reused = Reserve(app=APP, user_id="u1", event_type="chat", amount=3,
                     idempotency_key="k1", reservation_id=rid(3))
    assert run.apply(reused, advance_ns=DAY + S).records  # past the key's retention: anew
    assert run.apply(Commit(app=APP, reservation_id=rid(1))).error is not None  # forgotten
    run.apply(Commit(app=APP, reservation_id=rid(3), amount=3, idempotency_key="c3"))
    return run, midway


def test_replay_ends_in_the_live_state_keeping_nothing_the_log_answers_for(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    try:
        run, _ = _busy_log(wal)
        recovered = recover(wal, repair=False)
        assert recovered.sequence == run.core.sequence
        assert state_digest(recovered) == state_digest(run.core)
    finally:
        wal.close()


def test_a_restart_from_a_snapshot_taken_midway_ends_in_the_live_state(tmp_path: Path):
    wal = WriteAheadLog(tmp_path)
    try:
        run, midway = _busy_log(wal)
        sequence = int.from_bytes(midway[16:24], "big")
        wal.append([], Snapshot(sequence, midway))
        recovered = recover(wal, repair=False)
        assert state_digest(recovered) == state_digest(run.core)
    finally:
        wal.close()


def _tracked_objects_of(root: object, count_max: int) -> list[object]:
    """Up to count_max objects the collector tracks, reachable from root, breadth first."""
    found, seen, frontier = [], {id(root)}, deque([root])
    while frontier and len(found) < count_max:
        obj = frontier.popleft()
        if gc.is_tracked(obj):
            found.append(obj)
        for referent in gc.get_referents(obj):
            if id(referent) not in seen:
                seen.add(id(referent))
                frontier.append(referent)
    return found


@pytest.mark.parametrize("with_snapshot", [False, True])
@pytest.mark.parametrize("heap_frozen", [False, True])
def test_what_recovery_made_is_handed_to_the_collector_as_long_lived(
        tmp_path: Path, with_snapshot: bool, heap_frozen: bool):
    """Re-enabled as it was, the cyclic collector would walk every object recovery made at
    its next young collections (0.63 s of a restart at 1,000,000 users): they leave recovery
    out of the young generations, without a scan; frozen, in a process that froze its
    long-lived heap (as a serving server does)."""
    assert gc.isenabled()
    wal = WriteAheadLog(tmp_path)
    thresholds = gc.get_threshold()
    gc.set_threshold(10**9, 10**9, 10**9)  # no collection moves anything while this looks
    try:
        run, midway = _busy_log(wal)
        if with_snapshot:
            wal.append([], Snapshot(int.from_bytes(midway[16:24], "big"), midway))
        if heap_frozen:
            gc.freeze()
        recovered = recover(wal, repair=False)
        assert gc.isenabled()
        generation_of = {id(obj): generation for generation in (0, 1, 2)
                         for obj in gc.get_objects(generation)}
        made = _tracked_objects_of(recovered, 200)
        assert len(made) >= 20
        where = {generation_of.get(id(obj), "frozen") for obj in made}
        assert where == {"frozen"} if heap_frozen else where <= {2, "frozen"}, where
    finally:
        if heap_frozen:
            gc.unfreeze()
        gc.set_threshold(*thresholds)
        wal.close()
