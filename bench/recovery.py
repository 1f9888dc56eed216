"""Restart time at scale: a data directory with many users, then the time to load its
snapshot, to restart from it (snapshot + the log after it) and to replay the whole log.

    .venv/bin/python -m bench.recovery [--users 1000000] [--tail-records 100000] [--runs 3]
                                       [--idempotency-keys]

Builds the data directory offline with the real core and log, as the server would have
written it: one plan of two limit groups that every event hits; every user subscribed, then
one reserve + commit each (so every user has both counters); then the snapshot, made as the
server makes it while serving (a forked child encodes the state); then --tail-records more
records (reserve + commit pairs over random users): the log a restart replays after the
snapshot. The default is the server's snapshot cadence, 100,000 records: the most a crash
leaves to replay. Records are written 8,192 per synced LMDB transaction, --spacing-ms of
server time apart. The core is run as the server runs it: idempotency keys and finished holds
leave memory once their records are durable. With --idempotency-keys every Reserve and Commit
carries its own key, made as AsyncQuotaClient makes them by default: each record then holds
its first answer, which a replay makes again and checks.

It prints, each a median of --runs (with the range) unless noted:
  - snapshot fork:   the event-loop stall while serving (forking the child); one run
  - snapshot child:  fork to encoded bytes, and their size; the child's CPU (user + system),
                     also per record at the server's snapshot cadence; one run
  - snapshot children of the restarted state: the CPU of --runs children forked one after
                     the other, as a serving server forks them; and this process's CPU per
                     command (a Track of a random user) applied while each child works,
                     against the same without one: a page the server writes while a child
                     shares it is copied first. Whole snapshots, then deltas of the stored
                     one: the users changed since it, those the tail's records and that
                     run's Tracks before the fork touched (at --tail-records 100,000, about
                     the users one snapshot cadence of records changes)
  - snapshot load:   the stored snapshot to a core (checksum, decode, objects), and the
                     same state in the format before (zlib'd JSON), the peer
  - restart:         start-up recovery as the server does it: snapshot + log after it; and
                     the same state from the snapshot and a delta of it that holds the users
                     the log after it changed (the log then replayed is empty); these follow
                     the loads in this process, whose heap pages are then mapped already
  - restart in a new process: the same as a server's start: each run a process of its own,
                     which also has the kernel hand out its heap's pages (its system CPU
                     shown apart)
  - a server's own start: `quotad serve` on a copy of the directory (the copy untimed), its
                     serving line's recovery_s (recovery runs on a thread beside the event
                     loop, which answers health checks meanwhile); and the exec to its
                     listening line, which comes before (interpreter, imports, the port)
  - full replay:     every record from sequence 1 (what a lost snapshot costs), records/s;
                     and the same records read back alone (checksum, decode), us per record:
                     the part of replay that is not the core applying them again
  - pruning (--prune): every record the snapshot covers pruned from a copy of the log, as the
                     server prunes records past the retention: in transactions of
                     limits.PRUNED_RECORDS_PER_TRANSACTION_MAX (--prune-transaction-records),
                     CPU per record and each transaction's wall time (median, most); one run
Each shows wall-clock seconds and this process's CPU seconds: the machine may be shared.
Every recovered state is checked against the live one (equal state digests).

--dir keeps the built directory (with the live state's digest beside it), and a later run
with the same --dir measures it again without building.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import NamedTuple

from quotad.core.commands import Commit, Reserve, Track, UpsertPlan, UpsertSubscription
from quotad.core.machine import Core
from quotad.core.plans import LimitGroup, Match, Plan, Window
from quotad.engine.recovery import durable_idempotency, recover
from quotad.engine.writer import SNAPSHOT_EVERY_RECORDS_DEFAULT
from quotad.server import collect_as_serving
from quotad.storage import snapshot_child
from quotad.storage.codec import state_digest
from quotad.storage.snapshot import core_from_snapshot, core_with_delta, snapshot_of
from quotad.storage.snapshot_json import core_to_plain
from quotad.core import limits
from quotad.storage.wal import LOCK_FILE_NAME, Retention, Snapshot, WriteAheadLog, encode_snapshot
from quotad.testing import ServerProcess
from quotad_client import new_idempotency_key

BATCH_RECORDS = 8192
MAP_SIZE_BYTES = 256 * 1024**3
PLAN = Plan(id="pro", limit_groups=(
    LimitGroup(key="tokens", quota=10**12, window=Window.MONTH, match=Match(event_types=("*",))),
    LimitGroup(key="requests", quota=10**9, window=Window.DAY, match=Match(event_types=("*",))),
))
ROOT = Path(__file__).resolve().parent.parent
"""The checkout: the working directory of the processes the bench starts."""
FACTS_FILE = "bench-facts.json"
"""What a kept --dir holds beside the log: what the build found and the live state's digest."""


