"""The Redis peer's Lua scripts really enforce the quota, as bench/redis_peer.py claims, so that
the bench never compares quotad with a peer that quietly does less work: against a real
redis-server (the bench's own launcher, 127.0.0.1, a free port), installed from Debian's
package when it is missing (bench/install_redis.sh; skipped with the reason when this machine
cannot install it: not root, or no apt-get)."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

import pytest
import redis
import redis.asyncio

from server_process import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import redis_peer  # noqa: E402
from bench.redis_peer import SCRIPTS, RedisDriver, RedisServer, keys_of  # noqa: E402
from bench.workloads import QUOTAS, user_id  # noqa: E402

QUOTA = 1000
PREMIUM_QUOTA = 300
PLAN = {"tokens": QUOTA, "premium": PREMIUM_QUOTA}
LONG_TTL_MS = 60_000
SHORT_TTL_MS = 100


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    why = redis_peer.install_server()
    if why is not None:
        pytest.skip(why)
    server = RedisServer("none").start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Reply:
    ok: bool
    detail: object  # reserve: the hold id, or the group that denied; commit: (actual, returned)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)


def _counters(flat: list) -> dict[str, dict[str, int]]:
    return {flat[i]: {"quota": flat[i + 1], "used": flat[i + 2], "held": flat[i + 3]}
            for i in range(0, len(flat), 4)}


class Peer:
    """The scripts called one at a time, their replies taken apart, and the user's counters."""

    _users = count()

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.scripts = {name: client.register_script(text) for name, text in SCRIPTS.items()}

    def new_user(self, plan: dict[str, int] = PLAN) -> str:
        user = f"peer-test-{next(self._users)}"
        self.client.hset(keys_of(user)[0], mapping={f"quota:{g}": q for g, q in plan.items()})
        return user

    def reserve(self, user: str, amount: int, *groups: str, ttl_ms: int = LONG_TTL_MS) -> Reply:
        reply = self.scripts["reserve"](keys=keys_of(user), args=[user, amount, ttl_ms, *groups])
        if reply[0] == 1:
            return Reply(True, reply[1], _counters(reply[3:]))
        return Reply(False, reply[1], _counters(reply[2:]))

    def commit(self, hold: str, actual: int | None = None) -> Reply:
        reply = self.scripts["commit"](keys=keys_of(self.user_of(hold)),
                                       args=[hold, "" if actual is None else actual])
        return Reply(True, (reply[0], reply[1]), _counters(reply[2:]))

    def release(self, hold: str) -> Reply:
        reply = self.scripts["release"](keys=keys_of(self.user_of(hold)), args=[hold])
        return Reply(True, None, _counters(reply))

    def track(self, user: str, amount: int, *groups: str, enforce: bool = False) -> Reply:
        reply = self.scripts["track"](keys=keys_of(user),
                                      args=[amount, 1 if enforce else 0, *groups])
        return Reply(reply[0] == 1, reply[1], _counters(reply[2:]))

    @staticmethod
    def user_of(hold: str) -> str:
        return hold.rsplit("/", 1)[0]

    def state(self, user: str) -> dict[str, dict[str, int]]:
        raw = self.client.hgetall(keys_of(user)[0])
        return {g: {"used": int(raw.get(f"used:{g}", 0)), "held": int(raw.get(f"held:{g}", 0))}
                for g in PLAN}

    def holds(self, user: str) -> int:
        _, expiries, holds = keys_of(user)
        assert self.client.zcard(expiries) == self.client.hlen(holds)
        return int(self.client.hlen(holds))


@pytest.fixture
def peer(redis_server: RedisServer) -> Iterator[Peer]:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True,
                         socket_timeout=10)
    try:
        yield Peer(client)
    finally:
        client.close()


def test_reserves_beyond_the_quota_are_denied_and_hold_nothing(peer: Peer):
    user = peer.new_user()
    first = peer.reserve(user, 600, "tokens")
    assert first.ok and first.counters["tokens"] == {"quota": QUOTA, "used": 0, "held": 600}
    assert peer.reserve(user, 400, "tokens").ok  # exactly the quota is still within it
    denied = peer.reserve(user, 1, "tokens")
    assert not denied.ok and denied.detail == "tokens"
    assert denied.counters["tokens"] == {"quota": QUOTA, "used": 0, "held": 1000}
    assert peer.state(user)["tokens"] == {"used": 0, "held": 1000} and peer.holds(user) == 2

    peer.commit(first.detail, 600)  # used counts against the quota as held did
    assert not peer.reserve(user, 1, "tokens").ok
    assert peer.state(user)["tokens"] == {"used": 600, "held": 400}
    assert not peer.reserve(user, QUOTA + 1, "tokens").ok  # nor can one reserve exceed it
    assert not peer.reserve(peer.new_user(), QUOTA + 1, "tokens").ok


