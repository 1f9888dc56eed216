"""Overload: what share of its capacity quotad still serves when offered far more calls than
it can answer in time, beside a bare grpc.aio echo server offered the same.

    python -m bench.overload [--processes 4] [--concurrency 2000] [--deadline-s 1]
                             [--seconds 10] [--runs 3]

Each client process keeps --concurrency loops, each sending a unary Reserve and, once it is
answered, a unary Commit of its hold (raw stubs: no coalescing, no idempotency keys), every
call with a deadline of --deadline-s; a loop starts its next pair as soon as the last one
ends. After a failed call a loop waits as a polite client such as quotad_client does: after a
refusal that carries a google.rpc.RetryInfo (quotad's RESOURCE_EXHAUSTED OVERLOADED), that
delay plus up to as much again of jitter; after any other failure (CANCELLED from grpc's full
queue, DEADLINE_EXCEEDED), exponential backoff from 50 ms, doubling with each failure in a
row up to 1 s, the upper half random. A refused or failed Commit is sent again after the
wait (up to 10 attempts: its hold is live, and a Commit without an idempotency key never
counts twice); a pair is *good* when its Reserve and its Commit succeeded, each attempt
within its deadline; goodput is good pairs per second. Every failed attempt is counted by
its status code. As quotad_client does by default, each client process also throttles itself
(quotad_client._throttle, one throttle per process): while the server takes less than half
of what the process sends, it refuses some attempts before sending them, counted as
THROTTLED and waited out as a failure (--no-client-throttle: every attempt is sent).

Both servers get the same grpc treatment: their methods registered with grpc (each has its
own queue of received calls) and the same bound on that queue (--pending-calls-per-method,
quotad's default unless given). What stays different: quotad also refuses past its admission
limit, with RESOURCE_EXHAUSTED OVERLOADED and a RetryInfo; the echo peer has no such limit.

Each run, for each server (quotad on a fresh data directory, then the echo peer): a
calibration phase at --calibration-concurrency per process measures its capacity (goodput
with few calls in flight), then the overload phase at --concurrency; the overload goodput is
printed as a % of that capacity. After the overload phase the server must still answer
(quotad: a health check saying SERVING; the echo peer, which has no health service: a
Reserve) within --recovery-timeout-s. Figures are medians of the runs; status codes of the
overload phase's calls are summed over the runs.

The clients and the server share the machine's cores, so each phase also says where the CPU
went: attempts per second (every call sent, answered or refused), the clients' CPU per
attempt, the server's CPU per good pair, and the shares of the phase the server's event loop
thread was on a CPU and was ready to run but waiting for one (/proc's schedstat: every core
was taken); each run notes the load average before it.
Sharing is what collapses goodput on a small machine: every refused attempt costs its client
CPU, the busy clients take the server's share of the cores, and the server then answers
fewer calls. --separate-cpus runs the server on a CPU of its own and the clients on the
others (both servers alike), as a server is deployed; other work on the machine is not
kept off either.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from quotad.core import limits

from . import procfs, report, stats
from .harness import doc_parser, _positive_float, _positive_int, _write_json
from .targets import (ROOT, EchoTarget, QuotadTarget, Target, add_server_arguments,
                      process_cpu_s)
from .workloads import EVENT_TYPE, MODEL, user_id

THROTTLED = "THROTTLED"
"""An attempt the client's adaptive throttle refused: never sent."""
CODES = ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
         THROTTLED)
FAILED_CALL_PAUSE_S = 0.05  # and BACKOFF_MAX_S: quotad_client's RetryPolicy defaults
BACKOFF_MAX_S = 1.0
COMMIT_ATTEMPTS_MAX = 10
RETRIED_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE})
NOT_ACCEPTED_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                                grpc.StatusCode.DEADLINE_EXCEEDED})
"""What the client's throttle counts as not taken by the server, as quotad_client's does (this
bench's RESOURCE_EXHAUSTED is always OVERLOADED); UNAVAILABLE, no server, it leaves out."""
START_DELAY_S = 2.0  # for the client processes to connect and warm up before the start
PHASE_GRACE_S = 60.0
PROBE_EVERY_S = 0.5
MB = 1e6

