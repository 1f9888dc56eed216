"""A cluster of shards, each a real quotad process on 127.0.0.1 with a static shard map:
reservation ids carry their user's slot, a shard refuses another shard's users with
WRONG_SHARD (having changed nothing), GetShardMap, and the clients' routing."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import quotad_client as qc
from quotad_contract.errors import ErrorReason
from quotad_contract.shards import ShardMap, slot_of, slot_of_reservation
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as pb_grpc
from quotad.cluster.etcd_process import free_ports
from server_process import ServerProcess

APP = "default"
"""Without API keys every call is app default's."""
THREE_SHARDS = ("0-1364", "1365-2729", "2730-4095")
MOVED_SHARDS = ("0-1000", "1001-2729,4000-4095", "2730-3999")
"""THREE_SHARDS with slots 1001-1364 moved from shard 0 to 1 and 4000-4095 from 2 to 1."""
CALL_TIMEOUT_S = 10.0


def write_map(path: Path, addresses: list[str], slots: tuple[str, ...]) -> ShardMap:
    path.write_text(json.dumps({"shards": [
        {"id": shard_id, "address": address, "slots": text}
        for shard_id, (address, text) in enumerate(zip(addresses, slots))]}))
    return ShardMap.from_json(path.read_text())


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(3)]
        self.map_file = folder / "shards.json"
        self.shard_map = write_map(self.map_file, self.addresses, THREE_SHARDS)
        self.shards: list[ServerProcess | None] = [None, None, None]

    def start(self) -> Cluster:
        """Starts the shards; if one does not start, those started are killed."""
        try:
            for shard_id, address in enumerate(self.addresses):
                self.shards[shard_id] = ServerProcess(
                    self.folder / f"data-{shard_id}",
                    extra_args=("--log-state-digest", "--shard-map", str(self.map_file),
                                "--shard-id", str(shard_id))).start(address)
        except BaseException:
            self.close()
            raise
        return self

    def stop(self) -> None:
        for shard in self.shards:
            if shard is not None:
                assert shard.stop() == 0

    def close(self) -> None:
        for shard in self.shards:
            if shard is not None:
                shard.close()

    def owner(self, user_id: str) -> int:
        return self.shard_map.owner(slot_of(APP, user_id)).shard_id

    def users(self, shard_id: int, count: int, prefix: str = "user") -> list[str]:
        """The first `count` users named prefix-N that shard_id owns."""
        found = [f"{prefix}-{n}" for n in range(10_000) if self.owner(f"{prefix}-{n}") == shard_id]
        assert len(found) >= count
        return found[:count]


@pytest.fixture
def cluster(tmp_path: Path):
    cluster = Cluster(tmp_path).start()
    try:
        yield cluster
    finally:
        cluster.close()