@pytest.mark.parametrize("order", [("tokens", "premium"), ("premium", "tokens")])
def test_a_reserve_over_two_groups_is_all_or_nothing(peer: Peer, order: tuple[str, str]):
    # premium lacks room: nothing is held on tokens either, whichever group comes first
    user = peer.new_user()
    assert peer.reserve(user, 200, *order).ok
    denied = peer.reserve(user, 150, *order)
    assert not denied.ok and denied.detail == "premium"
    assert peer.state(user) == {"tokens": {"used": 0, "held": 200},
                                "premium": {"used": 0, "held": 200}}
    # tokens lacks room (a reserve of tokens alone took it): nothing is held on premium
    assert peer.reserve(user, 750, "tokens").ok
    denied = peer.reserve(user, 60, *order)
    assert not denied.ok and denied.detail == "tokens"
    assert peer.state(user) == {"tokens": {"used": 0, "held": 950},
                                "premium": {"used": 0, "held": 200}}
    assert peer.holds(user) == 2
    assert peer.reserve(user, 50, *order).ok  # room on both: held on both
    assert peer.state(user) == {"tokens": {"used": 0, "held": 1000},
                                "premium": {"used": 0, "held": 250}}


def test_a_group_without_a_quota_is_an_error_not_a_grant(peer: Peer):
    user = peer.new_user({"tokens": QUOTA})
    with pytest.raises(redis.ResponseError, match="NO_PLAN"):
        peer.reserve(user, 1, "tokens", "premium")
    with pytest.raises(redis.ResponseError, match="NO_PLAN"):
        peer.track(user, 1, "premium", enforce=True)
    assert peer.state(user)["tokens"] == {"used": 0, "held": 0} and peer.holds(user) == 0


def test_a_commit_of_less_than_reserved_returns_the_rest(peer: Peer):
    user = peer.new_user()
    hold = peer.reserve(user, 250, "tokens", "premium").detail
    committed = peer.commit(hold, 120)
    assert committed.detail == (120, 130)
    assert committed.counters["premium"] == {"quota": PREMIUM_QUOTA, "used": 120, "held": 0}
    assert peer.state(user) == {"tokens": {"used": 120, "held": 0},
                                "premium": {"used": 120, "held": 0}}
    assert peer.holds(user) == 0
    assert peer.reserve(user, PREMIUM_QUOTA - 120, "tokens", "premium").ok  # the rest is free
    assert not peer.reserve(user, 1, "premium").ok

    # no amount: the reserved amount; more than reserved: all of it is used, nothing returned
    other = peer.new_user()
    assert peer.commit(peer.reserve(other, 40, "tokens").detail).detail == (40, 0)
    assert peer.commit(peer.reserve(other, 50, "tokens").detail, 70).detail == (70, 0)
    assert peer.state(other)["tokens"] == {"used": 110, "held": 0}

    with pytest.raises(redis.ResponseError, match="NOT_FOUND"):  # settled once only
        peer.commit(hold, 1)
    assert peer.state(user)["tokens"]["used"] == 120


def test_a_release_returns_the_hold(peer: Peer):
    user = peer.new_user()
    hold = peer.reserve(user, 800, "tokens").detail
    assert not peer.reserve(user, 201, "tokens").ok
    released = peer.release(hold)
    assert released.counters["tokens"] == {"quota": QUOTA, "used": 0, "held": 0}
    assert peer.holds(user) == 0
    assert peer.reserve(user, QUOTA, "tokens").ok
    assert peer.release(hold).counters == {}  # already gone: nothing happens
    assert peer.release(f"{user}/999").counters == {}
    assert peer.state(user)["tokens"] == {"used": 0, "held": QUOTA}
    with pytest.raises(redis.ResponseError, match="NOT_FOUND"):
        peer.commit(hold, 1)