EPILOG = """\
outputs (in --results DIR, default bench/results/overload-<timestamp>/, git-ignored):
  results.json  the config, the machine, every phase of every run, the medians

examples:
  python -m bench.overload
  python -m bench.overload --processes 2 --concurrency 500 --seconds 5 --runs 1
  python -m bench.overload --separate-cpus
"""


TARGET_NAMES = ("quotad", "echo")


def _target_names(text: str) -> str:
    names = text.split(",")
    if any(name not in TARGET_NAMES for name in names) or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected some of {', '.join(TARGET_NAMES)}, comma-separated, each once")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = doc_parser("bench.overload", __doc__, EPILOG)
    parser.add_argument("--processes", type=_positive_int, default=4, metavar="N",
                        help="client processes, each with its own channel (default: 4)")
    parser.add_argument("--concurrency", type=_positive_int, default=2000, metavar="N",
                        help="pairs in flight per client process in the overload phase "
                             "(default: 2000)")
    parser.add_argument("--calibration-concurrency", type=_positive_int, default=64,
                        metavar="N",
                        help="pairs in flight per client process in the calibration phase, "
                             "which measures the capacity (default: 64)")
    parser.add_argument("--deadline-s", type=_positive_float, default=1.0, metavar="S",
                        help="deadline of each call (default: 1)")
    parser.add_argument("--seconds", type=_positive_float, default=10.0, metavar="S",
                        help="measured length of each phase (default: 10)")
    parser.add_argument("--runs", type=_positive_int, default=3, metavar="N",
                        help="runs, each measuring quotad then the echo peer; figures are "
                             "medians (default: 3)")
    parser.add_argument("--users", type=_positive_int, default=1000, metavar="N",
                        help="users, subscribed to the bench plan before each run; each loop "
                             "sticks to one (default: 1000)")
    parser.add_argument("--recovery-timeout-s", type=_positive_float, default=30.0, metavar="S",
                        help="how long the server has, after the overload phase, to answer "
                             "again (default: 30)")
    parser.add_argument("--pending-calls-per-method", type=_positive_int, metavar="N",
                        help="both servers: at most N calls of one method waiting in grpc's "
                             "queue for a handler (quotad's flag of that name; default: "
                             "quotad's default, and the echo peer the same)")
    parser.add_argument("--targets", type=_target_names, default="quotad,echo", metavar="NAMES",
                        help="servers to measure, comma-separated: quotad, echo "
                             "(default: quotad,echo)")
    add_server_arguments(parser, quotad_example="--admission-operations=256",
                         echo_example="--maximum-concurrent-rpcs=64")
    parser.add_argument("--no-client-throttle", action="store_true",
                        help="the client processes send every attempt, as quotad_client with "
                             "adaptive_throttle=False (default: each process refuses some "
                             "attempts itself while the server refuses most, as quotad_client "
                             "does by default; see quotad_client._throttle)")
    parser.add_argument("--separate-cpus", action="store_true",
                        help="run each server (every thread) on this machine's last CPU and "
                             "the client processes on the others, as a server deployed on "
                             "cores of its own; the same for quotad and the echo peer "
                             "(default: all share every CPU)")
    parser.add_argument("--results", type=Path, metavar="DIR",
                        help="where results.json goes (default: "
                             "bench/results/overload-<timestamp>/, git-ignored)")
    return parser


# --- the client processes ----------------------------------------------------------------------

