"""SIGKILL loop: the real server under concurrent load, killed with SIGKILL at random moments
and restarted on the same data directory, must lose nothing it acknowledged.

Several asyncio clients (each its own grpc.aio channel, kept across restarts: the server comes
back on the same loopback port and the channels reconnect) run Reserve / Commit / Release /
Extend / Track, every one with an idempotency key of its own, and keep every ACKNOWLEDGED
answer. From the answers alone the test keeps the exact (used, held) each (user, group) must
have. A call that fails at the kill is "in flight": its effect is unknown.

The loop runs three times: `unary` (each operation its own RPC), `batch` (each client sends
Batch RPCs of 2 to 8 operations, as the asyncio client's coalescing does; the replays and
retries after a restart go in Batch RPCs too) and `unary-alone` (one client, so that calls
come one at a time and the server writes their records on its event loop's thread, as it
does for a lone call). A Batch the kill interrupts puts every operation in it in flight.

Where kills land is planned, kill by kill (KILL_PLAN), so that every run covers each case:
- some loads run until the log has SNAPSHOT_EPOCH_RECORDS more records, several snapshots'
  worth at --snapshot-every-records SNAPSHOT_EVERY_RECORDS: the restart after it must load a
  snapshot newer than the state the load began with; the rest end at a random moment, and
  land now and then while a snapshot child works;
- some restarts are first SIGKILLed during their own start-up: right after they are spawned
  (before listening), once they listen (while they recover), or at a random moment of it.
The test asserts that both kinds of start-up kill landed before "serving", and that the
snapshot each restart loads is never older than the one the restart before it loaded. Most
subscribers stay idle, so most snapshots are deltas of a whole one, and some restarts must
load one.

After every restart, before anything else runs:
  - every operation acknowledged since the previous restart (and a sample of older ones) is
    sent again with the same key: the answer must be the first answer, field for field, and
    the state must not change at all: GetStateDigest then still gives the digest and sequence
    of the "serving" log line. Nothing acknowledged was lost;
  - every in-flight operation is sent again with the same key and the same request: it then
    has exactly one effect (either it had landed before the kill and the retry changes
    nothing, or it lands now, as ONE log record); a second retry answers the same again;
  - GetUsage of every user equals the model exactly, and used + held <= quota everywhere
    (the workload only uses enforced paths: Reserve, enforced Track, Commit <= reserved,
    refunds bounded so that no counter clamps at 0).
At the end the last server stops on SIGTERM, and `quotad verify` on its data directory is
clean with the digest and record count of its "stopped" line.

The log is at its retention, as a server's that has served for long: before the first start the
data directory holds an aged log (bench.recovery's: AGED_RECORDS keyed records of 1,000 users of
their own, with a whole snapshot of them), spread over AGED_SPAN_S of server time from 24 h and
AGED_DUE_AT_START_S ago. The server keeps the audit trail a day (--audit-retention-days 1), so
the starts that remember keys 24 h prune the aged records past 24 h (after their first batches,
and again after each whole snapshot) while the load runs and kills land (in a pruning
transaction, or in a sweep of the event index's entries, which each start begins with); the
starts that remember them 48 h keep them. The log's first record must move on at several
restarts and never back. ListEvents must list of each aged user a whole tail of their events
(never a pruned one), under load once the loads that run until snapshots are done (a whole
snapshot lets pruning go on past what the start's sweep swept: the pruned records' entries are
then in the index, unlisted), and right after the last kill, then holding every event the log
still has once the server stops.

Sizes: 10 kills per run by default (20 for unary-alone); QUOTAD_LONG=1 runs 100 per run. QUOTAD_SIGKILL_SEED replays the same
choices (not the same timing); QUOTAD_SIGKILL_VERBOSE=1 prints one line per kill.
Holds get a 1 h TTL so none expires during a run (checked: the run must stay well below it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, text_format
from google.rpc import code_pb2, status_pb2

from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as stubs
from server_process import ROOT, START_TIMEOUT_S, ServerProcess, bench_module

LONG = os.environ.get("QUOTAD_LONG") == "1"
VERBOSE = os.environ.get("QUOTAD_SIGKILL_VERBOSE") == "1"  # one line per kill
KILLS = 100 if LONG else 10
ALONE_KILLS = 100 if LONG else 20
"""unary-alone: one call in flight, so fewer kills catch one; 20 make it near certain that
some do (~4 in 10 did)."""
WORKERS = 6
BATCH_OPS = (2, 8)  # operations per Batch RPC in the batch run
USERS = tuple(f"sk-u{i}" for i in range(8))
IDLE_USERS = tuple(f"sk-idle{i}" for i in range(312))
"""Subscribed and never used: the 8 users at work are 2.5 % of them all, so most snapshots
after a whole one are deltas (SNAPSHOT_DELTA_USER_COST), and restarts load them."""
PLAN_ID = "sigkill"
QUOTAS = {"units": 40_000, "chat": 15_000, "premium": 4_000}
EVENT_TYPES = ("chat.gpt", "render")
MODELS = ("big", "small")
TTL_S = 3600  # the longest allowed: no hold may expire during the run
RUN_S_MAX = 3000  # the model assumes no expiry: the run must end well before TTL_S
LOAD_S_MAX = 0.25 if LONG else 0.5  # a kill lands 0 ... this long after the clients start
SNAPSHOT_EVERY_RECORDS = 100
SNAPSHOT_EPOCH_RECORDS = 3 * SNAPSHOT_EVERY_RECORDS
"""A load that must end in a stored snapshot runs until the log has this many more records:
the first child is forked within SNAPSHOT_EVERY_RECORDS, then has the time of 2x as many to
encode a few users' state."""
SNAPSHOT_EPOCH_S_MAX = 60.0
KILL_PLAN_PERIOD = 10
KILL_PLAN = {  # kill % KILL_PLAN_PERIOD -> (how the load ends, how the restart starts)
    1: ("after snapshots", ""),
    2: ("at random", "before listening"),
    4: ("at random", "while recovering"),
    6: ("after snapshots", ""),
    7: ("at random", "before listening"),
    8: ("at random", "at random"),
    9: ("at random", "while recovering"),
}
"""Kills not named here end the load at a random moment and restart with no start-up kill."""
OPS_PER_WORKER_EPOCH_MAX = 5_000
LIVE_HOLDS_PER_WORKER_MAX = 24
CALL_TIMEOUT_S = 5.0
CHECK_TIMEOUT_S = 15.0
AUDIT_PAGES_MAX = 1000  # of 1,000 events, per user
REPLAY_OLDER_SAMPLE = 25
REPLAY_CONCURRENCY = 16
REPLAY_BATCH_OPS = 16
AGED_RECORDS = 12_000 if LONG else 6_000
AGED_SPAN_S = 900 if LONG else 300
AGED_DUE_AT_START_S = AGED_SPAN_S // 3
"""A third of the aged records are due when the first start prunes (past the plan and the
subscriptions, which have no events, into the users' first pairs); the rest pass 24 h at
AGED_RECORDS / AGED_SPAN_S a second (20; ~13 when long), most of them after the run ends."""
AUDIT_RETENTION_DAYS = "1"
IN_FLIGHT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                   grpc.StatusCode.CANCELLED)
"""What a call the kill interrupts may end with. Before the kill, any error is a failure."""
CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),  # each client its own connection
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 250),
)

