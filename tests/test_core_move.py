"""Moving slots in the pure core: freeze, export, adopt (through a record), forget.

Two real Cores with a fake clock stand for a move's source and target. The users of the moved
slots must be on the target exactly as they were on the source (counters, live holds with
their absolute expiry, finished holds, idempotency entries), through the log record that
adopts them (encoded and decoded as the log stores it), and a replay of either shard's
records must rebuild its state exactly.
"""

from __future__ import annotations

import pytest

from core_helpers import APP, HOUR, MINUTE, S, Harness, digest, group, plan, replay_all
from quotad.core import limits
from quotad.core.commands import (
    AdoptSlots, Commit, ForgetSlots, FreezeSlots, GetUsage, MovedKey, Reserve, ThawSlots, Track,
)
from quotad.core.errors import InvalidArgument, NotFound, SlotsMoving
from quotad.core.holds import HoldState
from quotad.core.machine import Core
from quotad.core.plans import Window
from quotad.storage.codec import (
    decode_finished_hold, decode_record, decode_slot_state, encode_finished_hold, encode_record,
    encode_slot_state, record_key, reservation_bytes, to_plain,
)
from quotad.storage.snapshot import core_from_snapshot, core_with_delta, snapshot_of
from quotad_contract.errors import ErrorReason
from quotad_contract.shards import slot_of

PLAN = plan("pro", group("tokens", 1_000, Window.DAY), group("calls", 50, Window.HOUR))


def users_in_slots(count: int, outside: int) -> tuple[list[str], list[str], frozenset[int]]:
    """`count` users whose slots are the moved ones, `outside` users of other slots."""
    names = [f"user-{n}" for n in range(count + outside)]
    moved = names[:count]
    slots = frozenset(slot_of(APP, name) for name in moved)
    stay = [name for name in names[count:] if slot_of(APP, name) not in slots]
    return moved, stay, slots


def hold_id(user: str, n: int) -> str:
    """A reservation id carrying its user's slot, as the server makes them."""
    return f"rsv_{slot_of(APP, user):03x}{n:021x}"


def user_state(core: Core, users: list[str]) -> object:
    """Everything the core keeps of these users, in plain form (numbers aside: a shard gives
    its own)."""
    app = core.apps[APP]
    return to_plain({
        "users": {u: (app.users[u].subscription, sorted(app.users[u].counter_items()),
                      app.users[u].live_holds) for u in users},
        "holds": {r.reservation_id: (r.user_id, r.amount, r.holds, r.expires_at_ns, r.status,
                                     r.finished_at_ns, r.created_at_ns)
                  for r in app.reservations.values() if r.user_id in users},
        "expiry": [(at, rid) for at, _, _, rid in core.expiry
                   if app.reservations[rid].user_id in users],
    })


def logged(record):
    """A record as the log gives it back."""
    key = record_key(record.sequence)
    return decode_record(key, encode_record(record))


def make_source(moved: list[str], stay: list[str]) -> Harness:
    source = Harness().setup(PLAN, *moved, *stay)
    for n, user in enumerate(moved + stay):
        source.track(user, 10 + n, key=f"track-{user}")
        live = source.reserve(user, 5, ttl_ns=10 * MINUTE, reservation_id=hold_id(user, 1),
                              key=f"reserve-{user}")
        assert live.allowed
        done = source.reserve(user, 7, reservation_id=hold_id(user, 2))
        source.commit(done.reservation_id, 3, key=f"commit-{user}")
        source.advance(S)
    return source


def move(source: Harness, target: Harness, slots: frozenset[int]) -> None:
    """Freeze on the source, export, adopt on the target in chunks of 3 items through the
    log's encoding, forget on the source."""
    assert source.run(FreezeSlots(slots=tuple(sorted(slots)))).slots == len(slots)
    users, holds, keys = source.core.export_slots(slots, source.now)
    assert users and holds and keys
    items = [("u", u) for u in users] + [("h", h) for h in holds] + [("k", k) for k in keys]
    for start in range(0, len(items), 3):
        part = items[start:start + 3]
        chunk = encode_slot_state(*([i for t, i in part if t == kind] for kind in "uhk"))
        u, h, k = decode_slot_state(chunk)
        outcome = target.apply(AdoptSlots(slots=tuple(sorted(slots)), first=start == 0,
                                          users=u, holds=h, keys=k))
        assert outcome.error is None, outcome.error
        (record,) = outcome.records
        assert logged(record) == record  # the log gives back exactly what was adopted
    source.run(ForgetSlots(slots=tuple(sorted(slots))))


