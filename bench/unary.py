"""Unary Reserve (+ Commit) throughput and latency against a real quotad process.

    .venv/bin/python -m bench.unary [--seconds 5] [--runs 3] [--concurrency 1,64]

Starts its own server on a free loopback port and a fresh data directory for each run,
drives it with one grpc.aio client process, and prints the median of the runs. Also prints
how group commit behaved: records per LMDB transaction (from the server's stop line).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from server_process import ServerProcess  # noqa: E402

from quotad.v1 import quotad_pb2 as pb  # noqa: E402
from quotad.v1 import quotad_pb2_grpc as stubs  # noqa: E402

USERS = 1000


async def _drive(address: str, concurrency: int, seconds: float, pairs: bool) -> tuple[int, list[float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        quota = stubs.QuotaServiceStub(channel)
        admin = stubs.AdminServiceStub(channel)
        await admin.UpsertPlan(pb.UpsertPlanRequest(plan=pb.Plan(id="bench", limit_groups=[
            pb.LimitGroup(key="tokens", quota=10**15, window=pb.MONTH,
                          match=pb.Match(event_types=["*"]))])))
        for user in range(USERS):
            await admin.UpsertSubscription(pb.UpsertSubscriptionRequest(
                user_id=f"u{user}", plan_id="bench"))
        deadline = time.perf_counter() + seconds
        latencies_s: list[float] = []

        async def worker(index: int) -> int:
            done = 0
            user = f"u{index % USERS}"
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                hold = await quota.Reserve(pb.ReserveRequest(user_id=user, event_type="chat",
                                                             amount=10))
                latencies_s.append(time.perf_counter() - started)
                done += 1
                if pairs:
                    await quota.Commit(pb.CommitRequest(reservation_id=hold.reservation_id,
                                                        amount=7))
                    done += 1
            return done

        counts = await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return sum(counts), latencies_s


def run_once(concurrency: int, seconds: float, pairs: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as data_dir:
        server = ServerProcess(Path(data_dir), plans=None, extra_args=()).start()
        try:
            calls, latencies_s = asyncio.run(_drive(server.address, concurrency, seconds, pairs))
        finally:
            server.stop()
        stopped = server.last("stopped")
    latencies_s.sort()
    return {
        "calls_per_s": calls / seconds,
        "reserve_p50_ms": latencies_s[len(latencies_s) // 2] * 1e3,
        "reserve_p99_ms": latencies_s[int(len(latencies_s) * 0.99)] * 1e3,
        "records_per_batch": stopped["records_written"] / max(1, stopped["batches"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--pairs", action="store_true", help="Reserve then Commit each time")
    args = parser.parse_args()
    print(f"{'in flight':>9} {'calls/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'rec/txn':>8}"
          f"   (median of {args.runs} runs of {args.seconds:g} s)")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        runs = [run_once(concurrency, args.seconds, args.pairs) for _ in range(args.runs)]
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"{concurrency:>9} {median['calls_per_s']:>9.0f} {median['reserve_p50_ms']:>7.2f} "
              f"{median['reserve_p99_ms']:>7.2f} {median['records_per_batch']:>8.1f}")


if __name__ == "__main__":
    main()
