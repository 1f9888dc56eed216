"""CPU per keyed reserve + commit pair in the server's own steps, in one process, stage by
stage.

    .venv/bin/python -m bench.core_cost [--pairs 500] [--rounds 15] [--warmup-rounds 5]

What the server does for a Batch, without gRPC and the event loop: each round parses a
BatchRequest of --pairs Reserves (each with its own idempotency key, so each looks its key up
in the log first) from its bytes, converts each operation to its command as the Batch handler
does, applies them, fills and encodes the BatchResponse, appends their records in one synced
LMDB transaction and lets memory forget what is durable; then the same for a Batch committing
their holds. Each stage is timed with the thread's CPU clock (time.thread_time), so a busy
machine slows it less than a wall clock would.

The cyclic collector runs as in the server (quotad.server.collect_as_serving: the state set
up is frozen, the thresholds are the server's); with Python's defaults a pair
measured ~5 % more, the young generation collected every 700 allocations.

Prints, per stage, the median of the rounds and the fastest round, in microseconds of CPU per
operation of that stage's Batch, then the whole pair: a floor under what the server spends per
pair, which also pays for gRPC, the event loop and the request's authentication.

Under the stages, what of the append is encoding the records: after each append, the same
records are encoded again, alone, as the append encoded them (counters naming their shapes,
their unchanging parts copied from the bytes they encoded to before);
not counted in the pair. The rest of the append is LMDB's: the puts, the rows of keys,
holds and events, the commit and its sync.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from quotad.api import convert
from quotad.api.service import _FILL_BATCH_RESULT
from quotad.core import commands as c
from quotad.core.machine import Core
from quotad.core.plans import LimitGroup, Match, Plan, Window
from quotad.engine.recovery import recover
from quotad.server import collect_as_serving
from quotad.storage.codec import CounterHeads, CounterShape, encode_counter_shape, encode_record
from quotad.storage.wal import WriteAheadLog
from quotad_client import new_idempotency_key
from quotad_contract.v1 import quotad_pb2 as pb

from .harness import doc_parser

USERS = 1000
NS_PER_S = 10**9
APP = "default"
STAGES = ("parse", "convert", "apply", "fill", "encode", "append", "forget")
"""The request's bytes parsed; its operations made commands; the commands applied (with the
idempotency lookups); the response filled and encoded; the records written and synced; memory
told what is durable (which frees what only the records held)."""
ENCODING = "records"
"""The records encoded again after their append, alone (not a stage: not in the pair)."""


class Run:
    def __init__(self, data_dir: Path) -> None:
        self.wal = WriteAheadLog(data_dir)
        self.core: Core = recover(self.wal)
        self.now_ns = 1_800_000_000 * NS_PER_S
        self.serials = itertools.count(1)
        self.shape_ids: dict[CounterShape, bytes] = {}
        self.counter_heads: CounterHeads = {}
        """The encoded unchanging parts of the counters encoded again, as the log keeps them."""
        self.cpu_s: dict[str, list[float]] = {}
        """(Reserve|Commit, stage) -> CPU seconds of each round's Batch, once measuring."""
        self.encoding_s: dict[str, list[float]] = {}
        """Reserve|Commit -> CPU seconds of each round's records encoded again, alone."""
        plan = Plan(id="bench", limit_groups=(LimitGroup(
            key="tokens", label="Tokens", unit="tokens", quota=10**15, window=Window.MONTH,
            match=Match(event_types=("openai.*",))),))
        records = list(self._apply(c.UpsertPlan(app=APP, plan=plan)).records)
        for user in range(USERS):
            records += self._apply(c.UpsertSubscription(
                app=APP, user_id=f"user-{user:07d}", plan_id="bench")).records
        self.wal.append(records)
        self.core.forget_durable(self.core.sequence)

    def _apply(self, command: object) -> Any:
        self.now_ns += 1000
        outcome = self.core.apply(command, self.now_ns)
        assert outcome.error is None, outcome.error
        return outcome

    def _shape_id(self, shape: CounterShape) -> bytes:
        """A counter shape's id, as the log's shapes table gives it once stored."""
        found = self.shape_ids.get(shape)
        if found is None:
            found = self.shape_ids[shape] = encode_counter_shape(shape)[0]
        return found

    def _batch(self, kind: str, request_bytes: bytes, measure: bool) -> pb.BatchResponse:
        """One Batch of `kind` operations through every stage; the response."""
        to_command = getattr(convert, kind)
        times = [time.thread_time()]
        request = pb.BatchRequest.FromString(request_bytes)
        times.append(time.thread_time())
        commands = [to_command(APP, getattr(operation, kind))
                    for operation in request.operations]
        times.append(time.thread_time())
        outcomes, records = [], []
        with self.wal.reading():
            for command in commands:
                outcome = self._apply(command)
                outcomes.append(outcome)
                records += outcome.records
        times.append(time.thread_time())
        response = pb.BatchResponse()
        fill = _FILL_BATCH_RESULT[kind]
        for outcome in outcomes:
            fill(getattr(response.results.add(), kind), outcome.result)
        times.append(time.thread_time())
        response_bytes = response.SerializeToString()
        times.append(time.thread_time())
        self.wal.append(records)
        times.append(time.thread_time())
        for record in records:
            encode_record(record, self._shape_id, self.counter_heads)
        forget_started = time.thread_time()
        encoding_s = forget_started - times[-1]
        del outcomes, records, commands, request
        self.core.forget_durable(self.core.sequence)
        times.append(time.thread_time() - encoding_s)  # the forget stage leaves them out
        if measure:
            for stage, started, ended in zip(STAGES, times, times[1:]):
                self.cpu_s.setdefault((kind, stage), []).append(ended - started)
            self.encoding_s.setdefault(kind, []).append(encoding_s)
        return pb.BatchResponse.FromString(response_bytes)

    def round(self, pairs: int, measure: bool = True) -> None:
        reserves = pb.BatchRequest()
        for _ in range(pairs):
            serial = next(self.serials)
            reserve = reserves.operations.add().reserve
            reserve.user_id = f"user-{serial % USERS:07d}"
            reserve.event_type = "openai.chat"
            reserve.amount = 1000
            reserve.metadata["model"] = "gpt-4o-mini"
            reserve.idempotency_key = new_idempotency_key()
        reserved = self._batch("reserve", reserves.SerializeToString(), measure)
        commits = pb.BatchRequest()
        for result in reserved.results:
            assert result.reserve.allowed, result
            commit = commits.operations.add().commit
            commit.reservation_id = result.reserve.reservation_id
            commit.amount = 900
            commit.idempotency_key = new_idempotency_key()
        committed = self._batch("commit", commits.SerializeToString(), measure)
        assert all(result.HasField("commit") for result in committed.results)