def test_a_moved_slot_set_is_on_the_target_as_it_was_on_the_source_and_gone_from_it():
    moved, stay, slots = users_in_slots(4, 6)
    source = make_source(moved, stay)
    target = Harness(now=source.now).setup(PLAN)
    before = user_state(source.core, moved)
    usage_before = {u: source.usage(u) for u in moved}
    stay_before = user_state(source.core, stay)

    move(source, target, slots)

    assert user_state(target.core, moved) == before
    assert {u: target.usage(u) for u in moved} == usage_before
    assert user_state(source.core, stay) == stay_before  # the others are untouched
    assert not any(u in source.core.apps[APP].users for u in moved)
    assert not any(r.user_id in moved for r in source.core.apps[APP].reservations.values())
    assert source.core.frozen_slots == set() and target.core.incoming_slots == slots
    # replay rebuilds each shard exactly, and so does a snapshot of each
    for shard in (source, target):
        assert replay_all(logged(r) for r in shard.records).apps == shard.core.apps
        restored = core_from_snapshot(snapshot_of(shard.core))
        assert user_state(restored, moved if shard is target else []) == user_state(
            shard.core, moved if shard is target else [])
        assert restored.incoming_slots == shard.core.incoming_slots
        assert restored.apps[APP].departed == shard.core.apps[APP].departed


def test_a_delta_snapshot_of_each_shard_after_a_move_is_its_state():
    """Whole snapshots of both shards before the move, deltas after it: the target's holds
    the users it adopted, the source's names those it dropped, and each, read over its whole
    snapshot, is the shard's state (the users that stayed on the source, untouched, are
    in the whole one only)."""
    moved, stay, slots = users_in_slots(4, 6)
    source = make_source(moved, stay)
    source.release(hold_id(moved[0], 1))  # a user that moves with no live hold
    target = Harness(now=source.now).setup(PLAN)
    wholes = {}
    for shard in (source, target):
        wholes[id(shard)] = (shard.core.sequence, snapshot_of(shard.core))
        shard.core.clear_users_changed()

    move(source, target, slots)

    assert source.core.users_changed[APP] == set(moved)
    assert target.core.users_changed[APP] == set(moved)
    for shard in (source, target):
        sequence, whole = wholes[id(shard)]
        restored = core_with_delta(core_from_snapshot(whole), snapshot_of(shard.core, sequence))
        assert digest(restored) == digest(shard.core)
        assert restored.frozen_slots == shard.core.frozen_slots
        assert restored.incoming_slots == shard.core.incoming_slots
        assert restored.apps[APP].departed == shard.core.apps[APP].departed


def test_the_source_still_names_the_users_it_moved_away_in_its_usage_export():
    """Their audit events from before the move stay in the source's log, which names users
    by number: an export there must still give each line its user id."""
    moved, stay, slots = users_in_slots(3, 2)
    source = make_source(moved, stay)
    numbers = {source.core.apps[APP].users[u].number: source.core.apps[APP].users[u].subscription
               for u in moved + stay}
    target = Harness(now=source.now).setup(PLAN)
    move(source, target, slots)
    assert source.core.subscriptions_by_number(APP) == numbers
    assert {n: s.user_id for n, s in source.core.apps[APP].departed.items()} == {
        n: s.user_id for n, s in numbers.items() if s.user_id in moved}
    assert replay_all(logged(r) for r in source.records).apps[APP].departed == (
        source.core.apps[APP].departed)
    # a state digests as before the moves existed until a user moves away
    assert "departed" in to_plain(source.core.apps[APP])
    assert "departed" not in to_plain(target.core.apps[APP])


