"""The asyncio client's coalescing, alone: CPU per operation of gathering concurrent calls
into Batch requests and handing each caller its result.

    .venv/bin/python -m bench.coalesce [--concurrency 1000] [--rounds 200] [--runs 5] [--uvloop]

Each round makes --concurrency concurrent Reserve calls through one Coalescer whose Batch
method answers at once in this process (no network, no server), so what is timed is the
client's own per-operation path: queueing, cutting batches by count and encoded size,
building the BatchRequest, and resolving each caller. The parsing of the response, which a real
channel does for the client, is counted too: the in-process Batch method takes the encoded
request and answers with a BatchResponse parsed from bytes.
Prints the median of the runs in microseconds of CPU per operation, and the batches each round
took.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from quotad_client._coalesce import Coalescer
from quotad_contract.v1 import quotad_pb2 as pb

from .workloads import EVENT_TYPE, MODEL, user_id

CALL_TIMEOUT_S = 30.0


_ALLOWED = pb.BatchResult(reserve=pb.ReserveResponse(allowed=True,
                                                     reservation_id="rsv_" + "0" * 24))
_ANSWERS: dict[int, bytes] = {}


async def _answer(request: bytes, **_: Any) -> pb.BatchResponse:
    """An allowed Reserve for each operation of the encoded BatchRequest, parsed from bytes
    encoded once per request length (the rounds repeat the same batches), as a channel's
    deserializer would hand it over."""
    answer = _ANSWERS.get(len(request))
    if answer is None:
        count = len(pb.BatchRequest.FromString(request).operations)
        answer = _ANSWERS[len(request)] = pb.BatchResponse(
            results=[_ALLOWED] * count).SerializeToString()
    return pb.BatchResponse.FromString(answer)


async def _run(concurrency: int, rounds: int) -> tuple[float, float]:
    coalescer = Coalescer(_answer, CALL_TIMEOUT_S, ())
    requests = [pb.ReserveRequest(user_id=user_id(i), event_type=EVENT_TYPE, amount=1000,
                                  metadata={"model": MODEL}, idempotency_key=f"k{i:024d}")
                for i in range(concurrency)]
    started_s = time.process_time()
    for _ in range(rounds):
        await asyncio.gather(*(coalescer.call("Reserve", request, CALL_TIMEOUT_S) for request in requests))
    cpu_s = time.process_time() - started_s
    return cpu_s / (concurrency * rounds) * 1e6, coalescer.batches_sent / rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coalesce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--uvloop", action="store_true",
                        help="run on uvloop's event loop (default: asyncio's own)")
    options = parser.parse_args(argv)
    if options.uvloop:
        import uvloop
        run = uvloop.run
    else:
        run = asyncio.run
    figures = [run(_run(options.concurrency, options.rounds)) for _ in range(options.runs)]
    us_per_op = statistics.median(us for us, _ in figures)
    print(f"coalescing: {us_per_op:.2f} us CPU per operation, "
          f"{figures[0][1]:.1f} batches per {options.concurrency} concurrent calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
