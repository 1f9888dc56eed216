"""Credit balances through the real server: a plan with a balance group priced per model and
a recurring grant, GrantCredits and ListGrants through the sync and asyncio clients' typed
results, QuotaExceeded when the credits run out, refunds, the HTTP usage JSON, quotactl
(grant, grants, usage, plans show) and a kill -9 and restart that must replay to the same
state."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest

import quotad_client as qc
from test_ctl import quotactl
from test_pricing_e2e import HTTP_ARGS, state_digest, usage_json

CREDITS_PLAN = {"id": "credits", "name": "Credits", "limit_groups": [
    {"key": "credits", "label": "Credits", "unit": "credits", "kind": "balance",
     "match": {"event_types": ["openai.*"]},
     "cost": {"by": "model", "rates": {"gpt-4o": 10}, "default": 1},
     "grant": {"amount": 100, "every": "month", "rollover_max": 50}}]}


def test_credits_are_granted_spent_refunded_listed_and_replayed_after_kill_9(start_server):
    first = start_server(plans=None, extra_args=HTTP_ARGS)
    with qc.QuotaClient(first.address, timeout_s=10) as client:
        stored = client.upsert_plan(CREDITS_PLAN).plan
        group = stored.limit_groups[0]
        assert (group.kind, group.window, group.quota) == ("balance", "lifetime", 0)
        assert group.grant == qc.RecurringGrant(amount=100, every="month", rollover_max=50)
        assert client.upsert_plan(stored).changed is False  # the typed plan, sent back
        client.subscribe("u1", "credits")
        assert client.usage("u1")["credits"].quota == 100  # this month's recurring grant

        expires_at = datetime.now(timezone.utc) + timedelta(days=30)
        granted = client.grant_credits("u1", "credits", 1000, expires_at=expires_at,
                                       priority=1, idempotency_key="order-1")
        assert granted.grant.granted == 1000 and granted.grant.remaining == 1000
        assert abs(granted.grant.expires_at - expires_at) < timedelta(milliseconds=1)
        assert (granted.counter.kind, granted.counter.quota) == ("balance", 1100)
        again = client.grant_credits("u1", "credits", 1000, expires_at=expires_at,
                                     priority=1, idempotency_key="order-1")
        assert again.grant == granted.grant and client.usage("u1")["credits"].quota == 1100

        hold = client.reserve("u1", "openai.chat", 50, metadata={"model": "gpt-4o"})
        assert hold.counter("credits").held == 500
        committed = client.commit(hold.reservation_id, 30)  # 300 credits
        assert committed.returned == 20
        grants = {g.grant_id: g for g in client.list_grants("u1")}
        recurring = next(g for g in grants.values() if g.recurring)
        assert recurring.remaining == 0 and grants[granted.grant.grant_id].remaining == 800
        with pytest.raises(qc.QuotaExceeded) as exceeded:
            client.reserve("u1", "openai.chat", 81, metadata={"model": "gpt-4o"})
        assert exceeded.value.denied_by == "credits"
        client.track("u1", "openai.chat", -15, metadata={"model": "gpt-4o"})  # 150 back
        grants = {g.grant_id: g for g in client.list_grants("u1", group_key="credits")}
        assert grants[granted.grant.grant_id].remaining == 950  # the newest consumption
        assert grants[recurring.grant_id].remaining == 0
        with pytest.raises(qc.InvalidArgument) as bad:
            client.grant_credits("u1", "nope", 5)
        assert "group_key" in str(bad.value)
        live = client.reserve("u1", "openai.chat", 7, ttl_s=3600)
        before = client.usage("u1")["credits"]
        assert (before.quota, before.used, before.held, before.remaining) == (1100, 150, 7, 943)

    async def granted_async() -> tuple[qc.GrantResult, tuple[qc.Grant, ...]]:
        async with qc.AsyncQuotaClient(first.address, timeout_s=10) as client:
            result = await client.grant_credits("u1", "credits", 5, priority=9)
            return result, await client.list_grants("u1")
    async_result, listed = asyncio.run(granted_async())
    assert async_result.grant.expires_at is None and async_result.counter.remaining == 948
    assert listed[-1].grant_id == async_result.grant.grant_id  # priority 9: spent last

    shown = usage_json(first.http_address, "u1")["counters"][0]
    assert (shown["kind"], shown["quota"], shown["held"], shown["remaining"]) == (
        "balance", 1105, 7, 948)
    granted_line = quotactl(first.address, "grant", "u1", "credits", "20", "--priority", "3",
                            "--idempotency-key", "order-2").stdout
    assert "granted 20 credits" in granted_line and "968 available of 1125" in granted_line
    table = quotactl(first.address, "grants", "u1").stdout.splitlines()
    assert table[0].split()[:4] == ["GRANT", "GROUP", "GRANTED", "REMAINING"]
    assert len(table) == 1 + 4
    as_json = [json.loads(line) for line in quotactl(first.address, "grants", "u1",
                                                     "--json").stdout.splitlines()]
    assert sorted(g["granted"] for g in as_json) == [5, 20, 100, 1000]
    usage = quotactl(first.address, "usage", "u1").stdout.splitlines()
    assert next(line.split() for line in usage if line.startswith("credits "))[:7] == [
        "credits", "balance", "150", "7", "1125", "968", "0"]
    shown_plan = quotactl(first.address, "plans", "show", "credits").stdout.splitlines()
    assert "a balance of grants, 100 credits granted every month (rollover up to 50)" in (
        shown_plan[1])
    digest = state_digest(first.address)
    assert first.kill() == -signal.SIGKILL

    second = start_server(first.data_dir, plans=None, extra_args=HTTP_ARGS)
    assert state_digest(second.address) == digest
    with qc.QuotaClient(second.address, timeout_s=10) as client:
        again = client.grant_credits("u1", "credits", 1000, expires_at=expires_at,
                                     priority=1, idempotency_key="order-1")
        assert again.grant == granted.grant  # the key, remembered across the restart
        assert client.release(live.reservation_id).counter("credits").remaining == 975


def test_a_grant_expires_by_itself_as_a_logged_change_and_a_restart_keeps_it(start_server):
    first = start_server(plans=None)
    with qc.QuotaClient(first.address, timeout_s=10) as client:
        client.upsert_plan({"id": "prepaid", "limit_groups": [
            {"key": "credits", "kind": "balance", "match": {"event_types": ["image.*"]}}]})
        client.subscribe("u2", "prepaid")
        soon = client.grant_credits("u2", "credits", 50,
                                    expires_at=datetime.now(timezone.utc) + timedelta(seconds=2))
        lasting = client.grant_credits("u2", "credits", 30)
        hold = client.reserve("u2", "image.render", 60, ttl_s=3600)  # 20 of `soon` needed
        deadline = time.monotonic() + 30
        while not client.list_grants("u2")[-1].expired:  # no call of ours expires it
            assert time.monotonic() < deadline, "the grant never expired"
            time.sleep(0.1)
        grants = {g.grant_id: g for g in client.list_grants("u2")}
        assert grants[soon.grant.grant_id].expired
        assert grants[soon.grant.grant_id].remaining == 30  # kept for the hold: 60 - 30
        events = [e for e in client.list_events("u2").events if e.kind == "expire_grant"]
        assert [e.amount for e in events] == [20]  # what was available of it, dropped
        assert client.commit(hold.reservation_id, 60).counter("credits").remaining == 0
        assert client.usage("u2")["credits"].quota == 30
        assert lasting.grant.grant_id in {g.grant_id for g in client.list_grants("u2")}
    digest = state_digest(first.address)
    assert first.kill() == -signal.SIGKILL
    second = start_server(first.data_dir, plans=None)
    assert state_digest(second.address) == digest
