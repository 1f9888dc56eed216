"""Moving slots with their users' state between two shards of a cluster in a real etcd, each
shard a real quotad process on loopback, while 64 callers run through one
AsyncQuotaClient(cluster=...): the move (quotactl cluster move-slots' steps, in process so
that it starts within the load) freezes the slots on the source, hands their users' state to
the target's log, flips the map in one etcd transaction and has the source forget them; a
second load runs after it, on the target. The history checker (test_history's) then proves that no call was
admitted twice or denied falsely and that the final usage is exactly what the history implies;
a hold taken before the move commits after it, on the target; a key used before the move gets
its first answer after it; a kill -9 of the target loses nothing of what it took in.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from history_checker import check
from core_helpers import APP as CORE_APP
from quotad.api.moves import export_chunks, scan_keys
from quotad.core.commands import FreezeSlots, Track, UpsertPlan, UpsertSubscription
from quotad.core.limits import MOVE_CHUNK_BYTES_MAX
from quotad.core.values import replace
from quotad.engine.recovery import recover
from quotad.engine.writer import Writer
from quotad.storage.codec import decode_slot_state
from quotad.storage.wal import WriteAheadLog
from test_core_move import PLAN as CORE_PLAN
from test_cluster_history import subscribed
from test_core_move import users_in_slots
from quotad_client import AsyncQuotaClient, FailedPrecondition
from quotad_client._errors import error_from_rpc_error
from quotad_contract.errors import ErrorReason
from quotad_client.moves import MoveRefused, move_slots
from quotad_contract.shards import EtcdTarget, ShardMap, format_slots, slot_of
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc
from server_process import ROOT
from test_etcd_cluster import (
    APP, COMMAND_TIMEOUT_S, EtcdCluster, put_map, shard, stored_map, users_of, wait_until,
)
from test_history import G, P, QUOTA_ALL, QUOTA_PREMIUM, ClientCalls, assert_sound, run_calls

OPS_DURING, OPS_AFTER = 8_000, 2_000
"""Calls of the load the move starts in (it outlasts the freeze by far), then of a load that
starts once the move is done (on the target)."""
CLIENTS = 64
LIMIT_S = 40.0
MOVE_AFTER_S = 0.2
"""The move starts this long into the first load."""
RPC_TIMEOUT_S = 30.0
KEY = "before-the-move"


def quotactl(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotad_client.ctl", "--cluster", target,
                           "--timeout-s", "10", *args], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, cwd=ROOT)


def admin(address: str) -> quotad_pb2_grpc.AdminServiceStub:
    return quotad_pb2_grpc.AdminServiceStub(grpc.insecure_channel(address))


def digest(address: str) -> pb.GetStateDigestResponse:
    return admin(address).GetStateDigest(pb.GetStateDigestRequest(), timeout=RPC_TIMEOUT_S)


def with_a_user_of_the_target(cluster: EtcdCluster, user: str) -> list[str]:
    """A user of shard 0, and one of shard 1: subscribing both waits until the plan has
    reached both shards through etcd (shard 1 adopts only users whose plan it has)."""
    return [user, *users_of(cluster.shard_map, 1, 1, f"{user}-target")]


@pytest.fixture
def two_shards(tmp_path: Path, etcd):
    cluster = EtcdCluster(tmp_path, etcd, count=2).start()
    try:
        yield cluster
    finally:
        cluster.close()


def test_slots_move_under_load_with_their_users_state_and_nothing_lost_or_admitted_twice(
        two_shards: EtcdCluster, tmp_path: Path):
    cluster = two_shards
    shard_map = cluster.shard_map
    source_users = users_of(shard_map, 0, 2, "hot")
    users = tuple(source_users + users_of(shard_map, 1, 2, "hot"))
    [keeper] = [u for u in users_of(shard_map, 0, 3, "keeper")
                if slot_of(APP, u) not in {slot_of(APP, s) for s in source_users}][:1]
    moved = frozenset(slot_of(APP, user) for user in (*source_users, keeper))

    async def scenario():
        async with AsyncQuotaClient(cluster=cluster.target, timeout_s=RPC_TIMEOUT_S) as client:
            await subscribed(client, [*users, keeper])
            # before the move: a hold left live, a keyed track, on the moved keeper
            hold = await client.reserve(keeper, "chat", 40, ttl_s=600)
            first = await client.track(keeper, "chat", 7, idempotency_key=KEY)
            load = asyncio.create_task(run_calls(ClientCalls(client), users, OPS_DURING,
                                                 CLIENTS, LIMIT_S))
            await asyncio.sleep(MOVE_AFTER_S)
            steps: list[tuple[int, str]] = []
            began_ns = time.monotonic_ns()
            await asyncio.to_thread(
                move_slots, EtcdTarget.parse(cluster.target), 0, 1, moved, timeout_s=10.0,
                progress=lambda line: steps.append((time.monotonic_ns(), line)))
            moved_ns = time.monotonic_ns()
            during, _ = await load
            after, _ = await run_calls(ClientCalls(client), users, OPS_AFTER, CLIENTS, LIMIT_S)
            # the second load's holds are labelled apart from the first's
            history = during + [replace(c, hold=f"after.{c.hold}") if c.hold else c
                                for c in after]
            # after the move, on the target: the hold commits, the key gets its first answer
            committed = await client.commit(hold.reservation_id, 30)
            with pytest.raises(FailedPrecondition) as twice:  # read back from the target's log
                await client.commit(hold.reservation_id, 30)
            assert twice.value.reason == ErrorReason.RESERVATION_COMMITTED
            again = await client.track(keeper, "chat", 7, idempotency_key=KEY)
            usage = await client.usage(keeper)
            exported = [line async for page in client.export_usage(timeout_s=RPC_TIMEOUT_S)
                        for line in page.lines]
            return (steps, began_ns, moved_ns, during, history, first, committed, again, usage,
                    exported)

    (steps, began_ns, moved_ns, during, history, first, committed, again,
     usage, exported) = asyncio.run(scenario())
    output = "\n".join(line for _, line in steps)
    print(f"\n{output}\nmove took {(moved_ns - began_ns) / 1e9:.2f} s")
    for step in ("frozen on shard 0", "adopted by shard 1", "map flipped at etcd revision",
                 "forgotten on shard 0: 3 users"):
        assert step in output, output
    chunk_bytes = [int(n) for n in re.findall(r"\((\d+) bytes\)", output)]
    assert len(chunk_bytes) > 1 and max(chunk_bytes) <= MOVE_CHUNK_BYTES_MAX, chunk_bytes
    # the load ran before and during the freeze (calls of the moved users among them), and
    # after the move; every call was answered OK
    [frozen_ns] = [at for at, line in steps if line.startswith("frozen on shard 0")]
    assert any(c.start_ns < began_ns for c in during)
    assert any(c.end_ns > frozen_ns for c in during if c.user in source_users), (
        "the first load ended before the freeze")
    quotas = {(u, G): QUOTA_ALL for u in users} | {(u, P): QUOTA_PREMIUM for u in users}
    report = check(history, quotas)
    print(report.summary(CLIENTS))
    assert_sound(history, quotas, report, OPS_DURING + OPS_AFTER, LIMIT_S, users)
    # the hold taken before the move was committed after it, on the target
    assert (committed.committed, committed.returned, committed.expired) == (30, 10, False)
    assert again.counters == first.counters  # the first answer, nothing counted twice
    [counter] = [c for c in usage.counters if c.key == G]
    assert (counter.used, counter.held) == (7 + 30, 0)
    # the cluster's export: the track before the move from the source's log (which still
    # names the user), the commit after it from the target's
    assert sorted((line.shard_id, line.kind, line.amount) for line in exported
                  if line.user_id == keeper) == [(0, "track", 7), (1, "commit", 30)]
    # the map names the target; the source sends the users there
    assert ShardMap.from_json(stored_map(cluster.target).decode()).owner(
        min(moved)).shard_id == 1
    with pytest.raises(grpc.RpcError) as refused:
        admin(cluster.addresses[0]).GetSubscription(pb.GetSubscriptionRequest(
            user_id=keeper), timeout=RPC_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shard 1" in refused.value.details()

    # kill -9 of the target: its restart replays the adopted state exactly
    before = digest(cluster.addresses[1])
    cluster.shards[1].kill()
    cluster.shards[1].close()
    cluster.shards[1] = shard(cluster.folder, cluster.target, 1,
                              ttl_s=cluster.ttl_s).start(cluster.addresses[1])
    after = wait_until(lambda: digest(cluster.addresses[1]), "the target serving again")
    assert (after.digest, after.sequence) == (before.digest, before.sequence)

    async def usage_after_restart():
        async with AsyncQuotaClient(cluster=cluster.target, timeout_s=RPC_TIMEOUT_S) as client:
            return await client.usage(keeper)
    assert asyncio.run(usage_after_restart()).counters == usage.counters


@pytest.mark.parametrize(("args", "named"), [
    (["--from", "0", "--to", "7", "--slots", "0"], "no shard 7"),
    (["--from", "1", "--to", "1", "--slots", "0"], "both shard 1"),
    (["--from", "0", "--to", "1", "--slots", "4096"], "within 0-4095"),
    (["--from", "0", "--to", "1", "--slots", "5-"], "not FIRST-LAST"),
    (["--from", "0", "--to", "1", "--slots", "3000"], "not shard 0's"),
])
def test_a_bad_move_is_refused_naming_what_is_wrong_and_changes_nothing(
        two_shards: EtcdCluster, args: list[str], named: str):
    cluster = two_shards
    map_before = stored_map(cluster.target)
    digests = [digest(address).digest for address in cluster.addresses]
    done = quotactl(cluster.target, "cluster", "move-slots", *args)
    assert done.returncode == 2 and named in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert stored_map(cluster.target) == map_before
    assert [digest(address).digest for address in cluster.addresses] == digests


def test_the_move_rpcs_refuse_bad_input_with_nothing_changed(two_shards: EtcdCluster):
    cluster = two_shards
    source, target = (admin(address) for address in cluster.addresses)
    owned = format_slots(cluster.shard_map.shard(0).slots)
    digests = [digest(address).digest for address in cluster.addresses]
    refusals = [
        (source.FreezeSlots, pb.FreezeSlotsRequest(slots="x"), "slots"),
        (source.FreezeSlots, pb.FreezeSlotsRequest(slots="4000"), "not this shard's"),
        (source.AdoptSlots, pb.AdoptSlotsRequest(slots="0", first=True), "this shard's"),
        (target.AdoptSlots, pb.AdoptSlotsRequest(slots="0", first=True, state=b"{"), "state"),
        (target.AdoptSlots, pb.AdoptSlotsRequest(slots="0", first=False, state=b"[]"),
         "first chunk"),
        (source.ForgetSlots, pb.ForgetSlotsRequest(slots=owned), "this shard's"),
    ]
    for method, request, named in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            method(request, timeout=RPC_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert named in refused.value.details(), (request, refused.value.details())
    with pytest.raises(grpc.RpcError) as refused:  # nothing is read of slots not frozen
        list(source.ExportSlots(pb.ExportSlotsRequest(slots="0"), timeout=RPC_TIMEOUT_S))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not frozen" in refused.value.details()
    assert [digest(address).digest for address in cluster.addresses] == digests


def test_a_move_whose_mover_crashed_is_run_again_and_a_frozen_source_restarts_frozen(
        two_shards: EtcdCluster):
    """The mover stopped after the freeze and one chunk; then the source is killed (kill -9)
    and restarted: it still refuses the frozen user. The same command, run again, finishes
    the move, and the user's state is on the target as it was."""
    cluster = two_shards
    [user] = users_of(cluster.shard_map, 0, 1, "crash")
    slot = str(slot_of(APP, user))

    async def before_move():
        async with AsyncQuotaClient(cluster=cluster.target, timeout_s=RPC_TIMEOUT_S) as client:
            await subscribed(client, with_a_user_of_the_target(cluster, user))
            hold = await client.reserve(user, "chat", 25, ttl_s=600)
            await client.track(user, "chat", 11, idempotency_key=KEY)
            return hold, await client.usage(user)
    hold, usage = asyncio.run(before_move())
    source, target = (admin(address) for address in cluster.addresses)
    assert source.FreezeSlots(pb.FreezeSlotsRequest(slots=slot),
                              timeout=RPC_TIMEOUT_S).step.users == 1
    [chunk] = list(source.ExportSlots(pb.ExportSlotsRequest(slots=slot), timeout=RPC_TIMEOUT_S))
    assert (chunk.users, chunk.holds, chunk.keys) == (1, 1, 2)  # the reserve's key too
    target.AdoptSlots(pb.AdoptSlotsRequest(slots=slot, first=True, state=chunk.state),
                      timeout=RPC_TIMEOUT_S)
    cluster.shards[0].kill()  # the source dies while its slot is frozen
    cluster.shards[0].close()
    cluster.shards[0] = shard(cluster.folder, cluster.target, 0,
                              ttl_s=cluster.ttl_s).start(cluster.addresses[0])
    quota = quotad_pb2_grpc.QuotaServiceStub(grpc.insecure_channel(cluster.addresses[0]))
    with pytest.raises(grpc.RpcError) as refused:
        quota.GetUsage(pb.GetUsageRequest(user_id=user), timeout=RPC_TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_from_rpc_error(refused.value).reason == ErrorReason.SLOTS_MOVING

    again = quotactl(cluster.target, "cluster", "move-slots", "--from", "0", "--to", "1",
                     "--slots", slot)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "frozen on shard 0: 1 slots (0 newly)" in again.stdout, again.stdout
    assert "forgotten on shard 0: 1 users" in again.stdout, again.stdout

    async def after_move():
        async with AsyncQuotaClient(cluster=cluster.target, timeout_s=RPC_TIMEOUT_S) as client:
            moved_usage = await client.usage(user)
            committed = await client.commit(hold.reservation_id)
            return moved_usage, committed
    moved_usage, committed = asyncio.run(after_move())
    assert moved_usage.counters == usage.counters
    assert committed.committed == 25
    # run once more, the move is done: nothing to move, nothing changed
    done = quotactl(cluster.target, "cluster", "move-slots", "--from", "0", "--to", "1",
                    "--slots", slot)
    assert done.returncode == 2 and "not shard 0's" in done.stderr, done.stdout + done.stderr
    late = quotactl(cluster.target, "cluster", "move-slots", "--from", "0", "--to", "1",
                    "--slots", slot, "--abort")  # flipped: it can only be finished
    assert late.returncode == 2 and "finish it" in late.stderr, late.stdout + late.stderr


def test_a_move_given_up_before_its_flip_leaves_the_source_serving_and_the_target_clean(
        two_shards: EtcdCluster):
    cluster = two_shards
    [user] = users_of(cluster.shard_map, 0, 1, "abort")
    slot = str(slot_of(APP, user))

    async def setup():
        async with AsyncQuotaClient(cluster=cluster.target, timeout_s=RPC_TIMEOUT_S) as client:
            await subscribed(client, with_a_user_of_the_target(cluster, user))
            await client.track(user, "chat", 5)
    asyncio.run(setup())
    source, target = (admin(address) for address in cluster.addresses)
    source.FreezeSlots(pb.FreezeSlotsRequest(slots=slot), timeout=RPC_TIMEOUT_S)
    [chunk] = list(source.ExportSlots(pb.ExportSlotsRequest(slots=slot), timeout=RPC_TIMEOUT_S))
    target.AdoptSlots(pb.AdoptSlotsRequest(slots=slot, first=True, state=chunk.state),
                      timeout=RPC_TIMEOUT_S)
    # adopted, not flipped: the target asks the user's callers to wait, a read or a watch
    target_quota = quotad_pb2_grpc.QuotaServiceStub(grpc.insecure_channel(cluster.addresses[1]))
    for read in (lambda: target_quota.GetUsage(pb.GetUsageRequest(user_id=user),
                                               timeout=RPC_TIMEOUT_S),
                 lambda: next(target_quota.WatchUsage(pb.WatchUsageRequest(user_id=user),
                                                      timeout=RPC_TIMEOUT_S))):
        with pytest.raises(grpc.RpcError) as waiting:
            read()
        assert error_from_rpc_error(waiting.value).reason == ErrorReason.SLOTS_MOVING
    map_before = stored_map(cluster.target)
    aborted = quotactl(cluster.target, "cluster", "move-slots", "--from", "0", "--to", "1",
                       "--slots", slot, "--abort")
    assert aborted.returncode == 0, aborted.stdout + aborted.stderr
    assert "thawed on shard 0: 1 slots" in aborted.stdout, aborted.stdout
    assert "forgotten on shard 1: 1 slots, 1 users" in aborted.stdout, aborted.stdout
    assert stored_map(cluster.target) == map_before
    quota = quotad_pb2_grpc.QuotaServiceStub(grpc.insecure_channel(cluster.addresses[0]))
    usage = quota.GetUsage(pb.GetUsageRequest(user_id=user), timeout=RPC_TIMEOUT_S)
    assert [c.used for c in usage.counters if c.key == G] == [5]  # the source serves again
    with pytest.raises(grpc.RpcError) as refused:  # the target sends the user to the source
        target.GetSubscription(pb.GetSubscriptionRequest(user_id=user), timeout=RPC_TIMEOUT_S)
    assert error_from_rpc_error(refused.value).reason == ErrorReason.WRONG_SHARD


def test_a_map_changed_during_a_move_is_not_overwritten_and_the_move_run_again_finishes(
        two_shards: EtcdCluster):
    """Someone writes the map between the hand-over and the flip: the flip's transaction
    compares the map key's mod revision and fails, writing nothing; the slots stay frozen;
    the move run again reads the new map and finishes."""
    cluster = two_shards
    [user] = users_of(cluster.shard_map, 0, 1, "race")
    slot = slot_of(APP, user)

    async def setup():
        async with AsyncQuotaClient(cluster=cluster.target, timeout_s=RPC_TIMEOUT_S) as client:
            await subscribed(client, with_a_user_of_the_target(cluster, user))
            await client.track(user, "chat", 9)
    asyncio.run(setup())
    target = EtcdTarget.parse(cluster.target)
    written: list[bytes] = []

    def meanwhile(line: str) -> None:
        if line.startswith("exported from shard 0"):  # after the hand-over, before the flip
            put_map(cluster.target, cluster.shard_map)  # the same map: a new mod revision
            written.append(stored_map(cluster.target))
    with pytest.raises(MoveRefused) as refused:
        move_slots(target, 0, 1, frozenset({slot}), progress=meanwhile)
    assert "changed since it was read" in str(refused.value)
    assert stored_map(cluster.target) == written[0]  # not overwritten
    quota = quotad_pb2_grpc.QuotaServiceStub(grpc.insecure_channel(cluster.addresses[0]))
    with pytest.raises(grpc.RpcError) as frozen:
        quota.GetUsage(pb.GetUsageRequest(user_id=user), timeout=RPC_TIMEOUT_S)
    assert error_from_rpc_error(frozen.value).reason == ErrorReason.SLOTS_MOVING
    report = move_slots(target, 0, 1, frozenset({slot}))
    assert report.flipped_at_revision and report.forgotten_users == 1

    async def usage():
        async with AsyncQuotaClient(cluster=cluster.target, timeout_s=RPC_TIMEOUT_S) as client:
            return await client.usage(user)
    assert [c.used for c in asyncio.run(usage()).counters if c.key == G] == [9]


def test_the_export_finds_keys_before_the_scan_and_after_it_each_once(tmp_path: Path):
    """Over a real writer and LMDB log: keys used before the scan that precedes the freeze
    (read from the scan), between the scan and the freeze (read from the log records after
    it), and both ways the same export without a scan (a pass over the whole table)."""
    moved, stay, slots = users_in_slots(2, 4)
    wal = WriteAheadLog(tmp_path)

    async def run():
        writer = Writer(recover(wal), wal, on_failure=lambda error: None)
        writer.start()
        await writer.execute(UpsertPlan(app=CORE_APP, plan=CORE_PLAN))
        for user in moved + stay:
            await writer.execute(UpsertSubscription(app=CORE_APP, user_id=user, plan_id="pro"))
            await writer.execute(Track(app=CORE_APP, user_id=user, event_type="e", amount=1,
                                       idempotency_key=f"early-{user}"))
        scan = await scan_keys(wal, slots)
        for user in moved + stay:
            await writer.execute(Track(app=CORE_APP, user_id=user, event_type="e", amount=2,
                                       idempotency_key=f"late-{user}"))
        await writer.execute(FreezeSlots(slots=tuple(sorted(slots))))
        exported = [[chunk async for chunk in export_chunks(writer, tuple(sorted(slots)), how)]
                    for how in (scan, None)]
        await writer.close()
        return scan, exported
    scan, exported = asyncio.run(run())
    wal.close()
    assert {r.command.idempotency_key for r in scan.records} == {f"early-{u}" for u in moved}
    expected = {f"{when}-{u}" for u in moved for when in ("early", "late")}
    for chunks in exported:
        keys = [k.key for chunk in chunks for k in decode_slot_state(chunk.state)[2]]
        assert sorted(keys) == sorted(expected)


# --- the move's limits at their edges (no cluster needed) ----------------------------------

@pytest.mark.parametrize("extra", [0, 1])
def test_a_slot_set_is_read_up_to_its_text_limit_and_refused_past_it(extra):
    from quotad.api.moves import requested_slots
    from quotad.core.errors import InvalidArgument
    from quotad.core.limits import MOVE_SLOTS_TEXT_BYTES_MAX

    text = "0-4095".ljust(MOVE_SLOTS_TEXT_BYTES_MAX + extra)  # spaces around a range are read
    if extra:
        with pytest.raises(InvalidArgument, match=f"at most {MOVE_SLOTS_TEXT_BYTES_MAX} bytes"):
            requested_slots(text)
    else:
        assert requested_slots(text) == tuple(range(4096))


@pytest.mark.parametrize("extra", [0, 1])
def test_a_source_keeps_the_key_scans_of_at_most_move_key_scans_max_slot_sets(extra):
    from quotad.api.moves import KeyScan, KeyScans
    from quotad.core.limits import MOVE_KEY_SCANS_MAX

    scans = KeyScans()
    sets = [(slot,) for slot in range(MOVE_KEY_SCANS_MAX + extra)]
    for slots in sets:
        scans.put(slots, KeyScan(through_sequence=slots[0], records=()))
    kept = [slots for slots in sets if scans.get(slots) is not None]
    assert kept == sets[extra:]  # past the limit, the oldest scan is the one dropped


@pytest.mark.parametrize("short", [1, 0])
def test_a_pass_over_the_log_lets_other_calls_in_once_every_move_scan_rows_per_page(short):
    """One row short of a page, no other call gets a turn; a whole page, one does."""
    from quotad.api.moves import _paced
    from quotad.core.limits import MOVE_SCAN_ROWS_PER_PAGE

    count = MOVE_SCAN_ROWS_PER_PAGE - short

    async def turns_given() -> tuple[list[int], int]:
        turns = 0

        async def other_call() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)
        other = asyncio.create_task(other_call())
        await asyncio.sleep(0)  # it ran once
        before = turns
        rows = [row async for row in _paced(iter(range(count)))]
        given = turns - before
        other.cancel()
        return rows, given
    rows, given = asyncio.run(turns_given())
    assert rows == list(range(count))
    assert given == (0 if short else 1)