PLAN = pb.Plan(id=PLAN_ID, name="SIGKILL loop", limit_groups=[
    pb.LimitGroup(key="units", label="Units", unit="u", quota=QUOTAS["units"],
                  window=pb.LIFETIME, match=pb.Match(event_types=["*"])),
    pb.LimitGroup(key="chat", label="Chat", unit="u", quota=QUOTAS["chat"],
                  window=pb.LIFETIME, match=pb.Match(event_types=["chat.*"])),
    pb.LimitGroup(key="premium", label="Premium", unit="u", quota=QUOTAS["premium"],
                  window=pb.LIFETIME,
                  match=pb.Match(metadata=[pb.MetadataMatch(key="model", values=["big"])])),
])


def one_line(message) -> str:
    return text_format.MessageToString(message, as_one_line=True)


def matched_groups(event_type: str, model: str) -> tuple[str, ...]:
    groups = ["units"]
    if event_type.startswith("chat."):
        groups.append("chat")
    if model == "big":
        groups.append("premium")
    return tuple(groups)


@dataclasses.dataclass(eq=False)
class Hold:
    reservation_id: str
    user: str
    groups: tuple[str, ...]
    amount: int


@dataclasses.dataclass(eq=False)
class Op:
    rpc: str
    request: object
    worker: "Worker"
    user: str
    groups: tuple[str, ...]
    hold: Hold | None = None
    response: object = None
    in_flight: bool = False


class Run:
    """Everything the test knows: the model, the failures, the figures."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.expected = {(user, group): [0, 0] for user in USERS for group in QUOTAS}
        self.failures: list[str] = []
        self.acknowledged = 0
        self.lost = 0
        self.retried = 0
        self.applied_before_kill = 0
        self.verified_ops: list[Op] = []
        self.outcomes = {"allowed": 0, "denied": 0}
        self.in_flight_codes: dict[str, int] = {}
        self.audit_trails: dict[str, list[tuple[int, int]]] = {}
        """Each user's audit trail as ListEvents gave it after the last kill."""
        self.aged_trails: dict[str, list[tuple[int, int]]] = {}
        """The same of each aged user (none without an aged log)."""
        self.aged_checks_under_load = 0
        """Times every aged user's ListEvents was checked while the load ran."""

    def fail(self, message: str) -> None:
        if len(self.failures) < 200:
            self.failures.append(message)

    def change(self, op: Op, *, used: int = 0, held: int = 0) -> None:
        for group in op.groups:
            counter = self.expected[(op.user, group)]
            counter[0] += used
            counter[1] += held

    def check_counters(self, where: str, counters) -> None:
        for c in counters:
            if not (0 <= c.used and 0 <= c.held and c.used + c.held <= c.quota
                    and c.remaining == max(0, c.quota - c.used - c.held)):
                self.fail(f"{where}: invariant broken on {c.key}: quota {c.quota} used {c.used} "
                          f"held {c.held} remaining {c.remaining}")

    def settle(self, op: Op, response) -> None:
        """An answer arrived for op: check it and apply what it says to the model."""
        op.response = response
        worker, request = op.worker, op.request
        where = f"{op.rpc} {request.idempotency_key}"
        if op.rpc in ("Reserve", "Track", "Commit", "Release"):
            self.check_counters(where, response.counters)
        if op.rpc == "Reserve":
            self.outcomes["allowed" if response.allowed else "denied"] += 1
            if response.allowed:
                if not response.reservation_id.startswith("rsv_"):
                    self.fail(f"{where}: allowed without a reservation id: {one_line(response)}")
                self.change(op, held=request.amount)
                worker.live.append(Hold(response.reservation_id, op.user, op.groups,
                                        request.amount))
            elif response.denied_by not in op.groups:
                self.fail(f"{where}: denied by {response.denied_by!r}, not one of {op.groups}")
        elif op.rpc == "Commit":
            hold = op.hold
            if (response.committed, response.returned, response.expired) != (
                    request.amount, hold.amount - request.amount, False):
                self.fail(f"{where}: commit of {request.amount} of a {hold.amount} hold "
                          f"answered {one_line(response)}")
            self.change(op, used=request.amount, held=-hold.amount)
            worker.add_credit(op.user, op.groups, request.amount)
        elif op.rpc == "Release":
            self.change(op, held=-op.hold.amount)
        elif op.rpc == "Extend":
            worker.live.append(op.hold)
            if response.expires_at.seconds < time.time() + TTL_S - 120:
                self.fail(f"{where}: extended to {one_line(response.expires_at)}")
        elif op.rpc == "Track":
            if request.amount < 0:
                if not response.allowed:
                    self.fail(f"{where}: a refund was denied: {one_line(response)}")
                self.change(op, used=request.amount)
            elif response.allowed:
                self.outcomes["allowed"] += 1
                self.change(op, used=request.amount)
                worker.add_credit(op.user, op.groups, request.amount)
            else:
                self.outcomes["denied"] += 1
                if response.denied_by not in op.groups:
                    self.fail(f"{where}: denied by {response.denied_by!r}")
        self.acknowledged += 1