async def _drive(address: str, index: int, concurrency: int, deadline_s: float, users: int,
                 start_at: float, seconds: float, client_throttle: bool) -> dict[str, Any]:
    from quotad_client._throttle import AdaptiveThrottle
    from quotad_contract.v1 import quotad_pb2 as pb
    from quotad_contract.v1 import quotad_pb2_grpc as stubs

    throttle = AdaptiveThrottle() if client_throttle else None
    """One per client process, as one quotad_client per process has (its default)."""

    codes: Counter[str] = Counter()
    details: dict[str, str] = {}  # the first error message of each status code
    good_pair_latencies_s: list[float] = []
    denied = 0
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), START_DELAY_S + PHASE_GRACE_S)
        quota = stubs.QuotaServiceStub(channel)

        async def pairs(slot: int) -> None:
            nonlocal denied
            request = pb.ReserveRequest(user_id=user_id((index * concurrency + slot) % users),
                                        event_type=EVENT_TYPE, amount=1000,
                                        metadata={"model": MODEL})
            failures = 0  # in a row: the backoff grows with them

            async def back_off(error: grpc.aio.AioRpcError) -> None:
                nonlocal failures
                codes[error.code().name] += 1
                details.setdefault(error.code().name, error.details() or "")
                if throttle is not None and error.code() is not grpc.StatusCode.UNAVAILABLE:
                    throttle.ended(accepted=error.code() not in NOT_ACCEPTED_CODES)
                failures += 1
                await asyncio.sleep(_wait_s(error, failures))

            async def throttled() -> bool:
                """The client's throttle refused the attempt: waited out as a failure."""
                nonlocal failures
                if throttle is None or not throttle.refuse():
                    return False
                codes[THROTTLED] += 1
                failures += 1
                await asyncio.sleep(_backoff_s(failures))
                return True

            def answered() -> None:
                nonlocal failures
                codes["OK"] += 1
                failures = 0
                if throttle is not None:
                    throttle.accepted()

            while True:
                started = time.monotonic()
                if await throttled():
                    continue
                try:
                    hold = await quota.Reserve(request, timeout=deadline_s)
                except grpc.aio.AioRpcError as error:
                    await back_off(error)
                    continue
                answered()
                if not hold.allowed:
                    denied += 1
                    continue
                commit = pb.CommitRequest(reservation_id=hold.reservation_id, amount=700)
                for _ in range(COMMIT_ATTEMPTS_MAX):  # the hold is live: commit it, not another
                    if await throttled():
                        continue
                    try:
                        await quota.Commit(commit, timeout=deadline_s)
                    except grpc.aio.AioRpcError as error:
                        await back_off(error)
                        if error.code() in RETRIED_CODES:
                            continue
                        break  # e.g. a commit that landed, its answer lost: not good
                    answered()
                    good_pair_latencies_s.append(time.monotonic() - started)
                    break

        warm = await quota.Reserve(pb.ReserveRequest(user_id=user_id(index % users),
                                                     event_type=EVENT_TYPE, amount=1),
                                   timeout=PHASE_GRACE_S)
        if warm.allowed:
            await quota.Commit(pb.CommitRequest(reservation_id=warm.reservation_id, amount=1),
                               timeout=PHASE_GRACE_S)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        # a process that got here late (a loaded machine) measures a shorter window
        started = time.time()
        cpu_started = time.process_time()
        loops = [asyncio.create_task(pairs(slot)) for slot in range(concurrency)]
        await asyncio.sleep(max(0.0, start_at + seconds - time.time()))
        for loop in loops:  # calls still in flight at the end are neither good nor failed
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        return {"good_pairs": len(good_pair_latencies_s), "codes": dict(codes), "details": details,
                "denied": denied, "latencies_s": good_pair_latencies_s,
                "seconds": max(1e-3, start_at + seconds - started),
                "late_s": max(0.0, started - start_at),
                "client_cpu_s": time.process_time() - cpu_started}


def _wait_s(error: grpc.aio.AioRpcError, failures: int) -> float:
    """How long a loop waits after its `failures`-th failed call in a row: a RetryInfo's
    delay plus up to as much again of jitter; otherwise exponential backoff from
    FAILED_CALL_PAUSE_S, doubling with each failure in a row up to BACKOFF_MAX_S, the
    upper half of it random."""
    delay_s = _retry_delay_s(error)
    if delay_s is not None:
        return delay_s * (1.0 + random.random())
    return _backoff_s(failures)


def _backoff_s(failures: int) -> float:
    base_s = min(BACKOFF_MAX_S, FAILED_CALL_PAUSE_S * 2 ** (failures - 1))
    return base_s * (0.5 + 0.5 * random.random())


