"""Unary Reserve (+ Commit) throughput and latency against a real quotad process, beside a
bare grpc.aio echo server answering the same messages (the transport's own cost).

    .venv/bin/python -m bench.unary [--seconds 5] [--runs 3] [--concurrency 1,64] [--pairs]
                                    [--quotad-arg ARG] [--echo-arg ARG]

Starts its own servers on free loopback ports (quotad on a fresh data directory each run),
drives each with one grpc.aio client process in alternation, and prints medians of the runs
and the quotad / echo ratio, and each server's CPU time per call (user + system, from
/proc) over the measured seconds, with its quotad / echo ratio. Also prints how group
commit behaved: records per LMDB transaction (from quotad's stop line). With quotad's access
log on (`--quotad-arg=--log-level=debug`), also how much of a Reserve's time is quotad's
handler (the median of its access lines' duration_ms: from the call reaching the handler to
its answer, the synced commit included), the rest being gRPC and the client's; the log lines
cost the server CPU of their own, so take the other figures from a run without it.

One asymmetry beyond the work itself: quotad registers its data path's methods with grpc
(each its own queue of received calls; the rest share one), the echo serves its own through
one generic handler, and grpc.aio's server loop waits on one pending request per registered
method each time it takes a call (asyncio.wait over 12 futures against 1: ~10 against ~6 us
of CPU, `python -m bench.server_loop`), inside this bench's run-to-run spread. And one more:
quotad runs on uvloop's event loop, the echo on asyncio's own, as a bare grpc.aio server
does, unless `--echo-arg=--uvloop`.

With `--busy-cpus`, every CPU the bench may use also runs a spinner process at the lowest
priority (nice 19, pinned to it) throughout: the servers and the client take what they need
ahead of it, and no CPU ever goes idle. On a virtual machine a CPU left idle is given back
to the host, and waking it again (a request arriving, a sync completing) costs more than the
work of a call at one in flight: the flag shows the latency without those wake-ups, which a
server busy with other calls never pays. The spinners end with the bench.

The full harness (workloads, Redis peers, client processes, JSON and plots) is
`python -m bench`; this one stays as the smallest raw-stub check of the transport.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from quotad.api.service import full_method
from quotad.testing import ServerProcess
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as stubs

from bench.targets import add_server_arguments, process_cpu_s

USERS = 1000
RESERVE_METHOD = full_method("Reserve")
"""The method an access log line names for a Reserve."""


async def _set_up(channel: grpc.aio.Channel) -> None:
    admin = stubs.AdminServiceStub(channel)
    await admin.UpsertPlan(pb.UpsertPlanRequest(plan=pb.Plan(id="bench", limit_groups=[
        pb.LimitGroup(key="tokens", quota=10**15, window=pb.MONTH,
                      match=pb.Match(event_types=["*"]))])))
    for user in range(USERS):
        await admin.UpsertSubscription(pb.UpsertSubscriptionRequest(
            user_id=f"u{user}", plan_id="bench"))


async def _drive(address: str, concurrency: int, seconds: float, pairs: bool,
                 set_up: bool, server_pid: int) -> tuple[int, list[float], float]:
    async with grpc.aio.insecure_channel(address) as channel:
        quota = stubs.QuotaServiceStub(channel)
        if set_up:
            await _set_up(channel)
        cpu_started_s = process_cpu_s(server_pid) or 0.0
        deadline = time.perf_counter() + seconds
        latencies_s: list[float] = []

        async def worker(index: int) -> int:
            done = 0
            while time.perf_counter() < deadline:
                # each call the next user: holds left live (without --pairs) spread over all
                # of them, far below the live holds a user may have
                user = f"u{(index + done * concurrency) % USERS}"
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
        server_cpu_s = (process_cpu_s(server_pid) or 0.0) - cpu_started_s
        return sum(counts), latencies_s, server_cpu_s


def _figures(calls: int, latencies_s: list[float], seconds: float,
             server_cpu_s: float) -> dict[str, float]:
    latencies_s.sort()
    return {
        "calls_per_s": calls / seconds,
        "server_cpu_us_per_call": server_cpu_s / max(1, calls) * 1e6,
        "reserve_p50_ms": latencies_s[len(latencies_s) // 2] * 1e3,
        "reserve_p99_ms": latencies_s[int(len(latencies_s) * 0.99)] * 1e3,
    }


def run_quotad(concurrency: int, seconds: float, pairs: bool,
               quotad_args: tuple[str, ...] = ()) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as data_dir:
        server = ServerProcess(Path(data_dir), extra_args=quotad_args).start()
        try:
            calls, latencies_s, server_cpu_s = asyncio.run(_drive(
                server.address, concurrency, seconds, pairs, set_up=True,
                server_pid=server.process.pid))
        finally:
            server.stop()
        stopped = server.last("stopped")
    figures = _figures(calls, latencies_s, seconds, server_cpu_s)
    figures["records_per_txn"] = stopped["records_written"] / max(1, stopped["batches"])
    handler_ms = [line["duration_ms"] for line in server.log_lines
                  if line.get("message") == "call" and line.get("method") == RESERVE_METHOD]
    if handler_ms:
        figures["handler_p50_ms"] = statistics.median(handler_ms)
    return figures


def run_echo(concurrency: int, seconds: float, pairs: bool,
             echo_args: tuple[str, ...] = ()) -> dict[str, float]:
    echo = subprocess.Popen([sys.executable, "-m", "bench.echo_server", *echo_args],
                            stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        assert echo.stdout is not None
        port = int(echo.stdout.readline())
        calls, latencies_s, server_cpu_s = asyncio.run(_drive(
            f"127.0.0.1:{port}", concurrency, seconds, pairs, set_up=False,
            server_pid=echo.pid))
    finally:
        echo.kill()
        echo.wait(timeout=30)
    return _figures(calls, latencies_s, seconds, server_cpu_s)


SPINNER_MARK = "quotad-bench-busy-cpu"
"""The last argument of each --busy-cpus spinner process, naming it in a process list."""
_SPINNER = """
import os, sys, time
os.nice(19)
parent = int(sys.argv[1])
while os.getppid() == parent:  # ends with the bench, or within 0.5 s of its end
    until = time.monotonic() + 0.5
    while time.monotonic() < until:
        pass
