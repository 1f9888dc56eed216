"""The gRPC servicers: authenticate, map proto to commands, run them through the writer,
map results and errors back. No quota logic lives here.

Handlers are registered by hand (not through the generated add_*_to_server) so that a request
the protobuf runtime cannot parse is answered INVALID_ARGUMENT rather than INTERNAL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from . import commands as c
from . import convert, limits
from .commands import AUDIT_KINDS
from .errors import (
    AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound, QuotaError,
    ResourceExhausted, Violations,
)
from .v1 import quotad_pb2 as pb
from .wal import EVENT_CURSOR_BYTES
from .writer import Writer, WriterStopped

log = logging.getLogger("quotad.service")

DEFAULT_APP = "default"
ERROR_DOMAIN = "quotad"


class Malformed:
    """What a request that protobuf could not parse becomes."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe_parser(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as error:  # protobuf's DecodeError and friends
            return Malformed(error)
    return parse


def status_of(error: Exception) -> grpc.Status:
    """The gRPC status, with google.rpc details, for a refusal."""
    return rpc_status.to_status(status_proto_of(error))


def status_proto_of(error: Exception) -> status_pb2.Status:
    """The google.rpc.Status for a refusal: code, message, and details naming the cause."""
    code, details = code_pb2.INTERNAL, []
    if isinstance(error, InvalidArgument):
        code = code_pb2.INVALID_ARGUMENT
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]))
    elif isinstance(error, NotFound):
        code = code_pb2.NOT_FOUND
    elif isinstance(error, FailedPrecondition):
        code = code_pb2.FAILED_PRECONDITION
        details.append(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    elif isinstance(error, ResourceExhausted):
        code = code_pb2.RESOURCE_EXHAUSTED
        details.append(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    elif isinstance(error, AlreadyExists):
        code = code_pb2.ALREADY_EXISTS
    elif isinstance(error, (WriterStopped, Unavailable)):
        code = code_pb2.UNAVAILABLE
    elif isinstance(error, Unauthenticated):
        code = code_pb2.UNAUTHENTICATED
    packed = []
    for detail in details:
        envelope = any_pb2.Any()
        envelope.Pack(detail)
        packed.append(envelope)
    message = getattr(error, "message", None) or str(error)
    return status_pb2.Status(code=code, message=message, details=packed)


class Unavailable(Exception):
    pass


class Unauthenticated(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Gate:
    """Whether the service takes calls: not while starting, draining, or after a failure."""

    def __init__(self) -> None:
        self.writer: Writer | None = None
        self.state = "starting"

    def open_writer(self) -> Writer:
        if self.state != "serving" or self.writer is None or self.writer.failed:
            raise Unavailable(f"quotad is {self.state}" if self.state != "serving"
                              else "quotad storage failed")
        return self.writer


# (RPC name, request type, request -> command, result -> response)
_Method = tuple[str, Any, Callable[[str, Any], Any], Callable[[Any], Any]]

QUOTA_METHODS: list[_Method] = [
    ("Reserve", pb.ReserveRequest, convert.reserve, convert.reserve_response),
    ("Commit", pb.CommitRequest, convert.commit,
     lambda r: _filled(pb.CommitResponse(), convert.fill_commit_response, r)),
    ("Release", pb.ReleaseRequest, convert.release,
     lambda r: _filled(pb.ReleaseResponse(), convert.fill_release_response, r)),
    ("Extend", pb.ExtendRequest, convert.extend,
     lambda r: _filled(pb.ExtendResponse(), convert.fill_extend_response, r)),
    ("Track", pb.TrackRequest, convert.track,
     lambda r: _filled(pb.TrackResponse(), convert.fill_track_response, r)),
    ("GetUsage", pb.GetUsageRequest, convert.get_usage,
     lambda r: _filled(pb.GetUsageResponse(), convert.fill_usage_response, r)),
]
_FILL_BATCH_RESULT = {
    "reserve": convert.fill_reserve_response, "commit": convert.fill_commit_response,
    "release": convert.fill_release_response, "extend": convert.fill_extend_response,
    "track": convert.fill_track_response, "get_usage": convert.fill_usage_response,
}
"""How each kind of Batch operation's result is written into its BatchResult field."""


def _filled(message: Any, fill: Callable[[Any, Any], None], result: Any) -> Any:
    fill(message, result)
    return message


ADMIN_METHODS: list[_Method] = [
    ("UpsertPlan", pb.UpsertPlanRequest, convert.upsert_plan, lambda r: pb.UpsertPlanResponse(
        plan=convert.plan_to_proto(r.plan), changed=r.changed)),
    ("GetPlan", pb.GetPlanRequest, lambda app, q: c.GetPlan(app=app, plan_id=q.id),
     lambda r: pb.GetPlanResponse(plan=convert.plan_to_proto(r.plan))),
    ("ListPlans", pb.ListPlansRequest, lambda app, q: c.ListPlans(app=app),
     lambda r: pb.ListPlansResponse(plans=[convert.plan_to_proto(p) for p in r.plans])),
    ("DeletePlan", pb.DeletePlanRequest, lambda app, q: c.DeletePlan(app=app, plan_id=q.id),
     lambda r: pb.DeletePlanResponse()),
    ("UpsertSubscription", pb.UpsertSubscriptionRequest,
     lambda app, q: c.UpsertSubscription(app=app, user_id=q.user_id, plan_id=q.plan_id,
                                         time_zone=q.time_zone or "UTC"),
     lambda r: pb.UpsertSubscriptionResponse(
         subscription=convert.subscription_to_proto(r.subscription), changed=r.changed)),
    ("GetSubscription", pb.GetSubscriptionRequest,
     lambda app, q: c.GetSubscription(app=app, user_id=q.user_id),
     lambda r: pb.GetSubscriptionResponse(
         subscription=convert.subscription_to_proto(r.subscription))),
]


_Handler = Callable[[Any, Any], Awaitable[Any]]
_REFUSALS = (QuotaError, WriterStopped, Unavailable, Unauthenticated)


def _answering(answer: Callable[[Any], Awaitable[Any]]) -> _Handler:
    """A gRPC handler around answer(request): a request protobuf could not parse, and every
    refusal on the way to the answer, become the status they map to."""
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument([FieldViolation(
                    "request", f"cannot be parsed: {request.error}")])
            return await answer(request)
        except _REFUSALS as error:
            status = status_of(error)
            await context.abort(status.code, status.details, status.trailing_metadata)
    return handle


def _handler(gate: Gate, to_command: Callable[[str, Any], Any],
             to_response: Callable[[Any], Any]) -> _Handler:
    async def answer(request: Any) -> Any:
        writer = gate.open_writer()
        return to_response(await writer.execute(to_command(DEFAULT_APP, request)))
    return _answering(answer)


def _state_digest_handler(gate: Gate) -> _Handler:
    async def answer(request: Any) -> Any:
        digest, sequence = await gate.open_writer().state_digest()
        return pb.GetStateDigestResponse(digest=digest, sequence=sequence)
    return _answering(answer)


EVENTS_PAGE_SIZE_DEFAULT = 100
EVENTS_PAGE_SIZE_MAX = 1000
_EVENT_KINDS = {kind: pb.EventKind.Value(f"EVENT_KIND_{kind.upper()}") for kind in AUDIT_KINDS}
_END_OF_TIME_NS = 2**64 - 1
"""The event index stores times as unsigned 64-bit ns (to the year 2554); later is clamped."""
_TIMESTAMP_SECONDS_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z, protobuf's own bound


def _time_ns(v: Violations, request: Any, field: str, default: int) -> int:
    if not request.HasField(field):
        return default
    stamp = getattr(request, field)
    if not (0 <= stamp.seconds <= _TIMESTAMP_SECONDS_MAX and 0 <= stamp.nanos < limits.NS_PER_S):
        v.add(field, "must be a valid time from 1970 to 9999")
        return default
    return min(stamp.seconds * limits.NS_PER_S + stamp.nanos, _END_OF_TIME_NS - 1)


def _events_query(request: pb.ListEventsRequest) -> tuple[int, int, bytes, int]:
    """(start_ns, end_ns, cursor, page_size) of a ListEvents request, or InvalidArgument."""
    v = Violations()
    v.text(request.user_id, "user_id", bytes_min=1, bytes_max=limits.USER_ID_BYTES_MAX)
    v.check(0 <= request.page_size <= EVENTS_PAGE_SIZE_MAX, "page_size",
            f"must be 0 (meaning {EVENTS_PAGE_SIZE_DEFAULT}) to {EVENTS_PAGE_SIZE_MAX}")
    start_ns = _time_ns(v, request, "start_time", default=0)
    end_ns = _time_ns(v, request, "end_time", default=_END_OF_TIME_NS)
    if request.HasField("start_time") and request.HasField("end_time"):
        v.check(end_ns > start_ns, "end_time", "must be after start_time")
    try:
        cursor = bytes.fromhex(request.page_token)
    except ValueError:
        cursor = b"?"
    v.check(len(cursor) in (0, EVENT_CURSOR_BYTES), "page_token",
            "must be a next_page_token from ListEvents")
    v.raise_if_any()
    return start_ns, end_ns, cursor, request.page_size or EVENTS_PAGE_SIZE_DEFAULT


def _list_events_handler(gate: Gate) -> _Handler:
    async def answer(request: Any) -> Any:
        start_ns, end_ns, cursor, page_size = _events_query(request)
        log_ = gate.open_writer().log
        found = await asyncio.get_running_loop().run_in_executor(
            None, log_.list_events, DEFAULT_APP, request.user_id, start_ns, end_ns, cursor,
            page_size + 1)
        page = found[:page_size]
        return pb.ListEventsResponse(
            events=[pb.Event(
                sequence=stored.sequence, time=convert.timestamp(stored.now_ns),
                kind=_EVENT_KINDS[stored.event.kind], user_id=stored.event.user_id,
                event_type=stored.event.event_type, amount=stored.event.amount,
                metadata=dict(stored.event.metadata),
                reservation_id=stored.event.reservation_id, allowed=stored.event.allowed,
            ) for stored in page],
            next_page_token=page[-1].cursor.hex() if len(found) > page_size else "",
        )
    return _answering(answer)


BATCH_OPERATIONS_MAX = 1000
_BATCH_KINDS = {
    "reserve": "Reserve", "commit": "Commit", "release": "Release", "extend": "Extend",
    "track": "Track", "get_usage": "GetUsage",
}
_QUOTA_TABLE = {name: (to_command, to_response) for name, _, to_command, to_response
                in QUOTA_METHODS}


def _error_result(error: Exception) -> pb.BatchResult:
    return pb.BatchResult(error=status_proto_of(error))


def _batch_handler(gate: Gate) -> _Handler:
    async def answer(request: Any) -> Any:
        count = len(request.operations)
        if not 1 <= count <= BATCH_OPERATIONS_MAX:
            raise InvalidArgument([FieldViolation(
                "operations", f"must hold 1 to {BATCH_OPERATIONS_MAX} operations")])
        writer = gate.open_writer()
        results: list[Any] = [None] * count  # an error's BatchResult, or (kind, result)
        accepted: list[tuple[int, str, Any]] = []
        for index, operation in enumerate(request.operations):
            kind = operation.WhichOneof("operation")
            try:
                if kind is None:
                    raise InvalidArgument([FieldViolation(
                        f"operations[{index}]", "must hold one operation")])
                to_command = _QUOTA_TABLE[_BATCH_KINDS[kind]][0]
                accepted.append((index, kind, to_command(DEFAULT_APP,
                                                         getattr(operation, kind))))
            except InvalidArgument as error:
                results[index] = _error_result(error)
        outcomes = await writer.execute_many([command for _, _, command in accepted])
        for (index, kind, _), outcome in zip(accepted, outcomes):
            results[index] = (kind, outcome.result) if outcome.error is None else \
                _error_result(outcome.error)
        response = pb.BatchResponse()
        for answer in results:  # filled in place, in order: no copies of the results
            if isinstance(answer, tuple):
                kind, result = answer
                _FILL_BATCH_RESULT[kind](getattr(response.results.add(), kind), result)
            else:
                response.results.append(answer)
        return response
    return _answering(answer)


def generic_handlers(gate: Gate) -> list[grpc.GenericRpcHandler]:
    handlers = []
    for service, methods in (("quotad.v1.QuotaService", QUOTA_METHODS),
                             ("quotad.v1.AdminService", ADMIN_METHODS)):
        table = {
            name: grpc.unary_unary_rpc_method_handler(
                _handler(gate, to_command, to_response),
                request_deserializer=_safe_parser(request_type),
                response_serializer=lambda message: message.SerializeToString(),
            )
            for name, request_type, to_command, to_response in methods
        }
        specials = ((("GetStateDigest", pb.GetStateDigestRequest, _state_digest_handler),
                     ("ListEvents", pb.ListEventsRequest, _list_events_handler))
                    if service.endswith("AdminService")
                    else (("Batch", pb.BatchRequest, _batch_handler),))
        for name, request_type, make in specials:
            table[name] = grpc.unary_unary_rpc_method_handler(
                make(gate), request_deserializer=_safe_parser(request_type),
                response_serializer=lambda message: message.SerializeToString(),
            )
        handlers.append(grpc.method_handlers_generic_handler(service, table))
    return handlers