def test_after_a_move_a_hold_commits_on_the_target_and_keys_get_their_first_answers():
    moved, stay, slots = users_in_slots(2, 0)
    source = make_source(moved, stay)
    user = moved[0]
    first_reserve = source.reserve(user, 5, ttl_ns=10 * MINUTE, reservation_id=hold_id(user, 1),
                                   key=f"reserve-{user}")
    first_track = source.track(user, 10, key=f"track-{user}")
    target = Harness(now=source.now).setup(PLAN)
    move(source, target, slots)

    # the same keys, the same requests: the first answers, nothing counted again
    assert target.reserve(user, 5, ttl_ns=10 * MINUTE, reservation_id=hold_id(user, 99),
                          key=f"reserve-{user}") == first_reserve
    assert target.track(user, 10, key=f"track-{user}") == first_track
    used = target.counter(user, "tokens").used
    result = target.commit(hold_id(user, 1), 4)  # the hold taken on the source
    assert result.committed == 4 and result.returned == 1
    assert target.counter(user, "tokens").used == used + 4
    assert target.counter(user, "tokens").held == 0
    # a finished hold moved too: committing it again is refused as on the source
    with pytest.raises(Exception) as refused:
        target.commit(hold_id(user, 2))
    assert getattr(refused.value, "reason", None) == ErrorReason.RESERVATION_COMMITTED


def test_a_moved_live_hold_expires_on_the_target_at_its_absolute_time():
    moved, _, slots = users_in_slots(1, 0)
    source = make_source(moved, [])
    user = moved[0]
    expires_at_ns = source.core.apps[APP].reservations[hold_id(user, 1)].expires_at_ns
    target = Harness(now=source.now).setup(PLAN)
    move(source, target, slots)
    target.at(expires_at_ns - 1)
    target.expire()
    assert target.counter(user, "tokens").held == 5
    target.at(expires_at_ns)
    target.expire()
    assert target.counter(user, "tokens").held == 0


def test_frozen_slots_refuse_their_users_calls_having_done_nothing_and_stay_frozen_on_replay():
    moved, stay, slots = users_in_slots(1, 3)
    source = make_source(moved, stay)
    user = moved[0]
    source.run(FreezeSlots(slots=tuple(sorted(slots))))
    before = user_state(source.core, moved)
    for command in (Reserve(app=APP, user_id=user, event_type="e", amount=1, ttl_ns=HOUR,
                            reservation_id=hold_id(user, 50)),
                    Track(app=APP, user_id=user, event_type="e", amount=1),
                    Commit(app=APP, reservation_id=hold_id(user, 1), amount=None),
                    GetUsage(app=APP, user_id=user)):
        outcome = source.apply(command)
        assert isinstance(outcome.error, SlotsMoving), command
        assert outcome.error.code == "UNAVAILABLE"
        assert outcome.error.reason == ErrorReason.SLOTS_MOVING
    assert user_state(source.core, moved) == before
    assert source.track(stay[0], 1).allowed  # other slots serve
    # freezing again changes nothing and makes no record
    assert source.apply(FreezeSlots(slots=tuple(sorted(slots)))).records == ()
    assert replay_all(logged(r) for r in source.records).frozen_slots == slots
    assert core_from_snapshot(snapshot_of(source.core)).frozen_slots == slots
    source.run(ThawSlots(slots=tuple(sorted(slots))))
    assert source.track(user, 1).allowed


def test_a_move_run_again_from_its_first_chunk_ends_as_one_run_once():
    moved, _, slots = users_in_slots(3, 0)
    source = make_source(moved, [])
    source.run(FreezeSlots(slots=tuple(sorted(slots))))
    users, holds, keys = source.core.export_slots(slots, source.now)
    once = Harness(now=source.now).setup(PLAN)
    twice = Harness(now=source.now).setup(PLAN)
    adopt = AdoptSlots(slots=tuple(sorted(slots)), first=True, users=tuple(users),
                       holds=tuple(holds), keys=tuple(keys))
    once.run(adopt)
    twice.run(AdoptSlots(slots=adopt.slots, first=True, users=adopt.users[:1]))
    twice.run(adopt)  # a crashed move, run again
    assert user_state(twice.core, moved) == user_state(once.core, moved)
    assert user_state(once.core, moved) == user_state(source.core, moved)


