"""The gRPC servicers: authenticate, map proto to commands, run them through the writer,
map results and errors back. No quota logic lives here.

Handlers are registered by hand (not through the generated add_*_to_server) so that a request
the protobuf runtime cannot parse is answered INVALID_ARGUMENT rather than INTERNAL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from quotad.core import commands as c
from quotad.api import auth, convert
from quotad.core import limits
from quotad.api import export, requests, watch
from quotad.api.admission import Admission
from quotad.api.auth import Principal
from quotad.cluster.limits import CATALOG_APPLY_TIMEOUT_S
from quotad.api.gate import Gate
from quotad.core.errors import (
    FailedPrecondition, FieldViolation, InvalidArgument, PermissionDenied, Refusal, SlotsMoving,
)
from quotad_contract.errors import ERROR_DOMAIN, ERRORS, INTERNAL, ErrorReason
from quotad_contract.v1 import quotad_pb2 as pb
from quotad.engine.writer import DeadlinePassed, Writer
from quotad.storage.codec import CorruptRecord


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
    """The google.rpc.Status for a refusal: its code, message, and details naming the cause
    (a BadRequest of its field violations, an ErrorInfo of its reason). INTERNAL for
    anything else."""
    kind, details = INTERNAL, []
    if isinstance(error, Refusal):
        kind = ERRORS[error.code]
        if isinstance(error, InvalidArgument):
            details.append(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field,
                                                            description=v.description)
                for v in error.violations
            ]))
        if error.reason is not None:
            details.append(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN,
                                                       metadata=error.metadata))
        retry_delay_s = getattr(error, "retry_delay_s", None)
        if retry_delay_s is not None:
            retry_info = error_details_pb2.RetryInfo()
            retry_info.retry_delay.FromNanoseconds(round(retry_delay_s * 1e9))
            details.append(retry_info)
    packed = []
    for detail in details:
        envelope = any_pb2.Any()
        envelope.Pack(detail)
        packed.append(envelope)
    message = getattr(error, "message", None) or str(error)
    return status_pb2.Status(code=code_pb2.Code.Value(kind.code), message=message, details=packed)


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
    ("GrantCredits", pb.GrantCreditsRequest, convert.grant_credits,
     convert.grant_credits_response),
    ("ListGrants", pb.ListGrantsRequest, convert.list_grants, convert.list_grants_response),
]
_QUOTA_RPCS = frozenset([name for name, *_ in QUOTA_METHODS]
                        + ["Batch", "WatchUsage", "GetShardMap"])
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
    ("UpsertSubscription", pb.UpsertSubscriptionRequest, convert.upsert_subscription,
     lambda r: pb.UpsertSubscriptionResponse(
         subscription=convert.subscription_to_proto(r.subscription), changed=r.changed)),
    ("GetSubscription", pb.GetSubscriptionRequest,
     lambda app, q: c.GetSubscription(app=app, user_id=q.user_id),
     lambda r: pb.GetSubscriptionResponse(
         subscription=convert.subscription_to_proto(r.subscription))),
    ("ListSubscriptions", pb.ListSubscriptionsRequest, convert.list_subscriptions,
     lambda r: pb.ListSubscriptionsResponse(
         subscriptions=[convert.subscription_to_proto(s) for s in r.subscriptions],
         next_page_token=r.subscriptions[-1].user_id if r.more else "")),
]


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated call: the writer to run it through, who makes it, its metadata, and
    its deadline (time.monotonic() based; None: the caller set none)."""

    writer: Writer
    principal: Principal
    metadata: Any
    deadline_s: float | None = None


_Handler = Callable[[Any, Any], Awaitable[Any]]
_REFUSALS = (Refusal, CorruptRecord)
"""What a handler answers with a status: a refusal, with its code; a log record a read found
corrupt, INTERNAL (status_of: the data directory's fault, not the call's)."""


def open_call(gate: Gate, metadata: Any, rpc: str, deadline_s: float | None = None) -> Call:
    """The call's writer and caller, once the caller may call this RPC; else the refusal
    (UNAVAILABLE, UNAUTHENTICATED, PERMISSION_DENIED, or FAILED_PRECONDITION KEYS_DISABLED)."""
    writer = gate.open_writer()
    assert gate.auth is not None
    principal = gate.auth.authenticate(metadata)
    gate.auth.authorize(principal, rpc)
    return Call(writer, principal, metadata, deadline_s)