PROGRESS_LINE_EVERY_S = 30.0
"""Off a terminal, a progress line this often (on one, the bar is redrawn at each step)."""
_progress_line_at = [0.0]


def _progress(label: str, done: int, total: int, started: float) -> None:
    now = time.perf_counter()
    rate = done / max(1e-9, now - started)
    bar = "#" * int(30 * done / max(1, total))
    line = f"{label:<10} [{bar:<30}] {done:>11,}/{total:,} {rate:>9,.0f}/s"
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{line}" + ("\n" if done >= total else ""))
    elif done >= total or now - _progress_line_at[0] >= PROGRESS_LINE_EVERY_S:
        _progress_line_at[0] = now
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def user_id(user: int) -> str:
    """The user id of a built log's user number."""
    return f"user-{user}"


class _Builder:
    """The core and the log, driven as the writer drives them."""

    def __init__(self, data_dir: Path, spacing_ns: int, total_records: int,
                 idempotency_keys: bool, first_ns: int | None = None) -> None:
        """first_ns: the server time of the first record (default: now)."""
        self.wal = WriteAheadLog(data_dir, map_size_bytes=MAP_SIZE_BYTES)
        self.core = Core()
        self.core.durable_idempotency = durable_idempotency(self.wal)
        self.core.durable_hold = self.wal.finished_hold
        self.now_ns = (time.time_ns() if first_ns is None else first_ns) - spacing_ns
        self.spacing_ns = spacing_ns
        self.pending: list = []
        self.total_records = total_records
        self.idempotency_keys = idempotency_keys
        self.started = time.perf_counter()

    def apply(self, command: object) -> object:
        self.now_ns += self.spacing_ns
        outcome = self.core.apply(command, self.now_ns)
        assert outcome.error is None, outcome.error
        self.pending.extend(outcome.records)
        if len(self.pending) >= BATCH_RECORDS:
            self.flush()
        return outcome.result

    def flush(self) -> None:
        if self.pending:
            self.wal.append(self.pending)
            self.core.forget_durable(self.pending[-1].sequence)
            self.pending = []
        _progress("build", self.core.sequence, self.total_records, self.started)

    def pair(self, user: int, number: int, rng: random.Random) -> None:
        held = self.apply(Reserve(app="default", user_id=user_id(user),
                                  event_type="openai.chat", amount=1000,
                                  reservation_id=f"rsv_{number:024x}",
                                  idempotency_key=self._key()))
        self.apply(Commit(app="default", reservation_id=held.reservation_id,
                          amount=rng.randrange(1001), idempotency_key=self._key()))

    def _key(self) -> str:
        return new_idempotency_key() if self.idempotency_keys else ""


def _subscribe_users(builder: _Builder, users: int, rng: random.Random) -> None:
    """The plan, every user subscribed, then one pair each (so every user has both counters)."""
    builder.apply(UpsertPlan(app="default", plan=PLAN))
    for user in range(users):
        builder.apply(UpsertSubscription(app="default", user_id=user_id(user), plan_id="pro"))
    for user in range(users):
        builder.pair(user, user + 1, rng)
    builder.flush()


def _pairs_until(builder: _Builder, sequence: int, users: int, rng: random.Random) -> None:
    """Reserve + commit pairs of random users until the log reaches the sequence; once, after
    _subscribe_users, whose holds took numbers 1 to users."""
    number = users
    while builder.core.sequence < sequence:
        number += 1
        builder.pair(rng.randrange(users), number, rng)


