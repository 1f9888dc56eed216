"""`value_type` builds the same immutable values a frozen, slotted dataclass does, as msgspec
Structs built in C: the same fields, defaults, validation, equality, hash, repr, replace,
pickle, and assigning a field still fails."""

from __future__ import annotations

import dataclasses
import gc
import pickle
import sys
import threading

import pytest

from quotad.core import commands, machine
from quotad.core.errors import InvalidArgument
from quotad.core.values import is_value_type, replace, value_fields, value_type


@value_type(kw_only=True)
class Keyed:
    name: str
    amount: int = 1
    tags: tuple[str, ...] = ()
    hidden: int = dataclasses.field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.amount < 0:
            raise ValueError("amount")


@value_type
class Positional:
    sequence: int
    now_ns: int
    note: str = "-"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class KeyedReference:
    name: str
    amount: int = 1
    tags: tuple[str, ...] = ()
    hidden: int = dataclasses.field(default=0, compare=False)


def test_a_value_is_built_compared_hashed_and_printed_as_a_frozen_dataclass_would_be():
    value = Keyed(name="a", tags=("x",), hidden=4)
    reference = KeyedReference(name="a", tags=("x",), hidden=4)
    assert value_fields(Keyed) == tuple(f.name for f in dataclasses.fields(reference))
    assert [getattr(value, name) for name in value_fields(Keyed)] == list(
        dataclasses.astuple(reference))
    assert repr(value).removeprefix("Keyed") == repr(reference).removeprefix("KeyedReference")
    assert value == Keyed(name="a", tags=("x",), hidden=5)  # compare=False kept
    assert hash(value) == hash(Keyed(name="a", tags=("x",)))
    assert Positional(1, 2) == Positional(1, 2, "-") != Positional(1, 2, "+")
    assert replace(value, amount=3) == Keyed(name="a", amount=3, tags=("x",))
    assert pickle.loads(pickle.dumps(value)) == value
    assert not gc.is_tracked(value)  # values refer to values: no cycles for the collector
    with pytest.raises(TypeError):
        Keyed("a")  # keyword-only stays keyword-only
    with pytest.raises(TypeError):
        Keyed(amount=2)  # a field without a default is required


def test_a_value_stays_immutable_and_validated():
    value = Keyed(name="a")
    with pytest.raises(AttributeError):  # as a frozen dataclass's FrozenInstanceError is
        value.amount = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del value.name  # type: ignore[misc]
    with pytest.raises(ValueError, match="amount"):
        Keyed(name="a", amount=-1)
    with pytest.raises(ValueError, match="amount"):
        replace(value, amount=-1)


def test_the_core_values_keep_their_defaults_and_validation():
    """Each frozen value of the core whose fields all have defaults builds with them, and a
    command still validates itself."""
    checked = 0
    for module in (commands, machine):
        for cls in vars(module).values():
            if not (is_value_type(cls) and cls.__module__ == module.__name__):
                continue
            names = value_fields(cls)
            if names and len(cls.__struct_defaults__) == len(names):
                built = cls()
                assert [getattr(built, name) for name in names] == list(
                    cls.__struct_defaults__)
            checked += 1
    assert checked > 40
    reserve = commands.Reserve(app="a", user_id="u", event_type="e", amount=5,
                               reservation_id="rsv_" + "00" * 12)
    assert (reserve.metadata, reserve.ttl_ns, reserve.idempotency_key) == ((), 60 * 10**9, "")
    with pytest.raises(Exception, match="amount"):
        commands.Reserve(app="a", user_id="u", event_type="e", amount=0,
                         reservation_id="rsv_" + "00" * 12)


def test_a_hold_copy_keeps_every_field_and_is_its_own_object() -> None:
    """Every field here differs from its default, so a copy that left one out would show."""
    from quotad.core.holds import HoldState
    from quotad.core.plans import Window

    hold = machine.Reservation(
        app="a", reservation_id="rsv_" + "1" * 24, user_id="u", event_type="e", amount=5,
        metadata=(("k", "v"),), holds=(machine.HoldRef("g", Window.DAY, 7, 2),), sequence=3,
        created_at_ns=11, expires_at_ns=13, status=HoldState.COMMITTED, finished_at_ns=12)
    copy = hold.copy()
    assert copy == hold and copy is not hold
    names = value_fields(machine.Reservation)
    assert [getattr(copy, name) for name in names] == [getattr(hold, name) for name in names]
    copy.status = HoldState.RELEASED
    assert hold.status is HoldState.COMMITTED
    assert not gc.is_tracked(hold) and not gc.is_tracked(copy)
    with pytest.raises(TypeError):
        hash(hold)  # changes in place: no hash


