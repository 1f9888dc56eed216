"""A cluster whose control plane is a real etcd (loopback, free ports) and whose shards are
real quotad processes: `quotad cluster init` writes the map, `quotad serve --cluster` loads
and follows it, and a shard serves only while it holds its shard id's etcd lease (fencing):
a second process with the same id never serves, and a shard that cannot renew stops serving
before its lease could expire, and resumes once it holds it again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import quotad_client as qc
from quotad.cluster.control import ShardLease
from quotad.cluster.etcd import Etcd
from quotad.cluster.limits import LEASE_SAFETY_FRACTION
from quotad.cluster.etcd_process import free_port, free_ports
from quotad_contract.errors import ErrorReason
from quotad_contract.shards import EtcdTarget, Shard, ShardMap, slot_of
from server_process import ROOT, ServerProcess

APP = "default"
CALL_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 60.0
LEASE_TTL_S = 2
"""Short, to keep the lease tests quick: a shard stops serving ~1.6 s after its last renewal."""
WAIT_S = 15.0
WAITING = "another process holds this shard id's lease; waiting for it"
POLL_S = 0.05
PLAN = {"id": "p", "name": "P", "limit_groups": [
    {"key": "tokens", "label": "Tokens", "unit": "tokens", "quota": 1_000_000,
     "window": "month", "match": {"event_types": ["openai.*"]}}]}

_names = iter(range(1_000_000))


def new_target(etcd) -> str:
    """A cluster of its own in the module's etcd (keys under /quotad/NAME/)."""
    return f"etcd://{etcd.endpoint}/test-{next(_names)}-{int(time.time() * 1000) % 100000}"


def quotad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotad", *args], capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S, cwd=ROOT)


def stored_map(target: str) -> bytes | None:
    parsed = EtcdTarget.parse(target)

    async def read() -> bytes | None:
        etcd = Etcd(parsed.endpoint)
        try:
            found, _ = await etcd.get(parsed.shard_map_key)
            return None if found is None else found.value
        finally:
            await etcd.close()
    return asyncio.run(read())


def put_map(target: str, shard_map: ShardMap) -> None:
    parsed = EtcdTarget.parse(target)

    async def write() -> None:
        etcd = Etcd(parsed.endpoint)
        try:
            await etcd.put(parsed.shard_map_key, shard_map.to_json().encode())
        finally:
            await etcd.close()
    asyncio.run(write())


def init(target: str, addresses: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    flags = [flag for address in addresses for flag in ("--address", address)]
    return quotad("cluster", "init", "--cluster", target, "--shards", str(len(addresses)),
                  *flags, *extra)


def shard(folder: Path, target: str, shard_id: int, *, ttl_s: int = LEASE_TTL_S,
          data: str = "", env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(folder / (data or f"data-{shard_id}"), plans=None,
                         extra_args=("--cluster", target, "--shard-id", str(shard_id),
                                     "--lease-ttl-s", str(ttl_s)), env=env)


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S).status


def users_of(shard_map: ShardMap, shard_id: int, count: int, prefix: str = "user") -> list[str]:
    found = [f"{prefix}-{n}" for n in range(10_000)
             if shard_map.owner(slot_of(APP, f"{prefix}-{n}")).shard_id == shard_id]
    return found[:count]


HEALTH_FOLLOWS_GATE_S = 1.0
"""How soon health reports what the gate does: the gate refuses calls from the instant the
lease lapses, health changes by a timer a millisecond later and a task on the next turn of
the loop (a busy machine stretches both)."""


def _health_follows(address: str, status: int) -> None:
    wait_until(lambda: health(address) == status, f"health reports {status} at {address}",
               timeout_s=HEALTH_FOLLOWS_GATE_S)


def wait_until(condition, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"not within {timeout_s} s: {what}")


class EtcdCluster:
    """N shards of one cluster in etcd, each a quotad process on its own port."""

    def __init__(self, folder: Path, etcd, count: int = 3, ttl_s: int = LEASE_TTL_S,
                 env: dict[str, str] | None = None) -> None:
        self.folder, self.target, self.ttl_s, self.env = folder, new_target(etcd), ttl_s, env
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(count)]
        done = init(self.target, self.addresses)
        assert done.returncode == 0, done.stderr
        self.shard_map = ShardMap.from_json(done.stdout)
        self.shards: list[ServerProcess] = []

    def start(self) -> EtcdCluster:
        """Starts the shards; if one does not start, those started are killed."""
        try:
            for shard_id in range(len(self.addresses)):
                self.shards.append(self.start_shard(shard_id))
        except BaseException:
            self.close()
            raise
        return self

    def start_shard(self, shard_id: int) -> ServerProcess:
        """Shard shard_id's process on its address, with its data directory (anew after a
        stop: the same data)."""
        return shard(self.folder, self.target, shard_id, ttl_s=self.ttl_s,
                     env=self.env).start(self.addresses[shard_id])

    def close(self) -> None:
        for process in self.shards:
            process.close()