# --- a call refused SLOTS_MOVING is sent again at most SLOTS_MOVING_RETRIES_MAX times -------

CALLED_METHODS = ("Reserve", "GetUsage", "Batch")
"""What the clients' reserve and usage go out as (the async client's coalesced in a Batch)."""


def calls_answered(metrics_address: str) -> int:
    """The server's count of the calls it answered, of CALLED_METHODS, any code."""
    import urllib.request

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return int(sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith("quotad_requests_total{") and any(
                       f'method="{method}"' in line for method in CALLED_METHODS)))


def settled_calls_answered(metrics_address: str, settle_s: float = 0.5) -> int:
    """calls_answered once it stayed the same for settle_s (a call is counted just after its
    answer is sent)."""
    count = calls_answered(metrics_address)
    while True:
        time.sleep(settle_s)
        again = calls_answered(metrics_address)
        if again == count:
            return count
        count = again


def start_frozen_user(data_dir: Path):
    """A server that is the one shard of a static map, with the slot of a subscribed user of
    app `default` frozen (FreezeSlots, as a move's first step does): (server, address,
    metrics address, user). The caller closes the server."""
    import json

    from quotad.cluster.etcd_process import free_port
    from server_process import ServerProcess

    address = f"127.0.0.1:{free_port()}"
    data_dir.mkdir(parents=True)
    shard_map = data_dir / "shards.json"
    shard_map.write_text(json.dumps({"shards": [
        {"id": 0, "address": address, "slots": "0-4095"}]}))
    server = ServerProcess(data_dir / "data", extra_args=(
        "--shard-map", str(shard_map), "--shard-id", "0",
        "--metrics-listen", "127.0.0.1:0")).start(address)
    try:
        user = "frozen-user"
        stub = admin(address)
        stub.UpsertSubscription(pb.UpsertSubscriptionRequest(user_id=user, plan_id="free"),
                                timeout=RPC_TIMEOUT_S)
        stub.FreezeSlots(pb.FreezeSlotsRequest(slots=str(slot_of("default", user))),
                         timeout=RPC_TIMEOUT_S)
        return server, address, server.last("serving")["metrics"], user
    except BaseException:
        server.close()
        raise