def test_a_cluster_whose_shard_cannot_start_leaves_none_of_its_shards_running(tmp_path: Path):
    cluster = Cluster(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:  # shard 2's port
        taken.bind(("127.0.0.1", int(cluster.addresses[2].rsplit(":", 1)[1])))
        taken.listen()
        with pytest.raises(RuntimeError, match="cannot listen there"):
            cluster.start()
    started = [shard for shard in cluster.shards if shard is not None]
    assert len(started) == 2
    assert all(shard.process is not None and shard.process.poll() is not None
               for shard in started)

def digest(channel: grpc.Channel) -> bytes:
    stub = pb_grpc.AdminServiceStub(channel)
    return stub.GetStateDigest(pb.GetStateDigestRequest(), timeout=CALL_TIMEOUT_S).digest


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


def assert_wrong_shard(status: grpc.StatusCode, info: error_details_pb2.ErrorInfo,
                       cluster: Cluster, slot: int) -> None:
    owner = cluster.shard_map.owner(slot)
    assert status == grpc.StatusCode.FAILED_PRECONDITION
    assert info.reason == ErrorReason.WRONG_SHARD and info.domain == "quotad"
    assert dict(info.metadata) == {"slot": str(slot), "shard_id": str(owner.shard_id),
                                   "address": owner.address}


def test_every_reservation_id_a_server_hands_out_starts_with_its_users_slot(server):
    users = [f"rsv-user-{n}" for n in range(40)]
    with qc.QuotaClient(server.address, timeout_s=CALL_TIMEOUT_S) as client:
        for user in users:
            client.subscribe(user, "free")
        ids = {user: client.reserve(user, "openai.chat", 1).reservation_id for user in users}

    async def coalesced() -> dict[str, str]:
        async with qc.AsyncQuotaClient(server.address, timeout_s=CALL_TIMEOUT_S) as client:
            holds = await asyncio.gather(*(client.reserve(user, "openai.chat", 1)
                                           for user in users))
            return {user: hold.reservation_id for user, hold in zip(users, holds)}

    for found in (ids, asyncio.run(coalesced())):  # Reserve alone, and inside Batch RPCs
        for user, reservation_id in found.items():
            assert reservation_id.startswith(f"rsv_{slot_of(APP, user):03x}")
            assert slot_of_reservation(reservation_id) == slot_of(APP, user)


def foreign_requests(user: str, reservation_id: str) -> list[tuple[str, str, object]]:
    """(service, RPC, request) for every unary RPC that names a user or a hold."""
    return [
        ("quota", "Reserve", pb.ReserveRequest(user_id=user, event_type="openai.chat", amount=1)),
        ("quota", "Commit", pb.CommitRequest(reservation_id=reservation_id)),
        ("quota", "Release", pb.ReleaseRequest(reservation_id=reservation_id)),
        ("quota", "Extend", pb.ExtendRequest(reservation_id=reservation_id)),
        ("quota", "Track", pb.TrackRequest(user_id=user, event_type="openai.chat", amount=1)),
        ("quota", "GetUsage", pb.GetUsageRequest(user_id=user)),
        ("quota", "GrantCredits", pb.GrantCreditsRequest(user_id=user, group_key="tokens",
                                                         amount=5)),
        ("quota", "ListGrants", pb.ListGrantsRequest(user_id=user)),
        ("admin", "UpsertSubscription", pb.UpsertSubscriptionRequest(user_id=user,
                                                                     plan_id="pro")),
        ("admin", "GetSubscription", pb.GetSubscriptionRequest(user_id=user)),
        ("admin", "ListEvents", pb.ListEventsRequest(user_id=user)),
    ]


def test_a_shard_refuses_every_call_for_another_shards_user_having_changed_nothing(cluster):
    mine, theirs = cluster.users(0, 1)[0], cluster.users(1, 1)[0]
    with qc.QuotaClient(cluster.addresses[1], timeout_s=CALL_TIMEOUT_S) as owner:
        owner.subscribe(theirs, "free")
        reservation_id = owner.reserve(theirs, "openai.chat", 10).reservation_id
    with qc.QuotaClient(cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as first:
        first.subscribe(mine, "free")
    slot = slot_of(APP, theirs)
    assert slot_of_reservation(reservation_id) == slot
    channels = [grpc.insecure_channel(address) for address in cluster.addresses]
    try:
        before = [digest(channel) for channel in channels]
        stubs = {"quota": pb_grpc.QuotaServiceStub(channels[0]),
                 "admin": pb_grpc.AdminServiceStub(channels[0])}
        for service, rpc, request in foreign_requests(theirs, reservation_id):
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stubs[service], rpc)(request, timeout=CALL_TIMEOUT_S)
            assert_wrong_shard(refused.value.code(), error_info(refused.value), cluster, slot)
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(stubs["quota"].WatchUsage(pb.WatchUsageRequest(user_id=theirs),
                                                timeout=CALL_TIMEOUT_S)))
        assert_wrong_shard(refused.value.code(), error_info(refused.value), cluster, slot)
        operations = [pb.BatchOperation(**{rpc.lower() if rpc != "GetUsage" else "get_usage":
                                           request})
                      for service, rpc, request in foreign_requests(theirs, reservation_id)
                      if rpc in ("Reserve", "Commit", "Release", "Extend", "Track", "GetUsage")]
        response = stubs["quota"].Batch(pb.BatchRequest(operations=operations),
                                        timeout=CALL_TIMEOUT_S)
        assert len(response.results) == 6
        for result in response.results:
            assert result.WhichOneof("result") == "error"
            info = error_details_pb2.ErrorInfo()
            assert result.error.details[-1].Unpack(info)
            assert_wrong_shard(grpc.StatusCode.FAILED_PRECONDITION, info, cluster, slot)
            assert result.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert [digest(channel) for channel in channels] == before
        # Each operation of a Batch is checked alone: this shard's user's is applied.
        mixed = stubs["quota"].Batch(pb.BatchRequest(operations=[
            pb.BatchOperation(track=pb.TrackRequest(user_id=mine, event_type="openai.chat",
                                                    amount=3)),
            pb.BatchOperation(track=pb.TrackRequest(user_id=theirs, event_type="openai.chat",
                                                    amount=3))]), timeout=CALL_TIMEOUT_S)
        assert [r.WhichOneof("result") for r in mixed.results] == ["track", "error"]
        # Plans are the catalog: every shard takes them.
        stubs["admin"].GetPlan(pb.GetPlanRequest(id="free"), timeout=CALL_TIMEOUT_S)
    finally:
        for channel in channels:
            channel.close()


