"""`quotad health`: ask a server over grpc.health.v1 whether it serves (for container and
orchestrator health checks: exit 0 when SERVING, 1 otherwise)."""

from __future__ import annotations

import sys
from pathlib import Path

HEALTH_TIMEOUT_S_DEFAULT = 5.0
SERVING_EXIT = 0
NOT_SERVING_EXIT = 1


def check(target: str, *, tls_root_cert: Path | None, timeout_s: float,
          service: str = "") -> int:
    """Prints one line saying what the server answered; 0 if SERVING, 1 otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if tls_root_cert is not None:
        try:
            root_pem = tls_root_cert.read_bytes()
        except OSError as error:
            print(f"quotad health: --tls-root-cert {tls_root_cert}: {error.strerror}",
                  file=sys.stderr)
            return NOT_SERVING_EXIT
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_pem))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                timeout=timeout_s)
        except grpc.RpcError as error:
            code = error.code()
            print(f"quotad health: no answer from {target} (timeout {timeout_s:g} s): "
                  f"{code.name if code else 'no status'} ({error.details()})", file=sys.stderr)
            return NOT_SERVING_EXIT
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    if answer.status == health_pb2.HealthCheckResponse.SERVING:
        print(f"quotad health: {target} is SERVING")
        return SERVING_EXIT
    print(f"quotad health: {target} is {status}", file=sys.stderr)
    return NOT_SERVING_EXIT
