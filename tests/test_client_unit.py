"""Unit tests of the quotad_client library: its pure parts, and its retry policy over a tiny
scripted gRPC test double of the transport (never the real quotad server: end-to-end tests of
the client against it live elsewhere)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import quotad_client as qc
from quotad_contract.v1 import quotad_pb2, quotad_pb2_grpc
from quotad_client import _convert as cv
from quotad_client import _ops as ops
from server_process import ROOT

UTC = timezone.utc
T0 = datetime(2025, 3, 1, tzinfo=UTC)
T1 = datetime(2025, 4, 1, tzinfo=UTC)

EXAMPLE_PLAN: dict[str, Any] = {
    "id": "pro", "name": "Pro",
    "limit_groups": [
        {"key": "tokens", "label": "Tokens", "unit": "tokens", "quota": 2_000_000,
         "window": "month", "match": {"event_types": ["openai.*"]}},
        {"key": "premium_tokens", "label": "Premium tokens", "unit": "tokens", "quota": 50_000,
         "window": "month", "match": {"metadata": {"model": ["gpt-4o", "gpt-4-turbo"]}}},
    ],
}


def ts(when: datetime) -> Any:
    return cv.to_timestamp(when)


def proto_counter(key: str = "tokens", *, quota: int = 100, used: int = 10, held: int = 5,
                  window: int = quotad_pb2.MONTH, resets: bool = True) -> quotad_pb2.Counter:
    counter = quotad_pb2.Counter(key=key, label=key.title(), unit="tokens", quota=quota,
                                 used=used, held=held, remaining=max(0, quota - used - held),
                                 window=window, window_start=ts(T0))
    if resets:
        counter.resets_at.CopyFrom(ts(T1))
    return counter


def rich_status(code: grpc.StatusCode, message: str, *details: Message) -> status_pb2.Status:
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


# --- plans: dict -> proto --------------------------------------------------------------------

def test_a_plan_dict_converts_to_the_contract_proto() -> None:
    expected = quotad_pb2.Plan(id="pro", name="Pro", limit_groups=[
        quotad_pb2.LimitGroup(key="tokens", label="Tokens", unit="tokens", quota=2_000_000,
                              window=quotad_pb2.MONTH,
                              match=quotad_pb2.Match(event_types=["openai.*"])),
        quotad_pb2.LimitGroup(key="premium_tokens", label="Premium tokens", unit="tokens",
                              quota=50_000, window=quotad_pb2.MONTH, match=quotad_pb2.Match(
                                  metadata=[quotad_pb2.MetadataMatch(
                                      key="model", values=["gpt-4o", "gpt-4-turbo"])])),
    ])
    assert qc.plan_to_proto(EXAMPLE_PLAN) == expected


def test_the_example_plans_toml_entries_convert_as_they_are() -> None:
    plans = tomllib.loads((ROOT / "examples" / "plans.toml").read_text())["plans"]
    converted = [qc.plan_to_proto(plan) for plan in plans]
    assert [p.id for p in converted] == ["free", "pro"]
    assert converted[1] == qc.plan_to_proto(EXAMPLE_PLAN)
    assert converted[0].limit_groups[1].quota == 0


def test_plan_dict_shorthands_windows_and_single_strings() -> None:
    proto = qc.plan_to_proto({"id": "p", "limit_groups": [
        {"key": "a", "quota": 1, "window": "Day", "match": {"event_types": "img.render",
                                                            "metadata": {"size": "hd"}}},
        {"key": "b", "quota": 2, "window": quotad_pb2.LIFETIME},
        {"key": "c", "quota": 3},
    ]})
    a, b, c = proto.limit_groups
    assert a.window == quotad_pb2.DAY and list(a.match.event_types) == ["img.render"]
    assert [(m.key, list(m.values)) for m in a.match.metadata] == [("size", ["hd"])]
    assert b.window == quotad_pb2.LIFETIME and not b.HasField("match")
    assert c.window == quotad_pb2.WINDOW_UNSPECIFIED  # left to the server to reject


@pytest.mark.parametrize("plan, error", [
    ({"id": "p", "nmae": "typo"}, ValueError),
    ({"id": "p", "limit_groups": [{"key": "a", "qouta": 1}]}, ValueError),
    ({"id": "p", "limit_groups": [{"key": "a", "match": {"event_type": ["x"]}}]}, ValueError),
    ({"id": "p", "limit_groups": [{"key": "a", "window": "fortnight"}]}, ValueError),
    ({"id": "p", "limit_groups": [{"key": "a", "window": 99}]}, ValueError),
    ({"id": "p", "limit_groups": [{"key": "a", "quota": "5"}]}, TypeError),
    ({"id": "p", "limit_groups": [{"key": "a", "quota": True}]}, TypeError),
    ({"id": "p", "limit_groups": {"key": "a"}}, TypeError),
    ({"id": "p", "limit_groups": [{"key": "a", "match": {"metadata": ["model"]}}]}, TypeError),
    ({"id": "p", "limit_groups": [{"key": "a", "match": {"event_types": [1]}}]}, TypeError),
    ("free", TypeError),
])
def test_plan_dict_mistakes_are_caught_before_sending(plan: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        qc.plan_to_proto(plan)


def test_plans_round_trip_between_proto_and_dataclass() -> None:
    proto = qc.plan_to_proto(EXAMPLE_PLAN)
    plan = cv.plan_from_proto(proto)
    assert plan.limit_groups[0].window == "month"
    assert plan.limit_groups[1].match.metadata == {"model": ("gpt-4o", "gpt-4-turbo")}
    assert qc.plan_to_proto(plan) == proto
    copy = qc.plan_to_proto(proto)
    copy.name = "changed"
    assert proto.name == "Pro"  # a proto passed in is copied, never modified


# --- responses -> dataclasses ----------------------------------------------------------------

def test_counters_map_to_aware_utc_datetimes_and_window_names() -> None:
    proto = proto_counter()
    proto.window_start.nanos = 123_456_789
    counter = cv.counter_from_proto(proto)
    assert counter == qc.Counter(key="tokens", label="Tokens", unit="tokens", window="month",
                                 quota=100, used=10, held=5, remaining=85,
                                 window_start=T0 + timedelta(microseconds=123_456),
                                 resets_at=T1)
    assert counter.window_start.tzinfo is not None and counter.window_start.utcoffset() == \
        timedelta(0)
    lifetime = cv.counter_from_proto(proto_counter(window=quotad_pb2.LIFETIME, resets=False))
    assert lifetime.window == "lifetime" and lifetime.resets_at is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        counter.used = 0  # type: ignore[misc]


def test_reserve_responses_map_to_reservations() -> None:
    allowed = quotad_pb2.ReserveResponse(allowed=True, reservation_id="r1",
                                         expires_at=ts(T0), counters=[proto_counter()])
    r = cv.reservation_from_proto(allowed, 7)
    assert (r.allowed, r.reservation_id, r.expires_at, r.amount, r.denied_by) == \
        (True, "r1", T0, 7, "")
    assert r.counter("tokens") == cv.counter_from_proto(proto_counter())
    denied = cv.reservation_from_proto(quotad_pb2.ReserveResponse(
        allowed=False, denied_by="premium", counters=[proto_counter("premium", quota=0)]), 5)
    assert (denied.allowed, denied.reservation_id, denied.expires_at) == (False, "", None)
    assert denied.counter("missing") is None


def test_other_responses_map_to_dataclasses() -> None:
    commit = cv.commit_from_proto(quotad_pb2.CommitResponse(
        counters=[proto_counter()], committed=3, returned=4, expired=True))
    assert (commit.committed, commit.returned, commit.expired, len(commit.counters)) == \
        (3, 4, True, 1)
    track = cv.track_from_proto(quotad_pb2.TrackResponse(allowed=False, denied_by="tokens"))
    assert track == qc.TrackResult(allowed=False, counters=(), denied_by="tokens")
    usage = cv.usage_from_proto(quotad_pb2.GetUsageResponse(
        user_id="u1", plan_id="free", counters=[proto_counter(), proto_counter("images")]))
    assert (usage.user_id, usage.plan_id, usage["images"].key) == ("u1", "free", "images")
    with pytest.raises(KeyError):
        usage["nope"]
    sub = cv.upsert_subscription_from_proto(quotad_pb2.UpsertSubscriptionResponse(
        subscription=quotad_pb2.Subscription(user_id="u1", plan_id="pro", time_zone="UTC"),
        changed=True))
    assert sub == qc.UpsertSubscriptionResult(qc.Subscription("u1", "pro", "UTC"), True)
    page = cv.event_page_from_proto(quotad_pb2.ListEventsResponse(events=[quotad_pb2.Event(
        sequence=9, time=ts(T0), kind=quotad_pb2.EVENT_KIND_COMMIT, user_id="u1",
        event_type="openai.chat", amount=12, metadata={"model": "gpt-4o"},
        reservation_id="r1", allowed=True)], next_page_token="next"))
    (event,) = page.events
    assert (event.kind, event.time, event.metadata, page.next_page_token) == \
        ("commit", T0, {"model": "gpt-4o"}, "next")


def test_ttl_conversion() -> None:
    assert cv.to_duration(1.5).seconds == 1 and cv.to_duration(1.5).nanos == 500_000_000
    assert cv.to_duration(timedelta(minutes=2)).seconds == 120
    with pytest.raises(TypeError):
        cv.to_duration(True)
    with pytest.raises(ValueError):
        cv.to_timestamp(datetime(2025, 1, 1))  # naive


# --- errors ----------------------------------------------------------------------------------

def test_invalid_argument_carries_the_field_violations() -> None:
    status = rich_status(grpc.StatusCode.INVALID_ARGUMENT, "bad request",
                         error_details_pb2.BadRequest(field_violations=[
                             error_details_pb2.BadRequest.FieldViolation(
                                 field="user_id", description="must be 1 to 256 bytes, got 0"),
                             error_details_pb2.BadRequest.FieldViolation(
                                 field="amount", description="must be 1 to 2^53")]))
    error = qc.error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "bad request", status)
    assert isinstance(error, qc.InvalidArgument) and isinstance(error, qc.QuotadError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.message == "bad request"
    assert error.field_violations == [("user_id", "must be 1 to 256 bytes, got 0"),
                                      ("amount", "must be 1 to 2^53")]


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.FAILED_PRECONDITION, qc.FailedPrecondition),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, qc.ResourceExhausted),
])
def test_error_info_reason_is_parsed(code: grpc.StatusCode, cls: type[Any]) -> None:
    status = rich_status(code, "no", error_details_pb2.ErrorInfo(reason="NO_PLAN",
                                                                 domain="quotad"))
    error = qc.error_from_status(code, "no", status)
    assert type(error) is cls and error.reason == "NO_PLAN"
    bare = qc.error_from_status(code, "message too large")  # gRPC's own, no details
    assert type(bare) is cls and bare.reason == ""


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.NOT_FOUND, qc.NotFound),
    (grpc.StatusCode.ALREADY_EXISTS, qc.AlreadyExists),
    (grpc.StatusCode.PERMISSION_DENIED, qc.PermissionDenied),
    (grpc.StatusCode.UNAUTHENTICATED, qc.Unauthenticated),
    (grpc.StatusCode.UNAVAILABLE, qc.Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, qc.DeadlineExceeded),
    (grpc.StatusCode.INTERNAL, qc.QuotadError),
])
def test_each_code_maps_to_its_exception(code: grpc.StatusCode, cls: type[Any]) -> None:
    error = qc.error_from_status(code, "text")
    assert type(error) is cls and error.code == code and str(error) == f"{code.name}: text"


class _FailedCall(grpc.RpcError):
    """A failed call as grpc raises it: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self._code, self._details, self._trailing = code, details, trailing_metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


