"""Responses filled in place carry exactly what the results say: the remembered encodings of
counters' unchanging parts give the same messages as filling every field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotad.api import convert
from quotad.core import commands as c
from quotad.core import limits
from quotad.core.plans import Kind, Window
from quotad_contract.v1 import quotad_pb2 as pb

S = limits.NS_PER_S

texts = st.text(max_size=12)
amounts = st.integers(0, limits.COUNTER_MAX)
times_ns = st.integers(0, limits.TIME_NS_MAX)


@st.composite
def counter_views(draw) -> c.CounterView:
    kind = draw(st.sampled_from(Kind))
    return c.CounterView(
        key=draw(st.sampled_from(["tokens", "images", ""])), label=draw(texts),
        unit=draw(texts), window=draw(st.sampled_from(Window)),
        quota=draw(st.sampled_from([0, 1, 10**6, limits.COUNTER_MAX])), used=draw(amounts),
        held=draw(amounts), remaining=draw(amounts),
        window_start_ns=draw(st.one_of(times_ns, st.integers(0, 10**9).map(lambda s: s * S))),
        resets_at_ns=draw(st.none() | times_ns), kind=kind,
        full_at_ns=draw(st.none() | times_ns) if kind is Kind.RATE else None)


def filled(view: c.CounterView) -> pb.Counter:
    message = pb.Counter()
    convert._fill_counter(message, view)
    return message


def every_field(view: c.CounterView) -> pb.Counter:
    message = pb.Counter()
    convert._fill_counter_fields(message, view)
    return message


@settings(max_examples=300, deadline=None)
@given(st.lists(counter_views(), min_size=1, max_size=6))
def test_a_counter_filled_from_its_remembered_head_is_the_counter_filled_field_by_field(views):
    for view in views + views:  # the second time from what the first remembered
        assert filled(view).SerializeToString() == every_field(view).SerializeToString()


def test_the_remembered_heads_stay_within_their_limit_and_answer_right_after_forgetting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "COUNTER_HEADS_REMEMBERED_MAX", 2)
    monkeypatch.setattr(convert, "_counter_heads", {})
    views = [c.CounterView(key=f"group-{n}", label="Tokens", unit="tokens", window=Window.MONTH,
                           quota=1000, used=n, held=1, remaining=999 - n,
                           window_start_ns=n * S, resets_at_ns=(n + 30) * S)
             for n in range(5)]
    for view in views + views[::-1]:
        assert filled(view) == every_field(view)
        assert len(convert._counter_heads) <= 2
    assert filled(views[0]).key == "group-0" and filled(views[4]).used == 4


def test_a_counter_at_its_extreme_is_answered_with_the_largest_overage_int64_holds() -> None:
    """used and held each at COUNTER_MAX over a soft quota of 0: their sum is one past int64,
    so overage is reported as OVERAGE_MAX, and a change past COUNTER_MAX is refused."""
    from quotad.core.errors import ResourceExhausted
    from quotad.core.machine import Core
    from quotad.core.plans import LimitGroup, Plan

    core, now_ns = Core(), 1_800_000_000 * S

    def apply(command: object) -> object:
        nonlocal now_ns
        now_ns += 1
        return core.apply(command, now_ns)

    apply(c.UpsertPlan(app="a", plan=Plan(id="p", limit_groups=(LimitGroup(
        key="tokens", quota=0, window=Window.LIFETIME, enforce=False),))))
    apply(c.UpsertSubscription(app="a", user_id="u", plan_id="p"))
    steps = limits.COUNTER_MAX // limits.AMOUNT_MAX
    assert steps * limits.AMOUNT_MAX == limits.COUNTER_MAX
    for step in range(steps):
        assert apply(c.Track(app="a", user_id="u", event_type="e",
                             amount=limits.AMOUNT_MAX)).error is None
        assert apply(c.Reserve(app="a", user_id="u", event_type="e", amount=limits.AMOUNT_MAX,
                               ttl_ns=limits.TTL_NS_MAX,
                               reservation_id=convert.new_reservation_id(0))).result.allowed
    usage = core.usage("a", "u", now_ns)
    (view,) = usage.counters
    assert (view.used, view.held, view.quota) == (limits.COUNTER_MAX, limits.COUNTER_MAX, 0)
    assert view.overage == limits.OVERAGE_MAX == 2**63 - 1
    message = pb.GetUsageResponse()
    convert.fill_usage_response(message, usage)
    assert message.counters[0].overage == limits.OVERAGE_MAX
    assert filled(view).SerializeToString() == every_field(view).SerializeToString()
    refused = apply(c.Track(app="a", user_id="u", event_type="e", amount=1)).error
    assert isinstance(refused, ResourceExhausted)
    assert core.usage("a", "u", now_ns).counters == usage.counters  # nothing changed
