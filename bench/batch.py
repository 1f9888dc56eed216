"""Durable reserve + commit pairs/s that one quotad process sustains through Batch RPCs.

    .venv/bin/python -m bench.batch [--batch 500] [--in-flight 2] [--processes 2]
                                    [--seconds 5] [--runs 3] [--idempotency-keys]

The server's own ceiling, with the client taken out of the way as far as Python allows: each
client process keeps --in-flight loops, each sending a Batch of --batch Reserves (built once,
sent as the same bytes every time: every Reserve still gets a fresh reservation id) and then a
Batch committing the holds it got. A pair counts once its Commit is answered, i.e. durable.
quotad is started on a fresh data directory per run; --target HOST:PORT measures a running one.

Prints the median of the runs: pairs/s, records per LMDB transaction, the server's CPU per
pair and its CPU use (1.0 = one core busy), and the clients' CPU use. A server at ~1.0 CPU is
the bound; anything less means the clients or the disk are.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from quotad.core import limits
from quotad.testing import ServerProcess
from quotad_client import new_idempotency_key

from .harness import doc_parser
from .targets import EchoTarget, _set_up_quotad, add_server_arguments, process_cpu_s
from .workloads import EVENT_TYPE, MODEL, user_id

USERS = 1000
BATCH_DEFAULT = 500
BATCH_MAX = limits.BATCH_OPERATIONS_MAX


def _identity(data: bytes) -> bytes:
    return data


async def _drive(address: str, index: int, batch: int, in_flight: int, start_at: float,
                 seconds: float, idempotency_keys: bool) -> dict[str, float]:
    from quotad_contract.v1 import quotad_pb2 as pb

    async with grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)]) as channel:
        send = channel.unary_unary("/quotad.v1.QuotaService/Batch",
                                   request_serializer=_identity,
                                   response_deserializer=pb.BatchResponse.FromString)
        reserves = [pb.BatchOperation(reserve=pb.ReserveRequest(
            user_id=user_id((index * 7919 + i) % USERS), event_type=EVENT_TYPE, amount=1000,
            metadata={"model": MODEL})) for i in range(batch)]
        fixed = pb.BatchRequest(operations=reserves).SerializeToString()

        def reserve_batch() -> bytes:
            if not idempotency_keys:
                return fixed
            for operation in reserves:
                operation.reserve.idempotency_key = new_idempotency_key()
            return pb.BatchRequest(operations=reserves).SerializeToString()

        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.time() + seconds
        cpu_started = time.process_time()
        pairs = errors = 0

        async def loop() -> None:
            nonlocal pairs, errors
            while time.time() < deadline:
                answer = await send(reserve_batch(), timeout=30)
                commits = pb.BatchRequest()
                for result in answer.results:
                    if result.WhichOneof("result") != "reserve" or not result.reserve.allowed:
                        errors += 1
                        continue
                    commit = commits.operations.add().commit
                    commit.reservation_id = result.reserve.reservation_id
                    commit.amount = 700
                    if idempotency_keys:
                        commit.idempotency_key = new_idempotency_key()
                if not commits.operations:
                    continue
                answer = await send(commits.SerializeToString(), timeout=30)
                for result in answer.results:
                    if result.WhichOneof("result") == "commit":
                        pairs += 1
                    else:
                        errors += 1

        await asyncio.gather(*(loop() for _ in range(in_flight)))
        elapsed_s = time.time() - deadline + seconds
        return {"pairs": pairs, "errors": errors, "seconds": elapsed_s,
                "cpu_s": time.process_time() - cpu_started}


def _client(args: tuple[Any, ...]) -> dict[str, float]:
    return asyncio.run(_drive(*args))


def _warm(_: int) -> None:
    """Imports what a client needs, so every client process is ready before the clock starts."""
    import grpc  # noqa: F401
    from quotad_contract.v1 import quotad_pb2  # noqa: F401
    time.sleep(0.2)  # so that each process takes one of these


def run_once(options: argparse.Namespace) -> dict[str, float]:
    server = None
    data_dir = None
    address = options.target
    if options.echo:
        echo = EchoTarget(tuple(options.echo_arg))
        echo.start()
        try:
            return _measure(options, echo.address, echo.pid)
        finally:
            echo.stop()
    if address is None:
        data_dir = tempfile.TemporaryDirectory(prefix="bench-batch-")
        server = ServerProcess(Path(data_dir.name) / "data", extra_args=tuple(options.quotad_arg))
        server.start()
        address = server.address
    try:
        asyncio.run(_set_up_quotad(address, USERS))
        figures = _measure(options, address, server.process.pid if server is not None else None)
    finally:
        if server is not None:
            server.stop()
            stopped = server.last("stopped")
            server.close()
        if data_dir is not None:
            data_dir.cleanup()
    if server is not None:
        figures["records_per_txn"] = stopped["records_written"] / max(1, stopped["batches"])
    return figures


def _measure(options: argparse.Namespace, address: str, pid: int | None) -> dict[str, float]:
    with multiprocessing.get_context("spawn").Pool(options.processes) as pool:
        # spawned and imported first: on a busy machine that takes longer than the lead time,
        # and the server's CPU would be sampled before the clients ran
        pool.map(_warm, range(options.processes), chunksize=1)
        start_at = time.time() + 0.5
        jobs = [(address, index, options.batch, options.in_flight, start_at, options.seconds,
                 options.idempotency_keys) for index in range(options.processes)]
        pending = pool.map_async(_client, jobs)
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before = process_cpu_s(pid)
        wall_before = time.time()
        while not pending.ready() and time.time() < wall_before + options.seconds:
            time.sleep(0.05)
        cpu_after = process_cpu_s(pid)
        wall_s = time.time() - wall_before
        clients = pending.get(timeout=options.seconds + 120)
    pairs = sum(c["pairs"] for c in clients)
    seconds = max(c["seconds"] for c in clients)
    figures = {"pairs_per_s": pairs / seconds, "errors": sum(c["errors"] for c in clients),
               "client_cpu": sum(c["cpu_s"] for c in clients) / seconds}
    if cpu_before is not None and cpu_after is not None:
        server_cpu_s = cpu_after - cpu_before
        figures["server_cpu"] = server_cpu_s / wall_s
        figures["server_us_per_pair"] = server_cpu_s / max(1, pairs * wall_s / seconds) * 1e6
    return figures


def main() -> None:
    parser = doc_parser("bench.batch", __doc__)
    parser.add_argument("--batch", type=int, default=BATCH_DEFAULT, metavar="N",
                        help=f"operations per Batch RPC, 1 to {BATCH_MAX} (default: "
                             f"{BATCH_DEFAULT})")
    parser.add_argument("--in-flight", type=int, default=2, metavar="N",
                        help="Batch loops per client process (default: 2)")
    parser.add_argument("--processes", type=int, default=2, metavar="N",
                        help="client processes (default: 2)")
    parser.add_argument("--seconds", type=float, default=5.0, metavar="S",
                        help="measured length of each run (default: 5)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="runs; figures are medians (default: 3)")
    parser.add_argument("--idempotency-keys", action="store_true",
                        help="give every operation its own idempotency key, made as "
                             "AsyncQuotaClient makes them by default (quotad stores each "
                             "durably)")
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="a running quotad (loopback, no API keys) instead of a fresh one")
    parser.add_argument("--echo", action="store_true",
                        help="measure bench/echo_server.py instead (fixed answers, no state, "
                             "no I/O): the transport's own ceiling for the same messages")
    add_server_arguments(parser, quotad_example="--snapshot-every-records=1000000",
                         echo_example="--uvloop")
    options = parser.parse_args()
    if options.quotad_arg and (options.target or options.echo):
        parser.error("--quotad-arg is for the server the bench starts: not with --target or "
                     "--echo")
    if options.echo_arg and not options.echo:
        parser.error("--echo-arg is for the server the bench starts: only with --echo")
    if not 1 <= options.batch <= BATCH_MAX:
        parser.error(f"--batch must be 1 to {BATCH_MAX}")
    if options.in_flight < 1 or options.processes < 1 or options.runs < 1:
        parser.error("--in-flight, --processes and --runs must be >= 1")
    try:
        runs = [run_once(options) for _ in range(options.runs)]
    except RuntimeError as error:  # the server did not start: its own words say why
        sys.exit(f"bench.batch: {error}")
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    print(f"{'echo' if options.echo else 'quotad'}: Batch of {options.batch}, "
          f"{options.in_flight} in flight x {options.processes} "
          f"processes, keys {'on' if options.idempotency_keys else 'off'}, median of "
          f"{options.runs} runs of {options.seconds:g} s")
    for key, value in median.items():
        print(f"  {key:20} {value:>12,.2f}   runs: "
              + ", ".join(f"{run[key]:,.1f}" for run in runs))


if __name__ == "__main__":
    main()