def caller_of(gate: Gate, metadata: Any, context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Who made a call, for its refused line: the peer's address, and the app and key id its
    credentials name (verified or not; never the secret)."""
    if gate.auth is not None:
        app, key_id = gate.auth.identify(metadata)
    else:  # still starting: the keys are not loaded yet
        app, key_id = "", auth.presented_key_id(auth.header(metadata, auth.AUTHORIZATION_HEADER))
    return {"peer": context.peer() or "", "app": app, "key_id": key_id}


def _deadline_s(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on time.monotonic()'s scale; None when the caller set none."""
    remaining_s = context.time_remaining()
    return None if remaining_s is None else time.monotonic() + remaining_s


def _operations(rpc: str, request: Any) -> int:
    """What a call counts against the admission limit: a Batch its operations, others one."""
    if rpc == "Batch" and not isinstance(request, Malformed):
        return max(1, len(request.operations))
    return 1


def full_method(rpc: str) -> str:
    service = "QuotaService" if rpc in _QUOTA_RPCS else "AdminService"
    return f"/quotad.v1.{service}/{rpc}"


def _answering(gate: Gate, admission: Admission, rpc: str,
               answer: Callable[[Any, Call], Awaitable[Any]]) -> _Handler:
    """A gRPC handler around answer(request, call). A call whose deadline has passed is shed
    first (DEADLINE_EXCEEDED), then the caller is authenticated, a request protobuf could not
    parse is refused, and the call is admitted (or shed: RESOURCE_EXHAUSTED OVERLOADED);
    every refusal on the way to the answer becomes the status it maps to. Shed calls did no
    work and are counted, not logged: under overload a log line each would add to it."""
    method = full_method(rpc)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = context.invocation_metadata() or ()
        echo = ((requests.REQUEST_ID_HEADER, requests.begin(metadata)),)
        started_s = time.perf_counter()
        operations = 0
        try:
            deadline_s = _deadline_s(context)
            admission.check_deadline(rpc, deadline_s)
            call = open_call(gate, metadata, rpc, deadline_s)
            if isinstance(request, Malformed):
                raise InvalidArgument([FieldViolation(
                    "request", f"cannot be parsed: {request.error}")])
            admitting = _operations(rpc, request)
            admission.admit(rpc, admitting)
            operations = admitting
            response = await answer(request, call)
        except _REFUSALS as error:
            status = status_of(error)
            if isinstance(error, DeadlinePassed):
                admission.count_deadline_shed(rpc)
            elif not (isinstance(error, Refusal) and error.reason is ErrorReason.OVERLOADED):
                requests.refused(method, status.code.name, status.details,
                                 **caller_of(gate, metadata, context))
            await context.abort(status.code, status.details, (*status.trailing_metadata, *echo))
        finally:
            admission.release(operations)
        if requests.access_log_on():  # a line names it: the caller gets it back to match
            context.set_trailing_metadata(echo)
            requests.served(method, started_s)
        return response
    return handle


USER_RPCS = frozenset({"Reserve", "Track", "GetUsage", "GrantCredits", "ListGrants",
                       "UpsertSubscription", "GetSubscription", "ListEvents", "WatchUsage"})
"""RPCs that name one user (request.user_id): a shard takes them for its own users only."""
RESERVATION_RPCS = frozenset({"Commit", "Release", "Extend"})
"""RPCs that name one hold (request.reservation_id), whose first hex digits are its slot."""


def check_shard(gate: Gate, rpc: str, app: str, request: Any) -> None:
    """FAILED_PRECONDITION WRONG_SHARD, before anything changes, when the request names a
    user (or a hold) whose slot another shard of the cluster owns. A server alone owns all."""
    ownership = gate.ownership
    if ownership is None or not ownership.clustered:
        return
    try:
        if rpc in RESERVATION_RPCS:
            ownership.check_reservation(request.reservation_id)
        elif rpc in USER_RPCS:
            ownership.check_user(app, request.user_id)
    except FailedPrecondition as wrong:
        raise _moving_here_or(gate, wrong) from None


def _moving_here_or(gate: Gate, wrong: FailedPrecondition) -> Refusal:
    """SLOTS_MOVING rather than WRONG_SHARD for a slot this shard adopted and its map does not
    give it yet: the caller waits for the map instead of being sent back to the source."""
    slot = int(wrong.metadata.get("slot", -1))
    if gate.writer is not None and slot in gate.writer.core.incoming_slots:
        return SlotsMoving(f"slot {slot} is moving to this shard, whose map does not name it "
                           "the owner yet: nothing was done; send the call again shortly",
                           slot=slot)
    return wrong


def _handler(gate: Gate, admission: Admission, rpc: str, to_command: Callable[[str, Any], Any],
             to_response: Callable[[Any], Any]) -> _Handler:
    async def answer(request: Any, call: Call) -> Any:
        if rpc in auth.PUBLIC_RPCS:  # a usage read: a pk_ key's token must name the user
            assert gate.auth is not None
            gate.auth.authorize_usage_read(call.principal, call.metadata, request.user_id)
        check_shard(gate, rpc, call.principal.app, request)
        command = to_command(call.principal.app, request)
        catalog = gate.catalog  # a cluster in etcd: plans are written there, applied by all
        if catalog is not None and rpc == "UpsertPlan" and command.plan is not None:
            return to_response(await catalog.upsert_plan(
                command, request.plan.SerializeToString(deterministic=True),
                _catalog_deadline_s(call)))
        if catalog is not None and rpc == "DeletePlan":
            call.writer.core.check(command)  # refused here first: nothing written to etcd
            return to_response(await catalog.delete_plan(command, _catalog_deadline_s(call)))
        return to_response(await call.writer.execute(command, call.deadline_s))
    return _answering(gate, admission, rpc, answer)


def _state_digest_handler(gate: Gate, admission: Admission) -> _Handler:
    async def answer(request: Any, call: Call) -> Any:
        digest, sequence = await call.writer.state_digest()
        return pb.GetStateDigestResponse(digest=digest, sequence=sequence)
    return _answering(gate, admission, "GetStateDigest", answer)


def _shard_map_handler(gate: Gate, admission: Admission) -> _Handler:
    async def answer(request: Any, call: Call) -> Any:
        ownership = gate.ownership
        assert ownership is not None  # set before serving
        return convert.shard_map_response(ownership.shard_map, ownership.shard_id,
                                          call.principal.app)
    return _answering(gate, admission, "GetShardMap", answer)


def _list_events_handler(gate: Gate, admission: Admission) -> _Handler:
    async def answer(request: Any, call: Call) -> Any:
        check_shard(gate, "ListEvents", call.principal.app, request)
        query = convert.list_events(call.principal.app, request)
        start_ns, end_ns = query.range_ns
        page_size = query.events_per_page
        user_number = call.writer.core.user_number(query.app, query.user_id)
        found = [] if user_number is None else await asyncio.get_running_loop().run_in_executor(
            None, call.writer.wal.list_events, query.app, query.user_id, user_number, start_ns,
            end_ns, query.cursor, page_size + 1)
        page = found[:page_size]
        return convert.events_response(
            page, page[-1].cursor.hex() if len(found) > page_size else "")
    return _answering(gate, admission, "ListEvents", answer)


_BATCH_KINDS = {
    "reserve": "Reserve", "commit": "Commit", "release": "Release", "extend": "Extend",
    "track": "Track", "get_usage": "GetUsage",
}
_QUOTA_TABLE = {name: (to_command, to_response) for name, _, to_command, to_response
                in QUOTA_METHODS}


def _error_result(error: Exception) -> pb.BatchResult:
    return pb.BatchResult(error=status_proto_of(error))


def _batch_handler(gate: Gate, admission: Admission) -> _Handler:
    async def answer(request: Any, call: Call) -> Any:
        count = len(request.operations)
        if not 1 <= count <= limits.BATCH_OPERATIONS_MAX:
            raise InvalidArgument([FieldViolation(
                "operations", f"must hold 1 to {limits.BATCH_OPERATIONS_MAX} operations")])
        results: list[Any] = [None] * count  # an error's BatchResult, or (kind, result)
        accepted: list[tuple[int, str, Any]] = []
        for index, operation in enumerate(request.operations):
            kind = operation.WhichOneof("operation")
            try:
                if kind is None:
                    raise InvalidArgument([FieldViolation(
                        f"operations[{index}]", "must hold one operation")])
                rpc = _BATCH_KINDS[kind]
                check_shard(gate, rpc, call.principal.app, getattr(operation, kind))
                to_command = _QUOTA_TABLE[rpc][0]
                accepted.append((index, kind, to_command(call.principal.app,
                                                         getattr(operation, kind))))
            except (InvalidArgument, FailedPrecondition, SlotsMoving) as error:
                results[index] = _error_result(error)
        outcomes = await call.writer.execute_many([command for _, _, command in accepted],
                                                  call.deadline_s)
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
    return _answering(gate, admission, "Batch", answer)


def _target_app(principal: Principal, requested: str) -> str:
    """The app a CreateKey or ListKeys acts on: the one named (admin key), or the caller's."""
    if principal.kind == auth.ADMIN:
        return requested  # none named: the request's value refuses the empty app
    if requested and requested != principal.app:
        raise PermissionDenied(f"this key belongs to app {principal.app!r}, not {requested!r}")
    return principal.app


def _catalog_deadline_s(call: Call) -> float:
    """Until when a change of the cluster's catalog waits for this shard to apply it."""
    return (call.deadline_s if call.deadline_s is not None
            else time.monotonic() + CATALOG_APPLY_TIMEOUT_S)


def _create_key_handler(gate: Gate, admission: Admission) -> _Handler:
    async def answer(request: Any, call: Call) -> Any:
        spec = convert.key_spec(_target_app(call.principal, request.app), request)
        new = auth.new_key(spec.kind)
        command = c.CreateKey(
            app=spec.app, key_id=new.key_id, kind=spec.kind, name=spec.name,
            secret_sha256=new.secret_sha256, token_signing_key=new.token_signing_key)
        if gate.catalog is not None:  # a cluster in etcd: every shard takes the key
            call.writer.core.check(command)  # refused here first: nothing written to etcd
            result = await gate.catalog.create_key(command, _catalog_deadline_s(call))
        else:
            result = await call.writer.execute(command, call.deadline_s)
        return pb.CreateKeyResponse(key=convert.api_key(result.key), secret=new.whole)
    return _answering(gate, admission, "CreateKey", answer)


def _revoke_key_handler(gate: Gate, admission: Admission) -> _Handler:
    async def answer(request: Any, call: Call) -> Any:
        command = c.RevokeKey(app=call.principal.app, key_id=request.key_id)
        key = call.writer.core.keys.get(command.key_id)
        if gate.catalog is not None and key is not None and key.revoked_at_ns is None:
            call.writer.core.check(command)  # another app's key: refused, nothing written
            result = await gate.catalog.revoke_key(key, _catalog_deadline_s(call))
        else:  # alone, or nothing to write: the core answers (NotFound, already revoked)
            result = await call.writer.execute(command, call.deadline_s)
        return pb.RevokeKeyResponse(key=convert.api_key(result.key))
    return _answering(gate, admission, "RevokeKey", answer)


def _list_keys_handler(gate: Gate, admission: Admission) -> _Handler:
    async def answer(request: Any, call: Call) -> Any:
        app = _target_app(call.principal, request.app)
        result = await call.writer.execute(c.ListKeys(app=app), call.deadline_s)
        return pb.ListKeysResponse(keys=[convert.api_key(key) for key in result.keys])
    return _answering(gate, admission, "ListKeys", answer)


def _mint_user_token_handler(gate: Gate, admission: Admission) -> _Handler:
    async def answer(request: Any, call: Call) -> Any:
        mint = convert.mint_user_token(call.principal.app, request)
        assert gate.auth is not None
        token, expires_at_s = gate.auth.mint_user_token(call.principal, mint)
        return pb.MintUserTokenResponse(
            token=token, expires_at=convert.timestamp(expires_at_s * limits.NS_PER_S))
    return _answering(gate, admission, "MintUserToken", answer)


def streaming_handler(gate: Gate, rpc: str, request_type: type,
                      messages: Callable[[Any, Call], AsyncIterator[Any]]
                      ) -> grpc.RpcMethodHandler:
    """A server-streaming RPC around messages(request, call): the caller authenticated and a
    request that could not be parsed refused first; a refusal before or during the stream
    ends it with its status."""
    method = full_method(rpc)

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = context.invocation_metadata() or ()
        await context.send_initial_metadata(
            ((requests.REQUEST_ID_HEADER, requests.begin(metadata)),))
        try:
            call = open_call(gate, metadata, rpc)
            if isinstance(request, Malformed):
                raise InvalidArgument([FieldViolation(
                    "request", f"cannot be parsed: {request.error}")])
            async for message in messages(request, call):
                yield message
        except _REFUSALS as error:
            status = status_of(error)
            requests.refused(method, status.code.name, status.details,
                             **caller_of(gate, metadata, context))
            await context.abort(status.code, status.details, status.trailing_metadata)
    return grpc.unary_stream_rpc_method_handler(
        handle, request_deserializer=_safe_parser(request_type),
        response_serializer=lambda message: message.SerializeToString())


def _export_usage_handler(gate: Gate) -> grpc.RpcMethodHandler:
    """ExportUsage: the log's usage lines, each naming this shard in a cluster."""
    async def messages(request: Any, call: Call) -> AsyncIterator[Any]:
        query = convert.export_usage(_target_app(call.principal, request.app), request)
        ownership = gate.ownership
        shard_id = ownership.shard_id if ownership is not None and ownership.clustered else None
        async for message in export.messages(call.writer, query, shard_id):
            yield message
    return streaming_handler(gate, "ExportUsage", pb.ExportUsageRequest, messages)


def usage_reader(gate: Gate, metadata: Any, rpc: str, user_id: str | None) -> auth.UsageGrant:
    """What a usage read (GetUsage, WatchUsage, the HTTP endpoint) rests on, once its caller
    may read this user's usage: a pk_ key needs a user token naming the user. The grant's app
    is the one it reads from. With user_id None (a request that did not parse) only the caller
    is checked."""
    call = open_call(gate, metadata, rpc)
    if user_id is None:
        return auth.UsageGrant(call.principal)
    assert gate.auth is not None
    grant = gate.auth.authorize_usage_read(call.principal, metadata, user_id)
    if gate.ownership is not None and gate.ownership.clustered:
        try:
            gate.ownership.check_user(grant.app, user_id)
        except FailedPrecondition as wrong:
            raise _moving_here_or(gate, wrong) from None
    return grant


def _watch_caller(gate: Gate) -> Callable[[Any, Any], auth.UsageGrant]:
    def caller(metadata: Any, request: Any) -> auth.UsageGrant:
        user_id = request.user_id if isinstance(request, pb.WatchUsageRequest) else None
        return usage_reader(gate, metadata, "WatchUsage", user_id)
    return caller


def http_usage_authorizer(
        gate: Gate) -> Callable[[str | None, str | None, str], auth.UsageGrant]:
    """The browser endpoint's rule, the same as GetUsage's: its headers are the metadata."""
    def authorize(authorization: str | None, user_token: str | None,
                  user_id: str) -> auth.UsageGrant:
        metadata = {name: value for name, value in ((auth.AUTHORIZATION_HEADER, authorization),
                                                    (auth.USER_TOKEN_HEADER, user_token))
                    if value is not None}
        return usage_reader(gate, metadata, "GetUsage", user_id)
    return authorize


REGISTERED_METHODS = {"quotad.v1.QuotaService": frozenset(
    {"Reserve", "Commit", "Release", "Extend", "Track", "GetUsage", "Batch", "WatchUsage"})}
"""The methods registered with grpc, by service: the data path's. grpc's core gives each its
own queue of received calls (bounded by --pending-calls-per-method), so a flood of one never
holds back another; every other method is served through one generic handler, and their calls
share one queue. Only these, because grpc.aio's server loop waits on one pending request per
registered method (and one for the rest) each time it takes a call, at ~0.4 µs each: 34
pending requests cost ~19 µs a wait where 12 cost ~10 (`python -m bench.server_loop`)."""


def method_handlers(gate: Gate, admission: Admission) -> dict[str, dict[str, Any]]:
    """Every RPC's handler, by service and method name; the unary ones admitted by
    `admission` (WatchUsage is not)."""
    services = {}
    for service, methods in (("quotad.v1.QuotaService", QUOTA_METHODS),
                             ("quotad.v1.AdminService", ADMIN_METHODS)):
        table = {
            name: grpc.unary_unary_rpc_method_handler(
                _handler(gate, admission, name, to_command, to_response),
                request_deserializer=_safe_parser(request_type),
                response_serializer=lambda message: message.SerializeToString(),
            )
            for name, request_type, to_command, to_response in methods
        }
        specials = ((("GetStateDigest", pb.GetStateDigestRequest, _state_digest_handler),
                     ("ListEvents", pb.ListEventsRequest, _list_events_handler),
                     ("CreateKey", pb.CreateKeyRequest, _create_key_handler),
                     ("RevokeKey", pb.RevokeKeyRequest, _revoke_key_handler),
                     ("ListKeys", pb.ListKeysRequest, _list_keys_handler),
                     ("MintUserToken", pb.MintUserTokenRequest, _mint_user_token_handler))
                    if service.endswith("AdminService")
                    else (("Batch", pb.BatchRequest, _batch_handler),
                          ("GetShardMap", pb.GetShardMapRequest, _shard_map_handler)))
        for name, request_type, make in specials:
            table[name] = grpc.unary_unary_rpc_method_handler(
                make(gate, admission), request_deserializer=_safe_parser(request_type),
                response_serializer=lambda message: message.SerializeToString(),
            )
        if service.endswith("QuotaService"):
            hub = watch.WatchHub(gate.open_writer, lambda: gate.serving)
            table["WatchUsage"] = watch.method_handler(
                hub, _watch_caller(gate), _safe_parser(pb.WatchUsageRequest), status_of,
                _REFUSALS, full_method("WatchUsage"),
                lambda metadata, context: caller_of(gate, metadata, context))
        else:
            table["ExportUsage"] = _export_usage_handler(gate)
            from quotad.api import moves
            table.update(moves.method_handlers(gate, admission))
        services[service] = table
    return services