BATCH_FIELDS = {"Reserve": "reserve", "Commit": "commit", "Release": "release",
                "Extend": "extend", "Track": "track"}


class Worker:
    """One client: its own channel, its own holds, one RPC at a time (unary: one operation;
    batch: a Batch RPC of several)."""

    def __init__(self, index: int, rng: random.Random, transport: str) -> None:
        self.index = index
        self.rng = rng
        self.transport = transport
        self.live: list[Hold] = []
        self.credit = {(user, group): 0 for user in USERS for group in QUOTAS}
        """What this worker added to each counter and did not refund: it may refund up to
        this, so no refund can ever hit the clamp at 0 whatever the others do."""
        self.serial = 0
        self.channel: grpc.aio.Channel | None = None
        self.stub: stubs.QuotaServiceStub | None = None
        self.in_flight: list[Op] = []
        self.acknowledged: list[Op] = []

    def connect(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = stubs.QuotaServiceStub(self.channel)

    def add_credit(self, user: str, groups: tuple[str, ...], amount: int) -> None:
        for group in groups:
            self.credit[(user, group)] += amount

    def next_op(self, epoch: int) -> Op:
        rng = self.rng
        self.serial += 1
        key = f"sk-e{epoch}-w{self.index}-n{self.serial}"
        if self.live and (len(self.live) >= LIVE_HOLDS_PER_WORKER_MAX or rng.random() < 0.4):
            hold = self.live.pop(rng.randrange(len(self.live)))
            draw = rng.random()
            if draw < 0.6:
                request = pb.CommitRequest(reservation_id=hold.reservation_id,
                                           amount=rng.randint(0, hold.amount),
                                           idempotency_key=key)
                rpc = "Commit"
            elif draw < 0.9:
                request = pb.ReleaseRequest(reservation_id=hold.reservation_id,
                                            idempotency_key=key)
                rpc = "Release"
            else:
                request = pb.ExtendRequest(reservation_id=hold.reservation_id,
                                           ttl=duration_pb2.Duration(seconds=TTL_S),
                                           idempotency_key=key)
                rpc = "Extend"
            return Op(rpc, request, self, hold.user, hold.groups, hold=hold)
        user = rng.choice(USERS)
        event_type, model = rng.choice(EVENT_TYPES), rng.choice(MODELS)
        groups = matched_groups(event_type, model)
        metadata = {"model": model}
        draw = rng.random()
        refundable = min(self.credit[(user, group)] for group in groups)
        if draw < 0.25 and refundable > 0:
            amount = rng.randint(1, min(refundable, 300))
            self.add_credit(user, groups, -amount)  # taken now: in flight or not, it lands
            return Op("Track", pb.TrackRequest(user_id=user, event_type=event_type,
                                               amount=-amount, metadata=metadata,
                                               idempotency_key=key), self, user, groups)
        if draw < 0.55:
            return Op("Track", pb.TrackRequest(user_id=user, event_type=event_type,
                                               amount=rng.randint(1, 300), metadata=metadata,
                                               enforce=True, idempotency_key=key),
                      self, user, groups)
        return Op("Reserve", pb.ReserveRequest(user_id=user, event_type=event_type,
                                               amount=rng.randint(1, 400), metadata=metadata,
                                               ttl=duration_pb2.Duration(seconds=TTL_S),
                                               idempotency_key=key), self, user, groups)

    async def send(self, ops: list[Op], *, timeout: float,
                   wait_for_ready: bool = False) -> list:
        """One RPC carrying ops (unary: exactly one): each op's response, or the
        google.rpc.Status its operation failed with in a Batch. A failed RPC raises."""
        assert self.stub is not None
        if self.transport == "unary":
            assert len(ops) == 1
            return [await getattr(self.stub, ops[0].rpc)(ops[0].request, timeout=timeout,
                                                         wait_for_ready=wait_for_ready)]
        request = pb.BatchRequest()
        for op in ops:
            getattr(request.operations.add(), BATCH_FIELDS[op.rpc]).CopyFrom(op.request)
        response = await self.stub.Batch(request, timeout=timeout,
                                         wait_for_ready=wait_for_ready)
        if len(response.results) != len(ops):
            raise AssertionError(f"{len(ops)} operations, {len(response.results)} results")
        return [getattr(result, result.WhichOneof("result")) for result in response.results]

    def ops_per_rpc(self) -> int:
        return 1 if self.transport == "unary" else self.rng.randint(*BATCH_OPS)

    async def load(self, run: Run, epoch: int, stop: asyncio.Event) -> None:
        """RPCs one after another until the kill; the operations of the RPC the kill
        interrupts (or of the first after it) are in flight. Any other error, and any error
        before the kill, is a failure. (The kill blocks the event loop until the process is
        reaped, and `stop` is set right after it: an error seen while `stop` is clear really
        came before the kill.)"""
        for _ in range(OPS_PER_WORKER_EPOCH_MAX):
            if stop.is_set():
                return
            ops = [self.next_op(epoch) for _ in range(self.ops_per_rpc())]
            try:
                answers = await self.send(ops, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                if stop.is_set() and error.code() in IN_FLIGHT_CODES:
                    name = error.code().name
                    run.in_flight_codes[name] = run.in_flight_codes.get(name, 0) + 1
                    for op in ops:
                        op.in_flight = True
                        self.in_flight.append(op)
                else:
                    run.fail(f"{len(ops)} x {ops[0].rpc} {ops[0].request.idempotency_key}... "
                             f"under load: {error.code().name} {error.details()}")
                return
            for op, answer in zip(ops, answers):
                if isinstance(answer, status_pb2.Status):
                    run.fail(f"{op.rpc} {op.request.idempotency_key} in a Batch under load: "
                             f"{code_pb2.Code.Name(answer.code)} {answer.message}")
                    continue
                run.settle(op, answer)
                self.acknowledged.append(op)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    rank = max(1, int(-(-fraction * len(ordered) // 1)))  # nearest rank
    return ordered[rank - 1]


def pick_port(rng: random.Random) -> int:
    """A free loopback port below the ephemeral range, so that no port-0 server started by
    another test takes it while ours is down."""
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port")


class Servers:
    """Starts, kills and restarts quotad on one data directory and (if it can) one port."""

    def __init__(self, data_dir: Path, rng: random.Random, extra_args: tuple[str, ...],
                 retention_hours: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.retention_hours = retention_hours
        """--idempotency-retention-hours for each start in turn (none if empty): a start
        whose flag differs from the retention in force writes a record as it starts, which
        kills during start-up and replays then meet."""
        self.rng = rng
        self.port = pick_port(rng)
        self.spawned: list[ServerProcess] = []
        self.recovery_ms: list[float] = []
        self.wall_ms: list[float] = []
        self.records: list[int] = []
        self.replayed: list[int] = []
        self.snapshot_sequences: list[int] = []
        """The snapshot each restart loaded (0: none), from its "recovered" line."""
        self.log_first_sequences: list[int] = []
        """The log's first record at each restart (records before it pruned), from its
        "recovered" line."""
        self.deltas_loaded = 0
        """Restarts that loaded a delta snapshot over the whole one."""
        self.torn_tails = 0
        self.startup_kills = {"before listening": 0, "while recovering": 0, "after serving": 0}
        self.port_changes = 0

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _next_args(self) -> tuple[str, ...]:
        if not self.retention_hours:
            return self.extra_args
        hours = self.retention_hours[len(self.spawned) % len(self.retention_hours)]
        return (*self.extra_args, "--idempotency-retention-hours", hours)

    def retention_changes(self) -> int:
        """Starts that logged a change of the idempotency retention."""
        return sum(line.get("message", "").startswith("idempotency keys are remembered")
                   for process in self.spawned for line in process.log_lines)

    def start(self, *, restart: bool = True) -> ServerProcess:
        for _ in range(3):
            process = ServerProcess(self.data_dir, extra_args=self._next_args())
            self.spawned.append(process)
            started = time.monotonic()
            try:
                process.start(self.listen)
            except RuntimeError:
                if not any("Failed to bind" in line.get("message", "")
                           for line in process.log_lines):
                    raise
                self.port = pick_port(self.rng)  # someone took our port: move
                self.port_changes += 1
                continue
            if not restart:
                return process
            self.wall_ms.append((time.monotonic() - started) * 1000)
            serving = process.last("serving")
            self.recovery_ms.append(serving["recovery_s"] * 1000)
            self.records.append(serving["records"])
            recovered = [line for line in process.log_lines
                         if line.get("message") == "recovered"]
            self.replayed.append(recovered[-1].get("replayed", -1) if recovered else -1)
            self.snapshot_sequences.append(
                recovered[-1].get("snapshot_sequence", -1) if recovered else -1)
            self.log_first_sequences.append(
                recovered[-1].get("log_first_sequence", -1) if recovered else -1)
            self.deltas_loaded += bool(recovered) and (
                recovered[-1].get("snapshot_sequence", 0)
                > recovered[-1].get("whole_snapshot_sequence", 0))
            self.torn_tails += sum(line.get("message") == "dropped a torn log tail"
                                   for line in process.log_lines)
            return process
        raise RuntimeError(f"could not bind a loopback port: {self.spawned[-1].log_lines[-3:]}")

    def start_and_kill_during_startup(self, when: str) -> None:
        """Starts a server and SIGKILLs it during its start-up: "before listening" (within
        half the shortest time a start took to listen), "while recovering" (once
        it listens, within the first half of the last recovery), or "at random" (up to a
        little past the time the last start took: before it listens, while it recovers,
        reading the snapshot and the log and writing expiries and plans, or just after it
        serves)."""
        process = ServerProcess(self.data_dir, extra_args=self._next_args())
        self.spawned.append(process)
        thread = threading.Thread(target=self._start_quietly, args=(process,), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while process.process is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert process.process is not None
        typical_s = self.wall_ms[-1] / 1000 if self.wall_ms else 0.3
        recovery_s = self.recovery_ms[-1] / 1000 if self.recovery_ms else 0.05
        if when == "before listening":
            listened_s = min((wall - recovery) / 1000 for wall, recovery
                             in zip(self.wall_ms, self.recovery_ms)) if self.wall_ms else 0.1
            time.sleep(self.rng.uniform(0.0, 0.5 * max(listened_s, 0.0)))
        elif when == "while recovering":
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and process.process.poll() is None and not any(
                    line.get("message") == "listening" for line in list(process.log_lines)):
                time.sleep(0.001)
            time.sleep(self.rng.uniform(0.0, 0.5 * recovery_s))
        else:
            time.sleep(self.rng.uniform(0.0, 1.2 * typical_s))
        try:
            os.kill(process.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.process.wait(timeout=30)
        thread.join(timeout=40)
        assert not thread.is_alive()
        said = {line.get("message") for line in process.log_lines}
        phase = ("after serving" if "serving" in said else
                 "while recovering" if "listening" in said else "before listening")
        self.startup_kills[phase] += 1

    @staticmethod
    def _start_quietly(process: ServerProcess) -> None:
        try:
            process.start("127.0.0.1:0")
        except (RuntimeError, TimeoutError):
            pass

    def close_all(self) -> None:
        for process in self.spawned:
            process.close()


def server_args() -> tuple[str, ...]:
    """ServerProcess's --log-state-digest, plus frequent snapshots when this server takes
    them: kills then also land while a snapshot is written, and restarts load one; and an
    audit trail kept a day, when it takes that, so that it prunes the aged log."""
    help_text = _serve_help()
    args: tuple[str, ...] = ("--log-state-digest",)
    if "--snapshot-every-records" in help_text:
        args += ("--snapshot-every-records", str(SNAPSHOT_EVERY_RECORDS))
    if "--audit-retention-days" in help_text:
        args += ("--audit-retention-days", AUDIT_RETENTION_DAYS)
    return args


def aged_users() -> tuple[str, ...]:
    recovery = bench_module("recovery")
    return tuple(map(recovery.user_id, range(recovery.AGED_USERS)))


def build_aged_log(data_dir: Path, seed: int) -> dict[str, list[tuple[int, int]]]:
    """The aged log (the module's docstring), in data_dir before any server starts: each aged
    user's audit events as its records hold them."""
    first_ns = time.time_ns() - (24 * 3600 + AGED_DUE_AT_START_S) * 10**9
    bench_module("recovery").build_aged(data_dir, AGED_RECORDS, first_ns, AGED_SPAN_S * 10**9,
                                        seed)
    return logged_audit_trails(data_dir, aged_users())


def retention_hours() -> tuple[str, ...]:
    """The idempotency retentions the starts take in turn, when this server takes the flag."""
    return ("48", "24") if "--idempotency-retention-hours" in _serve_help() else ()


def _serve_help() -> str:
    return subprocess.run([sys.executable, "-m", "quotad", "serve", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT).stdout


def verify_data_dir(data_dir: Path) -> tuple[int, dict]:
    result = subprocess.run([sys.executable, "-m", "quotad", "verify", "--data-dir",
                             str(data_dir)], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    return result.returncode, json.loads(result.stdout) if result.stdout else {}


async def gather_bounded(coroutines: list, limit: int) -> list:
    semaphore = asyncio.Semaphore(limit)

    async def one(coroutine):
        async with semaphore:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


class Checker:
    """The test's own channel (kept across restarts too) for set-up and the checks."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.quota = stubs.QuotaServiceStub(self.channel)
        self.admin = stubs.AdminServiceStub(self.channel)

    async def digest(self) -> pb.GetStateDigestResponse:
        return await self.admin.GetStateDigest(pb.GetStateDigestRequest(),
                                               timeout=CHECK_TIMEOUT_S, wait_for_ready=True)

    async def usage(self) -> dict[str, pb.GetUsageResponse]:
        answers = await asyncio.gather(*(self.quota.GetUsage(
            pb.GetUsageRequest(user_id=user), timeout=CHECK_TIMEOUT_S, wait_for_ready=True)
            for user in USERS))
        return dict(zip(USERS, answers))

    async def audit_trails(self, users: tuple[str, ...]) -> dict[str, list[tuple[int, int]]]:
        """Each user's whole audit trail, page after page: (sequence, kind) of each event."""
        trails: dict[str, list[tuple[int, int]]] = {}
        for user in users:
            trail, token = trails.setdefault(user, []), ""
            for _ in range(AUDIT_PAGES_MAX):
                page = await self.admin.ListEvents(pb.ListEventsRequest(
                    user_id=user, page_size=1000, page_token=token), timeout=CHECK_TIMEOUT_S)
                trail += [(event.sequence, event.kind) for event in page.events]
                token = page.next_page_token
                if not token:
                    break
            else:
                raise AssertionError(f"{user}'s audit trail has over {AUDIT_PAGES_MAX} pages")
        return trails


def logged_audit_trails(data_dir: Path, users: tuple[str, ...] = USERS
                        ) -> dict[str, list[tuple[int, int]]]:
    """Each user's audit events as the log's records left hold them, read from the stopped
    server's data directory: (sequence, index in its record) of each."""
    from quotad.engine.recovery import recover
    from quotad.storage.wal import WriteAheadLog

    wal = WriteAheadLog(data_dir)
    try:
        core = recover(wal, repair=False)
        numbers = {core.user_number("default", user): user for user in users}
        trails: dict[str, list[tuple[int, int]]] = {user: [] for user in users}
        for record in wal.records(max(0, wal.first_sequence() - 1)):
            for index, number in enumerate(record.event_users):
                if number in numbers:
                    trails[numbers[number]].append((record.sequence, index))
    finally:
        wal.close()
    return trails


async def resend(ops: list[Op]) -> list[tuple[Op, object, str]]:
    """Sends ops again, each with its own key and request, as the run sends them (unary: one
    RPC each; batch: Batch RPCs of up to REPLAY_BATCH_OPS): (op, its answer, "") or
    (op, None, why it failed)."""
    if not ops:
        return []
    per_rpc = 1 if ops[0].worker.transport == "unary" else REPLAY_BATCH_OPS
    groups = [ops[i:i + per_rpc] for i in range(0, len(ops), per_rpc)]

    async def one(group: list[Op]) -> list[tuple[Op, object, str]]:
        try:
            answers = await group[0].worker.send(group, timeout=CHECK_TIMEOUT_S,
                                                 wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            return [(op, None, f"{error.code().name} {error.details()}") for op in group]
        return [(op, None, f"{code_pb2.Code.Name(a.code)} {a.message}")
                if isinstance(a, status_pb2.Status) else (op, a, "")
                for op, a in zip(group, answers)]

    done = await gather_bounded([one(group) for group in groups], REPLAY_CONCURRENCY)
    return [outcome for group in done for outcome in group]


async def check_restart(run: Run, checker: Checker, workers: list[Worker],
                        serving: dict, kill: int) -> None:
    """Everything acknowledged is there, in-flight calls resolve once, the state is exact."""
    where = f"restart after kill {kill}"
    for user, answer in (await checker.usage()).items():
        run.check_counters(f"{where}, {user} before retries", answer.counters)

    # 1. Every operation acknowledged by the killed server answers its first answer again,
    # and changes nothing: the state stays the one the "serving" line reported.
    epoch_ops = [op for w in workers for op in w.acknowledged]
    older = run.rng.sample(run.verified_ops, min(REPLAY_OLDER_SAMPLE, len(run.verified_ops)))

    for op, again, error in await resend(epoch_ops + older):
        if error:
            run.lost += 1
            run.fail(f"{where}: acknowledged {op.rpc} {op.request.idempotency_key} "
                     f"now fails: {error}")
        elif again != op.response:
            run.lost += 1
            run.fail(f"{where}: acknowledged {op.rpc} {op.request.idempotency_key} answered "
                     f"{one_line(op.response)} before the kill, {one_line(again)} after")
    replayed = await checker.digest()
    if (replayed.sequence, replayed.digest) != (serving["records"], serving["state_digest"]):
        run.fail(f"{where}: serving logged {serving['records']} {serving['state_digest']}; "
                 f"after replaying acknowledged operations: {replayed.sequence} "
                 f"{replayed.digest}")

    # 2. Every in-flight operation, again with the same key and request: one effect in all.
    # Each retry makes one log record if the first attempt never landed, none if it did;
    # a second retry must answer the same and make none.
    in_flight = [op for w in workers for op in w.in_flight]

    for op, answer, error in await resend(in_flight):
        if error:
            run.fail(f"{where}: in-flight {op.rpc} {op.request.idempotency_key} retried: "
                     f"{error}")
        else:
            run.settle(op, answer)
    for op, again, error in await resend([op for op in in_flight if op.response is not None]):
        if error:
            run.fail(f"{where}: in-flight {op.rpc} {op.request.idempotency_key} answered "
                     f"{one_line(op.response)} then {error}")
        elif again != op.response:
            run.fail(f"{where}: in-flight {op.rpc} {op.request.idempotency_key} answered "
                     f"{one_line(op.response)} then {one_line(again)}")
    retried = await checker.digest()
    applied_now = retried.sequence - replayed.sequence
    if not 0 <= applied_now <= len(in_flight):
        run.fail(f"{where}: {len(in_flight)} in-flight retries made {applied_now} records")
    run.retried += len(in_flight)
    run.applied_before_kill += len(in_flight) - applied_now

    # 3. The state is exactly what the acknowledged answers say, and within every quota.
    for user, answer in (await checker.usage()).items():
        run.check_counters(f"{where}, {user}", answer.counters)
        if answer.plan_id != PLAN_ID or {c.key for c in answer.counters} != set(QUOTAS):
            run.fail(f"{where}: {user} has plan {answer.plan_id}: {one_line(answer)}")
        for counter in answer.counters:
            expected = run.expected.get((user, counter.key))
            if expected is not None and [counter.used, counter.held] != expected:
                run.lost += 1
                run.fail(f"{where}: {user}/{counter.key} is used {counter.used} held "
                         f"{counter.held}, the acknowledged answers say used {expected[0]} "
                         f"held {expected[1]}")

    for worker in workers:
        run.verified_ops.extend(worker.acknowledged)
        # The retries were acknowledged by this server: the next kill puts them at risk too.
        worker.acknowledged = [op for op in worker.in_flight if op.response is not None]
        worker.in_flight = []


async def load_until_snapshots(run: Run, checker: Checker, start_sequence: int) -> None:
    """Waits while the load writes SNAPSHOT_EPOCH_RECORDS records past start_sequence."""
    deadline = time.monotonic() + SNAPSHOT_EPOCH_S_MAX
    while time.monotonic() < deadline:
        if (await checker.digest()).sequence >= start_sequence + SNAPSHOT_EPOCH_RECORDS:
            return
        if run.failures:
            return
        await asyncio.sleep(0.05)
    run.fail(f"the load wrote fewer than {SNAPSHOT_EPOCH_RECORDS} records in "
             f"{SNAPSHOT_EPOCH_S_MAX} s")


def kills_of(transport: str) -> int:
    return ALONE_KILLS if transport == "unary-alone" else KILLS


async def sigkill_loop(run: Run, servers: Servers, transport: str,
                       aged_built: dict[str, list[tuple[int, int]]]) -> ServerProcess:
    started = time.monotonic()
    server = servers.start(restart=False)
    address = servers.listen
    checker = Checker(address)
    callers = 1 if transport == "unary-alone" else WORKERS
    workers = [Worker(index, random.Random(run.rng.random()), transport.removesuffix("-alone"))
               for index in range(callers)]
    for worker in workers:
        worker.connect(address)
    await checker.admin.UpsertPlan(pb.UpsertPlanRequest(plan=PLAN), timeout=CHECK_TIMEOUT_S)
    for user in USERS + IDLE_USERS:
        await checker.admin.UpsertSubscription(
            pb.UpsertSubscriptionRequest(user_id=user, plan_id=PLAN_ID), timeout=CHECK_TIMEOUT_S)

    for kill in range(1, kills_of(transport) + 1):
        load_ends, startup_kill = KILL_PLAN.get(kill % KILL_PLAN_PERIOD, ("at random", ""))
        start_sequence = (await checker.digest()).sequence
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w.load(run, kill, stop)) for w in workers]
        if load_ends == "after snapshots":
            await load_until_snapshots(run, checker, start_sequence)
            if aged_built:  # under load, after snapshots: a whole one may have let it prune
                check_aged_tails(run, f"before kill {kill}", aged_built,
                                 await checker.audit_trails(aged_users()))
                run.aged_checks_under_load += 1
        else:
            await asyncio.sleep(run.rng.uniform(0.0, LOAD_S_MAX))
        assert server.kill() == -signal.SIGKILL
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), CALL_TIMEOUT_S + 10)

        if startup_kill:
            servers.start_and_kill_during_startup(startup_kill)
        server = servers.start()
        loaded = servers.snapshot_sequences[-1]
        if load_ends == "after snapshots" and not loaded > start_sequence:
            run.fail(f"restart after kill {kill}: loaded snapshot {loaded}, after a load that "
                     f"wrote records {start_sequence} to {servers.records[-1]} at a snapshot "
                     f"every {SNAPSHOT_EVERY_RECORDS}")
        if loaded < max(servers.snapshot_sequences[:-1], default=0):
            run.fail(f"restart after kill {kill}: loaded snapshot {loaded}, older than the "
                     f"one loaded before, {max(servers.snapshot_sequences[:-1])}")
        if servers.listen != address:  # the port was taken meanwhile: reconnect elsewhere
            address = servers.listen
            await checker.channel.close()
            checker = Checker(address)
            for worker in workers:
                await worker.channel.close()
                worker.connect(address)
        checked = time.monotonic()
        epoch_acked = sum(len(w.acknowledged) for w in workers)
        epoch_in_flight = sum(len(w.in_flight) for w in workers)
        await check_restart(run, checker, workers, server.last("serving"), kill)
        if VERBOSE:
            print(f"kill {kill}: acknowledged {epoch_acked} in flight {epoch_in_flight}; "
                  f"restart: records {servers.records[-1]} (replayed {servers.replayed[-1]}) "
                  f"recovery {servers.recovery_ms[-1]:.0f} ms wall {servers.wall_ms[-1]:.0f} ms; "
                  f"snapshot {servers.snapshot_sequences[-1]}; "
                  f"checks {(time.monotonic() - checked) * 1000:.0f} ms")
        if run.failures:
            break
        assert time.monotonic() - started < RUN_S_MAX, "holds would start to expire"

    # after a kill: the event index entries not yet filed were read again from the records
    run.audit_trails = await checker.audit_trails(USERS)
    if aged_built:
        run.aged_trails = await checker.audit_trails(aged_users())
        check_aged_tails(run, "after the last kill", aged_built, run.aged_trails)
    await checker.channel.close()
    for worker in workers:
        await worker.channel.close()
    return server


@pytest.mark.parametrize("transport", ["unary", "batch", "unary-alone"])
def test_sigkill_loop_loses_nothing_acknowledged(tmp_path: Path, transport: str):
    seed = int(os.environ.get("QUOTAD_SIGKILL_SEED", random.randrange(2**32)))
    run = Run(seed)
    servers = Servers(tmp_path / "data", run.rng, server_args(), retention_hours())
    started = time.monotonic()
    aged = "--audit-retention-days" in servers.extra_args and bool(servers.retention_hours)
    aged_built = build_aged_log(servers.data_dir, seed) if aged else {}
    try:
        last = asyncio.run(sigkill_loop(run, servers, transport, aged_built))
        stop_code = last.stop()
    finally:
        servers.close_all()
    stopped = last.last("stopped") if stop_code == 0 else {}
    code, summary = verify_data_dir(servers.data_dir)
    elapsed = time.monotonic() - started

    kills = len(servers.recovery_ms)
    recovery, wall = servers.recovery_ms, servers.wall_ms
    loaded = sum(sequence > 0 for sequence in servers.snapshot_sequences)
    print(f"\nsigkill ({transport}): {kills} kills, acknowledged ops {run.acknowledged}, lost {run.lost}, "
          f"in-flight retried {run.retried} (applied once {run.applied_before_kill}), "
          f"recovery p50 {percentile(recovery, 0.5):.0f} ms "
          f"p99 {percentile(recovery, 0.99):.0f} ms")
    print(f"sigkill: seed {seed}; start-up wall time (Popen to serving) p50 "
          f"{percentile(wall, 0.5):.0f} ms p99 {percentile(wall, 0.99):.0f} ms; "
          f"log records at the first restart {servers.records[0]}, at the last "
          f"{servers.records[-1]} (replayed {servers.replayed[-1]}); in-flight retries applied "
          f"by the retry {run.retried - run.applied_before_kill}; "
          f"reserve/track allowed {run.outcomes['allowed']} denied {run.outcomes['denied']}; "
          f"in-flight RPC errors {run.in_flight_codes}; kills during start-up "
          f"{servers.startup_kills}; restarts that loaded a snapshot {loaded} (the last "
          f"{servers.snapshot_sequences[-1]}; {servers.deltas_loaded} with a delta); "
          f"torn log tails dropped {servers.torn_tails}; "
          f"server args {servers.extra_args}, retention hours in turn "
          f"{servers.retention_hours} ({servers.retention_changes()} starts changed it); "
          f"port changes {servers.port_changes}; "
          f"{aged_summary(run, servers, aged_built)}"
          f"verify {summary.get('seconds')} s; total {elapsed:.1f} s")

    assert not run.failures, f"seed {seed}:\n" + "\n".join(run.failures[:20])
    assert run.lost == 0
    assert kills == kills_of(transport)
    assert run.retried > 0, "no kill caught a call in flight"
    # The planned kill points were reached: kills during start-up both before the server
    # listened and while it recovered, and restarts that loaded a snapshot (each newer than
    # the state its load began with: checked in the loop).
    assert servers.startup_kills["before listening"] >= 1, servers.startup_kills
    assert servers.startup_kills["while recovering"] >= 1, servers.startup_kills
    assert loaded >= 1, servers.snapshot_sequences
    assert servers.deltas_loaded >= 1, servers.snapshot_sequences
    assert not servers.retention_hours or servers.retention_changes() >= 2
    assert stop_code == 0
    assert code == 0 and summary["clean"], summary
    assert summary["records"] == stopped["records"]
    assert summary["state_digest"] == stopped["state_digest"]
    # ListEvents listed every event of the log once, in order, right after the last kill
    logged = logged_audit_trails(servers.data_dir)
    assert sum(map(len, logged.values())) > 100, logged
    assert {user: [sequence for sequence, _ in trail]
            for user, trail in run.audit_trails.items()} == {
        user: [sequence for sequence, _ in trail] for user, trail in logged.items()}
    if aged_built:
        check_aged_log(run, servers, aged_built)


def aged_summary(run: Run, servers: Servers, built: dict[str, list[tuple[int, int]]]) -> str:
    listed = run.aged_trails
    if not built:
        return "no aged log; "
    firsts = servers.log_first_sequences
    moves = sum(later > earlier for earlier, later in zip(firsts, firsts[1:]))
    return (f"aged log of {AGED_RECORDS:,} records: the log's first record {firsts[0]} at the "
            f"first restart, {firsts[-1]} at the last, moved on at {moves} restarts; aged "
            f"users' trails checked under load {run.aged_checks_under_load} times; their "
            f"events listed after the last kill {sum(map(len, listed.values())):,} of "
            f"{sum(map(len, built.values())):,}; ")


def check_aged_tails(run: Run, where: str, built: dict[str, list[tuple[int, int]]],
                     listed: dict[str, list[tuple[int, int]]]) -> None:
    """Each aged user's ListEvents is a whole tail of the events the aged log gave them."""
    for user, events in built.items():
        events_listed = [sequence for sequence, _ in listed[user]]
        events_built = [sequence for sequence, _ in events]
        if events_listed != events_built[len(events_built) - len(events_listed):]:
            run.fail(f"{where}: {user}'s audit trail lists {events_listed}, not a tail of "
                     f"{events_built}")


def check_aged_log(run: Run, servers: Servers, built: dict[str, list[tuple[int, int]]]) -> None:
    """The aged records were pruned as they passed 24 h while kills landed, and ListEvents
    never listed a pruned one (the module's docstring)."""
    listed = run.aged_trails
    assert run.aged_checks_under_load >= 1
    firsts = servers.log_first_sequences
    assert firsts == sorted(firsts), f"the log's first record moved back: {firsts}"
    assert len(set(firsts)) >= 3, f"pruned at fewer than two restarts: {firsts}"
    assert firsts[-1] <= AGED_RECORDS, f"pruned past the aged log: {firsts}"
    left = logged_audit_trails(servers.data_dir, aged_users())
    for user in built:  # listed: a whole tail of the user's events (check_aged_tails)
        events_listed = [sequence for sequence, _ in listed[user]]
        events_left = [sequence for sequence, _ in left[user]]
        assert events_left == events_listed[len(events_listed) - len(events_left):], user
        assert all(sequence >= firsts[-1] for sequence in events_listed), user
    listed_count = sum(map(len, listed.values()))
    assert 0 < listed_count < sum(map(len, built.values())), listed_count