def test_rpc_errors_are_mapped_through_their_rich_status() -> None:
    status = rpc_status.to_status(rich_status(
        grpc.StatusCode.FAILED_PRECONDITION, "hold was released",
        error_details_pb2.ErrorInfo(reason="RESERVATION_RELEASED", domain="quotad")))
    error = qc.error_from_rpc_error(
        _FailedCall(status.code, status.details, status.trailing_metadata))
    assert isinstance(error, qc.FailedPrecondition)
    assert (error.reason, error.message) == ("RESERVATION_RELEASED", "hold was released")
    # Details that contradict the call's own status are ignored, not trusted.
    error = qc.error_from_rpc_error(
        _FailedCall(grpc.StatusCode.NOT_FOUND, "x", status.trailing_metadata))
    assert type(error) is qc.NotFound and error.message == "x"
    error = qc.error_from_rpc_error(_FailedCall(grpc.StatusCode.UNAVAILABLE, "down", None))
    assert type(error) is qc.Unavailable


def test_quota_exceeded_is_a_denial_not_a_failed_call() -> None:
    denied = cv.reservation_from_proto(quotad_pb2.ReserveResponse(
        allowed=False, denied_by="premium",
        counters=[proto_counter("tokens"), proto_counter("premium", quota=0, used=0, held=0)]),
        2000)
    with pytest.raises(qc.QuotaExceeded) as caught:
        ops.check_denial(denied, user_id="u1", event_type="openai.chat", amount=2000,
                         raise_on_deny=True)
    exc = caught.value
    assert not isinstance(exc, qc.QuotadError)
    assert (exc.denied_by, exc.remaining, exc.resets_at, exc.amount) == ("premium", 0, T1, 2000)
    assert exc.counters == denied.counters and exc.result is denied
    assert "premium" in str(exc)
    assert ops.check_denial(denied, user_id="u1", event_type="e", amount=1,
                            raise_on_deny=False) is denied


