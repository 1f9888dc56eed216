"""The catalog every shard of a cluster shares, in a real etcd, applied by real shard
processes: plans deleted and API keys made or revoked through any shard reach every shard,
a shard that was down applies exactly the changes it missed (from the revision its log
holds), and a refused change writes nothing to etcd."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import grpc
import pytest

import quotad_client as qc
from quotad.cluster.etcd import Etcd
from quotad.cluster.limits import CATALOG_VALUE_BYTES_MAX
from quotad_contract.shards import EtcdTarget, slot_of
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as pb_grpc
from etcd_server import EtcdProcess, compact
from server_process import ServerProcess
from test_etcd_cluster import (
    CALL_TIMEOUT_S, PLAN, EtcdCluster, init, plan_quota, shard, wait_until,
)

ADMIN_KEY = "admin-" + "k" * 32
APP = "acme"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, etcd):
    cluster = EtcdCluster(tmp_path_factory.mktemp("catalog"), etcd, count=2,
                          env={"QUOTAD_ADMIN_KEY": ADMIN_KEY}).start()
    try:
        yield cluster
    finally:
        cluster.close()


def client(cluster: EtcdCluster, shard_id: int, api_key: str = ADMIN_KEY) -> qc.QuotaClient:
    return qc.QuotaClient(cluster.addresses[shard_id], api_key=api_key,
                          timeout_s=CALL_TIMEOUT_S)


def etcd_state(cluster: EtcdCluster) -> tuple[int, list[tuple[bytes, bytes]]]:
    """etcd's revision and every key of the cluster's catalog, with its value."""
    parsed = EtcdTarget.parse(cluster.target)

    async def read() -> tuple[int, list[tuple[bytes, bytes]]]:
        etcd = Etcd(parsed.endpoint)
        try:
            found, revision = await etcd.get_prefix(parsed.prefix + b"catalog/")
            return revision, [(kv.key, kv.value) for kv in found]
        finally:
            await etcd.close()
    return asyncio.run(read())


def delete_by_hand(cluster: EtcdCluster, key: bytes) -> None:
    parsed = EtcdTarget.parse(cluster.target)

    async def delete() -> None:
        etcd = Etcd(parsed.endpoint)
        try:
            assert await etcd.delete(parsed.prefix + key) == 1
        finally:
            await etcd.close()
    asyncio.run(delete())


def authenticates(cluster: EtcdCluster, shard_id: int, api_key: str) -> bool:
    with client(cluster, shard_id, api_key) as caller:
        try:
            caller.list_plans()
            return True
        except qc.Unauthenticated:
            return False


def listed(cluster: EtcdCluster, shard_id: int) -> list[qc.ApiKey]:
    with client(cluster, shard_id) as admin:
        return admin.list_keys(app=APP)


def test_a_key_made_on_one_shard_authenticates_on_every_shard_until_revoked_on_another(
        cluster):
    with client(cluster, 0) as admin:
        made = admin.create_key("secret", name="backend", app=APP)  # answered once applied
    assert authenticates(cluster, 0, made.secret)
    wait_until(lambda: authenticates(cluster, 1, made.secret), "shard 1 takes the key")
    _, stored = etcd_state(cluster)
    (value,) = [value for key, value in stored if key.endswith(made.key.key_id.encode())]
    assert made.secret.encode() not in value and json.loads(value)["secret_sha256"]
    assert listed(cluster, 0) == listed(cluster, 1), "both shards list the key alike"
    with client(cluster, 1, made.secret) as own:  # the key revokes itself, on shard 1
        assert own.revoke_key(made.key.key_id).revoked_at is not None
    assert not authenticates(cluster, 1, made.secret)
    wait_until(lambda: not authenticates(cluster, 0, made.secret), "shard 0 refuses it")
    assert listed(cluster, 0) == listed(cluster, 1)
    assert listed(cluster, 0)[-1].revoked_at is not None


def test_a_plan_deleted_on_one_shard_or_in_etcd_by_hand_is_gone_on_every_shard(cluster):
    with client(cluster, 0) as admin:
        key = admin.create_key("secret", app=APP).secret
    wait_until(lambda: authenticates(cluster, 1, key), "shard 1 takes the key")
    for plan_id in ("doomed", "by-hand"):
        with client(cluster, 0, key) as zero:
            zero.upsert_plan({**PLAN, "id": plan_id})
    with client(cluster, 1, key) as one:
        wait_until(lambda: plan_quota(one, "doomed") and plan_quota(one, "by-hand"),
                   "shard 1 has both plans")
        one.delete_plan("doomed")  # answered once deleted on shard 1
        assert plan_quota(one, "doomed") is None
    with client(cluster, 0, key) as zero:
        wait_until(lambda: plan_quota(zero, "doomed") is None, "shard 0 deletes it too")
    delete_by_hand(cluster, b"catalog/plans/" + APP.encode() + b"\0by-hand")
    for shard_id in (0, 1):
        with client(cluster, shard_id, key) as direct:
            wait_until(lambda: plan_quota(direct, "by-hand") is None,
                       f"shard {shard_id} deletes the plan deleted in etcd")


def test_refused_catalog_changes_write_nothing_to_etcd_nor_any_shard(cluster):
    with client(cluster, 0) as admin:
        key = admin.create_key("secret", app=APP).secret
    wait_until(lambda: authenticates(cluster, 1, key), "shard 1 takes the key")
    user = next(f"user-{n}" for n in range(10_000)
                if cluster.shard_map.owner(slot_of(APP, f"user-{n}")).shard_id == 0)
    with client(cluster, 0, key) as zero:
        zero.upsert_plan({**PLAN, "id": "in-use"})
        zero.subscribe(user, "in-use")
    before = etcd_state(cluster)
    keys_before = [listed(cluster, shard_id) for shard_id in (0, 1)]
    metadata = (("authorization", f"Bearer {ADMIN_KEY}"),)
    with client(cluster, 0, key) as zero:
        with pytest.raises(qc.FailedPrecondition, match="subscribers"):
            zero.delete_plan("in-use")  # a subscriber on this shard
        with pytest.raises(qc.NotFound):
            zero.delete_plan("never-made")
    for shard_id, address in enumerate(cluster.addresses):
        with grpc.insecure_channel(address) as channel:
            admin = pb_grpc.AdminServiceStub(channel)
            refusals = [
                (admin.CreateKey, pb.CreateKeyRequest(app=APP), "kind"),
                (admin.CreateKey, pb.CreateKeyRequest(kind=pb.KEY_KIND_SECRET), "app"),
                (admin.RevokeKey, pb.RevokeKeyRequest(key_id="not-a-key-id"), "key_id"),
            ]
            for call, request, field in refusals:
                with pytest.raises(grpc.RpcError) as refused:
                    call(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, shard_id
                assert field in refused.value.details()
            with pytest.raises(grpc.RpcError) as unknown:
                admin.RevokeKey(pb.RevokeKeyRequest(key_id="a" * 12), metadata=metadata,
                                timeout=CALL_TIMEOUT_S)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert etcd_state(cluster) == before
    assert [listed(cluster, shard_id) for shard_id in (0, 1)] == keys_before
    with client(cluster, 1, key) as one:
        assert plan_quota(one, "in-use") == PLAN["limit_groups"][0]["quota"]


def test_a_restarted_shard_applies_exactly_the_changes_it_missed_from_its_logged_revision(
        cluster):
    with client(cluster, 0) as admin:
        kept = admin.create_key("secret", app=APP).secret
    wait_until(lambda: authenticates(cluster, 1, kept), "shard 1 takes the key")
    with client(cluster, 0, kept) as zero:
        zero.upsert_plan({**PLAN, "id": "deleted-while-down"})
    with client(cluster, 1, kept) as one:
        wait_until(lambda: plan_quota(one, "deleted-while-down"), "shard 1 has the plan")
    assert cluster.shards[1].stop() == 0
    last_applied, _ = etcd_state(cluster)
    with client(cluster, 0) as admin:
        missed = admin.create_key("secret", app=APP)  # four changes while shard 1 is down
        admin.revoke_key(missed.key.key_id)
    with client(cluster, 0, kept) as zero:
        zero.upsert_plan({**PLAN, "id": "while-down"})
        zero.delete_plan("deleted-while-down")  # the last change: a delete
    after_changes, _ = etcd_state(cluster)
    cluster.shards[1] = cluster.start_shard(1)
    applied = cluster.shards[1].last("catalog applied")  # before it served
    assert applied["changes"] == 4 and applied["applied_revision"] == after_changes
    assert applied["resumed_from_revision"] <= last_applied  # its log's, not a full read
    assert not authenticates(cluster, 1, missed.secret)
    with client(cluster, 1, kept) as one:
        assert plan_quota(one, "while-down") is not None
        assert plan_quota(one, "deleted-while-down") is None

    assert cluster.shards[1].stop() == 0  # again, with etcd compacting the missed change
    with client(cluster, 0, kept) as zero:
        zero.upsert_plan({**PLAN, "id": "compacted-away"})
    revision, stored = etcd_state(cluster)
    compact(EtcdTarget.parse(cluster.target).endpoint, revision)
    cluster.shards[1] = cluster.start_shard(1)
    applied = cluster.shards[1].last("catalog applied")
    assert applied["changes"] == 1 and applied["applied_revision"] == revision
    assert cluster.shards[1].last("the catalog's changes since the last applied are "
                                  "compacted in etcd; reading the whole catalog")
    with client(cluster, 1, kept) as one:
        assert plan_quota(one, "compacted-away") is not None


def test_a_restarted_shard_whose_missed_deletes_etcd_compacted_away_deletes_what_etcd_lacks(
        cluster):
    """A plan deleted and a key deleted from etcd while shard 1 is down, with etcd compacted
    past them: shard 1 reads the whole catalog and deletes here what it lacks (the key:
    revoked), but a plan its own user still subscribes to (kept, the refusal logged) and the
    plans of its own --plans file."""
    with client(cluster, 0) as admin:
        kept = admin.create_key("secret", app=APP).secret
        doomed = admin.create_key("secret", app=APP)
        default_app = admin.create_key("secret", app="default").secret  # a --plans file's app
    wait_until(lambda: authenticates(cluster, 1, doomed.secret), "shard 1 takes the keys")
    with client(cluster, 0, kept) as zero:
        for plan_id in ("gone-while-down", "subscribed-on-1"):
            zero.upsert_plan({**PLAN, "id": plan_id})
    user = next(f"subscriber-{n}" for n in range(10_000)
                if cluster.shard_map.owner(slot_of(APP, f"subscriber-{n}")).shard_id == 1)
    with client(cluster, 1, kept) as one:
        wait_until(lambda: plan_quota(one, "gone-while-down") and plan_quota(
            one, "subscribed-on-1"), "shard 1 has both plans")
        one.subscribe(user, "subscribed-on-1")
    assert cluster.shards[1].stop() == 0  # with its own --plans file from now on
    own = ServerProcess(cluster.folder / "data-1", extra_args=(
        "--cluster", cluster.target, "--shard-id", "1", "--lease-ttl-s", str(cluster.ttl_s)),
        env=cluster.env)
    cluster.shards[1] = own.start(cluster.addresses[1])
    with client(cluster, 1, default_app) as one:
        own_plans = [plan.id for plan in one.list_plans()]
    assert own_plans
    assert cluster.shards[1].stop() == 0
    with client(cluster, 0, kept) as zero:  # no subscriber on shard 0: deleted from etcd
        zero.delete_plan("gone-while-down")
        zero.delete_plan("subscribed-on-1")
    delete_by_hand(cluster, b"catalog/keys/" + doomed.key.key_id.encode())
    revision, _ = etcd_state(cluster)
    compact(EtcdTarget.parse(cluster.target).endpoint, revision)
    own = ServerProcess(cluster.folder / "data-1", extra_args=own.extra_args, env=cluster.env)
    cluster.shards[1] = own.start(cluster.addresses[1])

    applied = cluster.shards[1].last("catalog applied")  # before it served
    assert applied["changes"] == 3 and applied["applied_revision"] == revision
    assert cluster.shards[1].last("the catalog's changes since the last applied are "
                                  "compacted in etcd; reading the whole catalog")
    deleted = [line for line in cluster.shards[1].log_lines if line.get("message") == (
        "deleting here what the catalog no longer holds: its delete is compacted away in etcd")]
    assert sorted(line["key"].rpartition("/")[2].rpartition("\0")[2] for line in deleted) == \
        sorted(["gone-while-down", "subscribed-on-1", doomed.key.key_id])
    assert all(line["revision"] == revision for line in deleted)
    refused = cluster.shards[1].last("a change of the catalog was refused by this shard")
    assert refused["key"].endswith("subscribed-on-1") and refused["revision"] == revision
    assert "subscribers" in refused["error"]
    assert not authenticates(cluster, 1, doomed.secret)
    assert [key.revoked_at is not None for key in listed(cluster, 1)
            if key.key_id == doomed.key.key_id] == [True]
    with client(cluster, 1, kept) as one:
        assert plan_quota(one, "gone-while-down") is None
        assert plan_quota(one, "subscribed-on-1") == PLAN["limit_groups"][0]["quota"]
        one.reserve(user, "openai.chat", 10).release()  # its subscriber served as before
    with client(cluster, 1, default_app) as one:
        assert [plan.id for plan in one.list_plans()] == own_plans


def test_a_user_token_signed_on_one_shard_lets_a_pk_key_read_usage_on_another(cluster):
    user = next(f"reader-{n}" for n in range(10_000)
                if cluster.shard_map.owner(slot_of(APP, f"reader-{n}")).shard_id == 1)
    with client(cluster, 0) as admin:
        secret = admin.create_key("secret", app=APP).secret
        public = admin.create_key("public", app=APP).secret
    wait_until(lambda: authenticates(cluster, 1, secret), "shard 1 takes the sk key")
    with client(cluster, 0, secret) as zero:
        zero.upsert_plan({**PLAN, "id": "readable"})
        token = zero.mint_user_token(user).token  # signed on shard 0
    with client(cluster, 1, secret) as one:
        one.subscribe(user, "readable")
    with qc.QuotaClient(cluster.addresses[1], api_key=public, user_token=token,
                        timeout_s=CALL_TIMEOUT_S) as browser:
        assert browser.usage(user)["tokens"].used == 0  # verified on shard 1


def test_a_value_in_etcd_that_is_not_what_its_key_holds_is_skipped_and_following_goes_on(
        cluster):
    parsed = EtcdTarget.parse(cluster.target)
    too_big = b"x" * (CATALOG_VALUE_BYTES_MAX + 1)

    async def put_by_hand() -> None:
        etcd = Etcd(parsed.endpoint)
        try:
            await etcd.put(parsed.prefix + b"catalog/plans/" + APP.encode() + b"\0big", too_big)
            await etcd.put(parsed.prefix + b"catalog/keys/bbbbbbbbbbbb", b"{not json")
        finally:
            await etcd.close()
    asyncio.run(put_by_hand())
    with client(cluster, 0) as admin:
        key = admin.create_key("secret", app=APP).secret  # applied after the two bad ones
    for shard_id in (0, 1):
        wait_until(lambda: authenticates(cluster, shard_id, key), f"shard {shard_id} follows")
        skipped = [line["key"] for line in cluster.shards[shard_id].log_lines if line.get(
            "message") == "a value in the catalog is not what its key holds; skipped"]
        assert [key[-3:] for key in skipped[-2:]] == ["big", "bbb"], skipped
        with client(cluster, shard_id, key) as direct:
            assert plan_quota(direct, "big") is None
    assert all(key.key_id != "bbbbbbbbbbbb" for key in listed(cluster, 0))


def test_a_shard_whose_data_applied_a_revision_its_etcd_has_not_reached_exits_2(
        cluster, tmp_path):
    with client(cluster, 0) as admin:
        kept = admin.create_key("secret", app=APP).secret
    wait_until(lambda: authenticates(cluster, 1, kept), "shard 1 takes the key")
    assert cluster.shards[1].stop() == 0
    other = EtcdProcess(tmp_path / "other-etcd").start()  # a new etcd: its revisions restart
    try:
        target = f"etcd://{other.endpoint}/other"
        assert init(target, cluster.addresses).returncode == 0
        stray = shard(cluster.folder, target, 1, env=cluster.env).launch(cluster.addresses[1])
        assert stray.process.wait(timeout=CALL_TIMEOUT_S * 4) == 2
        refused = stray.last("cannot join the cluster's catalog")
        assert "belongs with another etcd" in refused["error"]
        assert not any(line.get("message") == "serving" for line in stray.log_lines)
        stray.close()
    finally:
        other.stop()
        other.close()
    cluster.shards[1] = cluster.start_shard(1)  # its own cluster again: as it was
    assert cluster.shards[1].last("catalog applied")["changes"] == 0
    assert authenticates(cluster, 1, kept)


@pytest.mark.parametrize("size", [CATALOG_VALUE_BYTES_MAX, CATALOG_VALUE_BYTES_MAX + 1])
def test_a_catalog_value_is_read_up_to_its_size_limit_and_skipped_unread_past_it(size):
    """At CATALOG_VALUE_BYTES_MAX bytes a value is decoded (here it is no plan, so the
    decoder refuses it); one byte more and it is refused before anything reads it."""
    from quotad.cluster.catalog import PLANS, Catalog

    def decode_plan(value: bytes):
        raise ValueError("decoded: not a plan")
    catalog = Catalog(None, EtcdTarget.parse("etcd://127.0.0.1:1/edge"),
                      decode_plan=decode_plan, execute=None, applied_revision=0)
    with pytest.raises(ValueError) as refused:
        catalog._command(catalog.prefix + PLANS + APP.encode() + b"\0p", b"x" * size, 1)
    expected = "decoded" if size <= CATALOG_VALUE_BYTES_MAX else f"over {CATALOG_VALUE_BYTES_MAX}"
    assert expected in str(refused.value)


class EtcdPausedAtWatch(Etcd):
    """Our etcd client, with the etcd process it talks to paused (SIGSTOP) as the first watch
    opens: a catch-up has read the catalog, and the changes it then waits for cannot come
    until etcd is resumed (SIGCONT)."""

    def __init__(self, process: EtcdProcess) -> None:
        super().__init__(process.endpoint)
        self.pid = process.process.pid
        self.paused = False

    def watch(self, key: bytes, start_revision: int, *, prefix: bool = False):
        if not self.paused:
            os.kill(self.pid, signal.SIGSTOP)
            self.paused = True
        return super().watch(key, start_revision, prefix=prefix)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


@pytest.mark.parametrize("resumed", [True, False], ids=["etcd-back-before-the-limit",
                                                         "etcd-back-past-the-limit"])
def test_a_starting_shard_waits_for_missed_changes_up_to_catalog_catch_up_timeout_s(
        tmp_path, monkeypatch, resumed):
    """A shard that restarts with a change to catch up on, its etcd pausing as the catalog's
    watch opens. etcd back at half of CATALOG_CATCH_UP_TIMEOUT_S: the catch-up waited for it
    and applied the change. Not back: the catch-up gives up at the limit (EtcdUnavailable,
    on which the shard goes on starting, server.join_catalog), and the change is applied
    once etcd answers. A real etcd, writer and log; the limit set to 2 s, each bound on the
    time taken a second from what it rules out, so a loaded machine passes it."""
    from quotad.cluster import catalog as catalog_module
    from quotad.cluster.catalog import Catalog
    from quotad.cluster.etcd import EtcdUnavailable
    from quotad.engine.recovery import recover
    from quotad.engine.writer import Writer
    from quotad.server import _plan_from_value
    from quotad.storage.wal import WriteAheadLog

    limit_s = 2.0
    monkeypatch.setattr(catalog_module, "CATALOG_CATCH_UP_TIMEOUT_S", limit_s)
    etcd_process = EtcdProcess(tmp_path / "etcd").start()
    target = EtcdTarget.parse(f"etcd://{etcd_process.endpoint}/edge")
    wal = WriteAheadLog(tmp_path / "data")

    def plan_value(plan_id: str) -> bytes:
        return pb.Plan(id=plan_id, name=plan_id, limit_groups=[pb.LimitGroup(
            key="t", quota=10, window=pb.DAY, match=pb.Match(event_types=["*"]))]
        ).SerializeToString()

    async def scenario() -> tuple[float, int | None, bool, bool]:
        writer = Writer(recover(wal), wal, on_failure=lambda error: None)
        writer.start()
        etcd = Etcd(etcd_process.endpoint)
        paused = EtcdPausedAtWatch(etcd_process)
        restarted = None
        try:
            first = Catalog(etcd, target, decode_plan=_plan_from_value, execute=writer.execute,
                            applied_revision=writer.core.catalog_revision)
            await etcd.put(first.plan_key(APP, "before"), plan_value("before"))
            assert await first.catch_up() == 1  # its first start: the whole catalog
            await etcd.put(first.plan_key(APP, "missed"), plan_value("missed"))  # while down

            def missed_applied() -> bool:
                return "missed" in writer.core.apps[APP].plans

            restarted = Catalog(paused, target, decode_plan=_plan_from_value,
                                execute=writer.execute,
                                applied_revision=writer.core.catalog_revision)
            began = time.monotonic()
            if resumed:
                asyncio.get_running_loop().call_later(limit_s / 2, paused.resume)
            try:
                changes = await restarted.catch_up()
            except EtcdUnavailable as error:
                assert f"not all applied within {limit_s:g} s" in str(error)
                changes = None
            took_s = time.monotonic() - began
            applied_when_done = missed_applied()
            paused.resume()
            for _ in range(200):  # then followed on, once etcd answers: within 10 s
                if missed_applied():
                    break
                await asyncio.sleep(0.05)
            return took_s, changes, applied_when_done, missed_applied()
        finally:
            paused.resume()
            if restarted is not None and restarted._follower is not None:
                restarted._follower.cancel()
                await asyncio.gather(restarted._follower, return_exceptions=True)
            await paused.close()
            await etcd.close()
            await writer.close()

    try:
        took_s, changes, applied_when_done, applied_after = asyncio.run(scenario())
    finally:
        wal.close()
        etcd_process.stop()
        etcd_process.close()
    if resumed:  # it waited for etcd, then applied the change, before the limit
        assert limit_s / 2 <= took_s < limit_s, took_s
        assert changes == 1 and applied_when_done
    else:  # it waited the limit, no more, and went on; the change came once etcd answered
        assert limit_s <= took_s < limit_s + 1.0, took_s
        assert changes is None and not applied_when_done
    assert applied_after