@pytest.mark.parametrize("shards, flags, named", [
    ([{"id": 0, "address": "127.0.0.1:1", "slots": "0-4094"}], ("--shard-id", "0"),
     "slots 4095 are owned by no shard"),
    ([{"id": 0, "address": "127.0.0.1:1", "slots": "0-4095"},
      {"id": 1, "address": "127.0.0.1:2", "slots": "7"}], ("--shard-id", "0"),
     "slot 7 is owned by shards 0 and 1"),
    ([{"id": 0, "address": "nowhere", "slots": "0-4095"}], ("--shard-id", "0"),
     "'nowhere' is not HOST:PORT"),
    ([{"id": 0, "address": "127.0.0.1:1", "slots": "0-4095"}], ("--shard-id", "3"),
     "no shard 3"),
    ([{"id": 0, "address": "127.0.0.1:1", "slots": "0-4095"}], (),
     "--shard-map and --shard-id go together"),
])
def test_a_bad_shard_map_exits_2_naming_the_problem(tmp_path, shards, flags, named):
    import subprocess
    import sys
    map_file = tmp_path / "shards.json"
    map_file.write_text(json.dumps({"shards": shards}))
    done = subprocess.run([sys.executable, "-m", "quotad", "serve", "--listen", "127.0.0.1:0",
                           "--data-dir", str(tmp_path / "data"), "--shard-map", str(map_file),
                           *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_every_shard_answers_the_whole_map_and_which_shard_it_is(cluster):
    for shard_id, shard in enumerate(cluster.shards):
        assert shard is not None
        serving = shard.last("serving")
        assert (serving["shard_id"], serving["slots"]) == (shard_id, THREE_SHARDS[shard_id])
    for shard_id, address in enumerate(cluster.addresses):
        with grpc.insecure_channel(address) as channel:
            answer = pb_grpc.QuotaServiceStub(channel).GetShardMap(pb.GetShardMapRequest(),
                                                                   timeout=CALL_TIMEOUT_S)
        assert answer.shard_id == shard_id and answer.app == APP
        assert [(s.shard_id, s.address, [(r.first, r.last) for r in s.slots])
                for s in answer.shards] == [
            (0, cluster.addresses[0], [(0, 1364)]), (1, cluster.addresses[1], [(1365, 2729)]),
            (2, cluster.addresses[2], [(2730, 4095)])]


def test_a_server_alone_answers_one_shard_owning_every_slot_at_its_address(server):
    with grpc.insecure_channel(server.address) as channel:
        answer = pb_grpc.QuotaServiceStub(channel).GetShardMap(pb.GetShardMapRequest(),
                                                               timeout=CALL_TIMEOUT_S)
    assert answer.shard_id == 0 and answer.app == APP
    assert [(s.shard_id, s.address, [(r.first, r.last) for r in s.slots])
            for s in answer.shards] == [(0, server.address, [(0, 4095)])]


def test_one_client_reaches_users_on_all_three_shards_and_commits_a_hold_through_them(cluster):
    users = [user for shard_id in range(3) for user in cluster.users(shard_id, 3, "sync")]
    with qc.QuotaClient(cluster=cluster.addresses[1], timeout_s=CALL_TIMEOUT_S) as client:
        client.upsert_plan({"id": "p", "name": "P", "limit_groups": [
            {"key": "tokens", "label": "Tokens", "unit": "tokens", "quota": 1000,
             "window": "month", "match": {"event_types": ["openai.*"]}}]})
        for user in users:
            client.subscribe(user, "free")
            hold = client.reserve(user, "openai.chat", 100)
            assert slot_of_reservation(hold.reservation_id) == slot_of(APP, user)
            client.commit(hold.reservation_id, 40)
            with client.reserve(user, "openai.chat", 50) as guarded:
                guarded.actual = 7
            client.track(user, "openai.chat", 3)
            assert client.usage(user)["tokens"].used == 50
    # each user is on its own shard only
    for shard_id, address in enumerate(cluster.addresses):
        with qc.QuotaClient(address, timeout_s=CALL_TIMEOUT_S) as direct:
            for user in users:
                if cluster.owner(user) == shard_id:
                    assert direct.usage(user)["tokens"].used == 50
                else:
                    with pytest.raises(qc.FailedPrecondition) as refused:
                        direct.usage(user)
                    assert refused.value.reason == ErrorReason.WRONG_SHARD


def test_the_async_client_coalesces_per_shard_and_reaches_every_shard(cluster):
    users = [user for shard_id in range(3) for user in cluster.users(shard_id, 4, "async")]

    async def scenario() -> tuple[list[int], int]:
        async with qc.AsyncQuotaClient(cluster=cluster.addresses[2],
                                       timeout_s=CALL_TIMEOUT_S) as client:
            for user in users:
                await client.subscribe(user, "free")

            async def spend(user: str) -> None:
                async with client.reserve(user, "openai.chat", 20) as hold:
                    hold.actual = 5
                await client.track(user, "openai.chat", 1)

            await asyncio.gather(*(spend(user) for user in users for _ in range(5)))
            used = [(await client.usage(user))["tokens"].used for user in users]
            return used, len(client._shards)

    used, other_shards = asyncio.run(scenario())
    assert used == [5 * 6] * len(users)
    assert other_shards == 2  # a channel and a coalescer for each shard besides the target


def test_quotactl_with_cluster_sends_each_users_command_to_its_shard(cluster):
    import json
    import subprocess
    import sys
    user = cluster.users(2, 1, "ctl")[0]

    def quotactl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "quotad_client.ctl", "--target",
                               cluster.addresses[0], *args], capture_output=True, text=True,
                              timeout=60)

    refused = quotactl("subscribe", user, "free")
    assert refused.returncode == 1 and "belongs to shard 2" in refused.stderr
    assert quotactl("--cluster", "subscribe", user, "free").returncode == 0
    shown = quotactl("--cluster", "usage", user, "--json")
    assert shown.returncode == 0, shown.stderr
    listed = quotactl("--cluster", "subscriptions", "--json")  # every shard's, merged
    assert listed.returncode == 0, listed.stderr
    assert user in [json.loads(line)["user_id"] for line in listed.stdout.splitlines()]
    alone = quotactl("subscriptions", "--json")  # the target's own: the user is not there
    assert alone.returncode == 0, alone.stderr
    assert user not in [json.loads(line)["user_id"] for line in alone.stdout.splitlines()]
    with qc.QuotaClient(cluster.addresses[2], timeout_s=CALL_TIMEOUT_S) as owner:
        assert owner.get_subscription(user).plan_id == "free"