def _store_whole_snapshot(builder: _Builder, data_dir: Path) -> tuple[int, bytes, float, float,
                                                                     float]:
    """A whole snapshot of the state built, made as the server makes it while serving (the
    event loop pauses only to fork the child) and stored in the log: (its sequence, its
    bytes, the fork's seconds, fork to bytes in seconds, the child's CPU seconds)."""
    builder.flush()
    started = time.perf_counter()
    child = snapshot_child.start(builder.core, data_dir)
    fork_s = time.perf_counter() - started
    try:
        made = snapshot_child.finish(child)
    finally:
        snapshot_child.close(child)
    child_s = time.perf_counter() - started
    builder.wal.append([], Snapshot(child.sequence, made.encoded))
    return child.sequence, made.encoded, fork_s, child_s, made.cpu_s


def build(data_dir: Path, users: int, tail_records: int, seed: int,
          spacing_ns: int, idempotency_keys: bool) -> dict:
    rng = random.Random(seed)
    builder = _Builder(data_dir, spacing_ns, 1 + 3 * users + tail_records, idempotency_keys)
    _subscribe_users(builder, users, rng)
    sequence, encoded, fork_s, child_s, child_cpu_s = _store_whole_snapshot(builder, data_dir)
    _pairs_until(builder, sequence + tail_records, users, rng)
    builder.flush()
    facts = {"users": users, "records": builder.core.sequence, "snapshot_sequence": sequence,
             "snapshot_bytes": len(encoded), "fork_s": fork_s, "child_s": child_s,
             "child_cpu_s": child_cpu_s,
             "spacing_ms": spacing_ns / 1e6, "idempotency_keys": idempotency_keys,
             "live_digest": state_digest(builder.core)}
    builder.wal.close()
    (data_dir / FACTS_FILE).write_text(json.dumps(facts))
    return facts


AGED_USERS = 1000
"""The users of an aged log (build_aged), apart from a soak's own."""
AGED_RECORDS_MIN = 1 + 3 * AGED_USERS


def build_aged(data_dir: Path, records: int, first_ns: int, span_ns: int, seed: int = 7) -> int:
    """A log as a server that served keyed reserve + commit pairs (AGED_USERS users, every
    call with its own idempotency key, as AsyncQuotaClient makes them) from server time
    first_ns for span_ns would have left it: `records` records, evenly spaced, then a whole
    snapshot of them all (so a server started on it replays nothing, and may prune any of
    them once they pass its retention). Returns the records' count."""
    if records < AGED_RECORDS_MIN or span_ns <= 0:
        raise ValueError(f"an aged log holds at least {AGED_RECORDS_MIN} records (the plan, "
                         f"{AGED_USERS} users subscribed and a pair each) over a span > 0")
    rng = random.Random(seed)
    builder = _Builder(data_dir, span_ns // records, records, idempotency_keys=True,
                       first_ns=first_ns)
    _subscribe_users(builder, AGED_USERS, rng)
    _pairs_until(builder, records - 1, AGED_USERS, rng)
    _store_whole_snapshot(builder, data_dir)
    count = builder.core.sequence
    builder.wal.close()
    return count


COLLECTOR_DUE_ALLOCATIONS = 1000
"""Past the young generation's threshold (700 by default): enough to set off a collection the
measured work left due."""


def _timed(runs: int, measure, check=None) -> tuple[list[float], list[float]]:
    """(wall-clock s, this process's CPU s) of each run of measure, its result then checked
    (untimed). The machine is shared: CPU time shows the work alone, wall-clock what a
    restart would wait. What comes next is timed too (a few allocations, as a server's
    start-up goes on): a collection the measured work left due is part of its cost."""
    wall_s, cpu_s = [], []
    for _ in range(runs):
        gc.collect()
        started, started_cpu = time.perf_counter(), time.process_time()
        result = measure()
        _next_allocations = [[] for _ in range(COLLECTOR_DUE_ALLOCATIONS)]
        wall_s.append(time.perf_counter() - started)
        cpu_s.append(time.process_time() - started_cpu)
        if check is not None:
            check(result)
        del result
    return wall_s, cpu_s


def _summary(times: tuple[list[float], list[float]]) -> str:
    wall_s, cpu_s = times
    return (f"{statistics.median(wall_s):7.2f} s (range {min(wall_s):.2f} to "
            f"{max(wall_s):.2f}, {len(wall_s)} runs; CPU {statistics.median(cpu_s):.2f} s)")