# --- retry policy and idempotency keys -------------------------------------------------------

def test_backoff_grows_exponentially_is_capped_and_jittered() -> None:
    policy = qc.RetryPolicy(retries=10, initial_backoff_s=0.1, max_backoff_s=1.0, jitter=0.5,
                            rng=random.Random(7))
    for retry, base in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        wait = policy.backoff(retry)
        assert base * 0.5 <= wait <= base
    waits = {qc.RetryPolicy(rng=random.Random(seed)).backoff(0) for seed in range(5)}
    assert len(waits) > 1  # jitter: clients do not retry in lockstep


def test_only_unavailable_is_retried_and_only_within_bounds() -> None:
    policy = qc.RetryPolicy(retries=2, initial_backoff_s=0.1, jitter=0.0)
    far = time.monotonic() + 100
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert policy.next_wait(retry=0, code=unavailable, retryable=True, deadline=far) == 0.1
    assert policy.next_wait(retry=1, code=unavailable, retryable=True, deadline=far) == 0.2
    assert policy.next_wait(retry=2, code=unavailable, retryable=True, deadline=far) is None
    assert policy.next_wait(retry=0, code=unavailable, retryable=False, deadline=far) is None
    for code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED):
        assert policy.next_wait(retry=0, code=code, retryable=True, deadline=far) is None
    now = time.monotonic()
    assert policy.next_wait(retry=0, code=unavailable, retryable=True, deadline=now + 0.05,
                            now=now) is None  # the wait would overrun the call's deadline
    with pytest.raises(ValueError):
        qc.RetryPolicy(retries=-1)