def main() -> None:
    parser = doc_parser("bench.core_cost", __doc__)
    parser.add_argument("--pairs", type=int, default=500, metavar="N",
                        help="pairs per round: one Batch of Reserves, one of Commits (default: 500)")
    parser.add_argument("--rounds", type=int, default=15, metavar="N",
                        help="measured rounds; the figures are their medians (default: 15)")
    parser.add_argument("--warmup-rounds", type=int, default=5, metavar="N",
                        help="rounds run first and not measured (default: 5)")
    options = parser.parse_args()
    if not (1 <= options.pairs <= 4096 and options.rounds >= 1 and options.warmup_rounds >= 0):
        parser.error("--pairs must be 1 to 4096, --rounds at least 1, --warmup-rounds 0 or more")
    with tempfile.TemporaryDirectory(prefix="quotad-core-cost-") as directory:
        run = Run(Path(directory) / "data")
        collect_as_serving()
        try:
            for _ in range(options.warmup_rounds):
                run.round(options.pairs, measure=False)
            for _ in range(options.rounds):
                run.round(options.pairs)
        finally:
            run.wal.close()
    per_op_us = {key: [cpu_s / options.pairs * 1e6 for cpu_s in rounds]
                 for key, rounds in run.cpu_s.items()}
    per_pair_us = [sum(round_us) for round_us in zip(*per_op_us.values())]
    print(f"server steps, keyed reserve + commit pairs, {options.pairs} per Batch, "
          f"{options.rounds} rounds: us of CPU per operation, median (fastest)")
    print(f"  {'stage':10s} {'reserve':>16s} {'commit':>16s}")
    for stage in STAGES:
        cells = [f"{statistics.median(per_op_us[kind, stage]):7.2f} "
                 f"({min(per_op_us[kind, stage]):6.2f})" for kind in ("reserve", "commit")]
        print(f"  {stage:10s} {cells[0]:>16s} {cells[1]:>16s}")
    encoding_us = {kind: [cpu_s / options.pairs * 1e6 for cpu_s in rounds]
                   for kind, rounds in run.encoding_s.items()}
    cells = [f"{statistics.median(encoding_us[kind]):7.2f} ({min(encoding_us[kind]):6.2f})"
             for kind in ("reserve", "commit")]
    print(f"  of the append, its {ENCODING} encoded alone (not in the pair):")
    print(f"  {ENCODING:10s} {cells[0]:>16s} {cells[1]:>16s}")
    print(f"cpu_us_per_pair  {statistics.median(per_pair_us):8.1f}   "
          f"range {min(per_pair_us):.1f}-{max(per_pair_us):.1f}")


if __name__ == "__main__":
    main()
