"""A snapshot holds the whole core: restoring it, then applying the same commands, gives the
same records and the same state as never having stopped."""

from __future__ import annotations

import json

from core_helpers import Harness, digest, group, plan
from quotad.core import limits
from quotad.storage.codec import state_digest
from quotad.core.plans import Window
from quotad.storage.snapshot import core_from_plain, core_to_plain

S = limits.NS_PER_S


def _busy_harness() -> Harness:
    h = Harness()
    h.setup(plan("p", group("tokens", 1000, Window.DAY, ["openai.*"]),
                 group("premium", 100, Window.MONTH, metadata={"model": ["gpt-4o"]})),
            "alice", time_zone="Europe/Paris")
    h.subscribe("bob", "p", time_zone="Asia/Kolkata")
    live = h.reserve("alice", 80, metadata={"model": "gpt-4o"}, key="k-live", ttl_ns=600 * S)
    assert live.allowed
    committed = h.reserve("alice", 50)
    h.commit(committed.reservation_id, 70, key="k-commit")
    released = h.reserve("bob", 20)
    h.release(released.reservation_id)
    h.reserve("bob", 10, ttl_ns=1 * S)
    h.advance(2 * S)
    h.expire()
    h.track("bob", 5, enforce=True, key="k-track")
    h.reserve("alice", 5000, key="k-denied")  # denied, remembered under its key
    h.extend(live.reservation_id, 900 * S)
    return h


def _restored(h: Harness):
    plain = json.loads(json.dumps(core_to_plain(h.core)))  # as stored: through JSON
    return core_from_plain(plain)


def test_a_restored_snapshot_equals_the_state_it_was_taken_from():
    h = _busy_harness()
    restored = _restored(h)
    assert digest(restored) == digest(h.core)
    assert state_digest(restored) == state_digest(h.core)


def test_a_restored_core_makes_the_same_records_as_the_original_from_then_on():
    h = _busy_harness()
    restored = _restored(h)
    follow_up = [
        h.reserve_command("alice", 80, "openai.chat", {"model": "gpt-4o"}, key="k-live",
                          ttl_ns=600 * S),
        h.track_command("bob", -3),
        h.reserve_command("bob", 7, ttl_ns=1 * S),
    ]
    for command in follow_up:
        h.advance(1 * S)
        original = h.core.apply(command, h.now)
        again = restored.apply(command, h.now)
        assert (original.result, original.error, original.records) == (
            again.result, again.error, again.records)
    h.advance(limits.RESERVATION_RETENTION_NS + 10 * S)  # past every expiry and the holds' retention
    final = h.reserve_command("alice", 1)
    assert h.core.apply(final, h.now).records == restored.apply(final, h.now).records
    assert digest(restored) == digest(h.core)