def test_an_expired_hold_is_reclaimed_by_the_next_call_for_its_user(peer: Peer):
    user = peer.new_user()
    hold = peer.reserve(user, QUOTA, "tokens", ttl_ms=SHORT_TTL_MS).detail
    assert not peer.reserve(user, 1, "tokens").ok  # not expired yet: it holds the quota
    time.sleep(SHORT_TTL_MS / 1000 * 2.5)
    again = peer.reserve(user, QUOTA, "tokens")
    assert again.ok and again.counters["tokens"]["held"] == QUOTA  # not 2 x QUOTA
    assert peer.holds(user) == 1
    with pytest.raises(redis.ResponseError, match="NOT_FOUND"):  # reclaimed: gone for good
        peer.commit(hold, 10)
    assert peer.state(user)["tokens"] == {"used": 0, "held": QUOTA}

    # every script reclaims: track and release as well as reserve
    for settle in (lambda u: peer.track(u, 5, "tokens"),
                   lambda u: peer.release(f"{u}/999")):
        other = peer.new_user()
        peer.reserve(other, 700, "tokens", "premium", ttl_ms=SHORT_TTL_MS)
        time.sleep(SHORT_TTL_MS / 1000 * 2.5)
        settle(other)
        assert peer.state(other)["premium"] == {"used": 0, "held": 0}
        assert peer.state(other)["tokens"]["held"] == 0 and peer.holds(other) == 0


def test_an_expired_hold_not_yet_reclaimed_is_still_settled_by_its_commit(peer: Peer):
    user = peer.new_user()
    hold = peer.reserve(user, 300, "tokens", ttl_ms=SHORT_TTL_MS).detail
    time.sleep(SHORT_TTL_MS / 1000 * 2.5)
    assert peer.commit(hold, 200).detail == (200, 100)
    assert peer.state(user)["tokens"] == {"used": 200, "held": 0} and peer.holds(user) == 0


def test_a_call_reclaims_at_most_100_expired_holds(peer: Peer):
    user = peer.new_user()
    ttl_ms = 1000  # long enough that no hold expires while the 150 are made on a busy machine
    for _ in range(150):
        assert peer.reserve(user, 1, "tokens", ttl_ms=ttl_ms).ok
    assert peer.holds(user) == 150
    time.sleep(ttl_ms / 1000 * 1.5)
    peer.release(f"{user}/0")
    assert peer.holds(user) == 50 and peer.state(user)["tokens"]["held"] == 50
    peer.release(f"{user}/0")
    assert peer.holds(user) == 0 and peer.state(user)["tokens"]["held"] == 0


def test_track_counts_usage_and_enforces_the_quota_when_asked(peer: Peer):
    user = peer.new_user()
    tracked = peer.track(user, 300, "tokens", "premium")
    assert tracked.ok and tracked.counters["premium"] == {"quota": PREMIUM_QUOTA, "used": 300,
                                                          "held": 0}
    denied = peer.track(user, 1, "tokens", "premium", enforce=True)
    assert not denied.ok and denied.detail == "premium"
    assert peer.state(user)["tokens"]["used"] == 300  # all or nothing here too
    hold = peer.reserve(user, 600, "tokens").detail
    assert not peer.track(user, 101, "tokens", enforce=True).ok  # held counts against it
    assert peer.track(user, 100, "tokens", enforce=True).ok
    assert peer.track(user, 500, "tokens").ok  # not enforced: usage past the quota is counted
    assert peer.state(user)["tokens"] == {"used": 900, "held": 600}
    assert peer.track(user, -50, "tokens", enforce=True).ok  # a refund is never denied
    assert peer.track(user, -5000, "tokens", "premium").ok  # and never goes below zero
    assert peer.state(user) == {"tokens": {"used": 0, "held": 600},
                                "premium": {"used": 0, "held": 0}}
    peer.release(hold)


