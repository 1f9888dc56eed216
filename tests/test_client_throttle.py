"""The client's adaptive throttle: alone with a fake clock, then in the clients against a real
server that serves and a real port where nothing does."""

from __future__ import annotations

import random
import socket

import grpc
import pytest

import quotad_client as qc
from quotad_client._throttle import (
    BUCKETS, K, REQUESTS_MIN, THROTTLED, WINDOW_S, AdaptiveThrottle, throttled,
)
from quotad_contract.errors import ErrorReason


SHED = qc.ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "shed", ErrorReason.OVERLOADED)


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def make(clock: Clock, seed: int = 1) -> AdaptiveThrottle:
    return AdaptiveThrottle(rng=random.Random(seed), clock=clock)


def test_a_burst_sent_together_is_not_refused_for_having_no_answers_yet():
    throttle = make(Clock())
    assert not any(throttle.refuse() for _ in range(1000))
    for _ in range(1000):
        throttle.accepted()
    assert throttle.refusal_probability() == 0


def test_a_server_that_takes_everything_is_never_throttled():
    clock = Clock()
    throttle = make(clock)
    for _ in range(10_000):
        assert not throttle.refuse()
        throttle.accepted()
        clock.now_s += 0.001
    assert throttle.refused == 0 and throttle.refusal_probability() == 0


def test_an_overloaded_server_is_sent_about_k_times_what_it_takes():
    """Offered 20 attempts per 10 ms, a server that takes 5 of them: the client settles on
    sending about K x 5 and refuses the rest itself, where it would send all 20."""
    clock = Clock()
    throttle = make(clock)
    sent = accepted = 0
    for _ in range(2_000):  # 20 s
        clock.now_s += 0.01
        taken = 0
        for _ in range(20):
            if throttle.refuse():
                continue
            sent += 1
            if taken < 5:
                taken += 1
                throttle.accepted()
                accepted += 1
            else:
                throttle.failed(SHED)
    assert accepted >= 0.99 * 5 * 2_000  # the server stays busy: the throttle hardly starves it
    assert 0.4 < throttle.refused / 40_000 < 0.6
    assert K * accepted * 0.8 < sent < K * accepted * 1.2


def test_the_window_forgets_old_refusals():
    clock = Clock()
    throttle = make(clock)
    for _ in range(100):  # nothing accepted
        if not throttle.refuse():
            throttle.failed(qc.Unavailable(grpc.StatusCode.UNAVAILABLE, "down"))
    assert throttle.refusal_probability() > 0.9
    clock.now_s += WINDOW_S + WINDOW_S / BUCKETS
    assert throttle.refusal_probability() == 0
    assert not throttle.refuse()


def test_only_overload_counts_against_the_server():
    clock = Clock()
    throttle = make(clock)
    overload = [qc.ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "shed",
                                     ErrorReason.OVERLOADED),
                qc.Unavailable(grpc.StatusCode.UNAVAILABLE, "down"),
                qc.QuotadError(grpc.StatusCode.CANCELLED, "queue full"),
                qc.DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "late")]
    answered = [qc.NotFound(grpc.StatusCode.NOT_FOUND, "no such hold"),
                qc.ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "holds",
                                     ErrorReason.TOO_MANY_HOLDS)]
    for error in overload * 25:
        throttle.failed(error)
    assert throttle.refusal_probability() > 0.9
    for error in answered * 100:
        throttle.failed(error)
    assert throttle.refusal_probability() == 0


def test_a_few_failures_are_no_overload():
    throttle = make(Clock())
    for _ in range(REQUESTS_MIN - 1):
        throttle.failed(qc.Unavailable(grpc.StatusCode.UNAVAILABLE, "restarting"))
    assert throttle.refusal_probability() == 0 and not throttle.refuse()
    throttle.failed(qc.Unavailable(grpc.StatusCode.UNAVAILABLE, "restarting"))
    assert throttle.refusal_probability() > 0.9


def test_bad_settings_are_refused():
    for settings in ({"k": 0.5}, {"window_s": 0}, {"buckets": 0}, {"requests_min": -1}):
        with pytest.raises(ValueError):
            AdaptiveThrottle(**settings)
    refused = throttled()
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED and refused.reason == THROTTLED


# --- in the clients -----------------------------------------------------------------------------

def closed_port() -> tuple[socket.socket, str]:
    """A bound port nobody listens on: every connection is refused (UNAVAILABLE)."""
    bound = socket.socket()
    bound.bind(("127.0.0.1", 0))
    return bound, f"127.0.0.1:{bound.getsockname()[1]}"


def test_a_client_whose_server_is_gone_soon_refuses_calls_itself():
    bound, address = closed_port()
    refusals = []
    with bound, qc.QuotaClient(address, timeout_s=0.5, retries=0) as client:
        for _ in range(40):
            with pytest.raises(qc.QuotadError) as failed:
                client.usage("u")
            refusals.append(getattr(failed.value, "reason", "") == THROTTLED)
        assert client.throttle is not None and client.throttle.refused == sum(refusals)
    assert not any(refusals[:REQUESTS_MIN]) and sum(refusals[REQUESTS_MIN:]) >= 10


def test_a_client_without_the_throttle_sends_every_call():
    bound, address = closed_port()
    with bound, qc.QuotaClient(address, timeout_s=0.5, retries=0,
                               adaptive_throttle=False) as client:
        assert client.throttle is None
        for _ in range(20):
            with pytest.raises(qc.Unavailable):
                client.usage("u")


def test_a_serving_server_is_never_throttled_through_either_client(server):
    import asyncio

    with qc.QuotaClient(server.address, timeout_s=10) as client:
        client.upsert_plan({"id": "p", "limit_groups": [
            {"key": "t", "quota": 10, "window": "day"}]})
        client.subscribe("u", "p")
        for _ in range(50):
            client.track("u", "chat", 1, raise_on_deny=False)  # denials are answers too
        assert client.throttle is not None and client.throttle.refused == 0
        assert client.throttle.refusal_probability() == 0

    async def many() -> int:
        async with qc.AsyncQuotaClient(server.address, timeout_s=10) as client:
            await asyncio.gather(*(client.track("u", "chat", 1, raise_on_deny=False)
                                   for _ in range(300)))
            assert client.throttle is not None
            return client.throttle.refused
    assert asyncio.run(many()) == 0
