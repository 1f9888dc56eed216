"""The asyncio client's coalesced batches stay within the server's message limit
(MESSAGE_BYTES_MAX), whatever the number and the size of the calls made together: against the
real server, every call succeeds and none is refused as RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections import Counter
from datetime import timedelta

import pytest

import quotad_client as qc
from messages_at_limits import metadata_at_every_limit, text
from quotad_contract import limits
from server_process import ROOT

CALL_TIMEOUT_S = 120.0
BENCH_TIMEOUT_S = 120.0
PLAN = {
    "id": "wide", "name": "Wide",
    "limit_groups": [{"key": "tokens", "label": "Tokens", "unit": "tokens",
                      "quota": limits.QUOTA_MAX, "window": "month",
                      "match": {"event_types": ["*"]}}],
}


def _outcome(result: object) -> str:
    if isinstance(result, BaseException):
        return type(result).__name__
    return "ok"


def test_a_thousand_concurrent_reserves_on_one_client_all_succeed(server):
    async def scenario() -> tuple[Counter[str], int, int]:
        async with qc.AsyncQuotaClient(server.address, timeout_s=CALL_TIMEOUT_S) as client:
            await client.upsert_plan(PLAN)
            await client.subscribe("user-0042", "wide")
            sent = client._coalescer.batches_sent
            holds = await asyncio.gather(*(
                client.reserve("user-0042", "openai.chat", 10, metadata={"model": "gpt-4o"})
                for _ in range(limits.BATCH_OPERATIONS_MAX)), return_exceptions=True)
            batches = client._coalescer.batches_sent - sent
            held = (await client.usage("user-0042"))["tokens"].held
            return Counter(map(_outcome, holds)), batches, held

    outcomes, batches, held = asyncio.run(scenario())
    assert outcomes == {"ok": limits.BATCH_OPERATIONS_MAX}
    assert held == 10 * limits.BATCH_OPERATIONS_MAX
    assert batches >= 2  # a thousand such Reserves are more than one message may carry


def test_operations_with_every_field_at_its_largest_all_succeed(server):
    user = text(limits.USER_ID_BYTES_MAX, "u")
    event_type = text(limits.EVENT_TYPE_BYTES_MAX, "e")
    metadata = metadata_at_every_limit()
    ttl = timedelta(seconds=limits.TTL_NS_MAX // limits.NS_PER_S - 1, microseconds=999_999)
    calls = 40  # each ~9 KB: a handful per batch

    def key(kind: str, index: int) -> str:
        return text(limits.IDEMPOTENCY_KEY_BYTES_MAX, "i", f"{kind}{index:04d}")

    async def scenario() -> tuple[Counter[str], Counter[str], int, int]:
        async with qc.AsyncQuotaClient(server.address, timeout_s=CALL_TIMEOUT_S) as client:
            await client.upsert_plan(PLAN)
            await client.subscribe(user, "wide")
            sent = client._coalescer.batches_sent
            first = await asyncio.gather(*(
                *(client.reserve(user, event_type, 5, metadata=metadata, ttl_s=ttl,
                                 idempotency_key=key("r", i)) for i in range(calls)),
                *(client.track(user, event_type, 3, metadata=metadata,
                               idempotency_key=key("t", i)) for i in range(calls)),
            ), return_exceptions=True)
            holds = [hold for hold in first[:calls] if isinstance(hold, qc.AsyncHold)]
            second = await asyncio.gather(*(
                client.commit(hold.reservation_id, 4, idempotency_key=key("c", i))
                for i, hold in enumerate(holds)), return_exceptions=True)
            batches = client._coalescer.batches_sent - sent
            used = (await client.usage(user))["tokens"].used
            return Counter(map(_outcome, first)), Counter(map(_outcome, second)), used, batches

    first, second, used, batches = asyncio.run(scenario())
    assert first == {"ok": 2 * calls}
    assert second == {"ok": calls}
    assert used == calls * 3 + calls * 4
    assert 2 < batches < 3 * calls  # coalesced, a few operations a batch


def test_an_operation_too_large_for_any_batch_fails_alone(server):
    """Larger than a message may be (the server refuses it unread): it goes in a batch of its
    own, and the calls made together with it, before and after, still succeed."""
    oversized = "x" * limits.MESSAGE_BYTES_MAX

    async def scenario() -> list[str]:
        async with qc.AsyncQuotaClient(server.address, timeout_s=CALL_TIMEOUT_S) as client:
            await client.upsert_plan(PLAN)
            await client.subscribe("user-7", "wide")
            calls = [client.track("user-7", "openai.chat", 1) for _ in range(100)]
            calls.insert(50, client.track(oversized, "openai.chat", 1))
            return [_outcome(result) for result in
                    await asyncio.gather(*calls, return_exceptions=True)]

    outcomes = asyncio.run(scenario())
    assert outcomes[50] == "ResourceExhausted"
    assert outcomes[:50] + outcomes[51:] == ["ok"] * 100


@pytest.mark.parametrize("loop_args", [(), ("--uvloop",)], ids=["asyncio", "uvloop"])
def test_the_coalescing_bench_runs_and_cuts_a_thousand_reserves_in_two(
        loop_args: tuple[str, ...]):
    done = subprocess.run([sys.executable, "-m", "bench.coalesce", "--rounds", "2", "--runs", "1",
                           *loop_args],
                          capture_output=True, text=True, check=True, cwd=ROOT,
                          timeout=BENCH_TIMEOUT_S)
    assert re.fullmatch(r"coalescing: \d+\.\d+ us CPU per operation, "
                        r"2\.0 batches per 1000 concurrent calls\n", done.stdout)
