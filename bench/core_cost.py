"""CPU per keyed reserve + commit pair in the core and the log alone, in one process.

    .venv/bin/python -m bench.core_cost [--pairs 500] [--rounds 15] [--warmup-rounds 5]

What the writer does for a Batch, without gRPC, the request conversion or the answers: each
round applies --pairs Reserves (each with its own idempotency key, so each looks its key up
in the log first), appends their records in one synced LMDB transaction, lets memory forget
what is durable, then does the same for their Commits. The figure is the process's CPU per
pair (time.process_time), the median of the rounds and their range: a floor under what the
server spends per pair, which also pays for gRPC, conversion and the hop to the log thread.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

from quotad.core import commands as c
from quotad.core.machine import Core
from quotad.core.plans import LimitGroup, Match, Plan, Window
from quotad.engine.recovery import recover
from quotad.storage.wal import WriteAheadLog

USERS = 1000
NS_PER_S = 10**9


class Run:
    def __init__(self, data_dir: Path) -> None:
        self.wal = WriteAheadLog(data_dir)
        self.core: Core = recover(self.wal)
        self.now_ns = 1_800_000_000 * NS_PER_S
        self.serials = itertools.count(1)
        plan = Plan(id="bench", limit_groups=(LimitGroup(
            key="tokens", label="Tokens", unit="tokens", quota=10**15, window=Window.MONTH,
            match=Match(event_types=("openai.*",))),))
        records = list(self._apply(c.UpsertPlan(app="default", plan=plan)).records)
        for user in range(USERS):
            records += self._apply(c.UpsertSubscription(
                app="default", user_id=f"user-{user:07d}", plan_id="bench")).records
        self._append(records)

    def _apply(self, command: object) -> object:
        self.now_ns += 1000
        outcome = self.core.apply(command, self.now_ns)
        assert outcome.error is None, outcome.error
        return outcome

    def _append(self, records: list) -> None:
        self.wal.append(records)
        self.core.forget_durable(self.core.sequence)

    def _batch(self, commands: list) -> list:
        records, results = [], []
        with self.wal.reading():
            for command in commands:
                outcome = self._apply(command)
                records += outcome.records
                results.append(outcome.result)
        self._append(records)
        return results

    def round(self, pairs: int) -> None:
        reserves = []
        for _ in range(pairs):
            serial = next(self.serials)
            reserves.append(c.Reserve(
                app="default", user_id=f"user-{serial % USERS:07d}", event_type="openai.chat",
                amount=1000, metadata=(("model", "gpt-4o-mini"),),
                idempotency_key=f"r{serial:031x}", reservation_id=f"rsv_{serial:024x}"))
        holds = [result.reservation_id for result in self._batch(reserves)]
        self._batch([c.Commit(app="default", reservation_id=hold, amount=900,
                              idempotency_key=f"c{next(self.serials):031x}") for hold in holds])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.core_cost",
                                     description=__doc__.split("\n\n")[0], epilog=__doc__.split(
                                         "\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=500, metavar="N",
                        help="pairs per round: one Batch of Reserves, one of Commits (default: 500)")
    parser.add_argument("--rounds", type=int, default=15, metavar="N",
                        help="measured rounds; the figure is their median (default: 15)")
    parser.add_argument("--warmup-rounds", type=int, default=5, metavar="N",
                        help="rounds run first and not measured (default: 5)")
    options = parser.parse_args()
    if not (1 <= options.pairs <= 4096 and options.rounds >= 1 and options.warmup_rounds >= 0):
        parser.error("--pairs must be 1 to 4096, --rounds at least 1, --warmup-rounds 0 or more")
    with tempfile.TemporaryDirectory(prefix="quotad-core-cost-") as directory:
        run = Run(Path(directory) / "data")
        try:
            for _ in range(options.warmup_rounds):
                run.round(options.pairs)
            per_pair_us = []
            for _ in range(options.rounds):
                started = time.process_time()
                run.round(options.pairs)
                per_pair_us.append((time.process_time() - started) / options.pairs * 1e6)
        finally:
            run.wal.close()
    print(f"core + log, keyed reserve + commit pairs, {options.pairs} per Batch, "
          f"median of {options.rounds} rounds")
    print(f"  cpu_us_per_pair  {statistics.median(per_pair_us):8.1f}   "
          f"range {min(per_pair_us):.1f}-{max(per_pair_us):.1f}")


if __name__ == "__main__":
    main()