def test_mutations_get_one_key_before_the_first_attempt() -> None:
    mutations: list[ops.Op[Any]] = [
        ops.reserve("u", "e", 1, None, None, None, True),
        ops.commit("r", None, None, True),
        ops.release("r", None, True),
        ops.extend("r", 5, None, True),
        ops.track("u", "e", 1, None, False, None, True),
    ]
    keys = [op.request.idempotency_key for op in mutations]  # type: ignore[attr-defined]
    assert all(op.retryable for op in mutations)
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys) and len(set(keys)) == len(keys)
    given = ops.commit("r", 0, "order-17", True)
    assert given.request.idempotency_key == "order-17" and given.retryable  # type: ignore
    assert given.request.HasField("amount")
    bare = ops.reserve("u", "e", 1, None, None, None, False)
    assert bare.request.idempotency_key == "" and not bare.retryable  # type: ignore
    assert ops.usage("u").retryable and ops.get_plan("p").retryable
    assert ops.upsert_plan(EXAMPLE_PLAN).retryable  # idempotent by nature
    assert not ops.delete_plan("p").retryable  # no key, not idempotent in its answer
    assert not ops.commit("r", None, None, True).request.HasField("amount")



def test_operations_encoded_one_by_one_join_into_the_batch_request_they_stand_for() -> None:
    """The coalescer frames each operation itself and sends the concatenation as it is."""
    from quotad_client._coalesce import encode_operation

    long_metadata = {f"k{i}": "v" * 200 for i in range(16)}  # lengths of two and three bytes
    calls: list[tuple[str, Message]] = [
        ("Reserve", ops.reserve("u", "e", 7, {"model": "m"}, 30, None, True).request),
        ("Commit", ops.commit("rsv_1", 3, None, True).request),
        ("Release", ops.release("rsv_2", "k", True).request),
        ("Extend", ops.extend("rsv_3", 5, None, True).request),
        ("Track", ops.track("u", "e", -4, long_metadata, True, None, True).request),
        ("GetUsage", ops.usage("u").request),
        ("Track", ops.track("u" * 100, "e", 1, None, False, None, False).request),
        ("GetUsage", quotad_pb2.GetUsageRequest()),  # empty
    ]
    encoded = b"".join(encode_operation(method, request) for method, request in calls)
    expected = quotad_pb2.BatchRequest(operations=[
        quotad_pb2.BatchOperation(**{field: request}) for field, (_, request) in zip(
            ["reserve", "commit", "release", "extend", "track", "get_usage", "track",
             "get_usage"], calls)])
    assert quotad_pb2.BatchRequest.FromString(encoded) == expected
    assert len(encoded) == expected.ByteSize()