def test_bad_moves_are_refused_with_nothing_changed():
    moved, _, slots = users_in_slots(2, 0)
    source = make_source(moved, [])
    with pytest.raises(InvalidArgument):  # not frozen: nothing may be read
        source.core.export_slots(slots, source.now)
    for bad in ((), (4096,), (5, 3), (3, 3), (-1,)):
        with pytest.raises(InvalidArgument):
            FreezeSlots(slots=bad)
    source.run(FreezeSlots(slots=tuple(sorted(slots))))
    users, holds, keys = source.core.export_slots(slots, source.now)
    target = Harness(now=source.now)  # no plan "pro" here
    before = target.digest()
    outcome = target.apply(AdoptSlots(slots=tuple(sorted(slots)), first=True,
                                      users=tuple(users), holds=tuple(holds)))
    assert isinstance(outcome.error, NotFound) and outcome.records == ()
    assert target.digest() == before
    target.upsert_plan(PLAN)
    before = target.digest()
    other = next(slot for slot in range(4096) if slot not in slots)
    for bad in (AdoptSlots(slots=tuple(sorted(slots)), first=False, users=tuple(users)),
                AdoptSlots(slots=(other,), first=True, users=tuple(users)),
                AdoptSlots(slots=tuple(sorted(slots)), first=True, holds=tuple(holds))):
        outcome = target.apply(bad)
        assert isinstance(outcome.error, InvalidArgument), bad
        assert outcome.records == ()
    assert target.digest() == before and not target.core.incoming_slots
    # the source refuses to adopt slots it is moving away
    outcome = source.apply(AdoptSlots(slots=tuple(sorted(slots)), first=True))
    assert isinstance(outcome.error, InvalidArgument)
    with pytest.raises(ValueError):
        decode_slot_state(b'[["user", "app"]]')


def test_a_moved_hold_finished_on_the_target_is_stored_whole_in_its_holds_table():
    """It has no Reserve record in the target's log to be read back with."""
    moved, _, slots = users_in_slots(1, 0)
    source = make_source(moved, [])
    target = Harness(now=source.now).setup(PLAN)
    move(source, target, slots)
    user = moved[0]
    target.commit(hold_id(user, 1), 2)
    finished = target.core.apps[APP].reservations[hold_id(user, 1)]
    assert finished.sequence == 0 and finished.status is HoldState.COMMITTED
    row = encode_finished_hold(finished, target.core.sequence, 0, target.now)

    def no_record(sequence):
        raise AssertionError(f"record {sequence} read: the row was not whole")
    assert decode_finished_hold(reservation_bytes(finished.reservation_id), row,
                                target.core.sequence, no_record, no_record) == finished


def test_a_chunk_holds_at_most_move_chunk_items_max_users_holds_and_keys():
    moved, _, slots = users_in_slots(1, 0)
    source = make_source(moved, [])
    source.run(FreezeSlots(slots=tuple(sorted(slots))))
    key = source.core.export_slots(slots, source.now)[2][0]
    many = tuple(MovedKey(app=key.app, rpc=key.rpc, key=f"k{n}", request=key.request,
                          result=key.result, created_at_ns=key.created_at_ns, slot=key.slot)
                 for n in range(limits.MOVE_CHUNK_ITEMS_MAX + 1))
    full = AdoptSlots(slots=tuple(sorted(slots)), first=True,
                      keys=many[:limits.MOVE_CHUNK_ITEMS_MAX])
    target = Harness(now=source.now).setup(PLAN)
    assert target.run(full).keys == limits.MOVE_CHUNK_ITEMS_MAX
    with pytest.raises(InvalidArgument) as refused:
        AdoptSlots(slots=tuple(sorted(slots)), first=True, keys=many)
    assert {v.field for v in refused.value.violations} == {"state"}
