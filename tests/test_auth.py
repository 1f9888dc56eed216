"""Apps, API keys, user tokens and TLS, against real quotad processes.

One server with an admin key (from the environment) serves the permission table: every RPC of
both services, called by every kind of caller, answers exactly the expected code.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import quotad_client as qc
from quotad.core.machine import Core
from quotad.core import commands as c
from quotad.storage.codec import state_digest
from quotad.core import limits
from quotad.api.auth import Authenticator
from quotad.core.errors import (
    InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated,
)
from quotad.server import Config
from quotad.storage.snapshot import core_from_snapshot, snapshot_of
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc
from quotad_client._token import sign_user_token
from server_process import ROOT, ServerProcess

ADMIN_KEY = secrets.token_hex(24)
APP_A, APP_B = "app-a", "app-b"
CALL_TIMEOUT_S = 10.0
SUBPROCESS_TIMEOUT_S = 30.0
OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
NO_PLAN = grpc.StatusCode.FAILED_PRECONDITION
INVALID = grpc.StatusCode.INVALID_ARGUMENT

PLAN_A = pb.Plan(id="plan-a", name="A", limit_groups=[pb.LimitGroup(
    key="tokens", label="Tokens", unit="tokens", quota=10**9, window=pb.DAY), pb.LimitGroup(
    key="credits", kind=pb.LIMIT_KIND_BALANCE, window=pb.LIFETIME,
    match=pb.Match(event_types=["credit.*"]))])


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Keyed:
    """The module's keyed server, its apps' keys, and a way to call any RPC."""

    process: ServerProcess
    channel: grpc.Channel
    keys: dict[str, str] = field(default_factory=dict)
    """Whole keys by name: sk_a, pk_a, sk_b, pk_b, revoked."""

    def call(self, rpc: str, request: Any, metadata: Any = ()) -> tuple[grpc.StatusCode, Any]:
        service = "quota" if rpc in QUOTA_RPCS else "admin"
        stub = (quotad_pb2_grpc.QuotaServiceStub if service == "quota"
                else quotad_pb2_grpc.AdminServiceStub)(self.channel)
        try:
            if rpc in ("WatchUsage", "ExportUsage", "ExportSlots"):  # a stream: its first
                # message, or its refusal
                stream = getattr(stub, rpc)(request, metadata=tuple(metadata),
                                            timeout=CALL_TIMEOUT_S)
                first = next(stream)
                stream.cancel()
                return OK, first
            return OK, getattr(stub, rpc)(request, metadata=tuple(metadata),
                                          timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            return error.code(), error

    def ok(self, rpc: str, request: Any, key: str) -> Any:
        code, response = self.call(rpc, request, bearer(self.keys[key]))
        assert code == OK, (rpc, response)
        return response

    def create_key(self, app: str, kind: int, name: str = "") -> pb.CreateKeyResponse:
        return self.ok("CreateKey", pb.CreateKeyRequest(app=app, kind=kind, name=name), "admin")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    process = ServerProcess(tmp_path_factory.mktemp("keyed") / "data",
                            env={"QUOTAD_ADMIN_KEY": ADMIN_KEY})
    process.start()
    channel = grpc.insecure_channel(process.address)
    try:
        env = Keyed(process, channel, keys={"admin": ADMIN_KEY})
        for app, suffix in ((APP_A, "a"), (APP_B, "b")):
            env.keys[f"sk_{suffix}"] = env.create_key(app, pb.KEY_KIND_SECRET, "backend").secret
            env.keys[f"pk_{suffix}"] = env.create_key(app, pb.KEY_KIND_PUBLIC, "browser").secret
        revoked = env.create_key(APP_A, pb.KEY_KIND_SECRET, "old")
        env.ok("RevokeKey", pb.RevokeKeyRequest(key_id=revoked.key.key_id), "admin")
        env.keys["revoked"] = revoked.secret
        env.ok("UpsertPlan", pb.UpsertPlanRequest(plan=PLAN_A), "sk_a")
        for user in ("ann", "bob"):
            env.ok("UpsertSubscription", pb.UpsertSubscriptionRequest(
                user_id=user, plan_id="plan-a"), "sk_a")
        yield env
    finally:
        channel.close()
        process.close()


# --- the permission table ---------------------------------------------------------------------

QUOTA_RPCS = ("Reserve", "Commit", "Release", "Extend", "Track", "GetUsage", "Batch",
              "WatchUsage", "GrantCredits", "ListGrants", "GetShardMap")
ADMIN_RPCS = ("UpsertPlan", "GetPlan", "ListPlans", "DeletePlan", "UpsertSubscription",
              "GetSubscription", "ListSubscriptions", "ListEvents", "GetStateDigest",
              "CreateKey", "RevokeKey", "ListKeys", "MintUserToken", "ExportUsage")
CALLERS = ("no key", "invalid key", "revoked key", "admin", "sk own app", "sk other app",
           "pk own user token", "pk other user's token", "pk other app's token",
           "pk without token", "pk expired token")


def caller_metadata(env: Keyed, caller: str) -> tuple[tuple[str, str], ...]:
    now_s = int(time.time())
    token = {
        "pk own user token": sign_user_token(env.keys["sk_a"], APP_A, "ann", now_s + 600),
        "pk other user's token": sign_user_token(env.keys["sk_a"], APP_A, "bob", now_s + 600),
        "pk other app's token": sign_user_token(env.keys["sk_b"], APP_B, "ann", now_s + 600),
        "pk expired token": sign_user_token(env.keys["sk_a"], APP_A, "ann", now_s - 5),
    }.get(caller)
    key = {
        "no key": None, "invalid key": f"sk_{'a' * 12}_{secrets.token_urlsafe(32)}",
        "revoked key": env.keys["revoked"], "admin": ADMIN_KEY, "sk own app": env.keys["sk_a"],
        "sk other app": env.keys["sk_b"],
    }.get(caller, env.keys["pk_a"])
    metadata = bearer(key) if key else ()
    return metadata + ((("x-quotad-user-token", token),) if token else ())


def fresh_reservation(env: Keyed) -> str:
    return env.ok("Reserve", pb.ReserveRequest(user_id="ann", event_type="chat", amount=1),
                  "sk_a").reservation_id


def request_for(env: Keyed, rpc: str) -> Any:
    """A request every caller allowed to make gets OK for, aimed at app A's data (made fresh
    when the call consumes it)."""
    ttl = duration_pb2.Duration(seconds=60)
    if rpc in ("Commit", "Release", "Extend"):
        reservation_id = fresh_reservation(env)
        return {"Commit": pb.CommitRequest(reservation_id=reservation_id),
                "Release": pb.ReleaseRequest(reservation_id=reservation_id),
                "Extend": pb.ExtendRequest(reservation_id=reservation_id, ttl=ttl)}[rpc]
    if rpc == "DeletePlan":
        scratch = pb.Plan(id=f"scratch-{secrets.token_hex(4)}", name="scratch")
        env.ok("UpsertPlan", pb.UpsertPlanRequest(plan=scratch), "sk_a")
        return pb.DeletePlanRequest(id=scratch.id)
    if rpc == "RevokeKey":
        return pb.RevokeKeyRequest(key_id=env.create_key(APP_A, pb.KEY_KIND_PUBLIC).key.key_id)
    return {
        "Reserve": pb.ReserveRequest(user_id="ann", event_type="chat", amount=1, ttl=ttl),
        "Track": pb.TrackRequest(user_id="ann", event_type="chat", amount=1),
        "GetUsage": pb.GetUsageRequest(user_id="ann"),
        "WatchUsage": pb.WatchUsageRequest(user_id="ann"),
        "GrantCredits": pb.GrantCreditsRequest(user_id="ann", group_key="credits", amount=1),
        "ListGrants": pb.ListGrantsRequest(user_id="ann"),
        "Batch": pb.BatchRequest(operations=[pb.BatchOperation(
            get_usage=pb.GetUsageRequest(user_id="ann"))]),
        "UpsertPlan": pb.UpsertPlanRequest(plan=pb.Plan(id="any-plan", name="any")),
        "GetPlan": pb.GetPlanRequest(id="plan-a"),
        "ListPlans": pb.ListPlansRequest(),
        "UpsertSubscription": pb.UpsertSubscriptionRequest(user_id="carl", plan_id="plan-a"),
        "GetSubscription": pb.GetSubscriptionRequest(user_id="ann"),
        "ListSubscriptions": pb.ListSubscriptionsRequest(plan_id="plan-a"),
        "ExportUsage": pb.ExportUsageRequest(app=APP_A),
        "ListEvents": pb.ListEventsRequest(user_id="ann"),
        "GetStateDigest": pb.GetStateDigestRequest(),
        "GetShardMap": pb.GetShardMapRequest(),
        "CreateKey": pb.CreateKeyRequest(app=APP_A, kind=pb.KEY_KIND_PUBLIC, name="t"),
        "ListKeys": pb.ListKeysRequest(app=APP_A),
        "MintUserToken": pb.MintUserTokenRequest(user_id="ann"),
    }[rpc]


SK_OTHER_APP = {
    # An sk key of app B acts in app B: A's users, plans and subscriptions do not exist there,
    # A's reservations and keys are refused outright.
    "Reserve": NO_PLAN, "Commit": DENIED, "Release": DENIED, "Extend": DENIED,
    "Track": NO_PLAN, "GetUsage": NO_PLAN, "WatchUsage": NO_PLAN, "Batch": OK, "UpsertPlan": OK, "GetPlan": NOT_FOUND,
    "GrantCredits": NO_PLAN, "ListGrants": NO_PLAN,
    "ListPlans": OK, "DeletePlan": NOT_FOUND, "UpsertSubscription": NOT_FOUND,
    "GetSubscription": NOT_FOUND, "ListSubscriptions": OK, "ExportUsage": DENIED,
    "ListEvents": OK, "GetStateDigest": DENIED, "CreateKey": DENIED,
    "RevokeKey": DENIED, "ListKeys": DENIED, "MintUserToken": OK,
}
PK_USAGE_READ = {"pk own user token": OK, "pk other user's token": DENIED,
                 "pk other app's token": DENIED, "pk without token": UNAUTHENTICATED,
                 "pk expired token": UNAUTHENTICATED}


def expected_code(rpc: str, caller: str) -> grpc.StatusCode:
    if caller in ("no key", "invalid key", "revoked key"):
        return UNAUTHENTICATED
    if rpc == "GetShardMap":  # every valid key may ask where users are
        return OK
    if caller == "admin":
        return OK if rpc in ("CreateKey", "RevokeKey", "ListKeys", "GetStateDigest",
                             "ExportUsage") else DENIED
    if caller == "sk own app":
        return DENIED if rpc == "GetStateDigest" else OK  # the digest covers every app
    if caller == "sk other app":
        return SK_OTHER_APP[rpc]
    return PK_USAGE_READ[caller] if rpc in ("GetUsage", "WatchUsage", "ListGrants") else DENIED


MOVE_RPCS = ("FreezeSlots", "ExportSlots", "AdoptSlots", "ForgetSlots", "ThawSlots")


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("rpc", MOVE_RPCS)
def test_only_the_admin_key_moves_slots_since_a_move_covers_every_apps_users(
        keyed: Keyed, rpc: str, caller: str) -> None:
    """Past the keys, a server alone has no slots to move: INVALID_ARGUMENT, nothing done."""
    request = getattr(pb, f"{rpc}Request")(slots="0")
    code, error = keyed.call(rpc, request, caller_metadata(keyed, caller))
    if caller in ("no key", "invalid key", "revoked key"):
        assert code == UNAUTHENTICATED
    elif caller == "admin":
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a shard" in error.details()
    else:
        assert code == DENIED and "admin key" in error.details(), (rpc, caller)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("rpc", QUOTA_RPCS + ADMIN_RPCS)
def test_every_rpc_answers_each_kind_of_caller_as_the_permission_table_says(
        keyed: Keyed, rpc: str, caller: str) -> None:
    code, _ = keyed.call(rpc, request_for(keyed, rpc), caller_metadata(keyed, caller))
    assert code == expected_code(rpc, caller)


def test_a_refused_call_of_another_app_changes_nothing(keyed: Keyed) -> None:
    reservation_id = fresh_reservation(keyed)
    for rpc, request in (("Commit", pb.CommitRequest(reservation_id=reservation_id)),
                         ("Release", pb.ReleaseRequest(reservation_id=reservation_id))):
        assert keyed.call(rpc, request, bearer(keyed.keys["sk_b"]))[0] == DENIED
    committed = keyed.ok("Commit", pb.CommitRequest(reservation_id=reservation_id), "sk_a")
    assert committed.committed == 1 and not committed.expired  # still live, untouched


def test_the_state_digest_covers_every_app_so_only_the_admin_key_reads_it(keyed: Keyed) -> None:
    """Two apps' sk_ keys would get the same digest and sequence: each would see the whole
    server's activity. The admin key's digest moves with either app's change; theirs is refused."""
    before = keyed.ok("GetStateDigest", pb.GetStateDigestRequest(), "admin")
    for key in ("sk_a", "sk_b", "pk_a"):
        code, error = keyed.call("GetStateDigest", pb.GetStateDigestRequest(),
                                 bearer(keyed.keys[key]))
        assert code == DENIED and "admin key" in error.details(), key
    keyed.ok("Track", pb.TrackRequest(user_id="ann", event_type="chat", amount=1), "sk_a")
    after = keyed.ok("GetStateDigest", pb.GetStateDigestRequest(), "admin")
    assert after.sequence > before.sequence and after.digest != before.digest


