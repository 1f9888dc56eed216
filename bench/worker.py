"""The client side of a bench run: worker processes, each with its own asyncio loop, its own
client (one gRPC channel, or one Redis connection pool) and `concurrency` slots in flight.

The parent (WorkerPool) spawns the processes once and hands them one job per (target, run,
workload). A job goes: connect, warm up (every slot does one unit, not measured), say ready,
wait for the common start time, run until the deadline (--seconds) or until the process's
share of --ops is claimed, send the raw results back. Progress (operations done, errors) is
published every 0.1 s in shared arrays for the parent's progress bar.

Every loop is bounded: by the deadline, or by the op budget plus a hard time cap, and a
process stops early after MAX_ERRORS failed units.

Closed loop (the default): each of the `concurrency` slots starts its next unit as soon as its
last one ends. Paced (open loop, job["ops_per_s"] set): the process starts units on a fixed
schedule of that many operations per second (a unit of n operations takes n / rate of it),
whatever the answers, with at most `concurrency` units in flight. A unit whose time comes
while `concurrency` are in flight is not sent, and when the process finds itself more than
PACE_LATE_S behind its schedule, the operations of the time it missed are not sent either
(both counted: "not_sent_busy_ops", "not_sent_late_ops"): nothing queues behind a client
that fell behind, and the achieved rate says what was done.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
import traceback
from array import array
from collections import Counter
from typing import Any

from .targets import make_driver
from .workloads import GROUPS, UnitMaker, ZipfUsers

MAX_ERRORS = 1000
PACE_LATE_S = 0.05
"""Paced runs: a process this far behind its schedule does not send the operations of the
time it missed (it counts them) and goes on from where it is."""
READY_TIMEOUT_S = 120.0
OPS = ("reserve", "commit", "release", "track")


def error_name(error: BaseException) -> str:
    code = getattr(error, "code", None)
    if code is not None and hasattr(code, "name"):
        return f"{type(error).__name__}:{code.name}"
    text = str(error).split()
    if type(error).__name__ == "ResponseError" and text:
        return f"ResponseError:{text[0]}"
    return type(error).__name__


async def run_job(job: dict[str, Any], index: int, conn: Any, progress_ops: Any,
                  progress_errors: Any) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    rng = random.Random(f"{job['seed']}:{job['workload']}:{index}")
    maker = UnitMaker(job["workload"], ZipfUsers(job["users"], job["zipf_s"], rng), rng)
    concurrency = job["concurrency"]
    enforce = job["track_enforce"]
    driver = make_driver(job["driver"], concurrency=concurrency,
                         call_timeout_s=job["call_timeout_s"],
                         idempotency_keys=job["idempotency_keys"],
                         coalesce=job["coalesce"])
    mono = time.monotonic
    latencies: dict[str, list[float]] = {op: [] for op in OPS}
    timeline: list[int] = []
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    inv_bucket = 1.0 / job["bucket_s"]
    # long runs (a soak) keep no per-call latencies: they would grow the client without bound
    keep_latencies = job.get("keep_latencies", True)
    measuring = False
    start = 0.0
    ops_done = pairs = claimed = error_count = 0
    last_end = 0.0
    stop = False
    paced_rate = job.get("ops_per_s")
    asked_ops = not_sent_busy = not_sent_late = 0
    shard_of = getattr(driver, "shard_of", None)
    ops_by_shard: Counter[int] = Counter()

    def done(op: str, t0: float, user: str) -> None:
        nonlocal ops_done, last_end
        if not measuring:
            return
        if shard_of is not None:
            shard = shard_of(user)
            if shard is not None:
                ops_by_shard[shard] += 1
        t1 = mono()
        if keep_latencies:
            latencies[op].append(t1 - t0)
        bucket = int((t1 - start) * inv_bucket)
        if bucket >= len(timeline):
            timeline.extend([0] * (bucket + 1 - len(timeline)))
        timeline[bucket] += 1
        ops_done += 1
        last_end = t1

    def outcome(name: str) -> None:
        if measuring:
            outcomes[name] += 1

    async def execute(unit: Any) -> None:
        nonlocal pairs
        groups = GROUPS[unit.model]
        if unit.kind == "track":
            t0 = mono()
            allowed = await driver.track(unit.user, unit.amount, unit.model, enforce, groups)
            done("track", t0, unit.user)
            outcome("tracked" if allowed else "track_denied")
            return
        t0 = mono()
        allowed, hold = await driver.reserve(unit.user, unit.amount, unit.model, unit.ttl_s,
                                             groups)
        done("reserve", t0, unit.user)
        if not allowed:
            outcome("denied")
            if unit.kind != "denied":
                outcome("unexpected_denials")
            return
        outcome("allowed")
        if unit.kind == "expire":
            outcome("left_to_expire")
            return
        if unit.kind == "commit":
            t0 = mono()
            await driver.commit(hold, unit.actual)
            done("commit", t0, unit.user)
            outcome("committed")
        else:
            if unit.kind == "denied":
                outcome("unexpected_allowed")
            t0 = mono()
            await driver.release(hold)
            done("release", t0, unit.user)
            outcome("released")
        if measuring:
            pairs += 1

    def failed(error: Exception) -> None:
        nonlocal error_count, stop
        errors[error_name(error)] += 1
        error_count += 1
        if error_count >= MAX_ERRORS:
            stop = True

    async def slot(deadline: float, budget: int | None) -> None:
        nonlocal claimed
        while not stop and mono() < deadline and (budget is None or claimed < budget):
            unit = maker.next()
            claimed += unit.ops
            try:
                await execute(unit)
            except Exception as error:  # noqa: BLE001 - counted and reported, run goes on
                failed(error)
                await asyncio.sleep(0.01)

    async def paced_unit(unit: Any) -> None:
        try:
            await execute(unit)
        except Exception as error:  # noqa: BLE001 - counted and reported, run goes on
            failed(error)

    async def paced(first_at: float, deadline: float) -> None:
        """Starts units on the schedule (paced_rate operations/s from first_at until the
        deadline), never more than `concurrency` in flight and never more than PACE_LATE_S
        late; then waits for those in flight."""
        nonlocal claimed, asked_ops, not_sent_busy, not_sent_late
        in_flight: set[asyncio.Task[None]] = set()
        due = first_at
        while not stop and due < deadline:
            now = mono()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            if now - due > PACE_LATE_S:
                # behind (the process or the machine was busy): the operations of the time
                # missed are not sent, only counted, and the schedule goes on from now
                missed = round((min(now, deadline) - due) * paced_rate)
                asked_ops += missed
                not_sent_late += missed
                due = now
                continue
            unit = maker.next()
            asked_ops += unit.ops
            if len(in_flight) >= concurrency:
                not_sent_busy += unit.ops
            else:
                claimed += unit.ops
                task = asyncio.ensure_future(paced_unit(unit))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            due += unit.ops / paced_rate
        if in_flight:
            await asyncio.gather(*in_flight)

    async def publish() -> None:
        while True:
            progress_ops[index] = ops_done
            progress_errors[index] = error_count
            await asyncio.sleep(0.1)

    await driver.open()
    try:
        warm = await asyncio.gather(*(execute(maker.next()) for _ in range(concurrency)),
                                    return_exceptions=True)
        failures = [w for w in warm if isinstance(w, BaseException)]
        if len(failures) == len(warm):
            raise RuntimeError(f"every warm-up unit failed: {failures[0]!r}") from failures[0]
        conn.send(("ready", {"warmup_errors": len(failures)}))
        if not await loop.run_in_executor(None, conn.poll, READY_TIMEOUT_S):
            return None
        message = conn.recv()
        if message[0] != "go":
            return None
        start = message[1]
        await asyncio.sleep(max(0.0, start - mono()))
        measuring = True
        last_end = start
        cpu_before = os.times()
        batches_before = driver.batches_sent()
        publisher = asyncio.create_task(publish())
        if job["seconds"] is not None:
            deadline, budget = start + job["seconds"], None
        else:
            deadline, budget = start + job["max_seconds"], job["ops"]
        try:
            if paced_rate is not None:
                # the processes' schedules interleave: each starts its own share of one gap
                await paced(start + job.get("pace_offset", 0.0) / paced_rate, deadline)
            else:
                await asyncio.gather(*(slot(deadline, budget) for _ in range(concurrency)))
        finally:
            publisher.cancel()
        cpu_after = os.times()
        batches_after = driver.batches_sent()
        progress_ops[index] = ops_done
        progress_errors[index] = error_count
    finally:
        await driver.close()
    return {
        "ops": ops_done,
        "pairs": pairs,
        "errors": dict(errors),
        "outcomes": dict(outcomes),
        "latencies": {op: array("d", values).tobytes() for op, values in latencies.items()},
        "timeline": timeline,
        "start": start,
        "end": last_end,
        "client_cpu_s": (cpu_after.user + cpu_after.system)
        - (cpu_before.user + cpu_before.system),
        "stopped_early": stop,
        "batches_sent": (batches_after - batches_before
                         if batches_before is not None and batches_after is not None else None),
        "warmup_errors": len(failures),
        "paced_ops_per_s": paced_rate,
        "asked_ops": asked_ops if paced_rate is not None else None,
        "not_sent_busy_ops": not_sent_busy,
        "not_sent_late_ops": not_sent_late,
        "ops_by_shard": {str(shard): count for shard, count in sorted(ops_by_shard.items())},
    }


async def _serve(index: int, conn: Any, progress_ops: Any, progress_errors: Any) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            message = await loop.run_in_executor(None, conn.recv)
        except (EOFError, OSError):
            return
        if message[0] != "job":
            return
        try:
            result = await run_job(message[1], index, conn, progress_ops, progress_errors)
        except Exception:  # noqa: BLE001 - the parent shows it and stops the bench
            conn.send(("error", traceback.format_exc()))
            continue
        conn.send(("done", result) if result is not None else ("aborted", None))


def worker_main(index: int, conn: Any, progress_ops: Any, progress_errors: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    asyncio.run(_serve(index, conn, progress_ops, progress_errors))


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    """`processes` spawned client processes, reused for every job of the bench."""

    def __init__(self, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.size = processes
        self.progress_ops = ctx.Array("q", processes, lock=False)
        self.progress_errors = ctx.Array("q", processes, lock=False)
        self._conns = []
        self._procs = []
        for index in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"bench-client-{index}", daemon=True,
                               args=(index, child, self.progress_ops, self.progress_errors))
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def progress(self) -> tuple[int, int]:
        return sum(self.progress_ops), sum(self.progress_errors)

    def _receive_all(self, kind: str, timeout_s: float, tick: Any = None) -> list[Any]:
        """One message of `kind` from every worker, within timeout_s (tick() between polls)."""
        results: list[Any] = [None] * self.size
        waiting = dict(enumerate(self._conns))
        deadline = time.monotonic() + timeout_s
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"client processes did not report {kind!r} within "
                                  f"{timeout_s:.0f} s")
            ready = multiprocessing.connection.wait(list(waiting.values()), min(left, 0.2))
            for conn in ready:
                index = self._conns.index(conn)  # type: ignore[arg-type]
                try:
                    message = conn.recv()  # type: ignore[union-attr]
                except EOFError:
                    raise WorkerError(f"client process {index} died") from None
                if message[0] == "error":
                    raise WorkerError(f"client process {index} failed:\n{message[1]}")
                if message[0] != kind:
                    raise WorkerError(f"client process {index} said {message[0]!r}, "
                                      f"expected {kind!r}")
                results[index] = message[1]
                del waiting[index]
            for index, proc in enumerate(self._procs):
                if index in waiting and not proc.is_alive():
                    raise WorkerError(f"client process {index} exited ({proc.exitcode})")
            if tick is not None:
                tick()
        return results

    def run(self, job: dict[str, Any], *, timeout_s: float, tick: Any = None,
            on_start: Any = None) -> list[dict]:
        """Runs one job on every process; the per-process results. A paced job's
        "ops_per_s" is the total: each process gets an even share, its schedule shifted by
        its index's share of one gap. on_start() is called once every process is warm and
        told when to start, just before the measured time."""
        for index in range(self.size):
            self.progress_ops[index] = 0
            self.progress_errors[index] = 0
        for index, conn in enumerate(self._conns):
            per_process = dict(job)
            if job["ops"] is not None:  # split the op budget
                per_process["ops"] = job["ops"] // self.size + (
                    1 if index < job["ops"] % self.size else 0)
            if job.get("ops_per_s") is not None:  # split the pace
                per_process["ops_per_s"] = job["ops_per_s"] / self.size
                per_process["pace_offset"] = index / self.size
            conn.send(("job", per_process))
        self._receive_all("ready", READY_TIMEOUT_S)
        start = time.monotonic() + 0.05
        for conn in self._conns:
            conn.send(("go", start))
        if on_start is not None:
            on_start()
        return self._receive_all("done", timeout_s, tick)

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("stop", None))
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        for conn in self._conns:
            conn.close()
