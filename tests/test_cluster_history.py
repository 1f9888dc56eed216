"""The history check across a cluster: 3 shards from etcd on loopback, 64 callers through one
AsyncQuotaClient(cluster="etcd://...") with its defaults, hot users on every shard. Each call
goes to its user's shard (its hold's, by the id), coalesced per shard; the checker proves from
the timings alone that no instant had more certainly held and used than a quota, that no
denial was false, and that the final usage of every user is what the history implies. The
callers and the checker are test_history's; only the server is a cluster.

Sizes as test_history's: 10^4 calls by default; QUOTAD_LONG=1 runs 10^6; QUOTAD_HISTORY_OPS
and QUOTAD_HISTORY_CLIENTS set them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path


from history_checker import Call, check
from quotad.cluster.etcd_process import free_ports
from quotad_client import AsyncQuotaClient, NotFound
from quotad_contract.shards import ShardMap, slot_of
from server_process import ROOT, ServerProcess
from test_history import (
    G, P, PLAN, QUOTA_ALL, QUOTA_PREMIUM, RPC_TIMEOUT_S, ClientCalls, assert_sound, run_calls,
    workload_size,
)

SHARDS = 3
HOT_USERS_PER_SHARD = 2
APP = "default"
"""The app of a server without API keys: the slots are of its users."""
COMMAND_TIMEOUT_S = 60.0
PLAN_WAIT_S = 15.0


def hot_users(shard_map: ShardMap) -> tuple[str, ...]:
    """HOT_USERS_PER_SHARD users on each shard, the first names that land there."""
    found: dict[int, list[str]] = {shard.shard_id: [] for shard in shard_map.shards}
    number = 0
    while any(len(users) < HOT_USERS_PER_SHARD for users in found.values()):
        user = f"hot{number}"
        owner = found[shard_map.owner(slot_of(APP, user)).shard_id]
        if len(owner) < HOT_USERS_PER_SHARD:
            owner.append(user)
        number += 1
    return tuple(user for users in found.values() for user in users)


async def subscribed(client: AsyncQuotaClient, users: Iterable[str]) -> None:
    """PLAN upserted through one shard and each user subscribed to it, on its own shard once
    the plan has reached that shard through etcd."""
    await client.upsert_plan(PLAN)
    deadline = time.monotonic() + PLAN_WAIT_S
    for user in users:
        while True:
            try:
                await client.subscribe(user, PLAN.id)
                break
            except NotFound:
                assert time.monotonic() < deadline, f"the plan never reached {user}'s shard"
                await asyncio.sleep(0.05)


async def run_cluster_history(target: str, users: tuple[str, ...], ops: int, clients: int,
                              limit_s: float) -> tuple[list[Call], float]:
    async with AsyncQuotaClient(cluster=target, timeout_s=RPC_TIMEOUT_S) as client:
        await subscribed(client, users)
        return await run_calls(ClientCalls(client), users, ops, clients, limit_s)


def test_a_history_across_three_shards_has_no_over_admission_and_no_false_denial(
        tmp_path: Path, etcd):
    ops, clients, limit_s = workload_size()
    target = f"etcd://{etcd.endpoint}/history-{int(time.time() * 1000) % 100000}"
    addresses = [f"127.0.0.1:{port}" for port in free_ports(SHARDS)]
    init = subprocess.run(
        [sys.executable, "-m", "quotad", "cluster", "init", "--cluster", target,
         "--shards", str(SHARDS), *[f for a in addresses for f in ("--address", a)]],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, cwd=ROOT)
    assert init.returncode == 0, init.stderr
    shard_map = ShardMap.from_json(init.stdout)
    users = hot_users(shard_map)
    shards = [ServerProcess(tmp_path / f"shard-{shard_id}",
                            extra_args=("--cluster", target, "--shard-id", str(shard_id)))
              for shard_id in range(SHARDS)]
    try:
        for shard, address in zip(shards, addresses):
            shard.launch(address)
        for shard in shards:
            shard.wait_for("serving", COMMAND_TIMEOUT_S)
        history, elapsed = asyncio.run(run_cluster_history(target, users, ops, clients,
                                                           limit_s))
        records = []
        for shard in shards:
            shard.stop()
            [stopped] = [line for line in shard.log_lines if line.get("message") == "stopped"]
            records.append(stopped.get("records_written"))
    finally:
        for shard in shards:
            shard.close()

    quotas = {(u, G): QUOTA_ALL for u in users} | {(u, P): QUOTA_PREMIUM for u in users}
    report = check(history, quotas)
    attempts = sum(1 for c in history if c.kind == "reserve" or (
        c.kind == "track" and c.amount > 0))
    print(f"\n{report.summary(clients)}")
    print(f"cluster history: {SHARDS} shards, {elapsed:.1f} s of calls "
          f"({report.ops / elapsed:.0f} calls/s); {attempts} reserve/track attempts, "
          f"{report.denials} denied; records written per shard {records}")
    assert_sound(history, quotas, report, ops, limit_s, users)
    # each shard did its users' share of the work
    assert all(count and count > ops / (4 * SHARDS) for count in records), records