def _retry_delay_s(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a RESOURCE_EXHAUSTED refusal, None when there is none."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            return retry.retry_delay.ToNanoseconds() / 1e9
    return None


def _client(args: tuple[Any, ...]) -> dict[str, Any]:
    return asyncio.run(_drive(*args))


def _start_client_process(cpus: frozenset[int] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def separate_cpus() -> tuple[frozenset[int], frozenset[int]]:
    """--separate-cpus: (the server's CPU, the clients' CPUs): the last CPU this process may
    run on for the server, the others for the clients. ValueError with fewer than two."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise ValueError(f"--separate-cpus needs at least 2 CPUs; this process may use {cpus}")
    return frozenset(cpus[-1:]), frozenset(cpus[:-1])


def pin_process(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of process `pid` onto `cpus` (threads it starts later inherit it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


# --- one phase, one server ---------------------------------------------------------------------

def run_phase(pool: Any, target: Target, concurrency: int,
              options: argparse.Namespace) -> dict[str, Any]:
    """Every client process runs `concurrency` pair loops for options.seconds."""
    pid = target.pid
    start_at = time.time() + START_DELAY_S
    jobs = [(target.driver()["address"], index, concurrency, options.deadline_s, options.users,
             start_at, options.seconds, not options.no_client_throttle)
            for index in range(options.processes)]
    pending = pool.map_async(_client, jobs)
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = process_cpu_s(pid)
    sched_before = procfs.threads_schedstat_ns(pid) if pid is not None else None
    sched_started = time.monotonic()
    rss_peak = 0
    end = start_at + options.seconds
    while time.time() < end and not pending.ready():  # bounded by the phase's length
        memory = procfs.memory_bytes(pid) if pid is not None else None
        rss_peak = max(rss_peak, (memory or {}).get("VmRSS", 0))
        time.sleep(min(0.2, max(0.0, end - time.time())))
    cpu_after = process_cpu_s(pid)
    sched_after = procfs.threads_schedstat_ns(pid) if pid is not None else None
    sched_s = time.monotonic() - sched_started
    clients = pending.get(timeout=options.seconds + options.deadline_s * 2 + PHASE_GRACE_S)
    codes: Counter[str] = Counter()
    for client in clients:
        codes.update(client["codes"])
    good = sum(client["good_pairs"] for client in clients)
    latencies = sorted(value for client in clients for value in client["latencies_s"])
    attempts = sum(codes.values())
    client_cpu_s = sum(client["client_cpu_s"] for client in clients)
    server_cpu_s = (cpu_after - cpu_before
                    if cpu_before is not None and cpu_after is not None else None)
    return {
        "concurrency": concurrency,
        "in_flight": concurrency * options.processes,
        "good_pairs": good,
        "goodput_pairs_per_s": sum(client["good_pairs"] / client["seconds"]
                                   for client in clients),
        "latest_client_start_s": max(client["late_s"] for client in clients),
        "good_pair_p50_ms": stats.percentile(latencies, 0.5) * 1e3,
        "good_pair_p99_ms": stats.percentile(latencies, 0.99) * 1e3,
        "codes": {code: codes.get(code, 0) for code in CODES}
        | {code: count for code, count in codes.items() if code not in CODES},
        "details": {code: text for client in clients for code, text in client["details"].items()},
        "denied": sum(client["denied"] for client in clients),
        "rss_peak_sampled_bytes": rss_peak or None,
        "server_cpu_util": (server_cpu_s / options.seconds
                            if server_cpu_s is not None else None),
        "client_cpu_util": client_cpu_s / options.seconds,
        # where the machine's CPU goes: every attempt (answered or refused) costs its client,
        # and the server's CPU is spread over the pairs it got done in time
        "attempts_per_s": sum(sum(client["codes"].values()) / client["seconds"]
                              for client in clients),
        "client_cpu_per_attempt_us": client_cpu_s / attempts * 1e6 if attempts else None,
        "server_cpu_per_good_pair_us": (server_cpu_s / good * 1e6
                                        if server_cpu_s is not None and good else None),
        **_waits(pid, sched_before, sched_after, sched_s),
    }


def _waits(pid: int | None, before: dict[int, tuple[int, int]] | None,
           after: dict[int, tuple[int, int]] | None, seconds: float) -> dict[str, float | None]:
    """Shares of the phase the server's event loop thread (its main thread) was on a CPU and
    was ready to run but waiting for one (every core taken), and the CPUs' worth all its
    threads waited for: on shared cores, what the clients took from it. None where the
    kernel keeps no such figures."""
    shares: dict[str, float | None] = dict.fromkeys(
        ("loop_on_cpu_share", "loop_waiting_share", "server_waiting_cpus"))
    if pid is None or before is None or after is None or pid not in before or pid not in after:
        return shares
    phase_ns = seconds * 1e9
    shares["loop_on_cpu_share"] = (after[pid][0] - before[pid][0]) / phase_ns
    shares["loop_waiting_share"] = (after[pid][1] - before[pid][1]) / phase_ns
    shares["server_waiting_cpus"] = sum(
        after[tid][1] - before[tid][1] for tid in after if tid in before) / phase_ns
    return shares


async def _answers(target: Target, timeout_s: float) -> bool:
    """quotad: its health service says SERVING; the echo peer: it answers a Reserve."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from quotad_contract.v1 import quotad_pb2 as pb
    from quotad_contract.v1 import quotad_pb2_grpc as stubs

    async with grpc.aio.insecure_channel(target.driver()["address"]) as channel:
        try:
            if target.name == "quotad":
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout_s)
                return answer.status == health_pb2.HealthCheckResponse.SERVING
            await stubs.QuotaServiceStub(channel).Reserve(pb.ReserveRequest(
                user_id=user_id(0), event_type=EVENT_TYPE, amount=1), timeout=timeout_s)
            return True
        except grpc.aio.AioRpcError:
            return False


def recovery_s(target: Target, timeout_s: float) -> float | None:
    """Seconds until the server answers again after the overload, None if it did not within
    timeout_s (or its process is gone)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:  # bounded in time
        if target.pid is None or procfs.memory_bytes(target.pid) is None:
            return None
        left = timeout_s - (time.monotonic() - started)
        if asyncio.run(_answers(target, min(5.0, max(0.1, left)))):
            return time.monotonic() - started
        time.sleep(PROBE_EVERY_S)
    return None


def run_target(pool: Any, target: Target, options: argparse.Namespace) -> dict[str, Any]:
    loadavg = report.loadavg()  # the machine is shared: what else ran, next to the figures
    target.start()
    try:
        if options.separate_cpus and target.pid is not None:
            pin_process(target.pid, separate_cpus()[0])
        target.set_up(options.users)
        calibration = run_phase(pool, target, options.calibration_concurrency, options)
        overload = run_phase(pool, target, options.concurrency, options)
        recovered_s = recovery_s(target, options.recovery_timeout_s)
        memory = procfs.memory_bytes(target.pid) if target.pid is not None else None
    finally:
        server = target.stop()
    capacity = calibration["goodput_pairs_per_s"]
    return {
        "capacity_pairs_per_s": capacity,
        "goodput_pairs_per_s": overload["goodput_pairs_per_s"],
        "goodput_share": overload["goodput_pairs_per_s"] / capacity if capacity else None,
        "peak_rss_bytes": (memory or {}).get("VmHWM"),
        "survived": recovered_s is not None,
        "recovery_s": recovered_s,
        "loadavg_at_start": loadavg,
        "calibration": calibration,
        "overload": overload,
        "server": server,
    }


# --- output ------------------------------------------------------------------------------------

def _run_line(name: str, run_index: int, runs: int, run: dict[str, Any]) -> str:
    share = run["goodput_share"]
    codes = run["overload"]["codes"]
    rss = run["peak_rss_bytes"]
    load = run.get("loadavg_at_start")
    return (f"{name:<7} run {run_index + 1}/{runs}: capacity {run['capacity_pairs_per_s']:,.0f} "
            f"pairs/s, overload goodput {run['goodput_pairs_per_s']:,.0f} pairs/s "
            f"({'—' if share is None else f'{share:.0%}'}); "
            + " ".join(f"{code} {count:,}" for code, count in codes.items() if count)
            + f"; {_cpu_text(run['calibration'])} calibrating, "
            + f"{_cpu_text(run['overload'])} overloaded"
            + f"; peak RSS {'—' if rss is None else f'{rss / MB:,.0f} MB'}; "
            + ("answered again" + (f" after {run['recovery_s']:.1f} s" if run["recovery_s"]
                                   else "") if run["survived"] else "DID NOT ANSWER AGAIN")
            + ("" if load is None else f"; load average {load[0]:.1f} before the run"))


def _us(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} µs"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _cpu_text(phase: dict[str, Any]) -> str:
    """Attempts per second, the clients' CPU per attempt, the server's per good pair, and its
    event loop's shares of the phase on a CPU and waiting for one."""
    return (f"{phase['attempts_per_s']:,.0f} attempts/s, client CPU "
            f"{_us(phase['client_cpu_per_attempt_us'])}/attempt, server CPU "
            f"{_us(phase['server_cpu_per_good_pair_us'])}/good pair, its loop on a CPU "
            f"{_share(phase['loop_on_cpu_share'])} and waiting for one "
            f"{_share(phase['loop_waiting_share'])}")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str) -> float | None:
        return stats.median_of(runs, key)

    codes: Counter[str] = Counter()
    for run in runs:
        codes.update(run["overload"]["codes"])
    return {
        "capacity_pairs_per_s": median("capacity_pairs_per_s"),
        "goodput_pairs_per_s": median("goodput_pairs_per_s"),
        "goodput_share": median("goodput_share"),
        "peak_rss_bytes": max((run["peak_rss_bytes"] or 0 for run in runs), default=0) or None,
        "survived_runs": sum(1 for run in runs if run["survived"]),
        "runs": len(runs),
        "overload_codes": dict(codes),
        "overload_details": {code: text for run in runs
                             for code, text in run["overload"]["details"].items()},
        "overload_server_cpu_util": statistics.median(
            run["overload"]["server_cpu_util"] or 0.0 for run in runs),
        "overload_client_cpu_util": statistics.median(
            run["overload"]["client_cpu_util"] for run in runs),
        **{f"{phase}_{key}": _median_present(run[phase].get(key) for run in runs)
           for phase in ("calibration", "overload")
           for key in ("attempts_per_s", "client_cpu_per_attempt_us",
                       "server_cpu_per_good_pair_us", "loop_on_cpu_share",
                       "loop_waiting_share", "server_waiting_cpus")},
        "loadavg_at_start": [run["loadavg_at_start"][0] for run in runs
                             if run.get("loadavg_at_start")],
    }