def test_malformed_credentials_are_unauthenticated(keyed: Keyed) -> None:
    usage = pb.GetUsageRequest(user_id="ann")
    pk = bearer(keyed.keys["pk_a"])
    token = sign_user_token(keyed.keys["sk_a"], APP_A, "ann", int(time.time()) + 600)
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for metadata in [(("authorization", "Basic abc"),), (("authorization", "Bearer"),),
                     bearer("sk_short"), bearer(keyed.keys["sk_a"][:-1]),
                     bearer(keyed.keys["sk_a"].replace("sk_", "pk_", 1)),
                     pk + (("x-quotad-user-token", "garbage"),),
                     pk + (("x-quotad-user-token", tampered),),
                     pk + (("x-quotad-user-token", "ut1." + "x" * 3000),)]:
        assert keyed.call("GetUsage", usage, metadata)[0] == UNAUTHENTICATED, metadata


def test_a_token_naming_another_app_than_its_signing_key_is_refused(keyed: Keyed) -> None:
    forged = sign_user_token(keyed.keys["sk_b"], APP_A, "ann", int(time.time()) + 600)
    metadata = bearer(keyed.keys["pk_a"]) + (("x-quotad-user-token", forged),)
    assert keyed.call("GetUsage", pb.GetUsageRequest(user_id="ann"), metadata)[0] == (
        UNAUTHENTICATED)