CLIENT_KINDS = ("sync", "async", "async-uncoalesced")
REFUSED_CALL_DEADLINE_S = 60.0
"""100 waits of 50 ms and 101 round trips fit many times over."""


def refused_slots_moving(kind: str, call: str, address: str, metrics: str,
                         user: str) -> tuple[BaseException | None, int, float]:
    """One client of `kind` makes `call` for the frozen user until it gives up: what it
    raised, how many calls the server answered meanwhile, and how long it took (s)."""
    from quotad_client import QuotaClient

    deadline_s = REFUSED_CALL_DEADLINE_S

    async def attempt_async() -> None:
        async with AsyncQuotaClient(address, timeout_s=deadline_s,
                                    coalesce=kind == "async") as client:
            await (client.reserve(user, "chat", 1) if call == "reserve" else client.usage(user))

    def attempt() -> None:
        if kind.startswith("async"):
            asyncio.run(attempt_async())
            return
        with QuotaClient(address, timeout_s=deadline_s) as client:
            client.reserve(user, "chat", 1) if call == "reserve" else client.usage(user)

    before = settled_calls_answered(metrics)
    began = time.monotonic()
    raised = None
    try:
        attempt()
    except Exception as error:
        raised = error
    took_s = time.monotonic() - began
    return raised, settled_calls_answered(metrics) - before, took_s