def test_a_direct_call_to_the_wrong_shard_names_the_right_one(cluster):
    user = cluster.users(2, 1, "direct")[0]
    with qc.QuotaClient(cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as direct:
        with pytest.raises(qc.FailedPrecondition) as refused:
            direct.subscribe(user, "free")
    assert refused.value.reason == ErrorReason.WRONG_SHARD
    assert cluster.addresses[2] in str(refused.value)


def test_after_the_map_moves_slots_the_clients_fetch_it_again_and_succeed(cluster):
    moving = [user for user in cluster.users(0, 800, "moving")
              if 1001 <= slot_of(APP, user) <= 1364]
    by_sync, by_async = moving[:3], moving[3:6]
    assert len(by_async) == 3

    def move_slots() -> None:
        cluster.stop()
        cluster.shard_map = write_map(cluster.map_file, cluster.addresses, MOVED_SHARDS)
        cluster.start()

    async def scenario() -> list[int]:
        with qc.QuotaClient(cluster=cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as sync, \
                qc.QuotaClient(cluster=cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as watcher:
            async with qc.AsyncQuotaClient(cluster=cluster.addresses[0],
                                           timeout_s=CALL_TIMEOUT_S) as client:
                for user in by_sync:
                    sync.subscribe(user, "free")      # on shard 0, under the first map
                for user in by_async:
                    await client.subscribe(user, "free")
                watcher.usage(by_sync[0])  # the watcher has the first map too
                await asyncio.to_thread(move_slots)
                assert {cluster.owner(user) for user in moving[:6]} == {1}
                # Both clients still route by the old map: shard 0 refuses, each fetches the
                # map again and the call goes to shard 1. (The users' data stays on shard 0:
                # moving it is not part of this step, so they subscribe again there.)
                for user in by_sync:
                    sync.subscribe(user, "free")
                    hold = sync.reserve(user, "openai.chat", 10)
                    assert sync.commit(hold.reservation_id, 4).committed == 4
                watch = watcher.watch_usage(by_sync[0], reconnect=False)
                assert next(watch).counter("tokens").used == 4  # opened again on shard 1
                watch.close()
                for user in by_async:  # a coalesced call: WRONG_SHARD inside a Batch, then
                    with pytest.raises(qc.FailedPrecondition) as refused:  # shard 1's answer
                        await client.track(user, "openai.chat", 1)
                    assert refused.value.reason == ErrorReason.NO_PLAN
                    await client.subscribe(user, "free")
                for user in by_async:
                    async with client.reserve(user, "openai.chat", 10) as hold:
                        hold.actual = 3
                return [(await client.usage(user))["tokens"].used for user in moving[:6]]

    assert asyncio.run(scenario()) == [4, 4, 4, 3, 3, 3]


def test_a_client_given_a_shard_with_an_older_map_asks_the_refusing_shard_for_its_map(
        cluster):
    # Shards 0 and 1 restart on the moved map; shard 2, the one the clients are given, keeps
    # the first (as a shard may for a moment while a map spreads). Its map routes the users
    # to shard 0, which refuses them: the clients must take the refusing shard's map.
    moving = [user for user in cluster.users(0, 800, "stale")
              if 1001 <= slot_of(APP, user) <= 1364][:3]
    assert len(moving) == 3
    moved_file = cluster.folder / "shards-moved.json"
    write_map(moved_file, cluster.addresses, MOVED_SHARDS)
    for shard_id in (0, 1):
        shard = cluster.shards[shard_id]
        assert shard is not None and shard.stop() == 0
        cluster.shards[shard_id] = ServerProcess(
            cluster.folder / f"data-{shard_id}",
            extra_args=("--shard-map", str(moved_file), "--shard-id", str(shard_id)),
        ).start(cluster.addresses[shard_id])

    async def scenario() -> list[int]:
        with qc.QuotaClient(cluster=cluster.addresses[2], timeout_s=CALL_TIMEOUT_S) as sync:
            async with qc.AsyncQuotaClient(cluster=cluster.addresses[2],
                                           timeout_s=CALL_TIMEOUT_S) as client, \
                    qc.AsyncQuotaClient(cluster=cluster.addresses[2],
                                        timeout_s=CALL_TIMEOUT_S) as watcher:
                sync.subscribe(moving[0], "free")
                sync.commit(sync.reserve(moving[0], "openai.chat", 10).reservation_id, 4)
                watch = sync.watch_usage(moving[0], reconnect=False)
                assert next(watch).counter("tokens").used == 4
                watch.close()
                updates = watcher.watch_usage(moving[0], reconnect=False)  # its first call
                assert (await anext(updates)).counter("tokens").used == 4
                await updates.aclose()
                for user in moving[1:]:
                    await client.subscribe(user, "free")
                    await client.track(user, "openai.chat", 3)  # coalesced: inside a Batch
                return [(await client.usage(user))["tokens"].used for user in moving]

    assert asyncio.run(scenario()) == [4, 3, 3]
    with qc.QuotaClient(cluster.addresses[1], timeout_s=CALL_TIMEOUT_S) as owner:
        assert [owner.usage(user)["tokens"].used for user in moving] == [4, 3, 3]


def test_a_server_alone_is_a_one_shard_cluster_reached_where_the_client_asked(start_server):
    server = start_server(listen="localhost:0")  # it answers the map naming localhost:PORT
    target = "127.0.0.1:" + server.address.rpartition(":")[2]
    with qc.QuotaClient(cluster=target, timeout_s=CALL_TIMEOUT_S) as client:
        for user in ("alone-1", "alone-2", "alone-3"):
            client.subscribe(user, "free")
            with client.reserve(user, "openai.chat", 10) as hold:
                hold.actual = 2
            assert client.usage(user)["tokens"].used == 2
        assert client._shard_stubs == {}  # no second channel to the same server

    async def through_async() -> int:
        async with qc.AsyncQuotaClient(cluster=target, timeout_s=CALL_TIMEOUT_S) as client:
            await asyncio.gather(*(client.track("alone-1", "openai.chat", 1) for _ in range(9)))
            assert client._shards == {}
            return (await client.usage("alone-1"))["tokens"].used

    assert asyncio.run(through_async()) == 11


def test_the_browser_endpoint_refuses_another_shards_user_as_grpc_does(tmp_path):
    import http.client
    ports = free_ports(2)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    shard_map = write_map(tmp_path / "shards.json", addresses, ("0-2047", "2048-4095"))
    shard = ServerProcess(tmp_path / "data", extra_args=(
        "--shard-map", str(tmp_path / "shards.json"), "--shard-id", "0",
        "--http-listen", "127.0.0.1:0")).start(addresses[0])
    try:
        theirs = next(f"web-{n}" for n in range(1000) if slot_of(APP, f"web-{n}") >= 2048)
        host, _, port = shard.http_address.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
        connection.request("GET", f"/v1/usage?user_id={theirs}")
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
        connection.close()
        assert (response.status, error["code"], error["reason"]) == (
            409, "FAILED_PRECONDITION", "WRONG_SHARD")
        assert error["metadata"] == {"slot": str(slot_of(APP, theirs)), "shard_id": "1",
                                     "address": shard_map.owner(2048).address}
    finally:
        shard.close()
