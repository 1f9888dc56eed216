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


def encoded_or_refused(fill, view: c.CounterView) -> bytes | type:
    """The filled counter's bytes, or the error filling it raised (an overage past int64:
    used and held each at COUNTER_MAX over a quota of 0)."""
    try:
        return fill(view).SerializeToString()
    except ValueError as error:
        return type(error)


@settings(max_examples=300, deadline=None)
@given(st.lists(counter_views(), min_size=1, max_size=6))
def test_a_counter_filled_from_its_remembered_head_is_the_counter_filled_field_by_field(views):
    for view in views + views:  # the second time from what the first remembered
        assert encoded_or_refused(filled, view) == encoded_or_refused(every_field, view)


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