NEW_PROCESS_RESTART_TIMEOUT_S = 600
"""A restart in a process of its own that takes longer is a failure of the bench."""
SERVER_START_TIMEOUT_S = 600
"""A server's start on a copy of the directory that takes longer is a failure of the bench."""


class _SnapshotLost:
    """The log as a restart sees it when the snapshot is lost: every record is replayed."""

    def __init__(self, wal: WriteAheadLog) -> None:
        self._wal = wal

    def load_snapshot(self) -> None:
        return None

    def __getattr__(self, name: str) -> object:
        return getattr(self._wal, name)


BESIDE_CHILD_COMMANDS = 20_000
"""Commands applied in this process without a snapshot child, then again while one runs."""


class _ChildrenCost(NamedTuple):
    cpu_s: list[float]
    """Each child's CPU."""
    alone_us: list[float]
    """CPU per command applied by this process with no child."""
    beside_us: list[float]
    """The same, right after forking the child: each page written is copied while it lives."""
    alive_throughout: int
    """Runs whose child was still at work after the commands beside it."""
    users_changed: list[int]
    """The users each child's snapshot held as changed (a delta's)."""


def _snapshot_children(core: Core, data_dir: Path, users: int, runs: int,
                       delta_of_sequence: int = 0) -> _ChildrenCost:
    """`runs` snapshot children forked one after the other from a restarted server's state,
    the collector set as the server sets it once it has recovered; around each fork, the CPU
    of BESIDE_CHILD_COMMANDS Tracks of random users applied by the core, before the fork and
    while the child works. With delta_of_sequence, deltas of the whole snapshot at that
    sequence, each of the users the restart's replay changed and the Tracks before its fork."""
    replayed_changed = {app: set(ids) for app, ids in core.users_changed.items()}
    rng = random.Random(users + delta_of_sequence)
    now_ns = [core.last_record_ns]

    def applied_us() -> float:
        started = time.process_time()
        for _ in range(BESIDE_CHILD_COMMANDS):
            now_ns[0] += 1000
            outcome = core.apply(Track(app="default", user_id=user_id(rng.randrange(users)),
                                       event_type="openai.chat", amount=1), now_ns[0])
            assert outcome.error is None, outcome.error
        return (time.process_time() - started) / BESIDE_CHILD_COMMANDS * 1e6

    thresholds = gc.get_threshold()
    collect_as_serving()
    cpu_s, alone_us, beside_us, alive_throughout, users_changed = [], [], [], 0, []
    try:
        for _ in range(runs):
            core.users_changed = {app: set(ids) for app, ids in replayed_changed.items()}
            alone_us.append(applied_us())
            users_changed.append(core.users_changed_count())
            child = snapshot_child.start(core, data_dir, delta_of_sequence)
            try:
                beside_us.append(applied_us())
                alive_throughout += os.waitid(  # still at work? (WNOWAIT: not reaped)
                    os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
                cpu_s.append(snapshot_child.finish(child).cpu_s)
            finally:
                snapshot_child.close(child)
        return _ChildrenCost(cpu_s, alone_us, beside_us, alive_throughout, users_changed)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def restart_here(data_dir: str, live_digest: str) -> None:
    """A restart in this process, new: recover(), checked, then one line of JSON with its
    wall-clock, CPU and system CPU seconds (what _new_process_restarts runs)."""
    wal = WriteAheadLog(Path(data_dir), map_size_bytes=MAP_SIZE_BYTES)
    try:
        usage = os.times()
        started = time.perf_counter()
        core = recover(wal, repair=False)
        wall_s = time.perf_counter() - started
        ended = os.times()
        _check(live_digest, core)
    finally:
        wal.close()
    print(json.dumps({"wall_s": wall_s, "cpu_s": ended.user + ended.system - usage.user
                      - usage.system, "system_s": ended.system - usage.system}))


def _new_process_restarts(data_dir: Path, live_digest: str, runs: int
                          ) -> tuple[list[float], list[float], list[float]]:
    """(wall-clock, CPU, system CPU) seconds of each restart, each in a new process."""
    wall_s, cpu_s, system_s = [], [], []
    for _ in range(runs):
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from bench.recovery import restart_here; "
             "restart_here(sys.argv[1], sys.argv[2])", str(data_dir), live_digest],
            cwd=ROOT, capture_output=True, text=True,
            timeout=NEW_PROCESS_RESTART_TIMEOUT_S, check=True)
        times = json.loads(child.stdout.splitlines()[-1])
        wall_s.append(times["wall_s"])
        cpu_s.append(times["cpu_s"])
        system_s.append(times["system_s"])
    return wall_s, cpu_s, system_s


