"""WatchUsage on every kind of group through the real server and the client's typed updates: a
soft limit's overage and its thresholds past 100 %, a rate bucket's tokens and when it is
full again, a credit balance's live grants, all in the counters each change pushes, equal to
what GetUsage answers."""

from __future__ import annotations

import quotad_client as qc

WAIT_S = 20.0
"""Bound of every wait for a message (never reached unless something is broken)."""

PLAN = {"id": "mixed", "name": "Mixed", "limit_groups": [
    {"key": "soft", "label": "Soft", "unit": "tokens", "quota": 100, "window": "month",
     "enforce": False, "match": {"event_types": ["openai.*"]}},
    # a day's refill: not one token comes back while the test runs (86 s per token), so
    # the counters pushed and those GetUsage answers later are the same
    {"key": "tpd", "label": "Tokens per day", "unit": "tokens", "quota": 1000,
     "kind": "rate", "period_s": 86400, "match": {"event_types": ["openai.*"]}},
    {"key": "credits", "label": "Credits", "unit": "credits", "kind": "balance",
     "match": {"event_types": ["openai.*"]},
     "cost": {"by": "model", "rates": {"gpt-4o": 2}, "default": 1}},
]}


def _next_change(watch) -> qc.WatchUpdate:
    update = next(watch)
    assert update.reason == "change", update
    return update


def test_a_watch_shows_overage_bucket_tokens_and_balances_and_soft_thresholds_fire(
        start_server):
    server = start_server(plans=None)
    with qc.QuotaClient(server.address, timeout_s=WAIT_S) as client:
        client.upsert_plan(PLAN)
        client.subscribe("w1", "mixed")
        watch = client.watch_usage("w1")
        initial = next(watch)
        assert initial.reason == "initial"
        assert {c.key: c.kind for c in initial.counters} == {
            "soft": "quota", "tpd": "rate", "credits": "balance"}
        assert initial.counter("credits").quota == 0  # no grant yet

        granted = client.grant_credits("w1", "credits", 500, idempotency_key="topup-1")
        update = _next_change(watch)
        assert update.counter("credits") == granted.counter == client.usage("w1")["credits"]
        assert (update.counter("credits").quota, update.counter("credits").remaining) == (500, 500)

        crossed: list[tuple[str, int]] = []
        for amount in (70, 50):  # the soft group: 70 %, then 120 % of its quota
            client.track("w1", "openai.chat", amount, metadata={"model": "gpt-4o"})
            update = _next_change(watch)
            crossed += [(t.limit_group_key, t.percent) for t in update.thresholds]
            assert update.counters == client.usage("w1").counters
        soft, tpd, credits = (update.counter(key) for key in ("soft", "tpd", "credits"))
        assert (soft.used, soft.overage, soft.remaining) == (120, 20, 0)
        assert (tpd.used, tpd.remaining) == (120, 880) and tpd.full_at is not None
        assert (credits.used, credits.remaining) == (240, 260)  # 120 units at 2 credits each
        # the soft group never denies, and its 80 % and 100 % fire once each like any other
        assert [c for c in crossed if c[0] == "soft"] == [("soft", 80), ("soft", 100)]

        hold = client.reserve("w1", "openai.chat", 100, metadata={"model": "gpt-4o"})
        update = _next_change(watch)
        assert (update.counter("credits").held, update.counter("tpd").held) == (200, 100)
        assert update.counter("soft").overage == 120
        hold.release()
        update = _next_change(watch)
        assert update.counters == client.usage("w1").counters
        assert update.counter("credits").held == 0 and update.counter("soft").overage == 20
        watch.close()
