"""Rate buckets through the real server: a plan with a bucket through gRPC, the Python
client's typed results, QuotaExceeded, the HTTP usage JSON, quotactl, and a kill -9 and
restart that must replay to the same state.

The bucket refills its 1,000 tokens over 31 days (a token every 45 minutes), so that what
the test sees does not depend on how long a busy machine takes to run it; the refill itself
is proven exactly in the core's tests."""

from __future__ import annotations

import signal
from datetime import timedelta

import pytest

import quotad_client as qc
from quotad_contract import limits
from test_ctl import quotactl
from test_pricing_e2e import HTTP_ARGS, state_digest, usage_json

PERIOD_S = limits.RATE_PERIOD_NS_MAX // limits.NS_PER_S
QUOTA = 1000
BUCKET_PLAN = {"id": "slow", "name": "Slow", "limit_groups": [
    {"key": "tpm", "label": "Tokens", "unit": "tokens", "quota": QUOTA, "kind": "rate",
     "period_s": PERIOD_S, "match": {"event_types": ["openai.*"]}},
    {"key": "tokens", "quota": 1_000_000, "window": "month"}]}
ONE_TOKEN = timedelta(seconds=PERIOD_S / QUOTA)
NEAR = timedelta(microseconds=2)  # times travel as ns and are read back to the microsecond


def test_a_bucket_takes_gives_back_denies_with_a_fit_time_and_replays_after_kill_9(
        start_server):
    first = start_server(plans=None, extra_args=HTTP_ARGS)
    with qc.QuotaClient(first.address, timeout_s=10) as client:
        stored = client.upsert_plan(BUCKET_PLAN).plan
        tpm = stored.limit_groups[0]
        assert (tpm.kind, tpm.period_s, tpm.window) == ("rate", PERIOD_S, "lifetime")
        assert client.upsert_plan(stored).changed is False  # the typed plan, sent back
        client.subscribe("u1", "slow")
        hold = client.reserve("u1", "openai.chat", 600, ttl_s=3600)
        assert hold.counter("tpm").remaining == 400
        assert client.commit(hold.reservation_id, 250).returned == 350  # back at once
        released = client.reserve("u1", "openai.chat", 700, ttl_s=3600)
        client.release(released.reservation_id)
        counter = client.usage("u1")["tpm"]
        assert (counter.kind, counter.used, counter.held, counter.remaining) == (
            "rate", 250, 0, 750)
        assert counter.full_at is not None and counter.resets_at is None

        denied = client.reserve("u1", "openai.chat", 900, raise_on_deny=False)
        assert not denied.allowed and denied.denied_by == "tpm"
        # 900 fit once 150 of the 250 are back: 100 tokens' refill before the bucket is full
        assert abs(counter.full_at - 100 * ONE_TOKEN - denied.fits_at) <= NEAR
        with pytest.raises(qc.QuotaExceeded) as exceeded:
            client.reserve("u1", "openai.chat", 900)
        assert abs(exceeded.value.fits_at - denied.fits_at) <= NEAR
        assert "fits at" in str(exceeded.value)
        assert client.reserve("u1", "openai.chat", 1001, raise_on_deny=False).fits_at is None
        live = client.reserve("u1", "openai.chat", 500, ttl_s=3600)
        before = client.usage("u1")

    shown = {c["key"]: c for c in usage_json(first.http_address, "u1")["counters"]}
    assert (shown["tpm"]["kind"], shown["tpm"]["remaining"], shown["tpm"]["held"]) == (
        "rate", 250, 500)
    assert shown["tpm"]["full_at"].endswith("Z") and shown["tokens"]["full_at"] is None
    assert shown["tokens"]["kind"] == "quota"
    usage = quotactl(first.address, "usage", "u1").stdout.splitlines()
    tpm_line = next(line.split() for line in usage if line.startswith("tpm "))
    assert tpm_line[:7] == ["tpm", "rate", "250", "500", "1000", "250", "0"]
    assert tpm_line[7] == "never" and tpm_line[8].endswith("Z")
    shown_plan = quotactl(first.address, "plans", "show", "slow").stdout.splitlines()
    assert shown_plan[1] == (f"  tpm (Tokens): 1000 tokens a bucket refilled every {PERIOD_S} "
                             "s; events openai.*")
    digest = state_digest(first.address)
    assert first.kill() == -signal.SIGKILL

    second = start_server(first.data_dir, plans=None, extra_args=HTTP_ARGS)
    assert state_digest(second.address) == digest
    with qc.QuotaClient(second.address, timeout_s=10) as client:
        after = client.usage("u1")["tpm"]
        assert (after.used, after.held, after.full_at) == (
            before["tpm"].used, before["tpm"].held, before["tpm"].full_at)
        assert client.release(live.reservation_id).counter("tpm").held == 0