"""


@contextlib.contextmanager
def busy_cpus(on: bool):
    """With on, one spinner process per CPU this process may use, pinned to it at nice 19,
    for as long as the block runs (killed after it; each also ends within 0.5 s of this
    process's end)."""
    spinners: list[subprocess.Popen] = []
    try:
        for cpu in sorted(os.sched_getaffinity(0)) if on else ():
            spinner = subprocess.Popen([sys.executable, "-c", _SPINNER, str(os.getpid()),
                                        SPINNER_MARK])
            spinners.append(spinner)
            os.sched_setaffinity(spinner.pid, {cpu})
        yield len(spinners)
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--pairs", action="store_true", help="Reserve then Commit each time")
    parser.add_argument("--busy-cpus", action="store_true",
                        help="keep every CPU busy with a spinner at nice 19 while measuring, "
                             "so that none goes idle: the latency without a virtual "
                             "machine's wake-ups of idle CPUs (default: off)")
    add_server_arguments(parser, quotad_example="--commit-delay-ms=0",
                         echo_example="--uvloop, the echo on the event loop quotad runs on")
    args = parser.parse_args()
    with busy_cpus(args.busy_cpus) as spinners:
        _measure(args, spinners)


def _measure(args: argparse.Namespace, spinners: int) -> None:
    what = "Reserve+Commit" if args.pairs else "Reserve"
    busy = f"; {spinners} CPUs kept busy by spinners at nice 19" if spinners else ""
    print(f"{what}, median of {args.runs} runs of {args.seconds:g} s each, one client "
          f"process{busy}")
    print(f"{'in flight':>9} | {'quotad calls/s':>14} {'p50 ms':>7} {'p99 ms':>7} {'rec/txn':>8}"
          f" {'CPU us':>7} | {'echo calls/s':>12} {'p50 ms':>7} {'CPU us':>7} |"
          f" {'quotad/echo':>11} {'CPU ratio':>9}")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        quotad_runs, echo_runs = [], []
        for _ in range(args.runs):  # alternate, so drift on a shared machine hits both
            quotad_runs.append(run_quotad(concurrency, args.seconds, args.pairs,
                                          tuple(args.quotad_arg)))
            echo_runs.append(run_echo(concurrency, args.seconds, args.pairs,
                                      tuple(args.echo_arg)))
        q = {key: statistics.median(r[key] for r in quotad_runs) for key in quotad_runs[0]}
        e = {key: statistics.median(r[key] for r in echo_runs) for key in echo_runs[0]}
        # Each run's own ratios (quotad and the echo run right after it): their spread is
        # what the medians hide. Printed above the row, which stays the last line.
        spread = []
        for name, key in (("calls/s", "calls_per_s"), ("CPU", "server_cpu_us_per_call")):
            ratios = sorted(qr[key] / er[key] for qr, er in zip(quotad_runs, echo_runs))
            spread.append(f"{name} median {statistics.median(ratios):.2f}, range "
                          f"{ratios[0]:.2f} to {ratios[-1]:.2f}")
        print(f"{'':>9}   {concurrency} in flight, quotad / echo per run: {'; '.join(spread)}")
        if "handler_p50_ms" in q:
            print(f"{'':>9}   {concurrency} in flight, quotad's handler (access log): Reserve "
                  f"p50 {q['handler_p50_ms']:.3f} ms of the call's {q['reserve_p50_ms']:.3f} ms")
        print(f"{concurrency:>9} | {q['calls_per_s']:>14.0f} {q['reserve_p50_ms']:>7.2f} "
              f"{q['reserve_p99_ms']:>7.2f} {q['records_per_txn']:>8.1f}"
              f" {q['server_cpu_us_per_call']:>7.0f} |"
              f" {e['calls_per_s']:>12.0f} {e['reserve_p50_ms']:>7.2f}"
              f" {e['server_cpu_us_per_call']:>7.0f} |"
              f" {q['calls_per_s'] / e['calls_per_s']:>11.2f}"
              f" {q['server_cpu_us_per_call'] / e['server_cpu_us_per_call']:>9.2f}")

if __name__ == "__main__":
    main()