# --- the retry loop over a scripted test double of the transport -----------------------------

@dataclass
class Delay:
    seconds: float
    then: Message


class Scripted(quotad_pb2_grpc.QuotaServiceServicer, quotad_pb2_grpc.AdminServiceServicer):
    """Answers each RPC from a script: a list of responses, grpc.Status errors or Delays (the
    last entry repeats). Records every request and its metadata."""

    def __init__(self) -> None:
        self.script: dict[str, list[Any]] = {}
        self.requests: dict[str, list[Any]] = defaultdict(list)
        self.metadata: dict[str, list[dict[str, Any]]] = defaultdict(list)

    async def answer(self, name: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.requests[name].append(request)
        self.metadata[name].append(dict(context.invocation_metadata() or ()))
        steps = self.script[name]
        outcome = steps.pop(0) if len(steps) > 1 else steps[0]
        if isinstance(outcome, Delay):
            await asyncio.sleep(outcome.seconds)
            outcome = outcome.then
        if isinstance(outcome, grpc.Status):
            await context.abort(outcome.code, outcome.details, outcome.trailing_metadata)
        return outcome


def _rpc(name: str) -> Any:
    async def handler(self: Scripted, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.answer(name, request, context)
    return handler


for _name in ("Reserve", "Commit", "Release", "Extend", "Track", "GetUsage", "UpsertPlan",
              "DeletePlan", "Batch"):
    setattr(Scripted, _name, _rpc(_name))


class DoubleServer:
    """A grpc.aio server on 127.0.0.1, port 0, running its own loop in a thread."""

    def __init__(self) -> None:
        self.servicer = Scripted()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        quotad_pb2_grpc.add_QuotaServiceServicer_to_server(self.servicer, self.server)
        quotad_pb2_grpc.add_AdminServiceServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def double() -> Iterator[DoubleServer]:
    server = DoubleServer()
    try:
        yield server
    finally:
        server.close()


def unavailable(message: str = "starting") -> grpc.Status:
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message))