def test_a_users_state_has_its_own_counters_and_costs_the_collector_nothing() -> None:
    """A user's state and its counters change in place, each user with counters of its own
    (a tuple; the layout placing them is shared and never changed), none of them tracked by
    the cyclic collector, and a counter replaced keeps every field it is not given."""
    from quotad.core.balances import Balance
    from quotad.core.plans import Subscription, Window

    subscription = Subscription(user_id="u", plan_id="p")
    assert subscription == Subscription("u", "p", "UTC", "")  # the order the snapshot builds
    first, second = machine.UserState(subscription, 1), machine.UserState(subscription, 2)
    counter = machine.CounterState(7, 11, used=3, held=2, threshold_percent_fired=50,
                                   refilled_at_ns=5, refill_carry=1, balance=Balance())
    machine.file_counter(first, "g", Window.DAY, counter)
    first.live_holds += 1
    assert second.counters == () and second.layout == {} and second.live_holds == 0
    counter.held -= 2
    assert first.counter("g", Window.DAY).held == 0
    renewed = replace(counter, used=4)
    names = value_fields(machine.CounterState)
    assert [getattr(renewed, name) for name in names] == [7, 11, 4, 0, 50, 5, 1, counter.balance]
    assert not any(map(gc.is_tracked, (subscription, first, second, counter, renewed)))
    with pytest.raises(TypeError):
        hash(first)
    balance = counter.balance
    assert balance is not None
    grant = balance.add("g1", 100, 0, None, 0)
    copied = balance.copy()  # a move or a renewal changes the copy alone
    copied.grants[0].consumed = 40
    assert copied != balance and grant.remaining == 100 and copied.grants[0].remaining == 60
    assert not any(map(gc.is_tracked, (balance, grant, copied)))


def test_unchecked_builds_the_same_value_without_the_checks() -> None:
    fields = dict(app="a", user_id="u", event_type="e", amount=5, metadata=(("k", "v"),),
                  ttl_ns=60 * 10**9, idempotency_key="key", reservation_id="rsv_" + "0" * 24)
    checked, unchecked = commands.Reserve(**fields), commands.Reserve.unchecked(**fields)
    assert unchecked == checked and type(unchecked) is commands.Reserve
    assert hash(unchecked) == hash(checked)
    with pytest.raises(AttributeError):
        unchecked.amount = 6  # type: ignore[misc]
    assert commands.Commit.unchecked(app="a", reservation_id="rsv_" + "0" * 24) == \
        commands.Commit(app="a", reservation_id="rsv_" + "0" * 24)  # defaults kept
    with pytest.raises(InvalidArgument):  # the checked constructor still checks
        commands.Reserve(**{**fields, "amount": 0})
    assert commands.Reserve.unchecked(**{**fields, "amount": 0}).amount == 0  # this one not
    assert not hasattr(commands.CounterView, "unchecked")  # no checks, nothing to skip


def test_unchecked_skips_the_checks_of_its_own_thread_only() -> None:
    """The checks are skipped by a flag of the thread that builds unchecked: checked values
    built meanwhile on another thread are all still checked, and the flag is back once
    built, or once building failed."""
    fields = dict(app="a", reservation_id="rsv_" + "0" * 24)
    rounds = 20_000
    passed: list[int] = []

    def checked_elsewhere() -> None:
        slipped = 0
        for _ in range(rounds):
            try:
                commands.Commit(app="a", reservation_id="bad")
                slipped += 1
            except InvalidArgument:
                pass
        passed.append(slipped)

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns as often as they can
    try:
        thread = threading.Thread(target=checked_elsewhere)
        thread.start()
        while thread.is_alive():
            commands.Commit.unchecked(app="a", reservation_id="bad")
        thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert passed == [0]
    with pytest.raises(TypeError):
        commands.Commit.unchecked(**fields, unknown=1)  # fails while building
    with pytest.raises(InvalidArgument):
        commands.Commit(app="a", reservation_id="bad")  # checked again
