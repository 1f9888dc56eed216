"""Costs and soft limits through the real server: the `team` plan of examples/pricing.toml (spend priced per
model, a soft token budget) through gRPC, the Python client's typed results, the HTTP usage
JSON, the audit trail, and a kill -9 and restart that must replay to the same state even
though the plan's rate changed between a Reserve and its Commit."""

from __future__ import annotations

import http.client
import json
import signal

import grpc
import pytest

import quotad_client as qc
from quotad_contract import limits as qc_limits
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as stubs
from server_process import ROOT

PRICING_PLANS = ROOT / "examples" / "pricing.toml"

HTTP_ARGS = ("--log-state-digest", "--http-listen", "127.0.0.1:0")
SOCKET_TIMEOUT_S = 10.0
GPT4O, MINI = {"model": "gpt-4o"}, {"model": "gpt-4o-mini"}


def state_digest(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        return stubs.AdminServiceStub(channel).GetStateDigest(pb.GetStateDigestRequest(),
                                                              timeout=10).digest


def usage_json(http_address: str, user_id: str) -> dict:
    host, _, port = http_address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=SOCKET_TIMEOUT_S)
    try:
        connection.request("GET", f"/v1/usage?user_id={user_id}")
        response = connection.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        connection.close()


def team_plan_with_gpt4o_rate(client: qc.QuotaClient, rate: int) -> dict:
    team = client.get_plan("team")
    spend = team.limit_groups[0]
    cost = qc.Cost(by=spend.cost.by, rates={**spend.cost.rates, "gpt-4o": rate},
                   default_rate=spend.cost.default_rate)
    groups = (qc.LimitGroup(key=spend.key, label=spend.label, unit=spend.unit,
                            quota=spend.quota, window=spend.window, match=spend.match,
                            cost=cost), *team.limit_groups[1:])
    return qc.Plan(id=team.id, name=team.name, limit_groups=groups)


def test_costs_and_a_soft_limit_count_show_and_replay_exactly_after_kill_9(start_server):
    first = start_server(plans=PRICING_PLANS, extra_args=HTTP_ARGS)
    with qc.QuotaClient(first.address, timeout_s=10) as client:
        client.subscribe("u1", "team")
        hold = client.reserve("u1", "openai.chat", 1_000, metadata=GPT4O, ttl_s=3600)
        assert (hold.counter("spend").held, hold.counter("tokens").held) == (10_000, 1_000)
        other = client.reserve("u1", "openai.chat", 5, metadata={"model": "o1"}, ttl_s=3600)
        assert other.counter("spend").held == 10_010  # the default rate, 2
        client.upsert_plan(team_plan_with_gpt4o_rate(client, 20))
        committed = client.commit(hold.reservation_id, 400)  # at the hold's rate, 10
        assert (committed.counter("spend").used, committed.counter("spend").held) == (4_000, 10)
        soft = client.track("u1", "openai.chat", 2_500_000, metadata=MINI, enforce=True)
        assert soft.allowed  # the soft budget never denies
        tokens = client.usage("u1")["tokens"]
        assert (tokens.used, tokens.held, tokens.remaining, tokens.overage) == (
            2_500_400, 5, 0, 500_405)
        assert client.usage("u1")["spend"].overage == 0
        thresholds = [(e.limit_group_key, e.threshold_percent)
                      for e in client.list_events("u1").events if e.kind == "threshold"]
        assert thresholds == [("tokens", 80), ("tokens", 100)]
        before = client.usage("u1")
    shown = {c["key"]: c for c in usage_json(first.http_address, "u1")["counters"]}
    assert (shown["tokens"]["overage"], shown["tokens"]["remaining"]) == (500_405, 0)
    assert (shown["spend"]["used"], shown["spend"]["overage"]) == (2_504_000, 0)
    digest = state_digest(first.address)
    assert first.kill() == -signal.SIGKILL

    second = start_server(first.data_dir, plans=None, extra_args=HTTP_ARGS)  # as it was
    assert state_digest(second.address) == digest
    with qc.QuotaClient(second.address, timeout_s=10) as client:
        assert client.usage("u1") == before
        late = client.commit(other.reservation_id)  # taken at the default rate, 2
        assert late.counter("spend").used == 2_504_010


def test_a_commit_counting_past_amount_max_is_invalid_argument_amount_and_changes_nothing(
        start_server):
    server = start_server(plans=PRICING_PLANS)
    with qc.QuotaClient(server.address, timeout_s=10) as client:
        client.subscribe("u2", "team")
        hold = client.reserve("u2", "openai.chat", 10, metadata=GPT4O)
        before = state_digest(server.address)
        fits = qc_limits.AMOUNT_MAX // 10
        with pytest.raises(qc.InvalidArgument) as refused:
            client.commit(hold.reservation_id, fits + 1)  # 10 per unit in spend
        assert [field for field, _ in refused.value.field_violations] == ["amount"]
        assert "spend" in str(refused.value)
        assert state_digest(server.address) == before
        assert client.commit(hold.reservation_id, 20).counter("spend").used == 200
