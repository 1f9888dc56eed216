"""What grpc.aio's server loop pays per call for the methods registered with it.

    .venv/bin/python -m bench.server_loop [--rounds 20000] [--runs 3]

grpc.aio's server keeps one pending request for each method registered with it, and one for
all the others, and takes each call it receives by an `asyncio.wait` over all of them (first
completed): each wait checks every pending request, and adds and removes a done callback on
each. This times that wait, on uvloop's event loop as `quotad serve` runs, over as many
pending requests as quotad's server keeps (its data path's methods registered, health's, and
one for the rest: quotad.api.service.REGISTERED_METHODS), as it would keep with every method
registered, and as the echo peer keeps (one), each round with one of them done; a server
takes about one such wait per call it takes.

Prints, per count of pending requests, the median over --runs of the CPU per wait (the
thread's clock) in microseconds, and the fastest run.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import uvloop
from grpc_health.v1 import health_pb2

from quotad.api.service import REGISTERED_METHODS
from quotad_contract.v1 import quotad_pb2 as pb

from .harness import doc_parser, _positive_int


def pending_requests() -> dict[str, int]:
    """The pending requests of a server loop: quotad's now, with every method registered
    (each service's methods, health's, and one for every unregistered call), and the bench's
    echo peer's (bench.echo_server: one generic handler, nothing registered)."""
    health = len(health_pb2.DESCRIPTOR.services_by_name["Health"].methods)
    every = sum(len(pb.DESCRIPTOR.services_by_name[name.rsplit(".", 1)[1]].methods)
                for name in ("quotad.v1.QuotaService", "quotad.v1.AdminService"))
    registered = sum(len(methods) for methods in REGISTERED_METHODS.values())
    return {"quotad (data path registered)": registered + health + 1,
            "every method registered": every + health + 1,
            "the echo peer (generic handler)": 1}


async def _wait_cost_us(pending: int, rounds: int) -> float:
    """CPU per asyncio.wait(FIRST_COMPLETED) over `pending` futures, one of them done."""
    loop = asyncio.get_running_loop()
    # as grpc.aio keeps them: a dict of pending requests, waited on through its keys
    requests: dict[asyncio.Future[None], None] = {
        loop.create_future(): None for _ in range(pending - 1)}
    started = time.thread_time()
    for _ in range(rounds):
        ready = loop.create_future()
        requests[ready] = None
        loop.call_soon(ready.set_result, None)  # the call arrived: its request completes
        done, _ = await asyncio.wait(requests.keys(), return_when=asyncio.FIRST_COMPLETED)
        assert done == {ready}
        del requests[ready]  # taken: grpc.aio requests the method's next call in its place
    return (time.thread_time() - started) / rounds * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = doc_parser("bench.server_loop", __doc__)
    parser.add_argument("--rounds", type=_positive_int, default=20_000, metavar="N",
                        help="waits timed per run (default: %(default)s)")
    parser.add_argument("--runs", type=_positive_int, default=3, metavar="N",
                        help="runs per count of pending requests; the median is printed "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    counts = pending_requests()
    print(f"{'server loop':32s} {'pending':>8s} {'us per wait':>12s} {'fastest':>8s}")
    for name, pending in counts.items():
        runs = [uvloop.run(_wait_cost_us(pending, args.rounds)) for _ in range(args.runs)]
        print(f"{name:32s} {pending:8d} {statistics.median(runs):12.1f} {min(runs):8.1f}")


if __name__ == "__main__":
    main()