class _ServerStarts(NamedTuple):
    listening_s: list[float]
    """Exec to the listening line (the interpreter, imports, the log opened, the port bound),
    in seconds: the line's time (to the millisecond) less the wall-clock time of the exec."""
    recovery_s: list[float]
    """The serving line's recovery_s: from the listening line to serving (the snapshot and the
    log after it, on a thread beside the event loop that answers health checks meanwhile)."""


def _server_starts(data_dir: Path, live_digest: str, runs: int) -> _ServerStarts:
    """A server's own start, `quotad serve` on a fresh copy of the directory each run (the
    copy untimed), checked: the state digest of its serving line is the live state's (that
    line comes after the digest's pass over the state, so its own time is not the start's)."""
    starts = _ServerStarts([], [])
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="quotad-start-") as scratch:
            copy = Path(scratch) / "data"
            shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns(FACTS_FILE))
            server = ServerProcess(copy, extra_args=("--log-state-digest",), cwd=ROOT)
            try:
                launched_at_s = time.time()
                server.launch()
                serving = server.wait_for("serving", SERVER_START_TIMEOUT_S)
            finally:
                server.close()
            assert serving["state_digest"] == live_digest, "the server recovered another state"
            listening = datetime.fromisoformat(server.last("listening")["time"])
            starts.listening_s.append(listening.timestamp() - launched_at_s)
            starts.recovery_s.append(serving["recovery_s"])
    return starts


