"""A bare grpc.aio server answering QuotaService's Reserve, Commit, Release, Extend, Track and
GetUsage, one by one or in a Batch, with fixed responses of quotad's shape and size: the
transport's own cost, to compare quotad against in the same run.

    python -m bench.echo_server --listen 127.0.0.1:0      (prints the bound port)

It keeps no state and does no I/O. A Reserve for the bench's premium model is answered with
a denial (two counters and denied_by, as quotad answers it), every other one is allowed, so
the bench's mix workload sends the same messages to it as to quotad. A Batch (what the
client's coalescing sends) is answered with one such response per operation, in order.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

from quotad_contract.v1 import quotad_pb2 as pb

from .workloads import PREMIUM_MODEL, TOKENS_QUOTA

_TOKENS = pb.Counter(key="tokens", label="Tokens", unit="tokens", quota=TOKENS_QUOTA,
                     used=7_000_000, held=1500, remaining=TOKENS_QUOTA - 7_001_500,
                     window=pb.MONTH)
_TOKENS.window_start.GetCurrentTime()
_TOKENS.resets_at.GetCurrentTime()
_PREMIUM = pb.Counter(key="premium_tokens", label="Premium tokens", unit="tokens", quota=0,
                      window=pb.MONTH)
_PREMIUM.window_start.CopyFrom(_TOKENS.window_start)
_PREMIUM.resets_at.CopyFrom(_TOKENS.resets_at)

_ALLOWED = pb.ReserveResponse(allowed=True, reservation_id="rsv_" + "0" * 24,
                              counters=[_TOKENS])
_ALLOWED.expires_at.GetCurrentTime()
_DENIED = pb.ReserveResponse(allowed=False, counters=[_TOKENS, _PREMIUM],
                             denied_by="premium_tokens")
_EXTENDED = pb.ExtendResponse(expires_at=_ALLOWED.expires_at)
RESPONSES: dict[str, Any] = {
    "Reserve": _ALLOWED,
    "Commit": pb.CommitResponse(counters=[_TOKENS], committed=1000, returned=500),
    "Release": pb.ReleaseResponse(counters=[_TOKENS]),
    "Extend": _EXTENDED,
    "Track": pb.TrackResponse(allowed=True, counters=[_TOKENS]),
    "GetUsage": pb.GetUsageResponse(user_id="user-0000000", plan_id="bench",
                                    counters=[_TOKENS, _PREMIUM]),
}
REQUESTS = {"Reserve": pb.ReserveRequest, "Commit": pb.CommitRequest,
            "Release": pb.ReleaseRequest, "Extend": pb.ExtendRequest,
            "Track": pb.TrackRequest, "GetUsage": pb.GetUsageRequest}
# Batch: the result of each kind of operation (field names of BatchOperation / BatchResult)
_BATCH_KINDS = {"reserve": "Reserve", "commit": "Commit", "release": "Release",
                "extend": "Extend", "track": "Track", "get_usage": "GetUsage"}
_RESULTS = {kind: pb.BatchResult(**{kind: RESPONSES[name]})
            for kind, name in _BATCH_KINDS.items()}
_DENIED_RESULT = pb.BatchResult(reserve=_DENIED)


def _batch_result(operation: Any) -> Any:
    kind = operation.WhichOneof("operation")
    if kind == "reserve" and operation.reserve.metadata.get("model") == PREMIUM_MODEL:
        return _DENIED_RESULT
    return _RESULTS[kind]


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _option(text: str) -> tuple[str, int | str]:
    """NAME=VALUE, VALUE an integer when it is one (as grpc's channel arguments take it)."""
    name, equals, value = text.partition("=")
    if not name or not equals:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return name, int(value) if value.lstrip("-").isdigit() else value


async def serve(listen: str, options: list[tuple[str, int | str]],
                maximum_concurrent_rpcs: int | None, registered_methods: bool) -> None:
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=maximum_concurrent_rpcs)
    handlers = {}
    for name, response in RESPONSES.items():
        if name == "Reserve":
            async def answer(request: Any, context: Any) -> Any:
                return _DENIED if request.metadata.get("model") == PREMIUM_MODEL else _ALLOWED
        else:
            async def answer(request: Any, context: Any, response: Any = response) -> Any:
                return response
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=REQUESTS[name].FromString,
            response_serializer=_serialize)

    async def batch(request: Any, context: Any) -> Any:
        return pb.BatchResponse(results=[_batch_result(op) for op in request.operations])

    handlers["Batch"] = grpc.unary_unary_rpc_method_handler(
        batch, request_deserializer=pb.BatchRequest.FromString, response_serializer=_serialize)
    if registered_methods:  # as quotad registers its methods
        server.add_registered_method_handlers("quotad.v1.QuotaService", handlers)
    else:
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("quotad.v1.QuotaService", handlers)])
    port = server.add_insecure_port(listen)
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                        help="address to listen on (port 0: a free one; it is printed)")
    parser.add_argument("--option", type=_option, action="append", default=[],
                        metavar="NAME=VALUE",
                        help="a grpc server option (channel argument), repeatable")
    parser.add_argument("--maximum-concurrent-rpcs", type=int, metavar="N",
                        help="grpc.aio.server's maximum_concurrent_rpcs (default: none)")
    parser.add_argument("--pending-calls-per-method", type=int, metavar="N",
                        help="bound grpc's queue of calls not yet taken by a handler, per "
                             "method, as `quotad serve --pending-calls-per-method` does "
                             "(default: grpc's own bounds)")
    parser.add_argument("--registered-methods", action="store_true",
                        help="register the methods with grpc (as quotad does) rather than "
                             "serving them through a generic handler")
    parser.add_argument("--uvloop", action="store_true",
                        help="run on uvloop's event loop, as `quotad serve` does (default: "
                             "asyncio's own, a bare grpc.aio server's)")
    arguments = parser.parse_args()
    if arguments.pending_calls_per_method is not None:
        from quotad.server import pending_calls_options
        arguments.option += pending_calls_options(arguments.pending_calls_per_method)
    serving = serve(arguments.listen, arguments.option, arguments.maximum_concurrent_rpcs,
                    arguments.registered_methods)
    if arguments.uvloop:
        import uvloop
        uvloop.run(serving)
    else:
        asyncio.run(serving)
