"""Which transport carries hot-path operations more cheaply: unary Batch RPCs, or a
bidirectional stream (of single operations, or of small batches)?

    .venv/bin/python -m bench.stream_vs_batch [--seconds 4] [--runs 3] [--window 1000]

Transport only: a server process of its own (`--serve`) answers every operation with the
echo server's fixed response, so what differs between the modes is gRPC and protobuf, not
quotad's work. The same operations (Reserve requests of the bench's size) are carried as:

    batch       unary Batch RPCs of --batch operations, --window / --batch of them in flight
    stream-1    one bidi stream per client process, one BatchOperation per message, at most
                --window operations unanswered
    stream-N    the same stream, one BatchRequest of --stream-batch operations per message

Prints, per mode, the median over --runs of operations/s and the server's CPU per operation
(user + system from /proc, over the measured seconds); one client process per mode run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any

import grpc

from quotad_contract.v1 import quotad_pb2 as pb

from .echo_server import _batch_result
from .harness import doc_parser
from .targets import ROOT, process_cpu_s
from .workloads import EVENT_TYPE, MODEL

STREAM_OPERATIONS = "/bench.StreamVsBatch/Operations"
STREAM_BATCHES = "/bench.StreamVsBatch/Batches"
BATCH = "/quotad.v1.QuotaService/Batch"
MODES = ("batch", "stream-1", "stream-N")


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


async def serve() -> None:
    async def batch(request: Any, context: Any) -> Any:
        return pb.BatchResponse(results=[_batch_result(op) for op in request.operations])

    async def operations(requests: Any, context: Any) -> Any:
        async for operation in requests:
            yield _batch_result(operation)

    async def batches(requests: Any, context: Any) -> Any:
        async for request in requests:
            yield pb.BatchResponse(results=[_batch_result(op) for op in request.operations])

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("quotad.v1.QuotaService", {
            "Batch": grpc.unary_unary_rpc_method_handler(
                batch, request_deserializer=pb.BatchRequest.FromString,
                response_serializer=_serialize)}),
        grpc.method_handlers_generic_handler("bench.StreamVsBatch", {
            "Operations": grpc.stream_stream_rpc_method_handler(
                operations, request_deserializer=pb.BatchOperation.FromString,
                response_serializer=_serialize),
            "Batches": grpc.stream_stream_rpc_method_handler(
                batches, request_deserializer=pb.BatchRequest.FromString,
                response_serializer=_serialize)}),
    ])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _operation(index: int) -> Any:
    return pb.BatchOperation(reserve=pb.ReserveRequest(
        user_id=f"user-{index % 1000:07d}", event_type=EVENT_TYPE, amount=1000,
        metadata={"model": MODEL}, idempotency_key=f"{index:032x}"))


async def drive(address: str, mode: str, options: argparse.Namespace, pid: int) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        deadline = 0.0
        done = 0

        async def unary_batches() -> None:
            call = channel.unary_unary(BATCH, request_serializer=_serialize,
                                       response_deserializer=pb.BatchResponse.FromString)
            request = pb.BatchRequest(operations=[_operation(i) for i in range(options.batch)])

            async def loop() -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    response = await call(request)
                    done += len(response.results)

            await asyncio.gather(*(loop() for _ in range(max(1, options.window
                                                             // options.batch))))

        async def stream(per_message: int) -> None:
            if per_message == 1:
                call = channel.stream_stream(
                    STREAM_OPERATIONS, request_serializer=_serialize,
                    response_deserializer=pb.BatchResult.FromString)()
                message = _operation(0)
            else:
                call = channel.stream_stream(
                    STREAM_BATCHES, request_serializer=_serialize,
                    response_deserializer=pb.BatchResponse.FromString)()
                message = pb.BatchRequest(operations=[_operation(i)
                                                      for i in range(per_message)])
            room = asyncio.Semaphore(max(1, options.window // per_message))

            async def write() -> None:
                while time.perf_counter() < deadline:
                    await room.acquire()
                    await call.write(message)
                await call.done_writing()

            async def read() -> None:
                nonlocal done
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        return
                    done += per_message
                    room.release()

            await asyncio.gather(write(), read())

        runner = {"batch": unary_batches, "stream-1": lambda: stream(1),
                  "stream-N": lambda: stream(options.stream_batch)}[mode]
        cpu_started = process_cpu_s(pid) or 0.0
        started = time.perf_counter()
        deadline = started + options.seconds
        await runner()
        elapsed_s = time.perf_counter() - started
        server_cpu_s = (process_cpu_s(pid) or 0.0) - cpu_started
    return {"ops_per_s": done / elapsed_s, "server_us_per_op": server_cpu_s / max(1, done) * 1e6}


def main() -> None:
    parser = doc_parser("bench.stream_vs_batch", __doc__)
    parser.add_argument("--seconds", type=float, default=4.0, metavar="S",
                        help="measured length of each run (default: 4)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="runs per mode, modes alternating; figures are medians (default: 3)")
    parser.add_argument("--window", type=int, default=1000, metavar="N",
                        help="operations unanswered at most, in every mode (default: 1000)")
    parser.add_argument("--batch", type=int, default=500, metavar="N",
                        help="operations per unary Batch RPC (default: 500)")
    parser.add_argument("--stream-batch", type=int, default=16, metavar="N",
                        help="operations per stream message in stream-N (default: 16)")
    parser.add_argument("--serve", action="store_true",
                        help="be the server: print the port, answer until killed")
    options = parser.parse_args()
    if options.serve:
        asyncio.run(serve())
        return
    server = subprocess.Popen([sys.executable, "-m", "bench.stream_vs_batch", "--serve"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert server.stdout is not None
        address = f"127.0.0.1:{int(server.stdout.readline())}"
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(options.runs):
            for mode in MODES:
                runs[mode].append(asyncio.run(drive(address, mode, options, server.pid)))
    finally:
        server.kill()
        server.wait(timeout=30)
    print(f"Reserve operations, at most {options.window} unanswered, median of {options.runs} "
          f"runs of {options.seconds:g} s; stream-N carries {options.stream_batch} per message,"
          f" batch {options.batch} per RPC")
    base = statistics.median(r["ops_per_s"] for r in runs["batch"])
    print(f"{'mode':>9} {'ops/s':>10} {'server us/op':>13} {'ops/s vs batch':>15}")
    for mode in MODES:
        ops = statistics.median(r["ops_per_s"] for r in runs[mode])
        cpu = statistics.median(r["server_us_per_op"] for r in runs[mode])
        print(f"{mode:>9} {ops:>10,.0f} {cpu:>13.2f} {ops / base:>15.2f}")


if __name__ == "__main__":
    main()