def test_the_bench_plan_and_driver_allow_tokens_and_deny_the_premium_model(
        redis_server: RedisServer, peer: Peer):
    redis_server.set_up(3)
    assert peer.client.hgetall(keys_of(user_id(2))[0]) == {
        f"quota:{g}": str(q) for g, q in QUOTAS.items()}

    async def drive() -> None:
        driver = RedisDriver(redis_server.address, 4, 10.0)
        await driver.open()
        try:
            allowed, hold = await driver.reserve(user_id(0), 100, "m", 60, ("tokens",))
            assert allowed and hold.startswith(user_id(0) + "/")
            denied, _ = await driver.reserve(user_id(0), 1, "p", 60, ("tokens", "premium_tokens"))
            assert not denied
            await driver.commit(hold, 70)
            _, other = await driver.reserve(user_id(1), 100, "m", 60, ("tokens",))
            await driver.release(other)
            assert await driver.track(user_id(1), 5, "m", True, ("tokens",))
            assert not await driver.track(user_id(1), 5, "p", True, ("premium_tokens",))
        finally:
            await driver.close()

    asyncio.run(drive())
    raw = [peer.client.hgetall(keys_of(user_id(i))[0]) for i in (0, 1)]
    assert (raw[0]["used:tokens"], raw[0]["held:tokens"]) == ("70", "0")
    assert (raw[1]["used:tokens"], raw[1]["held:tokens"]) == ("5", "0")
    assert raw[0].get("used:premium_tokens", "0") == "0"


CONTENDERS = 64


def test_concurrent_reserves_hold_exactly_what_fits(redis_server: RedisServer, peer: Peer):
    user = peer.new_user()

    async def contend() -> list[bool]:
        driver = RedisDriver(redis_server.address, 200, 10.0)  # all 200 in flight at once
        await driver.open()
        try:
            replies = await asyncio.gather(*(
                driver.reserve(user, 7, "m", 60, ("tokens",)) for _ in range(200)))
        finally:
            await driver.close()
        return [allowed for allowed, _ in replies]

    allowed = asyncio.run(contend())
    assert sum(allowed) == QUOTA // 7
    assert peer.state(user)["tokens"] == {"used": 0, "held": 7 * (QUOTA // 7)}


def test_concurrent_reserves_and_settles_never_push_used_and_held_past_the_quota(
        redis_server: RedisServer, peer: Peer):
    # many tasks reserve over one or both groups, then commit part of it or release it, on
    # three hot users; a watcher reads every counter all along: used + held never exceeds a
    # quota, and at the end used is exactly what was committed and nothing is held
    plan = {"tokens": 40_000, "premium": 12_000}
    users = [peer.new_user(plan) for _ in range(3)]
    committed = {(u, g): 0 for u in users for g in plan}
    outcomes = {"allowed": 0, "denied": 0}
    breaches: list[tuple] = []

    async def work(driver: RedisDriver, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            user = rng.choice(users)
            groups = ("tokens", "premium") if rng.random() < 0.3 else ("tokens",)
            amount = rng.randint(1, 900)
            allowed, hold = await driver.reserve(user, amount, "m", 60, groups)
            outcomes["allowed" if allowed else "denied"] += 1
            if not allowed:
                continue
            await asyncio.sleep(0)
            if rng.random() < 0.25:
                await driver.release(hold)
            else:
                actual = rng.randint(0, amount)
                await driver.commit(hold, actual)
                for group in groups:
                    committed[user, group] += actual

    async def watch(client: redis.asyncio.Redis, done: asyncio.Event) -> int:
        samples = 0
        while not done.is_set():
            for user in users:
                raw = await client.hgetall(keys_of(user)[0])
                samples += 1
                for group, quota in plan.items():
                    total = int(raw.get(f"used:{group}", 0)) + int(raw.get(f"held:{group}", 0))
                    if total > quota:
                        breaches.append((user, group, total))
            await asyncio.sleep(0.001)
        return samples

    async def run() -> int:
        driver = RedisDriver(redis_server.address, CONTENDERS, 10.0)
        await driver.open()
        client = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port,
                                     decode_responses=True, socket_timeout=10)
        done = asyncio.Event()
        try:
            watcher = asyncio.create_task(watch(client, done))
            await asyncio.wait_for(
                asyncio.gather(*(work(driver, seed) for seed in range(CONTENDERS))), 120)
            done.set()
            return await watcher
        finally:
            done.set()
            await client.aclose()
            await driver.close()

    samples = asyncio.run(run())
    assert samples > 10 and not breaches, breaches[:5]
    assert outcomes["denied"] > 100 and outcomes["allowed"] > 100, outcomes  # both happened
    for user in users:
        state = peer.state(user)
        for group in plan:
            assert state[group] == {"used": committed[user, group], "held": 0}, (user, group)
        assert peer.holds(user) == 0