@pytest.mark.parametrize("call", ["reserve", "usage"])
def test_a_call_refused_slots_moving_is_sent_again_exactly_slots_moving_retries_max_times(
        tmp_path: Path, call: str):
    """The slot stays frozen: each client (sync, async coalescing it into a Batch, async
    sending it alone) sends the call, then again after each refusal's 50 ms RetryInfo,
    SLOTS_MOVING_RETRIES_MAX times (101 attempts in all, the server's count of calls
    answered; not one more as an UNAVAILABLE its retry policy would send again), and gives
    up with the refusal well before its deadline. The three clients run side by side, each
    against a server of its own, so each count is its client's alone."""
    from concurrent.futures import ThreadPoolExecutor

    from quotad_client import Unavailable
    from quotad_client._retry import SLOTS_MOVING_RETRIES_MAX

    with ThreadPoolExecutor(len(CLIENT_KINDS)) as pool:
        starting = [pool.submit(start_frozen_user, tmp_path / kind) for kind in CLIENT_KINDS]
        try:
            servers = [future.result() for future in starting]
            outcomes = list(pool.map(
                lambda kind, started: refused_slots_moving(kind, call, *started[1:]),
                CLIENT_KINDS, servers))
        finally:
            for future in starting:
                if future.exception() is None:
                    future.result()[0].close()
    for kind, (raised, answered, took_s) in zip(CLIENT_KINDS, outcomes):
        assert isinstance(raised, Unavailable), (kind, raised)
        assert raised.reason == ErrorReason.SLOTS_MOVING, kind
        assert answered == 1 + SLOTS_MOVING_RETRIES_MAX, kind
        assert SLOTS_MOVING_RETRIES_MAX * 0.05 <= took_s < REFUSED_CALL_DEADLINE_S / 2, (
            kind, took_s)
