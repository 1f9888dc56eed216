"""A cluster's usage export: every shard's lines once, each id naming the shard whose log
holds it, and a cursor that holds each shard's own so that an export resumes exactly after
any page. Against a real etcd and 3 real shard processes on loopback, through the sync
client, the async client and `quotactl export --cluster`."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

import quotad_client as qc
from quotad_client import ctl
from quotad_client._cluster import EXPORT_CURSOR_PREFIX, export_cursors
from quotad_contract.shards import slot_of
from test_etcd_cluster import EtcdCluster

PLAN = {"id": "p", "name": "P", "limit_groups": [
    {"key": "tokens", "label": "Tokens", "unit": "tokens", "quota": 10**9, "window": "month",
     "match": {"event_types": ["openai.*"]}}]}
USERS_PER_SHARD = 3
PLAN_REACHES_SHARDS_S = 15.0


def owner(cluster: EtcdCluster, user_id: str) -> int:
    return cluster.shard_map.owner(slot_of("default", user_id)).shard_id


def users(cluster: EtcdCluster) -> list[str]:
    """USERS_PER_SHARD users of each shard."""
    found: dict[int, list[str]] = {shard.shard_id: [] for shard in cluster.shard_map.shards}
    for number in range(10_000):  # bounded: 3 shards fill up within a few dozen
        user = f"user-{number}"
        mine = found[owner(cluster, user)]
        if len(mine) < USERS_PER_SHARD:
            mine.append(user)
        if all(len(mine) == USERS_PER_SHARD for mine in found.values()):
            return [user for mine in found.values() for user in mine]
    raise AssertionError("users never filled every shard")


def subscribe_all(client: qc.QuotaClient, user_ids: list[str]) -> None:
    client.upsert_plan(PLAN)  # to one shard; every shard applies it from etcd
    deadline = time.monotonic() + PLAN_REACHES_SHARDS_S
    for user in user_ids:
        while True:
            try:
                client.subscribe(user, "p")
                break
            except qc.NotFound:
                assert time.monotonic() < deadline, "the plan never reached the shards"
                time.sleep(0.05)


def exported(client: qc.QuotaClient, cursor: str = "") -> list[qc.UsageExportPage]:
    return list(client.export_usage(cursor=cursor, timeout_s=30))


@pytest.fixture
def cluster(tmp_path, etcd):
    cluster = EtcdCluster(tmp_path, etcd).start()
    try:
        yield cluster
    finally:
        cluster.close()


def test_a_cluster_export_gives_every_shards_usage_once_and_resumes_after_any_page(
        cluster, capsys):
    user_ids = users(cluster)
    with qc.QuotaClient(cluster=cluster.target, timeout_s=10) as client:
        subscribe_all(client, user_ids)
        spent: Counter[str] = Counter()
        for number, user in enumerate(user_ids):
            with client.reserve(user, "openai.chat", 100) as hold:
                hold.actual = number + 1
            client.track(user, "openai.image", 1000 + number)
            spent[user] += number + 1 + 1000 + number

        pages = exported(client)
        lines = [line for page in pages for line in page.lines]
        assert Counter({user: amount for user, amount in spent.items()}) == Counter(
            {user: sum(line.amount for line in lines if line.user_id == user)
             for user in user_ids})
        assert len({line.id for line in lines}) == len(lines) == 2 * len(user_ids)
        for line in lines:  # each id names the shard whose log holds it, its user's owner
            assert line.shard_id == owner(cluster, line.user_id), line
            assert line.id == f"{line.shard_id}:{line.sequence}-{line.index}", line
        assert {line.shard_id for line in lines} == {0, 1, 2}
        last = pages[-1].next_cursor
        assert last.startswith(EXPORT_CURSOR_PREFIX) and set(export_cursors(last)) == {0, 1, 2}

        for index, page in enumerate(pages):  # resumed after any page: exactly the rest
            rest = [line.id for later in pages[index + 1:] for line in later.lines]
            assert [line.id for p in exported(client, page.next_cursor)
                    for line in p.lines] == rest
        assert [p.lines for p in exported(client, last)] == [()] * 3  # each shard: nothing

        client.track(user_ids[0], "openai.image", 5)
        client.track(user_ids[-1], "openai.image", 6)
        newer = [line for page in exported(client, last) for line in page.lines]
        assert sorted((line.user_id, line.amount) for line in newer) == sorted(
            [(user_ids[0], 5), (user_ids[-1], 6)])

        everything = [line.id for page in exported(client) for line in page.lines]
        assert sorted(everything) == sorted(line.id for line in lines + newer)
        with pytest.raises(ValueError, match=EXPORT_CURSOR_PREFIX):
            exported(client, "12")  # one shard's cursor is not the cluster's

    async def async_ids() -> list[str]:
        async with qc.AsyncQuotaClient(cluster=cluster.target, timeout_s=10) as client:
            return [line.id async for page in client.export_usage(timeout_s=30)
                    for line in page.lines]
    assert asyncio.run(async_ids()) == everything  # the same lines in the same order

    capsys.readouterr()
    assert ctl.main(["--cluster", cluster.target, "export", "--format", "csv",
                     "--since", last]) == 0
    out, err = capsys.readouterr()
    rows = out.splitlines()[1:]  # after the header
    assert sorted(row.split(",")[0] for row in rows) == sorted(line.id for line in newer)
    resumed = err.splitlines()[-1].removeprefix(ctl.NEXT_CURSOR_PREFIX)
    assert export_cursors(resumed) != export_cursors(last)
    assert ctl.main(["--cluster", cluster.target, "export", "--format", "csv",
                     "--since", resumed]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == []  # nothing after it
    assert ctl.main(["--cluster", cluster.target, "export", "--format", "csv",
                     "--since", "7"]) == 2
    assert EXPORT_CURSOR_PREFIX in capsys.readouterr().err
