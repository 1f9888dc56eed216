"""quotad's etcd client against a real etcd (loopback, free ports): KV, the create-if-absent
and compare-and-swap transactions, a key's watch, and leases whose keys go with them."""

from __future__ import annotations

import asyncio

import pytest

from etcd_server import compact
from quotad.cluster.etcd import Etcd, EtcdCompacted, EtcdUnavailable
from quotad.cluster.etcd_process import free_port

WAIT_S = 10.0


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, WAIT_S))


def test_get_put_create_replace_and_delete_a_key(etcd):
    async def scenario():
        client = Etcd(etcd.endpoint)
        try:
            key = b"/test/kv/one"
            assert (await client.get(key))[0] is None
            created, found = await client.create(key, b"first")
            assert created and found is None
            created, found = await client.create(key, b"second")  # exists: nothing changes
            assert not created and found is not None and found.value == b"first"
            current, _ = await client.get(key)
            assert current is not None and current.value == b"first"
            swapped, _ = await client.replace(key, b"third", current.mod_revision + 100)
            assert not swapped and (await client.get(key))[0].value == b"first"
            swapped, _ = await client.replace(key, b"third", current.mod_revision)
            assert swapped and (await client.get(key))[0].value == b"third"
            assert await client.delete(key) == 1
            assert (await client.get(key))[0] is None
        finally:
            await client.close()
    run(scenario())


def test_a_watch_sees_puts_and_deletes_from_its_start_revision(etcd):
    async def scenario():
        client = Etcd(etcd.endpoint)
        try:
            key = b"/test/watch/one"
            first = await client.put(key, b"a")
            await client.put(key, b"b")
            await client.delete(key)
            seen = []
            async for event in client.watch(key, first):
                seen.append(event.value)
                if len(seen) == 3:
                    break
            assert seen == [b"a", b"b", None]
        finally:
            await client.close()
    run(scenario())


def test_create_at_and_delete_at_answer_the_revision_of_their_change(etcd):
    async def scenario():
        client = Etcd(etcd.endpoint)
        try:
            key = b"/test/kv/revisions"
            created = await client.create_at(key, b"first")
            assert created is not None and (await client.get(key))[0].mod_revision == created
            assert await client.create_at(key, b"second") is None  # exists: nothing written
            assert (await client.get(key))[0].value == b"first"
            deleted, revision = await client.delete_at(key)
            assert deleted == 1 and revision > created
            assert await client.delete_at(key) == (0, revision)  # nothing: no new revision
        finally:
            await client.close()
    run(scenario())


def test_a_watch_from_a_compacted_revision_says_so_and_which_is_the_oldest_kept(etcd):
    async def scenario():
        client = Etcd(etcd.endpoint)
        try:
            key = b"/test/watch/compacted"
            first = await client.put(key, b"a")
            latest = await client.put(key, b"b")
            compact(etcd.endpoint, latest)
            with pytest.raises(EtcdCompacted) as compacted:
                async for _ in client.watch(key, first):
                    pass
            assert compacted.value.compact_revision == latest
            with pytest.raises(EtcdCompacted):  # a read as of then is refused alike
                await client.get_prefix(b"/test/watch/", revision=first)
            (then,), _ = await client.get_prefix(b"/test/watch/", revision=latest,
                                                 keys_only=True)
            assert (then.key, then.value, then.mod_revision) == (key, b"", latest)
            async for event in client.watch(key, latest):  # the oldest kept is still there
                assert (event.revision, event.value) == (latest, b"b")
                break
        finally:
            await client.close()
    run(scenario())


def test_a_revoked_lease_takes_its_key_and_renewing_it_answers_0(etcd):
    async def scenario():
        client = Etcd(etcd.endpoint)
        try:
            lease_id, ttl_s = await client.grant_lease(5)
            assert lease_id and ttl_s == 5
            assert await client.renew_lease(lease_id) == 5
            created, _ = await client.create(b"/test/lease/one", b"held", lease_id=lease_id)
            assert created
            await client.revoke_lease(lease_id)
            assert (await client.get(b"/test/lease/one"))[0] is None
            assert await client.renew_lease(lease_id) == 0
            assert await client.lease_ttl_s(lease_id) == -1
            await client.revoke_lease(lease_id)  # already gone: no error
        finally:
            await client.close()
    run(scenario())


def test_an_etcd_nobody_listens_for_is_unavailable_within_the_timeout():
    async def scenario():
        client = Etcd(f"127.0.0.1:{free_port()}", timeout_s=0.5)
        try:
            with pytest.raises(EtcdUnavailable, match="range failed"):
                await client.get(b"/test")
            with pytest.raises(EtcdUnavailable, match="keep-alive failed"):
                await client.renew_lease(1)
        finally:
            await client.close()
    run(scenario())


def test_the_install_script_leaves_etcd_on_path_and_no_system_etcd_on_2379(etcd):
    import shutil
    import socket
    import subprocess

    from etcd_server import INSTALL_SCRIPT

    done = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert shutil.which("etcd") is not None
    with socket.socket() as probe:  # the package's own service was not started
        assert probe.connect_ex(("127.0.0.1", 2379)) != 0