def _median_present(values: Any) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def print_summary(medians: dict[str, dict[str, Any]], options: argparse.Namespace) -> None:
    print()
    print(f"medians of {options.runs} run(s); overload: {options.processes} x "
          f"{options.concurrency:,} pairs in flight, calibration: {options.processes} x "
          f"{options.calibration_concurrency:,}; deadline {options.deadline_s:g} s per call")
    print(f"{'server':<7} {'capacity pairs/s':>16} {'overload goodput':>16} {'% of capacity':>13} "
          f"{'peak RSS MB':>11} {'survived':>9} {'server CPU':>10} {'client CPU':>10}")
    for name, m in medians.items():
        share = "—" if m["goodput_share"] is None else f"{m['goodput_share']:.0%}"
        rss = "—" if not m["peak_rss_bytes"] else f"{m['peak_rss_bytes'] / MB:,.0f}"
        survived = f"{m['survived_runs']}/{m['runs']}"
        print(f"{name:<7} {m['capacity_pairs_per_s']:>16,.0f} {m['goodput_pairs_per_s']:>16,.0f} "
              f"{share:>13} {rss:>11} {survived:>9} {m['overload_server_cpu_util']:>10.0%} "
              f"{m['overload_client_cpu_util']:>10.0%}")
    print("(CPU: in the overload phase, share of one core: the server; all client processes)")
    print()
    print(f"{'server':<7} {'phase':<12} {'attempts/s':>10} {'client CPU/attempt':>18} "
          f"{'server CPU/good pair':>20} {'loop on a CPU':>13} {'loop waiting':>12}")
    for name, m in medians.items():
        for phase in ("calibration", "overload"):
            attempts = m[f"{phase}_attempts_per_s"]
            print(f"{name:<7} {phase:<12} "
                  f"{'—' if attempts is None else f'{attempts:,.0f}':>10} "
                  f"{_us(m[f'{phase}_client_cpu_per_attempt_us']):>18} "
                  f"{_us(m[f'{phase}_server_cpu_per_good_pair_us']):>20} "
                  f"{_share(m[f'{phase}_loop_on_cpu_share']):>13} "
                  f"{_share(m[f'{phase}_loop_waiting_share']):>12}")
    print("(the server's event loop thread, as a share of the phase: on a CPU, and ready to run "
          "but waiting for one)")
    loads = [load for m in medians.values() for load in m["loadavg_at_start"]]
    if loads:
        print(f"load average (1 min) before the runs: {min(loads):.1f} to {max(loads):.1f}")
    names = list(medians)
    print()
    print(f"overload status codes (calls, all runs): {'':<14}" + "".join(
        f"{name:>12}" for name in names))
    shown = list(CODES) + sorted({code for m in medians.values() for code in m["overload_codes"]}
                                 - set(CODES))
    for code in shown:
        print(f"  {code:<52}" + "".join(
            f"{medians[name]['overload_codes'].get(code, 0):>12,}" for name in names))
    for name, m in medians.items():
        for code, text in sorted(m["overload_details"].items()):
            print(f"  {name} {code}: e.g. {text!r}")
    quotad, echo = medians.get("quotad"), medians.get("echo")
    if quotad and echo:
        ratio = stats.ratio(quotad["goodput_share"], echo["goodput_share"])
        print()
        print("quotad / echo, goodput as a share of capacity: "
              + ("—" if ratio is None else f"{ratio:.2f}"))


