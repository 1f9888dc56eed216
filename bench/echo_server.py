"""A bare grpc.aio server answering Reserve and Commit with fixed responses of quotad's size:
the transport's own cost, to compare quotad against in the same run.

    python -m bench.echo_server --listen 127.0.0.1:0      (prints the bound port)
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

from quotad.v1 import quotad_pb2 as pb

_COUNTER = pb.Counter(key="tokens", label="Tokens", unit="tokens", quota=10**15, used=7,
                      held=10, remaining=10**15 - 17, window=pb.MONTH)
_COUNTER.window_start.GetCurrentTime()
_COUNTER.resets_at.GetCurrentTime()
RESPONSES: dict[str, Any] = {
    "Reserve": pb.ReserveResponse(allowed=True, reservation_id="rsv_" + "0" * 24,
                                  counters=[_COUNTER]),
    "Commit": pb.CommitResponse(counters=[_COUNTER], committed=7, returned=3),
}
REQUESTS = {"Reserve": pb.ReserveRequest, "Commit": pb.CommitRequest}


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    handlers = {}
    for name, response in RESPONSES.items():
        async def answer(request: Any, context: Any, response: Any = response) -> Any:
            return response
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=REQUESTS[name].FromString,
            response_serializer=lambda message: message.SerializeToString())
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("quotad.v1.QuotaService", handlers)])
    port = server.add_insecure_port(listen)
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    asyncio.run(serve(parser.parse_args().listen))
