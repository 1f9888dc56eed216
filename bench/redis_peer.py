"""The Redis peer: reserve / commit / release / track as atomic Lua scripts, and a redis-server
that the bench starts and stops itself (127.0.0.1, a free port, a temporary directory).

What a careful team would build on Redis instead of quotad. Per user, three keys (one hash
tag, so a cluster would keep them on one shard):

    {user}:c   hash    quota:<group>, used:<group>, held:<group>, seq
    {user}:x   zset    hold id -> expires_at (ms, Redis' own clock: TIME)
    {user}:h   hash    hold id -> "<amount>|<group>,<group>"

Each script first reclaims the user's expired holds (up to 100; an expired hold's amount
leaves `held`), then checks and updates. Reserve is all-or-nothing over the groups the client
says the event matches (the client knows the plan's match rules; quotad works them out
itself). A reservation id is "<user>/<seq>", so commit and release find the user's keys.

Differences from quotad, on purpose small: no idempotency keys, no audit trail, no windows
(one counter per group), and a hold reclaimed after its expiry is gone (a late commit of it is
NOT_FOUND here; quotad still records the usage).

Persistence modes (the two peers of the bench):
    always   appendonly yes, appendfsync always (every write is in the fsynced AOF before the
             reply: Redis' group commit, one fsync per event-loop turn); RDB snapshots off
    none     save "", appendonly no: nothing on disk at all
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from quotad.cluster.etcd_process import free_port
from quotad.testing import run_install_script

from .workloads import QUOTAS, user_id

MODES = {
    "always": ["--appendonly", "yes", "--appendfsync", "always", "--save", ""],
    "none": ["--appendonly", "no", "--save", ""],
}
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 15.0
INSTALL_SCRIPT = Path(__file__).resolve().parent / "install_redis.sh"
INSTALL_TIMEOUT_S = 1500.0  # apt-get update and install, each bounded inside the script too

_COMMON = r"""
local C, X, H = KEYS[1], KEYS[2], KEYS[3]

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function split(hold)
  local bar = string.find(hold, '|', 1, true)
  local groups = {}
  for g in string.gmatch(string.sub(hold, bar + 1), '[^,]+') do groups[#groups + 1] = g end
  return tonumber(string.sub(hold, 1, bar - 1)), groups
end

local function reclaim(now)
  local ids = redis.call('ZRANGEBYSCORE', X, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(ids) do
    local hold = redis.call('HGET', H, id)
    if hold then
      local amount, groups = split(hold)
      for _, g in ipairs(groups) do redis.call('HINCRBY', C, 'held:' .. g, -amount) end
      redis.call('HDEL', H, id)
    end
    redis.call('ZREM', X, id)
  end
end

-- per group: key, quota, used, held (what quotad's responses carry too)
local function counters(out, groups)
  for _, g in ipairs(groups) do
    local v = redis.call('HMGET', C, 'quota:' .. g, 'used:' .. g, 'held:' .. g)
    out[#out + 1] = g
    out[#out + 1] = tonumber(v[1]) or 0
    out[#out + 1] = tonumber(v[2]) or 0
    out[#out + 1] = tonumber(v[3]) or 0
  end
  return out
end

-- nil when every group has room for amount, else the first group that has none
local function no_room(groups, amount)
  for _, g in ipairs(groups) do
    local v = redis.call('HMGET', C, 'quota:' .. g, 'used:' .. g, 'held:' .. g)
    local quota = tonumber(v[1])
    if quota == nil then return redis.error_reply('NO_PLAN ' .. C) end
    if (tonumber(v[2]) or 0) + (tonumber(v[3]) or 0) + amount > quota then return g end
  end
  return nil
end
"""

# ARGV: user, amount, ttl_ms, group... -> {1, id, expires_ms, counters...} | {0, denied_by, ...}
RESERVE = _COMMON + r"""
local now = now_ms()
reclaim(now)
local amount = tonumber(ARGV[2])
local groups = {}
for i = 4, #ARGV do groups[#groups + 1] = ARGV[i] end
local denied = no_room(groups, amount)
if type(denied) == 'table' then return denied end
if denied then return counters({0, denied}, groups) end
for _, g in ipairs(groups) do redis.call('HINCRBY', C, 'held:' .. g, amount) end
local id = ARGV[1] .. '/' .. redis.call('HINCRBY', C, 'seq', 1)
local expires = now + tonumber(ARGV[3])
redis.call('HSET', H, id, amount .. '|' .. table.concat(groups, ','))
redis.call('ZADD', X, expires, id)
return counters({1, id, expires}, groups)
"""

# ARGV: hold id, actual ('' = the reserved amount) -> {committed, returned, counters...}
# The hold itself is settled even when it has expired (its usage is recorded); then the
# user's other expired holds are reclaimed.
COMMIT = _COMMON + r"""
local hold = redis.call('HGET', H, ARGV[1])
if not hold then return redis.error_reply('NOT_FOUND reservation ' .. ARGV[1]) end
local amount, groups = split(hold)
local actual = amount
if ARGV[2] ~= '' then actual = tonumber(ARGV[2]) end
for _, g in ipairs(groups) do
  redis.call('HINCRBY', C, 'held:' .. g, -amount)
  redis.call('HINCRBY', C, 'used:' .. g, actual)
end
redis.call('HDEL', H, ARGV[1])
redis.call('ZREM', X, ARGV[1])
reclaim(now_ms())
local returned = amount - actual
if returned < 0 then returned = 0 end
return counters({actual, returned}, groups)
"""

# ARGV: hold id -> {counters...}; a hold that is gone (settled, reclaimed) is a no-op
RELEASE = _COMMON + r"""
local hold = redis.call('HGET', H, ARGV[1])
local groups = {}
if hold then
  local amount
  amount, groups = split(hold)
  for _, g in ipairs(groups) do redis.call('HINCRBY', C, 'held:' .. g, -amount) end
  redis.call('HDEL', H, ARGV[1])
  redis.call('ZREM', X, ARGV[1])
end
reclaim(now_ms())
return counters({}, groups)
"""

# ARGV: amount (negative: a refund), enforce (0/1), group... -> {1, '', counters} | {0, group, ...}
TRACK = _COMMON + r"""
reclaim(now_ms())
local amount = tonumber(ARGV[1])
local groups = {}
for i = 3, #ARGV do groups[#groups + 1] = ARGV[i] end
if ARGV[2] == '1' and amount > 0 then
  local denied = no_room(groups, amount)
  if type(denied) == 'table' then return denied end
  if denied then return counters({0, denied}, groups) end
end
for _, g in ipairs(groups) do
  if redis.call('HINCRBY', C, 'used:' .. g, amount) < 0 then redis.call('HSET', C, 'used:' .. g, 0) end
end
return counters({1, ''}, groups)
"""

SCRIPTS = {"reserve": RESERVE, "commit": COMMIT, "release": RELEASE, "track": TRACK}


def keys_of(user: str) -> list[str]:
    return [f"{{{user}}}:c", f"{{{user}}}:x", f"{{{user}}}:h"]


def unavailable_reason(binary: str = "redis-server") -> str | None:
    """Why the Redis peers cannot run here, or None when they can."""
    if shutil.which(binary) is None:
        return f"{binary} is not on PATH (Debian: apt-get install redis-server)"
    try:
        import redis  # noqa: F401
        import redis.asyncio  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install -e '.[test]' or '.[bench]')"
    return None


_install_outcome: list[str | RuntimeError | None] = []


def install_server(binary: str = "redis-server") -> str | None:
    """Makes redis-server available, installing Debian's package (install_redis.sh) when it is
    not on PATH: None once it is there, else why it cannot be installed on this machine (not
    root, no apt-get). RuntimeError when the install itself fails. Tried once per process."""
    if shutil.which(binary) is not None:
        return None
    if binary != "redis-server":
        return f"{binary} is not on PATH"
    if not _install_outcome:
        _install_outcome.append(run_install_script(INSTALL_SCRIPT, binary, INSTALL_TIMEOUT_S))
    outcome = _install_outcome[0]
    if isinstance(outcome, RuntimeError):
        raise outcome
    return outcome


def server_version(binary: str = "redis-server") -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or None


class RedisServer:
    """One redis-server process on 127.0.0.1 in a temporary directory, in one MODES mode."""

    def __init__(self, mode: str, *, binary: str = "redis-server") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown Redis mode {mode!r}")
        self.mode = mode
        self.binary = binary
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> RedisServer:
        import redis

        self._dir = tempfile.TemporaryDirectory(prefix=f"bench-redis-{self.mode}-")
        log_path = Path(self._dir.name) / "redis.log"
        last_error = ""
        for _ in range(3):  # a free port can be taken between probing and binding it
            self.port = free_port()
            args = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port),
                    "--dir", self._dir.name, "--daemonize", "no", "--protected-mode", "yes",
                    "--logfile", str(log_path), *MODES[self.mode]]
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + START_TIMEOUT_S
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
            try:
                while time.monotonic() < deadline and self.process.poll() is None:
                    try:
                        if client.ping():
                            return self
                    except (redis.ConnectionError, redis.TimeoutError,
                            redis.BusyLoadingError) as error:
                        last_error = str(error)
                    time.sleep(0.05)
            finally:
                client.close()
            self._kill()
            if log_path.exists():
                last_error = log_path.read_text(errors="replace")[-500:]
        self._cleanup_dir()
        raise RuntimeError(f"redis-server ({self.mode}) did not start: {last_error}")

    def set_up(self, users: int) -> None:
        """Gives every user the plan's quotas (pipelined) and loads the scripts."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            mapping = {f"quota:{group}": quota for group, quota in QUOTAS.items()}
            for start in range(0, users, 1000):
                pipe = client.pipeline(transaction=False)
                for index in range(start, min(users, start + 1000)):
                    pipe.hset(keys_of(user_id(index))[0], mapping=mapping)
                pipe.execute()
            for script in SCRIPTS.values():
                client.script_load(script)
        finally:
            client.close()

    def info(self) -> dict[str, Any]:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            persistence = client.info("persistence")
            server = client.info("server")
        finally:
            client.close()
        return {"redis_version": server.get("redis_version"),
                "aof_enabled": persistence.get("aof_enabled"),
                "rdb_changes_since_last_save": persistence.get("rdb_changes_since_last_save")}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill()
        self._cleanup_dir()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class RedisDriver:
    """The bench's async driver of the Redis peer (redis.asyncio, one pool per process)."""

    def __init__(self, address: str, concurrency: int, call_timeout_s: float) -> None:
        self._host, port = address.rsplit(":", 1)
        self._port = int(port)
        self._concurrency = concurrency
        self._timeout_s = call_timeout_s
        self._keys: dict[str, list[str]] = {}

    async def open(self) -> None:
        import redis.asyncio

        self._client = redis.asyncio.Redis(
            host=self._host, port=self._port, decode_responses=True,
            max_connections=self._concurrency + 4, socket_timeout=self._timeout_s)
        self._scripts = {name: self._client.register_script(text)
                         for name, text in SCRIPTS.items()}

    async def close(self) -> None:
        await self._client.aclose()

    def batches_sent(self) -> int | None:
        return None

    def _user_keys(self, user: str) -> list[str]:
        keys = self._keys.get(user)
        if keys is None:
            keys = self._keys[user] = keys_of(user)
        return keys

    async def reserve(self, user: str, amount: int, model: str, ttl_s: float,
                      groups: tuple[str, ...]) -> tuple[bool, str]:
        reply = await self._scripts["reserve"](
            keys=self._user_keys(user), args=[user, amount, int(ttl_s * 1000), *groups])
        return reply[0] == 1, reply[1] if reply[0] == 1 else ""

    async def commit(self, hold_id: str, actual: int) -> None:
        user = hold_id.rsplit("/", 1)[0]
        await self._scripts["commit"](keys=self._user_keys(user), args=[hold_id, actual])

    async def release(self, hold_id: str) -> None:
        user = hold_id.rsplit("/", 1)[0]
        await self._scripts["release"](keys=self._user_keys(user), args=[hold_id])

    async def track(self, user: str, amount: int, model: str, enforce: bool,
                    groups: tuple[str, ...]) -> bool:
        reply = await self._scripts["track"](
            keys=self._user_keys(user), args=[amount, 1 if enforce else 0, *groups])
        return reply[0] == 1


def _self_check() -> None:  # pragma: no cover - a manual aid: python -m bench.redis_peer
    import asyncio

    server = RedisServer("none").start()
    try:
        server.set_up(3)

        async def check() -> None:
            driver = RedisDriver(server.address, 4, 2.0)
            await driver.open()
            try:
                allowed, hold = await driver.reserve(user_id(0), 100, "m", 60, ("tokens",))
                assert allowed and hold, hold
                denied, _ = await driver.reserve(user_id(0), 1, "p", 60,
                                                 ("tokens", "premium_tokens"))
                assert not denied
                await driver.commit(hold, 70)
                allowed, hold = await driver.reserve(user_id(1), 100, "m", 1, ("tokens",))
                await asyncio.sleep(1.1)
                await driver.track(user_id(1), 5, "m", True, ("tokens",))
                raw = await driver._client.hgetall(keys_of(user_id(1))[0])
                assert raw["held:tokens"] == "0" and raw["used:tokens"] == "5", raw
                raw = await driver._client.hgetall(keys_of(user_id(0))[0])
                assert raw["held:tokens"] == "0" and raw["used:tokens"] == "70", raw
            finally:
                await driver.close()

        asyncio.run(check())
        print("redis peer scripts: ok", server.info())
    finally:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _self_check()
