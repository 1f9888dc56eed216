"""Rate groups as plans are written (`kind = "rate"`, `period_s = 60`): the contract's parser
reads them strictly and checks the period's limits, naming each key's path, and the server
names what it refuses as the file names it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quotad_contract import limits
from quotad_contract.plans import plan_from_dict
from quotad_contract.v1 import quotad_pb2 as pb
from server_process import ROOT

PERIOD_S_MIN = limits.RATE_PERIOD_NS_MIN // limits.NS_PER_S
PERIOD_S_MAX = limits.RATE_PERIOD_NS_MAX // limits.NS_PER_S


def plan_with(**group_fields) -> dict:
    return {"id": "p", "limit_groups": [{"key": "tpm", "quota": 40_000, **group_fields}]}


def test_a_rate_group_reads_as_the_contracts_kind_and_period():
    group = plan_from_dict(plan_with(kind="rate", period_s=60)).limit_groups[0]
    assert (group.kind, group.period.seconds, group.period.nanos) == (pb.LIMIT_KIND_RATE, 60, 0)
    assert group.window == pb.LIFETIME  # a bucket has no calendar window
    quota = plan_from_dict(plan_with(kind="quota", window="day")).limit_groups[0]
    assert quota.kind == pb.LIMIT_KIND_UNSPECIFIED and not quota.HasField("period")


@pytest.mark.parametrize("group_fields, error, message", [
    ({"kind": "bucket", "period_s": 60}, ValueError,
     "plan.limit_groups[0].kind: unknown kind 'bucket'; expected one of quota, rate"),
    ({"kind": 2, "period_s": 60}, TypeError, "plan.limit_groups[0].kind: expected a kind name"),
    ({"kind": "rate", "period_s": 1.5}, TypeError,
     "plan.limit_groups[0].period_s: expected whole seconds"),
    ({"kind": "rate", "period_s": True}, TypeError,
     "plan.limit_groups[0].period_s: expected whole seconds"),
    ({"kind": "rate", "period_s": PERIOD_S_MIN - 1}, ValueError,
     f"plan.limit_groups[0].period_s: a period is {PERIOD_S_MIN} to {PERIOD_S_MAX} s, got 0"),
    ({"kind": "rate", "period_s": PERIOD_S_MAX + 1}, ValueError,
     f"plan.limit_groups[0].period_s: a period is {PERIOD_S_MIN} to {PERIOD_S_MAX} s"),
    ({"window": "day", "period_s": 60}, ValueError,
     "plan.limit_groups[0].period_s: only a group of kind = \"rate\" has a period"),
    ({"kind": "rate", "perod_s": 60}, ValueError, "unknown key plan.limit_groups[0].perod_s "),
])
def test_a_misspelt_mistyped_or_out_of_bounds_kind_or_period_is_named_with_its_path(
        group_fields, error, message):
    with pytest.raises(error) as raised:
        plan_from_dict(plan_with(**group_fields))
    assert str(raised.value).startswith(message)


def test_the_parser_takes_a_period_at_both_edges():
    for period_s in (PERIOD_S_MIN, PERIOD_S_MAX):
        assert plan_from_dict(plan_with(kind="rate", period_s=period_s)).limit_groups[
            0].period.seconds == period_s


def test_quotad_serve_names_a_rate_groups_missing_period_and_window_as_in_the_file(
        tmp_path: Path):
    path = tmp_path / "plans.toml"
    path.write_text('[[plans]]\nid = "p"\n  [[plans.limit_groups]]\n  key = "tpm"\n'
                    '  quota = 1\n  window = "day"\n  kind = "rate"\n')
    refused = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--plans", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2
    assert f"{path}: plans[0].limit_groups[0].period_s: must be {PERIOD_S_MIN} s to " in (
        refused.stderr)
    assert "plans[0].limit_groups[0].window: a rate group refills over its period" in (
        refused.stderr)


BUCKET_PLANS = ROOT / "examples" / "buckets.toml"


def test_quotactl_applies_and_shows_a_rate_bucket_and_reads_it_back_unchanged(start_server):
    import json

    from test_ctl import quotactl

    address = start_server(plans=None).address
    first = quotactl(address, "plans", "apply", str(BUCKET_PLANS))
    assert first.returncode == 0, first.stderr
    line = ("tokens_per_minute (Tokens per minute): 40000 tokens a bucket refilled every 60 s; "
            "events openai.*")
    assert f"  + {line}" in first.stdout
    again = quotactl(address, "plans", "apply", str(BUCKET_PLANS))
    assert "1 unchanged; nothing to apply" in again.stdout  # read back as it was written
    assert quotactl(address, "plans", "show", "chat").stdout.splitlines()[1] == f"  {line}"
    bucket = json.loads(quotactl(address, "plans", "show", "chat", "--json").stdout)[
        "limit_groups"][0]
    assert (bucket["kind"], bucket["period_s"], "window" in bucket) == ("rate", 60, False)