FAST = qc.RetryPolicy(retries=3, initial_backoff_s=0.01, max_backoff_s=0.05)
RESERVED = quotad_pb2.ReserveResponse(allowed=True, reservation_id="r1", expires_at=ts(T1),
                                      counters=[proto_counter()])


def test_async_reserve_retries_unavailable_with_one_generated_key(double: DoubleServer) -> None:
    double.servicer.script["Reserve"] = [unavailable(), unavailable(), RESERVED,
                                         unavailable(), RESERVED]
    double.servicer.script["Commit"] = [unavailable(), quotad_pb2.CommitResponse(committed=1200)]

    async def scenario() -> tuple[qc.AsyncHold, qc.AsyncHold]:
        async with qc.AsyncQuotaClient(double.target, retry_policy=FAST, coalesce=False) as client:
            awaited = await client.reserve("u1", "openai.chat", 2000,
                                           metadata={"model": "gpt-4o"}, ttl_s=30)
            async with client.reserve("u1", "openai.chat", 2000) as entered:
                entered.actual = 1200
            return awaited, entered

    hold, entered = asyncio.run(scenario())
    assert isinstance(hold, qc.AsyncHold) and hold.reservation_id == "r1"
    assert hold.expires_at == T1 and hold.counters[0].remaining == 85
    requests = double.servicer.requests["Reserve"]
    assert len(requests) == 5
    first, second = {r.idempotency_key for r in requests[:3]}, {r.idempotency_key for r in
                                                                 requests[3:]}
    assert len(first) == 1 and len(second) == 1 and first != second
    assert len(next(iter(first))) == 32
    assert requests[0].ttl.seconds == 30 and dict(requests[0].metadata) == {"model": "gpt-4o"}
    commits = double.servicer.requests["Commit"]
    assert [(c.reservation_id, c.amount) for c in commits] == [("r1", 1200)] * 2
    assert len({c.idempotency_key for c in commits}) == 1
    assert entered.commit_result is not None and entered.commit_result.committed == 1200


def test_sync_commit_retries_with_one_generated_key_and_keeps_a_given_one(
        double: DoubleServer) -> None:
    double.servicer.script["Commit"] = [unavailable(), unavailable(),
                                        quotad_pb2.CommitResponse(committed=900, returned=1100)]
    double.servicer.script["Track"] = [unavailable(), quotad_pb2.TrackResponse(allowed=True)]
    with qc.QuotaClient(double.target, retry_policy=FAST) as client:
        result = client.commit("r1", 900)
        assert (result.committed, result.returned) == (900, 1100)
        assert client.track("u1", "img.render", 1, idempotency_key="render-7").allowed
    commits = double.servicer.requests["Commit"]
    assert len(commits) == 3 and len({c.idempotency_key for c in commits}) == 1
    assert commits[0].idempotency_key and commits[0].amount == 900
    assert [t.idempotency_key for t in double.servicer.requests["Track"]] == ["render-7"] * 2