def measure(data_dir: Path, facts: dict, runs: int, replay_runs: int) -> None:
    # first, while no other process holds the directory
    new_process_s = _new_process_restarts(data_dir, facts["live_digest"], runs)
    server_starts = _server_starts(data_dir, facts["live_digest"], runs)
    wal = WriteAheadLog(data_dir, map_size_bytes=MAP_SIZE_BYTES)
    try:
        stored = wal.load_snapshot()
        assert stored is not None and stored.sequence == facts["snapshot_sequence"]
        check = partial(_check, facts["live_digest"])
        load_s = _timed(runs, lambda: core_from_snapshot(stored.encoded))
        as_json = _json_snapshot(core_from_snapshot(stored.encoded))
        json_load_s = _timed(runs, lambda: core_from_snapshot(as_json))
        restart_s = _timed(runs, lambda: recover(wal, repair=False), check)
        replayed = recover(wal, repair=False)
        tail_users = replayed.users_changed_count()
        delta = snapshot_of(replayed, stored.sequence)  # what the tail's records changed
        del replayed
        delta_restart_s = _timed(runs, lambda: core_with_delta(
            core_from_snapshot(stored.encoded), delta), check)
        children = _snapshot_children(recover(wal, repair=False), data_dir, facts["users"],
                                      runs)
        deltas = _snapshot_children(recover(wal, repair=False), data_dir, facts["users"], runs,
                                    stored.sequence)
        replay_s = _timed(replay_runs, lambda: recover(_SnapshotLost(wal), repair=False), check)
        decode_s = _timed(replay_runs, lambda: sum(1 for _ in wal.records(0)))
        if replay_runs == 0:  # measured once already: shown again from the facts kept
            replay_s = facts.get("replay_s", ([], []))
            decode_s = facts.get("decode_s", ([], []))
        facts["replay_s"], facts["decode_s"] = replay_s, decode_s
        (data_dir / FACTS_FILE).write_text(json.dumps(facts))
    finally:
        wal.close()
    size_mb = sum(f.stat().st_size for f in data_dir.iterdir()) / 1e6
    records, tail = facts["records"], facts["records"] - facts["snapshot_sequence"]
    keyed = ", each Reserve and Commit keyed" if facts.get("idempotency_keys") else ""
    print(f"users {facts['users']:,} (2 counters each), log records {records:,}, "
          f"{tail:,} after the snapshot{keyed}; data dir {size_mb:,.0f} MB")
    print(f"snapshot fork (event-loop stall)  {facts['fork_s']:7.3f} s")
    print(f"snapshot child, fork to bytes     {facts['child_s']:7.2f} s, "
          f"{facts['snapshot_bytes'] / 1e6:,.2f} MB")
    if "child_cpu_s" in facts:  # not in a directory built before it was measured
        cpu_s = facts["child_cpu_s"]
        print(f"  the child's CPU                 {cpu_s:7.2f} s: "
              f"{cpu_s / SNAPSHOT_EVERY_RECORDS_DEFAULT * 1e6:.2f} us per record at the "
              f"server's cadence (a snapshot every {SNAPSHOT_EVERY_RECORDS_DEFAULT:,} records)")
    for kind, cost in (("whole", children), ("deltas", deltas)):
        cpu_s = cost.cpu_s
        changed = (f", of {statistics.median(cost.users_changed):,.0f} users changed"
                   if kind == "deltas" else "")
        per_record_us = statistics.median(cpu_s) / SNAPSHOT_EVERY_RECORDS_DEFAULT * 1e6
        print(f"snapshot children of the restarted state, {kind}{changed}: CPU "
              f"{statistics.median(cpu_s):.2f} s (range {min(cpu_s):.2f} to {max(cpu_s):.2f}, "
              f"{len(cpu_s)} runs): {per_record_us:.2f} us per record at the server's cadence")
        print(f"  commands applied beside a child {statistics.median(cost.beside_us):7.2f} us "
              f"of CPU each (range {min(cost.beside_us):.2f} to {max(cost.beside_us):.2f}), "
              f"without one {statistics.median(cost.alone_us):.2f} "
              f"({min(cost.alone_us):.2f} to {max(cost.alone_us):.2f}); "
              f"{BESIDE_CHILD_COMMANDS:,} a run, the child at work throughout "
              f"{cost.alive_throughout} of {len(cpu_s)}")
    print(f"snapshot load                     {_summary(load_s)}")
    print(f"  the same as JSON (before), {len(as_json) / 1e6:,.2f} MB "
          f"{_summary(json_load_s)}: binary / JSON CPU "
          f"{statistics.median(load_s[1]) / statistics.median(json_load_s[1]):.2f}")
    print(f"restart (snapshot + {tail:,} records) {_summary(restart_s)}")
    print(f"restart (snapshot + a delta of the {tail_users:,} users they changed, "
          f"{len(delta) / 1e6:,.2f} MB) {_summary(delta_restart_s)}")
    print(f"restart in a new process (snapshot + {tail:,} records) "
          f"{_summary(new_process_s[:2])}, of it system "
          f"{statistics.median(new_process_s[2]):.2f} s")
    recovery_s, listening_s = server_starts.recovery_s, server_starts.listening_s
    print(f"a server's own start (quotad serve on a copy), its recovery_s "
          f"{statistics.median(recovery_s):.2f} s (range {min(recovery_s):.2f} to "
          f"{max(recovery_s):.2f}, {len(recovery_s)} runs); exec to listening before it "
          f"{statistics.median(listening_s):.2f} s ({min(listening_s):.2f} to "
          f"{max(listening_s):.2f})")
    if replay_s[0]:
        print(f"full replay of the log            {_summary(replay_s)}: "
              f"{records / statistics.median(replay_s[0]):,.0f} records/s "
              f"(CPU: {records / statistics.median(replay_s[1]):,.0f})")
    if decode_s[0]:
        print(f"  the records read back alone     {_summary(decode_s)}: "
              f"{statistics.median(decode_s[1]) / records * 1e6:.2f} us of CPU per record")


