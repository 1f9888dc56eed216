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
            throttle.failed(SHED)
    assert throttle.refusal_probability() > 0.9
    clock.now_s += WINDOW_S + WINDOW_S / BUCKETS
    assert throttle.refusal_probability() == 0
    assert not throttle.refuse()


def test_only_overload_counts_against_the_server():
    clock = Clock()
    throttle = make(clock)
    overload = [SHED, qc.QuotadError(grpc.StatusCode.CANCELLED, "queue full"),
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


def test_no_server_answering_is_not_counted_at_all():
    """UNAVAILABLE (stopped, restarting): sparing it saves nobody work, and counting it would
    keep refusing calls for a window once it is back."""
    throttle = make(Clock())
    for _ in range(1000):
        throttle.failed(qc.Unavailable(grpc.StatusCode.UNAVAILABLE, "down"))
    assert throttle.refusal_probability() == 0 and not throttle.refuse()


def test_a_few_failures_are_no_overload():
    throttle = make(Clock())
    for _ in range(REQUESTS_MIN - 1):
        throttle.failed(SHED)
    assert throttle.refusal_probability() == 0 and not throttle.refuse()
    throttle.failed(SHED)
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


def test_a_client_whose_server_is_gone_sends_every_call():
    bound, address = closed_port()
    with bound, qc.QuotaClient(address, timeout_s=0.5, retries=0) as client:
        for _ in range(3 * REQUESTS_MIN):
            with pytest.raises(qc.Unavailable):
                client.usage("u")
        assert client.throttle is not None and client.throttle.refused == 0


def test_a_client_refuses_calls_itself_while_the_server_sheds_most_then_stops(start_server):
    """A real server whose admission limit is 1 operation, offered waves of 50 unary calls at
    once: it sheds many (OVERLOADED), and once it has shed most of what the window holds the
    client refuses some itself, never sending them; once the waves have left the throttle's
    window, calls one at a time are all sent and served. How many of a wave the server takes
    depends on how the calls arrive (a loaded machine spreads them out and it takes more):
    waves go on until the client has refused some, WAVES_MAX at most."""
    import asyncio

    process = start_server(extra_args=("--admission-operations", "1"))
    with qc.QuotaClient(process.address, timeout_s=10) as admin:
        admin.upsert_plan({"id": "p", "limit_groups": [
            {"key": "t", "quota": 10**9, "window": "day"}]})
        admin.subscribe("u", "p")

    async def scenario() -> tuple[int, list[str], int]:
        async with qc.AsyncQuotaClient(process.address, timeout_s=2, retries=0,
                                       coalesce=False) as client:
            client.throttle = AdaptiveThrottle(window_s=SHORT_WINDOW_S)  # a quicker test
            reasons = []
            for _ in range(WAVES_MAX):  # waves of calls at once: the later see the earlier's end
                outcomes = await asyncio.gather(
                    *(client.track("u", "chat", 1) for _ in range(WAVE_CALLS)),
                    return_exceptions=True)
                reasons += [getattr(outcome, "reason", "ok") for outcome in outcomes]
                if client.throttle.refused:
                    break
            refused_in_burst = client.throttle.refused
            await asyncio.sleep(SHORT_WINDOW_S * 1.2)  # the waves leave the window
            for _ in range(30):  # one at a time, the server takes each: none refused
                await client.track("u", "chat", 1)
            return refused_in_burst, reasons, client.throttle.refused

    refused_in_burst, reasons, refused = asyncio.run(scenario())
    assert set(reasons) <= {"ok", str(ErrorReason.OVERLOADED), THROTTLED}, set(reasons)
    assert reasons.count(str(ErrorReason.OVERLOADED)) >= REQUESTS_MIN
    assert refused_in_burst > 0 and reasons.count(THROTTLED) == refused_in_burst
    assert refused == refused_in_burst


SHORT_WINDOW_S = 1.0
WAVES_MAX, WAVE_CALLS = 12, 50


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