def test_other_errors_are_not_retried_and_keep_their_details(double: DoubleServer) -> None:
    released = rich_status(grpc.StatusCode.FAILED_PRECONDITION, "hold was released",
                           error_details_pb2.ErrorInfo(reason="RESERVATION_RELEASED",
                                                       domain="quotad"))
    invalid = rich_status(grpc.StatusCode.INVALID_ARGUMENT, "bad", error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(
            field="ttl", description="must be 1 s to 1 h")]))
    double.servicer.script["Commit"] = [rpc_status.to_status(released)]
    double.servicer.script["Extend"] = [rpc_status.to_status(invalid)]
    with qc.QuotaClient(double.target, retry_policy=FAST) as client:
        with pytest.raises(qc.FailedPrecondition) as caught:
            client.commit("r1")
    assert caught.value.reason == "RESERVATION_RELEASED"
    assert len(double.servicer.requests["Commit"]) == 1

    async def scenario() -> None:
        async with qc.AsyncQuotaClient(double.target, retry_policy=FAST, coalesce=False) as client:
            await client.extend("r1", 7200)

    with pytest.raises(qc.InvalidArgument) as invalid_caught:
        asyncio.run(scenario())
    assert invalid_caught.value.field_violations == [("ttl", "must be 1 s to 1 h")]
    assert len(double.servicer.requests["Extend"]) == 1


def test_retries_are_bounded(double: DoubleServer) -> None:
    double.servicer.script["Release"] = [unavailable("draining")]
    policy = qc.RetryPolicy(retries=2, initial_backoff_s=0.01)
    with qc.QuotaClient(double.target, retry_policy=policy) as client:
        with pytest.raises(qc.Unavailable) as caught:
            client.release("r1")
    assert caught.value.message == "draining"
    assert len(double.servicer.requests["Release"]) == 3


def test_without_auto_keys_unkeyed_mutations_are_not_retried_but_reads_are(
        double: DoubleServer) -> None:
    double.servicer.script["Reserve"] = [unavailable(), RESERVED]
    double.servicer.script["GetUsage"] = [unavailable(), quotad_pb2.GetUsageResponse(
        user_id="u1", plan_id="free")]
    double.servicer.script["DeletePlan"] = [unavailable(), quotad_pb2.DeletePlanResponse()]
    double.servicer.script["UpsertPlan"] = [unavailable(), quotad_pb2.UpsertPlanResponse(
        plan=qc.plan_to_proto(EXAMPLE_PLAN), changed=True)]
    with qc.QuotaClient(double.target, retry_policy=FAST, auto_idempotency_keys=False) as client:
        with pytest.raises(qc.Unavailable):
            client.reserve("u1", "openai.chat", 1)
        assert client.usage("u1").plan_id == "free"
        with pytest.raises(qc.Unavailable):
            client.delete_plan("pro")
        upserted = client.upsert_plan(EXAMPLE_PLAN)
    assert upserted.changed and upserted.plan == cv.plan_from_proto(qc.plan_to_proto(EXAMPLE_PLAN))
    requests = double.servicer.requests
    assert [r.idempotency_key for r in requests["Reserve"]] == [""]
    assert (len(requests["GetUsage"]), len(requests["DeletePlan"]),
            len(requests["UpsertPlan"])) == (2, 1, 2)


def test_api_key_travels_as_bearer_metadata(double: DoubleServer) -> None:
    double.servicer.script["GetUsage"] = [quotad_pb2.GetUsageResponse(user_id="u1")]
    with qc.QuotaClient(double.target, api_key="sk_test") as client:
        client.usage("u1")
    with qc.QuotaClient(double.target) as client:
        client.usage("u1")
    first, second = double.servicer.metadata["GetUsage"]
    assert first["authorization"] == "Bearer sk_test"
    assert "authorization" not in second


def test_every_call_has_a_deadline(double: DoubleServer) -> None:
    double.servicer.script["GetUsage"] = [Delay(2.0, quotad_pb2.GetUsageResponse())]
    with qc.QuotaClient(double.target, timeout_s=30) as client:
        started = time.monotonic()
        with pytest.raises(qc.DeadlineExceeded):
            client.usage("u1", timeout_s=0.2)
        assert time.monotonic() - started < 1.5

    async def scenario() -> None:
        async with qc.AsyncQuotaClient(double.target, timeout_s=0.2, coalesce=False) as client:
            await client.usage("u1")

    with pytest.raises(qc.DeadlineExceeded):
        asyncio.run(scenario())