def measure_pruning(data_dir: Path,
                    transaction_records: int = limits.PRUNED_RECORDS_PER_TRANSACTION_MAX) -> None:
    """Prunes a copy of the log as the server does once its records pass the retention, in
    transactions of transaction_records at most."""
    assert transaction_records >= 1
    copy = Path(tempfile.mkdtemp(prefix="quotad-prune-")) / "data"
    try:
        shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns(LOCK_FILE_NAME))
        wal = WriteAheadLog(copy, map_size_bytes=MAP_SIZE_BYTES)
        try:
            covered = wal.snapshot_sequence()
            transactions_s: list[float] = []
            records = 0
            started_cpu = time.process_time()
            while True:
                started = time.perf_counter()
                pruned = wal.prune(covered, Retention(before_ns=2**63), transaction_records)
                transactions_s.append(time.perf_counter() - started)
                records += pruned.records
                if not pruned.more:
                    break
            cpu_s = time.process_time() - started_cpu
            assert wal.first_sequence() == covered + 1, (wal.first_sequence(), covered)
        finally:
            wal.close()
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
    print(f"pruning {records:,} records, {transaction_records:,} a "
          f"transaction: {cpu_s / max(records, 1) * 1e6:.2f} us of CPU per record; "
          f"transactions: {len(transactions_s)}, median {statistics.median(transactions_s) * 1e3:.1f} "
          f"ms, most {max(transactions_s) * 1e3:.1f} ms")


def _json_snapshot(core: Core) -> bytes:
    """The core as the format before binary snapshots stored it (zlib'd JSON), the peer."""
    body = zlib.compress(json.dumps(core_to_plain(core), separators=(",", ":"),
                                    ensure_ascii=False).encode("utf-8"), 1)
    return encode_snapshot(core.sequence, body)


def _check(live_digest: str, recovered: Core) -> None:
    assert state_digest(recovered) == live_digest, "recovered another state"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Building runs the core at its live speed (5,000 to 15,000 records/s on a "
               "shared 2-core machine): 1,000,000 users take 5 to 10 minutes.")
    parser.add_argument("--users", type=int, default=1_000_000,
                        help="subscribers, each with both counters (default: %(default)s)")
    parser.add_argument("--tail-records", type=int, default=SNAPSHOT_EVERY_RECORDS_DEFAULT,
                        help="log records after the snapshot, which a restart replays "
                             "(default: the server's snapshot cadence, %(default)s)")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs of snapshot load and of restart; the median is shown "
                             "(default: %(default)s)")
    parser.add_argument("--replay-runs", type=int, default=1,
                        help="runs of the full replay, the slow one; 0 shows the last one "
                             "measured in --dir (default: %(default)s)")
    parser.add_argument("--dir", type=Path,
                        help="build here and keep it; an existing one this bench built is "
                             "measured again without building (default: a temporary dir)")
    parser.add_argument("--seed", type=int, default=7,
                        help="seed of the random users and amounts of the pairs after the "
                             "first one of each user (default: %(default)s)")
    parser.add_argument("--spacing-ms", type=float, default=1.0,
                        help="server time between two records (default: %(default)s)")
    parser.add_argument("--idempotency-keys", action="store_true",
                        help="give every Reserve and Commit its own idempotency key, made as "
                             "AsyncQuotaClient makes them by default (each record then holds "
                             "its first answer); ignored for an existing --dir")
    parser.add_argument("--prune", action="store_true",
                        help="also prune every record the snapshot covers from a copy of the "
                             "log, as the server does past the retention, and show its cost")
    parser.add_argument("--prune-transaction-records", type=int,
                        default=limits.PRUNED_RECORDS_PER_TRANSACTION_MAX, metavar="N",
                        help="with --prune: records pruned in one transaction at most, to see "
                             "what a transaction costs besides its records (default: the "
                             "server's, %(default)s)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    assert args.users >= 1 and args.tail_records >= 0 and args.runs >= 1
    assert args.replay_runs >= 0
    if args.prune_transaction_records < 1:
        build_parser().error("--prune-transaction-records must be at least 1")
    data_dir = args.dir or Path(tempfile.mkdtemp(prefix="quotad-recovery-"))
    try:
        facts_path = data_dir / FACTS_FILE
        if facts_path.exists():
            facts = json.loads(facts_path.read_text())
        else:
            facts = build(data_dir, args.users, args.tail_records, args.seed,
                          int(args.spacing_ms * 1_000_000), args.idempotency_keys)
        measure(data_dir, facts, args.runs, args.replay_runs)
        if args.prune:
            measure_pruning(data_dir, args.prune_transaction_records)
    finally:
        if args.dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