@pytest.fixture
def cluster(tmp_path: Path, etcd):
    cluster = EtcdCluster(tmp_path, etcd).start()
    try:
        yield cluster
    finally:
        cluster.close()


# --- cluster init ------------------------------------------------------------------------------

def test_cluster_init_writes_the_slots_split_evenly_and_refuses_a_second_map(etcd):
    target = new_target(etcd)
    done = init(target, ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
    assert done.returncode == 0, done.stderr
    written = ShardMap.from_json(stored_map(target).decode())
    assert written == ShardMap.from_json(done.stdout)
    assert [len(s.slots) for s in written.shards] == [1366, 1365, 1365]
    assert [s.address for s in written.shards] == ["127.0.0.1:7001", "127.0.0.1:7002",
                                                   "127.0.0.1:7003"]
    again = init(target, ["127.0.0.1:8001"])
    assert again.returncode == 2 and "already" in again.stderr and "--replace" in again.stderr
    assert stored_map(target) == written.to_json().encode()  # nothing changed
    replaced = init(target, ["127.0.0.1:8001"], "--replace")
    assert replaced.returncode == 0, replaced.stderr
    assert ShardMap.from_json(stored_map(target).decode()).shards[0].address == "127.0.0.1:8001"


@pytest.mark.parametrize(("args", "named"), [
    (["--cluster", "http://127.0.0.1:1/x", "--shards", "1", "--address", "h:1"],
     "etcd://HOST:PORT/NAME"),
    (["--cluster", "etcd://127.0.0.1:1/a/b", "--shards", "1", "--address", "h:1"],
     "etcd://HOST:PORT/NAME"),
    (["--cluster", "etcd://127.0.0.1:1/" + "n" * 65, "--shards", "1", "--address", "h:1"],
     "over 64"),
    (["--cluster", "{target}", "--shards", "2", "--address", "h:1"], "needs 2 --address"),
    (["--cluster", "{target}", "--shards", "0", "--address", "h:1"], "--shards must be 1"),
    (["--cluster", "{target}", "--shards", "1", "--address", "no-port"], "not HOST:PORT"),
    (["--cluster", "{target}", "--shards", "2", "--address", "h:1", "--address", "h:1"],
     "different"),
])
def test_cluster_init_refuses_bad_input_naming_it_and_writes_nothing(etcd, args, named):
    target = new_target(etcd)
    done = quotad("cluster", "init", *[arg.replace("{target}", target) for arg in args])
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert stored_map(target) is None


def test_cluster_init_without_etcd_exits_2_within_its_connect_timeout():
    started = time.monotonic()
    done = quotad("cluster", "init", "--cluster", f"etcd://127.0.0.1:{free_port()}/x",
                  "--shards", "1", "--address", "h:1")
    assert done.returncode == 2 and "did not answer" in done.stderr, done.stderr
    assert time.monotonic() - started < 20


# --- serve --cluster: bad input ----------------------------------------------------------------

def test_serve_cluster_refuses_bad_flags_naming_them(tmp_path, etcd):
    target = new_target(etcd)
    data = str(tmp_path / "data")
    cases = [
        (["--cluster", target], "--cluster needs --shard-id"),
        (["--cluster", "etcd://nowhere", "--shard-id", "0"], "etcd://HOST:PORT/NAME"),
        (["--cluster", target, "--shard-id", "0", "--shard-map", "x.json"], "give one"),
        (["--cluster", target, "--shard-id", "0", "--lease-ttl-s", "1"], "--lease-ttl-s"),
        (["--cluster", target, "--shard-id", "-1"], "--shard-id must be"),
        (["--cluster", target, "--shard-id", "0"], "no shard map"),  # not initialised
    ]
    for flags, named in cases:
        done = quotad("serve", "--listen", "127.0.0.1:0", "--data-dir", data, *flags)
        assert done.returncode == 2 and named in done.stderr, (flags, done.stderr)
        assert "Traceback" not in done.stderr
    assert init(target, ["127.0.0.1:7001"]).returncode == 0
    done = quotad("serve", "--listen", "127.0.0.1:0", "--data-dir", data, "--cluster", target,
                  "--shard-id", "5")
    assert done.returncode == 2 and "no shard 5" in done.stderr, done.stderr
    assert not (tmp_path / "data").exists()  # refused before touching the data directory


# --- serving from etcd -------------------------------------------------------------------------

def test_three_shards_from_etcd_serve_their_users_and_refuse_the_others(cluster):
    shard_map = cluster.shard_map
    with qc.QuotaClient(cluster=cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as client:
        client.upsert_plan(PLAN)  # the catalog is each shard's own, for now
        for address in cluster.addresses[1:]:
            with qc.QuotaClient(address, timeout_s=CALL_TIMEOUT_S) as direct:
                direct.upsert_plan(PLAN)
        for shard_id in range(3):
            for user in users_of(shard_map, shard_id, 3):
                client.subscribe(user, "p")
                hold = client.reserve(user, "openai.chat", 100)
                client.commit(hold.reservation_id, 40)
                assert client.usage(user)["tokens"].used == 40
    user = users_of(shard_map, 2, 1)[0]
    with qc.QuotaClient(cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as wrong:
        with pytest.raises(qc.FailedPrecondition) as refused:
            wrong.usage(user)
    assert refused.value.reason == ErrorReason.WRONG_SHARD
    for process in cluster.shards:
        assert health(process.address) == health_pb2.HealthCheckResponse.SERVING


def test_a_shard_follows_the_map_in_etcd_as_it_changes(cluster):
    shard_map = cluster.shard_map
    user = users_of(shard_map, 0, 1, "moving")[0]
    slot = slot_of(APP, user)
    with qc.QuotaClient(cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as first, \
            qc.QuotaClient(cluster.addresses[1], timeout_s=CALL_TIMEOUT_S) as second:
        first.upsert_plan(PLAN)
        second.upsert_plan(PLAN)
        first.subscribe(user, "p")
        # the user's slot moves from shard 0 to shard 1, in etcd only: both shards follow
        zero, one, two = shard_map.shards
        put_map(cluster.target, ShardMap.of([
            Shard(0, zero.address, zero.slots - {slot}), Shard(1, one.address, one.slots | {slot}),
            two]))

        def refused_by_first() -> bool:
            try:
                first.usage(user)
            except qc.FailedPrecondition as error:
                return error.reason == ErrorReason.WRONG_SHARD
            return False
        wait_until(refused_by_first, "shard 0 refuses the moved user")
        second.subscribe(user, "p")  # now shard 1's
        assert second.usage(user)["tokens"].used == 0
        with qc.QuotaClient(cluster=cluster.addresses[2], timeout_s=CALL_TIMEOUT_S) as routed:
            assert routed.usage(user)["tokens"].used == 0  # routed by the new map
    assert "shard map changed" in {line.get("message") for line in cluster.shards[0].log_lines}


# --- fencing ----------------------------------------------------------------------------------

def test_a_second_process_with_a_taken_shard_id_never_serves_until_the_first_stops(
        tmp_path, etcd):
    target = new_target(etcd)
    addresses = [f"127.0.0.1:{port}" for port in free_ports(2)]
    assert init(target, addresses[:1]).returncode == 0
    first = shard(tmp_path, target, 0).start(addresses[0])
    second = shard(tmp_path, target, 0, data="data-second")
    try:
        second.launch(addresses[1])
        second.wait_for(WAITING, WAIT_S)
        assert health(addresses[1]) == health_pb2.HealthCheckResponse.NOT_SERVING
        with qc.QuotaClient(addresses[1], timeout_s=CALL_TIMEOUT_S, retries=0) as refused:
            for _ in range(3):
                with pytest.raises(qc.QuotadError) as unavailable:
                    refused.usage("anyone")
                assert unavailable.value.code == grpc.StatusCode.UNAVAILABLE
                assert "lease" in str(unavailable.value)
                time.sleep(LEASE_TTL_S / 2)  # well past a renewal, still refused
        assert health(addresses[0]) == health_pb2.HealthCheckResponse.SERVING
        assert "serving" not in {line.get("message") for line in second.log_lines}
        assert first.stop() == 0  # gives the lease back: the second takes the shard id
        second.wait_for("serving", WAIT_S)
        assert health(addresses[1]) == health_pb2.HealthCheckResponse.SERVING
        assert second.stop() == 0
    finally:
        first.close()
        second.close()


def test_a_lease_timer_that_fires_before_the_lapse_is_set_again_and_the_lapse_still_published():
    """The lapse timer may fire a little before the monotonic clock reaches the lapse (a
    loop's timers count whole milliseconds), while held() still holds: it must be set again,
    not dropped, or health would say SERVING for as long as etcd stays away while the gate
    refuses every call. No etcd is reached: only the lease's clock and its timer run."""
    lapse_in_s = 0.2

    async def run() -> list[bool]:
        published: list[bool] = []
        no_etcd: Any = None  # never reached: the lapse timer reads the clock alone
        lease = ShardLease(no_etcd, EtcdTarget.parse("etcd://127.0.0.1:2379/t"), 0, 1,
                           holder={}, on_change=published.append)
        held_ns = int(1e9 * (1 - LEASE_SAFETY_FRACTION))  # a 1 s TTL renewal's hold
        lease._extend(time.monotonic_ns() - held_ns + int(lapse_in_s * 1e9), 1)
        assert published == [True] and lease.held()
        assert lease._timer is not None
        lease._timer.cancel()  # it fires early: as if it ran now, well before the lapse
        lease._lapse_due()
        assert published == [True] and lease.held()  # nothing to publish yet: set again
        await asyncio.sleep(lapse_in_s + 0.3)
        assert not lease.held()
        return published

    assert asyncio.run(run()) == [True, False]


def test_with_etcd_stopped_shards_serve_while_their_lease_lasts_then_refuse_and_resume(
        tmp_path):
    from etcd_server import EtcdProcess, install_etcd

    why = install_etcd()
    if why is not None:
        pytest.skip(why)
    etcd = EtcdProcess(tmp_path / "etcd" / "data").start()  # its own: this test stops it
    cluster = EtcdCluster(tmp_path, etcd, count=2)
    outcomes: list[tuple[float, int, str]] = []
    """(time.monotonic(), shard id, "ok" or the status code's name) of every call of the load."""
    stop_load = threading.Event()

    def load(shard_id: int, user: str) -> None:
        with qc.QuotaClient(cluster.addresses[shard_id], timeout_s=CALL_TIMEOUT_S,
                            retries=0) as client:
            deadline = time.monotonic() + 4 * WAIT_S
            while not stop_load.is_set() and time.monotonic() < deadline:
                try:
                    hold = client.reserve(user, "openai.chat", 1)
                    client.commit(hold.reservation_id, 1)
                    outcomes.append((time.monotonic(), shard_id, "ok"))
                except qc.QuotadError as error:
                    outcomes.append((time.monotonic(), shard_id, error.code.name))
                    assert error.code == grpc.StatusCode.UNAVAILABLE, error
                    assert "lease" in str(error)
                    time.sleep(POLL_S)

    loaders: list[threading.Thread] = []
    try:
        cluster.start()
        users = [users_of(cluster.shard_map, shard_id, 1, "load")[0] for shard_id in range(2)]
        for shard_id, user in enumerate(users):
            with qc.QuotaClient(cluster.addresses[shard_id], timeout_s=CALL_TIMEOUT_S) as admin:
                admin.upsert_plan(PLAN)
                admin.subscribe(user, "p")
        loaders = [threading.Thread(target=load, args=(shard_id, user), daemon=True)
                   for shard_id, user in enumerate(users)]
        for loader in loaders:
            loader.start()
        wait_until(lambda: len(outcomes) > 20, "the load runs")
        stopped_at = time.monotonic()
        etcd.stop()  # etcd exits by its SIGTERM (-15) once it has closed cleanly

        def refused_by_both() -> bool:
            return {shard_id for at, shard_id, outcome in outcomes
                    if at > stopped_at and outcome == "UNAVAILABLE"} == {0, 1}
        wait_until(refused_by_both, "both shards refuse once their lease may have lapsed")
        for shard_id in range(2):
            served = [at - stopped_at for at, sid, outcome in outcomes
                      if sid == shard_id and at > stopped_at and outcome == "ok"]
            first_refused = min(at - stopped_at for at, sid, outcome in outcomes
                                if sid == shard_id and at > stopped_at and outcome != "ok")
            print(f"shard {shard_id}: served {len(served)} calls for "
                  f"{max(served, default=0):.2f} s after etcd stopped; first refusal at "
                  f"{first_refused:.2f} s (TTL {LEASE_TTL_S} s)")
            assert served, "a shard keeps serving while its lease lasts"
            assert first_refused < LEASE_TTL_S, "it stops before the lease could expire"
            _health_follows(cluster.addresses[shard_id], health_pb2.HealthCheckResponse.NOT_SERVING)
        etcd = EtcdProcess(etcd.data_dir, client_port=etcd.client_port,
                           peer_port=etcd.peer_port).start()
        back_at = time.monotonic()

        def resumed_by_both() -> bool:
            return {shard_id for at, shard_id, outcome in outcomes
                    if at > back_at and outcome == "ok"} == {0, 1}
        wait_until(resumed_by_both, "both shards serve again with etcd back")
        for shard_id in range(2):
            _health_follows(cluster.addresses[shard_id], health_pb2.HealthCheckResponse.SERVING)
        stop_load.set()
        for loader in loaders:
            loader.join(timeout=WAIT_S)
        assert [process.stop() for process in cluster.shards] == [0, 0]
    finally:
        stop_load.set()
        cluster.close()
        etcd.close()


# --- clients with an etcd:// target ------------------------------------------------------------

def test_the_clients_and_quotactl_read_the_map_from_etcd_and_reach_every_shard(cluster):
    shard_map = cluster.shard_map
    users = [user for shard_id in range(3) for user in users_of(shard_map, shard_id, 2, "etcd")]
    for address in cluster.addresses:
        with qc.QuotaClient(address, timeout_s=CALL_TIMEOUT_S) as direct:
            direct.upsert_plan(PLAN)
    with qc.QuotaClient(cluster=cluster.target, timeout_s=CALL_TIMEOUT_S) as client:
        for user in users:
            client.subscribe(user, "p")
            hold = client.reserve(user, "openai.chat", 100)
            assert client.commit(hold.reservation_id, 40).committed == 40

    async def through_the_async_client() -> list[int]:
        async with qc.AsyncQuotaClient(cluster=cluster.target,
                                       timeout_s=CALL_TIMEOUT_S) as client:
            async def one(user: str) -> int:
                async with client.reserve(user, "openai.chat", 10) as hold:
                    hold.actual = 2
                return (await client.usage(user))["tokens"].used
            return list(await asyncio.gather(*(one(user) for user in users)))
    assert asyncio.run(asyncio.wait_for(through_the_async_client(), WAIT_S)) == [42] * len(users)
    for user in users:  # each user's counters are on its own shard
        owner = cluster.addresses[shard_map.owner(slot_of(APP, user)).shard_id]
        with qc.QuotaClient(owner, timeout_s=CALL_TIMEOUT_S) as direct:
            assert direct.usage(user)["tokens"].used == 42
    done = subprocess.run([sys.executable, "-m", "quotad_client.ctl", "--cluster", cluster.target,
                           "usage", users[-1]], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "42" in done.stdout


def test_after_a_slot_moves_in_etcd_the_clients_refresh_on_wrong_shard_and_succeed(cluster):
    shard_map = cluster.shard_map
    user = users_of(shard_map, 0, 1, "refresh")[0]
    slot = slot_of(APP, user)
    for address in cluster.addresses:
        with qc.QuotaClient(address, timeout_s=CALL_TIMEOUT_S) as direct:
            direct.upsert_plan(PLAN)
    with qc.QuotaClient(cluster=cluster.target, timeout_s=CALL_TIMEOUT_S) as sync:
        sync.subscribe(user, "p")
        assert sync.usage(user)["tokens"].used == 0  # routed to shard 0, by the map as it was

        async def open_async() -> qc.AsyncQuotaClient:
            client = qc.AsyncQuotaClient(cluster=cluster.target, timeout_s=CALL_TIMEOUT_S)
            await client.usage(user)  # its routes: the map as it was
            return client

        async def scenario() -> None:
            client = await open_async()
            try:
                zero, one, two = shard_map.shards
                await asyncio.to_thread(put_map, cluster.target, ShardMap.of([
                    Shard(0, zero.address, zero.slots - {slot}),
                    Shard(1, one.address, one.slots | {slot}), two]))
                with qc.QuotaClient(cluster.addresses[1], timeout_s=CALL_TIMEOUT_S) as new_owner:
                    def taken() -> bool:
                        try:
                            new_owner.subscribe(user, "p")
                            return True
                        except qc.FailedPrecondition as error:
                            assert error.reason == ErrorReason.WRONG_SHARD
                            return False
                    await asyncio.to_thread(wait_until, taken, "shard 1 takes the moved user")
                with qc.QuotaClient(cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as old_owner:
                    def released() -> bool:  # each shard follows etcd on its own time
                        try:
                            old_owner.usage(user)
                            return False
                        except qc.FailedPrecondition as error:
                            return error.reason == ErrorReason.WRONG_SHARD
                    await asyncio.to_thread(wait_until, released, "shard 0 lets the user go")
                # both clients still route the user to shard 0: WRONG_SHARD, refresh, shard 1
                async with client.reserve(user, "openai.chat", 5) as hold:
                    hold.actual = 5
                hold = sync.reserve(user, "openai.chat", 7)
                sync.commit(hold.reservation_id, 7)
                assert (await client.usage(user))["tokens"].used == 12
            finally:
                await client.close()
        asyncio.run(asyncio.wait_for(scenario(), 2 * WAIT_S))


def test_an_etcd_target_that_is_bad_unreachable_or_holds_no_map_is_refused_clearly(etcd):
    with pytest.raises(ValueError, match="etcd://HOST:PORT/NAME"):
        qc.QuotaClient(cluster="etcd://127.0.0.1/prod")
    with pytest.raises(ValueError, match="etcd://HOST:PORT/NAME"):
        qc.AsyncQuotaClient(cluster="etcd://127.0.0.1:2379/")
    with pytest.raises(qc.Unavailable, match="cannot read the shard map from etcd"):
        qc.QuotaClient(cluster=f"etcd://127.0.0.1:{free_port()}/prod", timeout_s=1.0)
    with pytest.raises(ValueError, match="no shard map"):
        qc.QuotaClient(cluster=new_target(etcd))
    done = subprocess.run([sys.executable, "-m", "quotad_client.ctl", "--cluster",
                           f"etcd://127.0.0.1:{free_port()}/prod", "usage", "u1"],
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert done.returncode == 2 and "cannot read the shard map" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_shard_whose_lease_key_another_lease_takes_stops_serving_and_takes_it_back_after(
        tmp_path, etcd):
    target = new_target(etcd)
    address = f"127.0.0.1:{free_port()}"
    assert init(target, [address]).returncode == 0
    process = shard(tmp_path, target, 0).start(address)
    key = EtcdTarget.parse(target).lease_key(0)

    async def take_key() -> int:
        client = Etcd(etcd.endpoint)
        try:
            lease_id, _ = await client.grant_lease(30)
            await client.delete(key)
            await client.put(key, b'{"address": "elsewhere"}', lease_id=lease_id)
            return lease_id
        finally:
            await client.close()

    async def revoke(lease_id: int) -> None:
        client = Etcd(etcd.endpoint)
        try:
            await client.revoke_lease(lease_id)
        finally:
            await client.close()

    try:
        assert health(address) == health_pb2.HealthCheckResponse.SERVING
        other = asyncio.run(take_key())
        wait_until(lambda: health(address) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   "the shard stops serving once its key is another lease's", LEASE_TTL_S * 2)
        with qc.QuotaClient(address, timeout_s=CALL_TIMEOUT_S, retries=0) as client:
            with pytest.raises(qc.Unavailable, match="lease"):
                client.usage("anyone")
        asyncio.run(revoke(other))  # the other holder is gone: the shard takes its id back
        wait_until(lambda: health(address) == health_pb2.HealthCheckResponse.SERVING,
                   "the shard serves again")
        assert process.stop() == 0
    finally:
        process.close()


def test_kill_9_of_one_shard_under_load_spares_the_others_and_loses_nothing_acknowledged(
        cluster):
    shard_map = cluster.shard_map
    users = [users_of(shard_map, shard_id, 1, "kill")[0] for shard_id in range(3)]
    for address in cluster.addresses:
        with qc.QuotaClient(address, timeout_s=CALL_TIMEOUT_S) as direct:
            direct.upsert_plan(PLAN)
    acknowledged = [0, 0, 0]
    refused: list[tuple[float, int]] = []
    stop_load = threading.Event()

    def load(shard_id: int) -> None:
        user = users[shard_id]
        with qc.QuotaClient(cluster=cluster.target, timeout_s=CALL_TIMEOUT_S,
                            retries=0) as client:
            client.subscribe(user, "p")
            deadline = time.monotonic() + 4 * WAIT_S
            while not stop_load.is_set() and time.monotonic() < deadline:
                try:
                    client.track(user, "openai.chat", 1)
                    acknowledged[shard_id] += 1
                except qc.QuotadError as error:
                    assert error.code == grpc.StatusCode.UNAVAILABLE, error
                    refused.append((time.monotonic(), shard_id))
                    time.sleep(POLL_S)

    loaders = [threading.Thread(target=load, args=(shard_id,), daemon=True)
               for shard_id in range(3)]
    try:
        for loader in loaders:
            loader.start()
        wait_until(lambda: min(acknowledged) > 20, "the load runs on every shard")
        cluster.shards[1].kill()
        killed_at = time.monotonic()
        before = list(acknowledged)
        wait_until(lambda: any(sid == 1 for _, sid in refused), "shard 1's user is refused")
        wait_until(lambda: all(acknowledged[s] > before[s] + 20 for s in (0, 2)),
                   "the other shards' users are served meanwhile")
        assert {sid for _, sid in refused} == {1}
        # restarted on its data: it waits for the killed process's lease to expire, then serves
        cluster.shards[1] = shard(cluster.folder, cluster.target, 1).start(cluster.addresses[1])
        print(f"shard 1 served again {time.monotonic() - killed_at:.2f} s after kill -9 "
              f"(lease TTL {LEASE_TTL_S} s)")
        mark = acknowledged[1]
        wait_until(lambda: acknowledged[1] > mark + 20, "shard 1's user is served again")
        stop_load.set()
        for loader in loaders:
            loader.join(timeout=WAIT_S)
        with qc.QuotaClient(cluster=cluster.target, timeout_s=CALL_TIMEOUT_S) as client:
            for shard_id, user in enumerate(users):  # every acknowledged track is there
                assert client.usage(user)["tokens"].used >= acknowledged[shard_id]
                assert client.usage(user)["tokens"].used <= acknowledged[shard_id] + 1
    finally:
        stop_load.set()


# --- the catalog in etcd -----------------------------------------------------------------------

def plan_quota(client: qc.QuotaClient, plan_id: str) -> int | None:
    try:
        plan = client.get_plan(plan_id)
    except qc.NotFound:
        return None
    return plan.limit_groups[0].quota


def test_a_plan_upserted_on_one_shard_is_every_shards_and_a_restarted_shard_catches_up(
        cluster):
    plan = {**PLAN, "id": "shared"}
    with qc.QuotaClient(cluster.addresses[1], timeout_s=CALL_TIMEOUT_S) as one:
        assert one.upsert_plan(plan).changed  # answered once applied on shard 1
        assert plan_quota(one, "shared") == 1_000_000
        assert not one.upsert_plan(plan).changed
    for address in cluster.addresses:
        with qc.QuotaClient(address, timeout_s=CALL_TIMEOUT_S) as direct:
            wait_until(lambda: plan_quota(direct, "shared") == 1_000_000,
                       f"shard at {address} applies the plan")
    user = users_of(cluster.shard_map, 2, 1, "catalog")[0]
    with qc.QuotaClient(cluster=cluster.target, timeout_s=CALL_TIMEOUT_S) as client:
        client.subscribe(user, "shared")  # on shard 2, with the plan written through shard 1
        client.reserve(user, "openai.chat", 10).release()
    assert cluster.shards[2].stop() == 0
    changed = {**plan, "limit_groups": [{**PLAN["limit_groups"][0], "quota": 7}]}
    with qc.QuotaClient(cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as zero:
        assert zero.upsert_plan(changed).changed  # shard 2 is down meanwhile
    cluster.shards[2] = shard(cluster.folder, cluster.target, 2).start(cluster.addresses[2])
    with qc.QuotaClient(cluster.addresses[2], timeout_s=CALL_TIMEOUT_S) as two:
        assert plan_quota(two, "shared") == 7  # applied before it served
    applied = cluster.shards[2].last("catalog applied")
    assert applied["changes"] == 1 and applied["resumed_from_revision"] > 0  # only the missed


def test_an_invalid_plan_is_refused_before_the_catalog_and_no_shard_sees_it(cluster):
    bad = {**PLAN, "id": "bad", "limit_groups": [PLAN["limit_groups"][0]] * 2}  # keys twice
    with qc.QuotaClient(cluster.addresses[0], timeout_s=CALL_TIMEOUT_S) as zero:
        with pytest.raises(qc.InvalidArgument, match="unique"):
            zero.upsert_plan(bad)
    parsed = EtcdTarget.parse(cluster.target)

    async def stored() -> int:
        etcd = Etcd(parsed.endpoint)
        try:
            found, _ = await etcd.get_prefix(parsed.prefix + b"catalog/")
            return len(found)
        finally:
            await etcd.close()
    assert asyncio.run(stored()) == 0
    for address in cluster.addresses:
        with qc.QuotaClient(address, timeout_s=CALL_TIMEOUT_S) as direct:
            assert plan_quota(direct, "bad") is None