# --- a watch lasts only as long as its credentials ---------------------------------------------

WATCH_END_S_MAX = 1.0
"""A watch whose key is revoked, or whose token expires, ends within this long."""


def open_watch(env: Keyed, metadata: Any, user_id: str = "ann",
               timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """A WatchUsage stream past its first (initial) message."""
    stream = quotad_pb2_grpc.QuotaServiceStub(env.channel).WatchUsage(
        pb.WatchUsageRequest(user_id=user_id), metadata=tuple(metadata), timeout=timeout_s)
    assert next(stream).reason == pb.WATCH_REASON_INITIAL
    return stream


def refused_watch(env: Keyed, metadata: Any, user_id: str) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata of a watch refused RESOURCE_EXHAUSTED."""
    stream = quotad_pb2_grpc.QuotaServiceStub(env.channel).WatchUsage(
        pb.WatchUsageRequest(user_id=user_id), metadata=tuple(metadata), timeout=CALL_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as refusal:
        next(stream)
    assert refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.value
    info = error_details_pb2.ErrorInfo()
    [detail] = rpc_status.from_call(refusal.value).details
    detail.Unpack(info)
    return info.reason, dict(info.metadata)


WATCH_CAP_TEST_TIMEOUT_S = 120.0
"""The cap test holds its watches open this long at most (it opens over a hundred)."""


def test_one_browser_key_cannot_take_every_watch_and_the_refusal_names_the_cap(
        keyed: Keyed) -> None:
    """One end user with a valid token on a browser-shipped pk_ key opened 1,024 watches, and
    every other app was refused. Now a user gets WATCHERS_PER_USER_MAX, a key
    WATCHERS_PER_KEY_MAX; the app's other keys and other apps keep watching."""
    browser = keyed.create_key(APP_A, pb.KEY_KIND_PUBLIC).secret
    users = [f"watcher-{index}" for index in range(
        limits.WATCHERS_PER_KEY_MAX // limits.WATCHERS_PER_USER_MAX + 1)]
    keyed.ok("UpsertPlan", pb.UpsertPlanRequest(plan=PLAN_A), "sk_b")
    for user in users:
        for key in ("sk_a", "sk_b"):
            keyed.ok("UpsertSubscription", pb.UpsertSubscriptionRequest(
                user_id=user, plan_id="plan-a"), key)

    def as_user(user: str) -> tuple[tuple[str, str], ...]:
        token = sign_user_token(keyed.keys["sk_a"], APP_A, user, int(time.time()) + 600)
        return bearer(browser) + (("x-quotad-user-token", token),)

    streams = []
    try:
        for user in users[:-1]:
            for _ in range(limits.WATCHERS_PER_USER_MAX):
                streams.append(open_watch(keyed, as_user(user), user, WATCH_CAP_TEST_TIMEOUT_S))
            assert refused_watch(keyed, as_user(user), user) == ("TOO_MANY_WATCHERS", {
                "limit": "WATCHERS_PER_USER_MAX", "max": str(limits.WATCHERS_PER_USER_MAX)})
        assert refused_watch(keyed, as_user(users[-1]), users[-1]) == ("TOO_MANY_WATCHERS", {
            "limit": "WATCHERS_PER_KEY_MAX", "max": str(limits.WATCHERS_PER_KEY_MAX)})
        for key in ("sk_a", "sk_b"):  # the app's backend, and another app
            streams.append(open_watch(keyed, bearer(keyed.keys[key]), users[-1]))
    finally:
        for stream in streams:
            stream.cancel()


def ended_with(stream: Any) -> tuple[grpc.StatusCode, str, float]:
    """How the stream ended (code, details, time.time()), reading past any updates; the
    call's own timeout bounds the wait."""
    try:
        for _ in stream:
            pass
    except grpc.RpcError as error:
        return error.code(), error.details(), time.time()
    raise AssertionError("the stream ended without a status")


@pytest.mark.parametrize("kind", ["pk", "sk"])
def test_a_watch_ends_unauthenticated_within_1_s_of_its_key_being_revoked(
        keyed: Keyed, kind: str) -> None:
    created = keyed.create_key(APP_A, pb.KEY_KIND_PUBLIC if kind == "pk" else pb.KEY_KIND_SECRET)
    token = sign_user_token(keyed.keys["sk_a"], APP_A, "ann", int(time.time()) + 600)
    metadata = bearer(created.secret) + ((("x-quotad-user-token", token),)
                                         if kind == "pk" else ())
    doomed = open_watch(keyed, metadata)
    bystander = open_watch(keyed, bearer(keyed.keys["sk_a"]))
    keyed.ok("RevokeKey", pb.RevokeKeyRequest(key_id=created.key.key_id), "admin")
    revoked_at_s = time.time()
    code, details, ended_at_s = ended_with(doomed)
    assert code == UNAUTHENTICATED and "revoked" in details, details
    assert ended_at_s - revoked_at_s <= WATCH_END_S_MAX
    keyed.ok("Track", pb.TrackRequest(user_id="ann", event_type="chat", amount=1), "sk_a")
    assert next(bystander).reason == pb.WATCH_REASON_CHANGE  # a watch on other keys goes on
    bystander.cancel()


def test_a_watch_ends_when_the_sk_key_that_signed_its_user_token_is_revoked(
        keyed: Keyed) -> None:
    signer = keyed.create_key(APP_A, pb.KEY_KIND_SECRET)
    token = sign_user_token(signer.secret, APP_A, "ann", int(time.time()) + 600)
    stream = open_watch(keyed, bearer(keyed.keys["pk_a"]) + (("x-quotad-user-token", token),))
    keyed.ok("RevokeKey", pb.RevokeKeyRequest(key_id=signer.key.key_id), "admin")
    revoked_at_s = time.time()
    code, details, ended_at_s = ended_with(stream)
    assert code == UNAUTHENTICATED and "signing key" in details, details
    assert ended_at_s - revoked_at_s <= WATCH_END_S_MAX


def test_a_watch_ends_unauthenticated_at_its_user_tokens_expiry(keyed: Keyed) -> None:
    expires_at_s = int(time.time()) + 3
    token = sign_user_token(keyed.keys["sk_a"], APP_A, "ann", expires_at_s)
    stream = open_watch(keyed, bearer(keyed.keys["pk_a"]) + (("x-quotad-user-token", token),))
    code, details, ended_at_s = ended_with(stream)
    assert code == UNAUTHENTICATED and "expired" in details, details
    assert expires_at_s <= ended_at_s <= expires_at_s + WATCH_END_S_MAX


# --- refused lines say who, never with a secret -------------------------------------------------

LOG_WAIT_S = 20.0
"""Bound of the wait for a log line (never reached unless something is broken)."""


def refused_line(env: Keyed, request_id: str) -> dict:
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        for line in list(env.process.log_lines):
            if line.get("message") == "refused" and line.get("request_id") == request_id:
                return line
        time.sleep(0.02)
    raise AssertionError(f"no refused line for {request_id}")


def test_every_refused_line_names_the_peer_app_and_key_id_and_no_secret(keyed: Keyed) -> None:
    sk_a_id, sk_b_id = (keyed.keys[k].split("_")[1] for k in ("sk_a", "sk_b"))
    pk_a_id, revoked_id = (keyed.keys[k].split("_")[1] for k in ("pk_a", "revoked"))
    now_s = int(time.time())
    expired = sign_user_token(keyed.keys["sk_a"], APP_A, "ann", now_s - 5)
    other_user = sign_user_token(keyed.keys["sk_a"], APP_A, "bob", now_s + 600)
    wrong_secret = f"sk_{sk_a_id}_{secrets.token_urlsafe(32)}"
    reservation_id = fresh_reservation(keyed)
    cases = [  # rpc, request, metadata, the app and key id the line must name
        ("GetUsage", pb.GetUsageRequest(user_id="ann"), bearer(wrong_secret), APP_A, sk_a_id),
        ("ListPlans", pb.ListPlansRequest(), bearer(keyed.keys["revoked"]), APP_A, revoked_id),
        ("Commit", pb.CommitRequest(reservation_id=reservation_id), bearer(keyed.keys["sk_b"]),
         APP_B, sk_b_id),
        ("GetUsage", pb.GetUsageRequest(user_id="ann"),
         bearer(keyed.keys["pk_a"]) + (("x-quotad-user-token", expired),), APP_A, pk_a_id),
        ("WatchUsage", pb.WatchUsageRequest(user_id="ann"),
         bearer(keyed.keys["pk_a"]) + (("x-quotad-user-token", other_user),), APP_A, pk_a_id),
        ("Reserve", pb.ReserveRequest(user_id="ann", event_type="chat", amount=1),
         bearer(ADMIN_KEY), "", "admin"),
        ("GetStateDigest", pb.GetStateDigestRequest(), bearer(keyed.keys["sk_a"]), APP_A,
         sk_a_id),
        ("ListPlans", pb.ListPlansRequest(), (), "", ""),
    ]
    for index, (rpc, request, metadata, app, key_id) in enumerate(cases):
        request_id = f"who-{index}-{secrets.token_hex(4)}"
        code, _ = keyed.call(rpc, request, (*metadata, ("x-request-id", request_id)))
        assert code != OK, rpc
        line = refused_line(keyed, request_id)
        assert line["method"].endswith(f"/{rpc}") and line["code"] == code.name
        assert (line["app"], line["key_id"]) == (app, key_id), (rpc, line)
        assert line["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:")), line
    secret_parts = [key.split("_", 2)[2] for key in keyed.keys.values() if key != ADMIN_KEY]
    logged = "\n".join(json.dumps(line) for line in list(keyed.process.log_lines))
    for secret in [*keyed.keys.values(), *secret_parts, wrong_secret, expired, other_user,
                   expired.rsplit(".", 1)[-1]]:
        assert secret not in logged


# --- keys and tokens through the client library -------------------------------------------------

def test_keys_are_shown_once_listed_without_secrets_and_revoked_at_once(keyed: Keyed) -> None:
    with qc.QuotaClient(keyed.process.address, api_key=ADMIN_KEY) as admin:
        created = admin.create_key("secret", name="worker", app="app-c")
        assert created.secret.startswith(f"sk_{created.key.key_id}_")
        assert len(created.secret) >= 3 + 12 + 1 + 43 and created.key.app == "app-c"
        with qc.QuotaClient(keyed.process.address, api_key=created.secret) as worker:
            assert worker.list_plans() == []
            public = worker.create_key("public", name="web")
            assert public.key.app == "app-c" and public.secret.startswith("pk_")
            listed = {key.key_id: key for key in admin.list_keys(app="app-c")}
            assert set(listed) == {created.key.key_id, public.key.key_id}
            assert listed[created.key.key_id].revoked_at is None
            assert admin.revoke_key(created.key.key_id).revoked_at is not None
            with pytest.raises(qc.Unauthenticated):
                worker.list_plans()
        assert admin.list_keys(app="app-c")[0].revoked_at is not None


def test_revoking_an_sk_key_invalidates_its_user_tokens(keyed: Keyed) -> None:
    with qc.QuotaClient(keyed.process.address, api_key=ADMIN_KEY) as admin:
        sk = admin.create_key("secret", app=APP_A).secret
        with qc.QuotaClient(keyed.process.address, api_key=sk) as backend:
            token = backend.mint_user_token("ann", ttl_s=60)
        assert token.expires_at.timestamp() > time.time()
        with qc.QuotaClient(keyed.process.address, api_key=keyed.keys["pk_a"],
                            user_token=token.token) as browser:
            assert browser.usage("ann").plan_id == "plan-a"
            admin.revoke_key(sk.split("_")[1])
            with pytest.raises(qc.Unauthenticated):
                browser.usage("ann")


def test_a_client_minted_token_is_accepted_by_the_server_sync_and_async(keyed: Keyed) -> None:
    token = qc.mint_user_token(keyed.keys["sk_a"], APP_A, "ann", ttl_s=60)
    with qc.QuotaClient(keyed.process.address, api_key=keyed.keys["pk_a"],
                        user_token=token) as browser:
        assert browser.usage("ann").user_id == "ann"
        with pytest.raises(qc.PermissionDenied):
            browser.usage("bob")
        with pytest.raises(qc.PermissionDenied):
            browser.track("ann", "chat", 1)

    async def read() -> str:  # coalescing would use Batch, which a pk_ key may not call
        async with qc.AsyncQuotaClient(keyed.process.address, api_key=keyed.keys["pk_a"],
                                       user_token=token) as client:
            return (await client.usage("ann")).plan_id

    assert asyncio.run(read()) == "plan-a"
    with pytest.raises(ValueError):
        qc.mint_user_token(keyed.keys["pk_a"], APP_A, "ann")
    with pytest.raises(ValueError):
        qc.mint_user_token(keyed.keys["sk_a"], APP_A, "ann", ttl_s=24 * 3600 + 1)


def test_the_async_client_sends_keys_on_coalesced_batches(keyed: Keyed) -> None:
    async def run() -> tuple[int, str]:
        async with qc.AsyncQuotaClient(keyed.process.address,
                                       api_key=keyed.keys["sk_a"]) as client:
            usages = await asyncio.gather(*(client.usage("ann") for _ in range(5)))
            return len(usages), usages[0].plan_id

    assert asyncio.run(run()) == (5, "plan-a")


def test_key_rpcs_validate_their_fields(keyed: Keyed) -> None:
    def violations(rpc: str, request: Any, key: str) -> set[str]:
        code, error = keyed.call(rpc, request, bearer(keyed.keys[key]))
        assert code == INVALID, (rpc, request)
        status = rpc_status.from_call(error)
        bad = error_details_pb2.BadRequest()
        status.details[0].Unpack(bad)
        return {v.field for v in bad.field_violations}

    assert violations("CreateKey", pb.CreateKeyRequest(kind=pb.KEY_KIND_SECRET), "admin") == {
        "app"}
    assert violations("ListKeys", pb.ListKeysRequest(), "admin") == {"app"}
    assert violations("CreateKey", pb.CreateKeyRequest(app=APP_A), "admin") == {"kind"}
    assert violations("CreateKey", pb.CreateKeyRequest(
        kind=pb.KEY_KIND_PUBLIC, name="n" * 129), "sk_a") == {"name"}
    assert violations("CreateKey", pb.CreateKeyRequest(
        app="x" * 65, kind=pb.KEY_KIND_PUBLIC), "admin") == {"app"}
    assert violations("RevokeKey", pb.RevokeKeyRequest(key_id="nope"), "admin") == {"key_id"}
    for seconds in (0, 24 * 3600 + 1):
        assert violations("MintUserToken", pb.MintUserTokenRequest(
            user_id="ann", ttl=duration_pb2.Duration(seconds=seconds)), "sk_a") == {"ttl"}
    assert violations("MintUserToken", pb.MintUserTokenRequest(user_id=""), "sk_a") == {
        "user_id"}
    code, _ = keyed.call("RevokeKey", pb.RevokeKeyRequest(key_id="a" * 12), bearer(ADMIN_KEY))
    assert code == NOT_FOUND
    for seconds in (1, 24 * 3600):  # the edges are allowed
        keyed.ok("MintUserToken", pb.MintUserTokenRequest(
            user_id="ann", ttl=duration_pb2.Duration(seconds=seconds)), "sk_a")


# --- app isolation ----------------------------------------------------------------------------

def test_the_same_user_in_two_apps_has_separate_plans_counters_events_and_keys(
        keyed: Keyed) -> None:
    address = keyed.process.address
    with qc.QuotaClient(address, api_key=keyed.keys["sk_a"]) as a, \
            qc.QuotaClient(address, api_key=keyed.keys["sk_b"]) as b:
        for client, quota in ((a, 100), (b, 7)):
            client.upsert_plan({"id": "iso", "limit_groups": [
                {"key": "tokens", "quota": quota, "window": "lifetime"}]})
            client.subscribe("shared", "iso")
        a.track("shared", "chat", 40, idempotency_key="same-key")
        b.track("shared", "chat", 3, idempotency_key="same-key")  # independent of A's key
        assert a.usage("shared").counter("tokens").used == 40
        assert b.usage("shared").counter("tokens").used == 3
        assert b.usage("shared").counter("tokens").quota == 7
        assert [e.amount for e in a.iter_events("shared")] == [40]
        assert [e.amount for e in b.iter_events("shared")] == [3]
        assert {k.app for k in a.list_keys()} == {APP_A}
        assert {k.app for k in b.list_keys()} == {APP_B}
        with pytest.raises(qc.PermissionDenied):
            b.list_keys(app=APP_A)


# --- modes, key sources, TLS ------------------------------------------------------------------

def test_open_mode_answers_key_rpcs_with_keys_disabled(server: ServerProcess) -> None:
    with qc.QuotaClient(server.address) as client:
        for call in (lambda: client.create_key("secret", app="x"), client.list_keys,
                     lambda: client.revoke_key("a" * 12), lambda: client.mint_user_token("u")):
            with pytest.raises(qc.FailedPrecondition) as refused:
                call()
            assert refused.value.reason == "KEYS_DISABLED"
            assert "QUOTAD_ADMIN_KEY" in refused.value.message
        assert client.list_plans()  # unauthenticated calls act as app "default"


def run_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """`quotad serve` expected to refuse to start: its exit code and stderr."""
    base = {k: v for k, v in os.environ.items() if k != "QUOTAD_ADMIN_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--data-dir", str(tmp_path / "data"), *args],
        env={**base, **(env or {})}, cwd=ROOT, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S)


def test_open_mode_refuses_a_non_loopback_listen(tmp_path: Path) -> None:
    refused = run_serve(tmp_path, "--listen", "0.0.0.0:0")
    assert refused.returncode == 2
    assert "loopback" in refused.stderr and "QUOTAD_ADMIN_KEY" in refused.stderr


def test_bad_admin_keys_refuse_to_start(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    key_file.chmod(0o644)
    refused = run_serve(tmp_path, "--admin-key-file", str(key_file))
    assert refused.returncode == 2 and "chmod 600" in refused.stderr
    key_file.chmod(0o600)
    refused = run_serve(tmp_path, "--admin-key-file", str(key_file),
                        env={"QUOTAD_ADMIN_KEY": ADMIN_KEY})
    assert refused.returncode == 2 and "both" in refused.stderr
    refused = run_serve(tmp_path, env={"QUOTAD_ADMIN_KEY": "too-short"})
    assert refused.returncode == 2 and "32" in refused.stderr
    refused = run_serve(tmp_path, "--tls-cert", str(key_file))
    assert refused.returncode == 2 and "--tls-key" in refused.stderr


def test_an_admin_key_file_allows_any_listen_and_keys_survive_a_restart(
        tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    key_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
    args = ("--admin-key-file", str(key_file))
    first = start_server(listen="0.0.0.0:0", extra_args=args)
    port = first.address.rpartition(":")[2]
    with qc.QuotaClient(f"127.0.0.1:{port}", api_key=ADMIN_KEY) as admin:
        created = admin.create_key("secret", app=APP_A)
        revoked = admin.create_key("secret", app=APP_A)
        admin.revoke_key(revoked.key.key_id)
    assert first.stop() == 0
    second = start_server(extra_args=args)
    with qc.QuotaClient(second.address, api_key=created.secret) as backend:
        assert backend.list_plans() == []
    with qc.QuotaClient(second.address, api_key=revoked.secret) as old:
        with pytest.raises(qc.Unauthenticated):
            old.list_plans()


def test_tls_round_trip(tls_files: tuple[Path, Path],
                        start_server: Callable[..., ServerProcess]) -> None:
    cert, key = tls_files
    process = start_server(extra_args=("--tls-cert", str(cert), "--tls-key", str(key)),
                           env={"QUOTAD_ADMIN_KEY": ADMIN_KEY})
    assert process.last("serving")["tls"] is True
    with qc.QuotaClient(process.address, api_key=ADMIN_KEY,
                        tls_root_cert=cert.read_bytes()) as admin:
        created = admin.create_key("secret", app=APP_A)
    with qc.QuotaClient(process.address, api_key=created.secret,
                        tls_root_cert=cert.read_bytes()) as backend:
        backend.upsert_plan({"id": "p", "limit_groups": [
            {"key": "t", "quota": 5, "window": "day"}]})
        backend.subscribe("u", "p")
        assert backend.usage("u").counter("t").remaining == 5

    def quotactl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "quotad_client.ctl", "--target", process.address, *args,
             "usage", "u"], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
            env={**os.environ, "QUOTAD_API_KEY": created.secret})

    over_tls = quotactl("--tls-root-cert", str(cert))
    assert over_tls.returncode == 0, over_tls.stderr
    assert over_tls.stdout.splitlines()[-1].split()[0] == "t"  # the usage table's row
    plaintext = quotactl("--timeout-s", "2")
    assert plaintext.returncode == 2 and "cannot reach quotad" in plaintext.stderr


# --- the pure core: keys replay and snapshot like everything else ------------------------------

def test_keys_in_the_core_replay_and_snapshot_to_the_same_state() -> None:
    core, records = Core(), []
    sha = "ab" * 32
    for at_ns, command in enumerate([
            c.CreateKey(app="a", key_id="a" * 12, kind="secret", secret_sha256=sha,
                        token_signing_key=sha),
            c.CreateKey(app="b", key_id="b" * 12, kind="public", secret_sha256=sha),
            c.RevokeKey(app="", key_id="b" * 12)], start=1):
        outcome = core.apply(command, at_ns)
        assert outcome.error is None
        records.extend(outcome.records)
    assert core.apply(c.RevokeKey(app="b", key_id="a" * 12), 10).error.__class__ is (
        PermissionDenied)
    assert isinstance(core.apply(c.RevokeKey(app="", key_id="c" * 12), 10).error, NotFound)
    replayed = Core()
    for record in records:
        replayed.replay(record)
    restored = core_from_snapshot(snapshot_of(core))
    assert state_digest(replayed) == state_digest(core) == state_digest(restored)
    assert [k.key_id for k in core.apply(c.ListKeys(app="b"), 11).result.keys] == ["b" * 12]
    assert core.keys["b" * 12].revoked_at_ns == 3
    with pytest.raises(InvalidArgument):
        c.CreateKey(app="a", key_id="A" * 12, kind="secret", secret_sha256=sha)


# --- limits at their edges ---------------------------------------------------------------------

def test_an_app_holds_at_most_keys_per_app_max_keys_revoked_ones_included() -> None:
    core, sha, clock = Core(), "ab" * 32, iter(range(1, 10**6))

    def create(app: str, index: int) -> Any:
        key_id = f"{app}{index:011d}".translate(str.maketrans("0123456789", "abcdefghij"))
        return core.apply(c.CreateKey(app=app, key_id=key_id, kind="public",
                                      secret_sha256=sha), next(clock))

    for index in range(limits.KEYS_PER_APP_MAX):
        assert create("a", index).error is None
    assert core.apply(c.RevokeKey(app="a", key_id="a" + "a" * 11), next(clock)).error is None
    refused = create("a", limits.KEYS_PER_APP_MAX).error
    assert isinstance(refused, ResourceExhausted) and refused.reason == "TOO_MANY_KEYS"
    assert create("b", 0).error is None  # another app has its own allowance


def test_key_names_and_admin_keys_and_user_tokens_at_their_edges(tmp_path: Path) -> None:
    sha = "ab" * 32
    c.CreateKey(app="a", key_id="a" * 12, kind="public", secret_sha256=sha,
                name="n" * limits.KEY_NAME_BYTES_MAX)
    with pytest.raises(InvalidArgument):
        c.CreateKey(app="a", key_id="a" * 12, kind="public", secret_sha256=sha,
                    name="n" * (limits.KEY_NAME_BYTES_MAX + 1))
    for length in (limits.ADMIN_KEY_BYTES_MIN, limits.ADMIN_KEY_BYTES_MAX):
        Config(admin_key="k" * length, data_dir=tmp_path)
    for length in (limits.ADMIN_KEY_BYTES_MIN - 1, limits.ADMIN_KEY_BYTES_MAX + 1):
        with pytest.raises(ValueError, match="admin key"):
            Config(admin_key="k" * length, data_dir=tmp_path)
    authenticator = Authenticator(ADMIN_KEY, {})
    with pytest.raises(Unauthenticated, match="longer than"):
        authenticator.verify_user_token("u" * (limits.USER_TOKEN_BYTES_MAX + 1))
    with pytest.raises(Unauthenticated, match="malformed"):  # at the limit: parsed, refused
        authenticator.verify_user_token("u" * limits.USER_TOKEN_BYTES_MAX)


def test_an_export_holds_only_its_own_apps_usage(keyed: Keyed) -> None:
    keyed.ok("Track", pb.TrackRequest(user_id="ann", event_type="chat", amount=3), "sk_a")

    def exported(key: str, app: str = "") -> set[str]:
        stub = quotad_pb2_grpc.AdminServiceStub(keyed.channel)
        return {line.user_id + ":" + line.event_type
                for message in stub.ExportUsage(pb.ExportUsageRequest(app=app),
                                                metadata=bearer(keyed.keys[key]),
                                                timeout=CALL_TIMEOUT_S)
                for line in message.lines}
    assert "ann:chat" in exported("sk_a")
    assert exported("sk_a") == exported("admin", APP_A)
    assert exported("sk_b") == exported("admin", APP_B) and "ann:chat" not in exported("sk_b")
    code, _ = keyed.call("ExportUsage", pb.ExportUsageRequest(), bearer(ADMIN_KEY))
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # the admin key names the app