def _targets(options: argparse.Namespace) -> list[Target]:
    pending = options.pending_calls_per_method or limits.PENDING_CALLS_PER_METHOD
    both = ("--pending-calls-per-method", str(pending))
    made = {"quotad": lambda: QuotadTarget(extra_args=(*both, *options.quotad_arg)),
            "echo": lambda: EchoTarget(extra_args=(*both, "--registered-methods",
                                                   *options.echo_arg))}
    return [made[name]() for name in options.targets.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    placement = ""
    client_cpus: frozenset[int] | None = None  # None: every CPU, shared with the server
    if options.separate_cpus:
        try:
            server_cpus, client_cpus = separate_cpus()
        except ValueError as error:
            parser.error(str(error))
        placement = (f"; servers on CPU {','.join(map(str, sorted(server_cpus)))}, clients on "
                     f"{','.join(map(str, sorted(client_cpus)))}")
    results_dir = options.results or ROOT / "bench" / "results" / time.strftime(
        "overload-%Y%m%d-%H%M%S")
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / "results.json"
    config = {key: (str(value) if isinstance(value, Path) else value)
              for key, value in vars(options).items()}
    document: dict[str, Any] = {"version": 1, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "finished": False, "config": config,
                                "machine": report.machine(None),
                                "targets": {name: {"runs": []}
                                            for name in options.targets.split(",")}}
    print(f"overload: unary Reserve + Commit pairs, {options.processes} x "
          f"{options.calibration_concurrency:,} in flight to calibrate, then {options.processes} x "
          f"{options.concurrency:,}; {options.deadline_s:g} s deadline per call, "
          f"{options.seconds:g} s per phase, {options.runs} run(s); quotad, then the echo peer"
          f"{placement}; results in {results_dir}", flush=True)
    pool = multiprocessing.get_context("spawn").Pool(options.processes,
                                                    initializer=_start_client_process,
                                                    initargs=(client_cpus,))
    try:
        for run_index in range(options.runs):
            for target in _targets(options):  # alternate: drift hits both
                print(f"{target.name} run {run_index + 1}/{options.runs}: calibration, then "
                      "overload ...", file=sys.stderr, flush=True)
                run = run_target(pool, target, options)
                document["targets"][target.name]["runs"].append(run)
                _write_json(json_path, document)
                print(_run_line(target.name, run_index, options.runs, run), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped; partial results in " + str(json_path),
              file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError, multiprocessing.TimeoutError) as error:
        print(f"overload failed: {error!r}", file=sys.stderr)
        return 1
    finally:
        pool.terminate()
        pool.join()
        _write_json(json_path, document)
    medians = {name: summarise(entry["runs"]) for name, entry in document["targets"].items()}
    for name, summary in medians.items():
        document["targets"][name]["median"] = summary
    print_summary(medians, options)
    document["machine"]["loadavg_at_end"] = report.loadavg()
    document["finished"] = True
    document["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(json_path, document)
    print(f"\nresults: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
