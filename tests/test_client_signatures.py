"""The sync and asyncio clients are one API: every public method of QuotaClient (and of its
Hold) has a twin on AsyncQuotaClient (AsyncHold) taking the same parameters (names, kinds,
defaults), awaited where the sync one blocks. The intended differences are listed here, each
with its reason; anything else that differs fails."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import quotad_client as qc

ASYNC_ONLY_PARAMETERS = {
    (qc.AsyncQuotaClient, "__init__", "coalesce"):
        "only the asyncio client gathers concurrent calls into Batch RPCs; a sync call blocks "
        "its thread, so there is nothing to gather",
}
NOT_A_COROUTINE = {
    "reserve": "returns a PendingReserve, so that `async with client.reserve(...)` works "
               "without an await; awaiting it gives the AsyncHold",
}
SENDS_NOTHING = {
    "counter": "reads the counters the hold already has",
    "set_actual": "records what to commit on leaving the hold; nothing is sent until then",
}
RETURNS = {
    "reserve": ("Hold", "PendingReserve"),  # see NOT_A_COROUTINE
}
TWINS = [(qc.QuotaClient, qc.AsyncQuotaClient), (qc.Hold, qc.AsyncHold)]


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def _methods(cls: type) -> list[str]:
    return sorted(name for name in _public(cls) if inspect.isfunction(getattr(cls, name)))


def _parameters(cls: type, method: str) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default)
            for p in inspect.signature(getattr(cls, method)).parameters.values()
            if (cls, method, p.name) not in ASYNC_ONLY_PARAMETERS]


CASES = [(sync, twin, method) for sync, twin in TWINS for method in [*_methods(sync), "__init__"]
         if method != "__init__" or sync is qc.QuotaClient]


@pytest.mark.parametrize(("sync", "twin"), TWINS, ids=lambda cls: cls.__name__)
def test_both_have_the_same_public_names(sync: type, twin: type):
    assert _public(sync) == _public(twin)


@pytest.mark.parametrize(("sync", "twin", "method"), CASES,
                         ids=lambda value: getattr(value, "__name__", value))
def test_each_twin_takes_the_same_parameters(sync: type, twin: type, method: str):
    assert _parameters(twin, method) == _parameters(sync, method)


@pytest.mark.parametrize(("sync", "twin", "method"),
                         [case for case in CASES if case[2] != "__init__"],
                         ids=lambda value: getattr(value, "__name__", value))
def test_each_twin_is_awaited_where_the_sync_one_blocks(sync: type, twin: type, method: str):
    blocking, awaited = getattr(sync, method), getattr(twin, method)
    if method in NOT_A_COROUTINE or method in SENDS_NOTHING:
        assert not inspect.iscoroutinefunction(awaited)
    elif inspect.isgeneratorfunction(blocking):
        assert inspect.isasyncgenfunction(awaited)
    else:
        assert inspect.iscoroutinefunction(awaited)
    returned = (inspect.signature(blocking).return_annotation,
                inspect.signature(awaited).return_annotation)
    expected = RETURNS.get(method, (returned[0], returned[0].replace("Iterator[",
                                                                     "AsyncIterator[")))
    assert returned == expected


def test_both_clients_are_context_managers_of_their_kind():
    assert _parameters(qc.QuotaClient, "__exit__") == _parameters(qc.AsyncQuotaClient,
                                                                   "__aexit__")
    assert inspect.iscoroutinefunction(qc.AsyncQuotaClient.__aenter__)
    assert inspect.iscoroutinefunction(qc.AsyncQuotaClient.__aexit__)


def test_each_listed_difference_is_still_there():
    for (cls, method, name), _reason in ASYNC_ONLY_PARAMETERS.items():
        assert name in inspect.signature(getattr(cls, method)).parameters
    assert set(NOT_A_COROUTINE) | set(SENDS_NOTHING) <= _public(qc.AsyncQuotaClient) | _public(
        qc.AsyncHold)