BATCH_DELAY_S = 3.0
"""How long the double takes to answer a Batch in the deadline tests below: a call with a
0.1 s deadline must fail long before that."""
BEFORE_THE_BATCH_ENDS_S = 2.0
"""What such a call may take at most, the machine's load included: still a second before the
Batch's answer, so a call that failed only with its Batch fails the test."""


def _usage_results(count: int) -> quotad_pb2.BatchResponse:
    return quotad_pb2.BatchResponse(results=[
        quotad_pb2.BatchResult(get_usage=quotad_pb2.GetUsageResponse(user_id="u"))] * count)


def test_a_coalesced_call_fails_alone_at_its_own_deadline(double: DoubleServer) -> None:
    """In flight: the others in its batch get their answers when the batch ends."""
    double.servicer.script["Batch"] = [Delay(BATCH_DELAY_S, _usage_results(3))]

    async def scenario() -> list[Any]:
        async with qc.AsyncQuotaClient(double.target, timeout_s=30) as client:
            started = time.monotonic()
            short = asyncio.ensure_future(client.usage("a", timeout_s=0.1))
            others = asyncio.gather(client.usage("b"), client.usage("c"))
            with pytest.raises(qc.DeadlineExceeded, match="deadline exceeded in a batch"):
                await short
            assert time.monotonic() - started < BEFORE_THE_BATCH_ENDS_S
            return list(await others)

    assert [usage.user_id for usage in asyncio.run(scenario())] == ["u", "u"]
    assert len(double.servicer.requests["Batch"]) == 1


def test_a_queued_call_fails_at_its_deadline_while_batches_are_in_flight(
        double: DoubleServer) -> None:
    double.servicer.script["Batch"] = [Delay(BATCH_DELAY_S, _usage_results(1))]

    async def scenario() -> list[Any]:
        async with qc.AsyncQuotaClient(double.target, timeout_s=30) as client:
            first = asyncio.ensure_future(client.usage("a"))
            await asyncio.sleep(0.05)  # a batch of its own
            second = asyncio.ensure_future(client.usage("b"))
            await asyncio.sleep(0.05)  # as many batches in flight as may be: "c" waits
            started = time.monotonic()
            with pytest.raises(qc.DeadlineExceeded):
                await client.usage("c", timeout_s=0.1)
            assert time.monotonic() - started < BEFORE_THE_BATCH_ENDS_S
            return [await first, await second]

    assert len(asyncio.run(scenario())) == 2


def test_cancelling_one_coalesced_call_leaves_the_others_of_its_batch(
        double: DoubleServer) -> None:
    double.servicer.script["Batch"] = [Delay(0.2, _usage_results(3))]

    async def scenario() -> list[Any]:
        async with qc.AsyncQuotaClient(double.target, timeout_s=30) as client:
            calls = [asyncio.ensure_future(client.usage(user)) for user in "abc"]
            await asyncio.sleep(0.05)
            calls[1].cancel()
            return await asyncio.gather(*calls, return_exceptions=True)

    first, second, third = asyncio.run(scenario())
    assert isinstance(second, asyncio.CancelledError)
    assert first.user_id == third.user_id == "u"

def test_client_settings_defaults_and_overrides() -> None:
    from quotad_client._config import ClientConfig, merged_channel_options

    options = dict(merged_channel_options([("grpc.max_reconnect_backoff_ms", 5)]))
    assert options["grpc.max_reconnect_backoff_ms"] == 5  # the caller's value wins
    assert options["grpc.initial_reconnect_backoff_ms"] == 100
    config = ClientConfig.make(api_key="sk_1", timeout_s=2, retries=1, retry_policy=None,
                               auto_idempotency_keys=True,
                               metadata=[("Authorization", "old"), ("x-trace", "t")])
    assert config.metadata == (("authorization", "Bearer sk_1"), ("x-trace", "t"))
    assert config.policy.retries == 1 and config.budget(None) == 2 and config.budget(0.5) == 0.5
    with pytest.raises(ValueError):
        config.budget(0)
