"""Costs and soft limits as plans are written (`cost = {...}`, `enforce = false`): the contract's
parser reads them strictly and checks the cost limits, naming each key's path, and a plan
means the same through the file, a dict, the client's types and the server's answer."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import quotad_client as qc
from quotad_contract import limits
from quotad_contract.plans import load_plans_file, plan_from_dict
from server_process import ROOT
from test_ctl import quotactl

PRICING_PLANS = ROOT / "examples" / "pricing.toml"

COST = {"by": "model", "rates": {"gpt-4o": 10, "gpt-4o-mini": 1}, "default": 2}


def plan_with(**group_fields) -> dict:
    return {"id": "p", "limit_groups": [{"key": "spend", "quota": 100, "window": "day",
                                         **group_fields}]}


def test_a_cost_and_a_soft_limit_read_as_the_contracts_fields():
    group = plan_from_dict(plan_with(cost=COST, enforce=False)).limit_groups[0]
    assert dict(group.cost.rates) == {"gpt-4o": 10, "gpt-4o-mini": 1}
    assert (group.cost.by, group.cost.default_rate, group.enforce) == ("model", 2, False)
    hard = plan_from_dict(plan_with(enforce=True)).limit_groups[0]
    assert not hard.HasField("enforce")  # true is the default: the server answers it unset
    no_default = plan_from_dict(plan_with(cost={"by": "model", "rates": {"a": 1}}))
    assert not no_default.limit_groups[0].cost.HasField("default_rate")


@pytest.mark.parametrize("group_fields, error, message", [
    ({"cost": {**COST, "defualt": 1}}, ValueError, "unknown key plan.limit_groups[0].cost.defualt "),
    ({"cost": {**COST, "rates": ["gpt-4o"]}}, TypeError, "plan.limit_groups[0].cost.rates: "),
    ({"cost": {**COST, "rates": {"gpt-4o": 1.5}}}, TypeError,
     "plan.limit_groups[0].cost.rates.gpt-4o: expected an integer rate"),
    ({"cost": {**COST, "rates": {"gpt-4o": True}}}, TypeError,
     "plan.limit_groups[0].cost.rates.gpt-4o: expected an integer rate"),
    ({"cost": {**COST, "default": "1"}}, TypeError, "plan.limit_groups[0].cost.default: "),
    ({"cost": {**COST, "by": 3}}, TypeError, "plan.limit_groups[0].cost.by: "),
    ({"cost": "model"}, TypeError, "plan.limit_groups[0].cost: "),
    ({"enforce": "false"}, TypeError, "plan.limit_groups[0].enforce: expected true or false"),
    ({"enforce": 0}, TypeError, "plan.limit_groups[0].enforce: expected true or false"),
])
def test_a_misspelt_or_mistyped_cost_or_enforce_is_named_with_its_path(group_fields, error,
                                                                        message):
    with pytest.raises(error) as raised:
        plan_from_dict(plan_with(**group_fields))
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize("where, good, bad", [
    ("rates.gpt-4o", 1, 0), ("rates.gpt-4o", limits.COST_RATE_MAX, limits.COST_RATE_MAX + 1),
    ("default", 1, -1), ("default", limits.COST_RATE_MAX, limits.COST_RATE_MAX + 1),
])
def test_the_parser_checks_each_rate_at_its_edges(where, good, bad):
    def cost(rate: int) -> dict:
        return ({**COST, "rates": {"gpt-4o": rate}} if where.startswith("rates")
                else {**COST, "default": rate})
    plan_from_dict(plan_with(cost=cost(good)))
    with pytest.raises(ValueError) as raised:
        plan_from_dict(plan_with(cost=cost(bad)))
    assert str(raised.value).startswith(
        f"plan.limit_groups[0].cost.{where}: a rate is 1 to {limits.COST_RATE_MAX}, got {bad}")


def test_the_parser_takes_at_most_cost_rates_per_group_max_rates():
    most = {f"model-{i}": 1 for i in range(limits.COST_RATES_PER_GROUP_MAX)}
    plan_from_dict(plan_with(cost={"by": "model", "rates": most}))
    with pytest.raises(ValueError) as raised:
        plan_from_dict(plan_with(cost={"by": "model", "rates": {**most, "one-more": 1}}))
    assert str(raised.value).startswith(
        f"plan.limit_groups[0].cost.rates: at most {limits.COST_RATES_PER_GROUP_MAX} rates")


def test_quotad_serve_names_an_invalid_cost_field_as_it_is_in_the_file(tmp_path: Path):
    path = tmp_path / "plans.toml"
    path.write_text('[[plans]]\nid = "p"\n  [[plans.limit_groups]]\n  key = "spend"\n'
                    '  quota = 1\n  window = "day"\n  cost = { by = "" }\n')
    refused = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--plans", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2
    assert f"{path}: plans[0].limit_groups[0].cost.by: must be 1 to " in refused.stderr
    assert "plans[0].limit_groups[0].cost.rates: a cost needs at least one rate" in (
        refused.stderr)


def test_the_pricing_example_means_the_same_through_the_file_and_a_dict():
    [team] = load_plans_file(PRICING_PLANS)
    assert team == qc.plan_to_proto(tomllib.loads(PRICING_PLANS.read_text())["plans"][0])
    spend, tokens = team.limit_groups
    assert (spend.cost.default_rate, tokens.enforce) == (2, False)


def test_a_plan_with_costs_and_soft_limits_round_trips_through_the_client(server):
    """As a dict, as the client's types and as the server answers it: one plan."""
    plan = {"id": "metered", "limit_groups": [
        {"key": "spend", "quota": 1000, "window": "day", "cost": COST},
        {"key": "soft", "quota": 10, "window": "day", "enforce": False}]}
    with qc.QuotaClient(server.address) as client:
        stored = client.upsert_plan(plan).plan
        spend, soft = stored.limit_groups
        assert spend.cost == qc.Cost(by="model", rates={"gpt-4o": 10, "gpt-4o-mini": 1},
                                     default_rate=2) and spend.enforce
        assert soft.cost is None and soft.enforce is False
        assert client.upsert_plan(stored).changed is False  # the typed plan, sent back
        assert client.get_plan("metered") == stored


# --- quotactl ------------------------------------------------------------------------------

TEAM_CHANGED = """
[[plans]]
id = "team"
name = "Team"
  [[plans.limit_groups]]
  key = "spend"
  label = "Spend"
  unit = "credits"
  quota = 20_000_000
  window = "month"
  match = { event_types = ["openai.*"] }
  cost = { by = "model", rates = { "gpt-4o" = 12 } }
  [[plans.limit_groups]]
  key = "tokens"
  label = "Tokens"
  unit = "tokens"
  quota = 2_000_000
  window = "month"
  match = { event_types = ["openai.*"] }
"""


def test_quotactl_applies_and_shows_costs_and_soft_limits(start_server, tmp_path: Path):
    address = start_server(plans=None).address
    first = quotactl(address, "plans", "apply", str(PRICING_PLANS))
    assert first.returncode == 0, first.stderr
    spend_line = ("spend (Spend): 20000000 credits per month; events openai.*; amount x rate "
                  "by model (gpt-4o 10, gpt-4o-mini 1; else 2)")
    soft_line = "tokens (Tokens): 2000000 tokens per month (soft: never denies); events openai.*"
    assert f"  + {spend_line}" in first.stdout and f"  + {soft_line}" in first.stdout
    again = quotactl(address, "plans", "apply", str(PRICING_PLANS))
    assert "1 unchanged; nothing to apply" in again.stdout  # read back as it was written
    shown = quotactl(address, "plans", "show", "team")
    assert shown.stdout.splitlines() == ["plan team (Team)", f"  {spend_line}", f"  {soft_line}"]
    as_json = json.loads(quotactl(address, "plans", "show", "team", "--json").stdout)
    spend, soft = as_json["limit_groups"]
    assert spend["cost"] == {"by": "model", "rates": {"gpt-4o": 10, "gpt-4o-mini": 1},
                             "default": 2}
    assert "enforce" not in spend and soft["enforce"] is False and "cost" not in soft
    changed = tmp_path / "team.toml"
    changed.write_text(TEAM_CHANGED)
    dry = quotactl(address, "plans", "apply", str(changed), "--dry-run")
    assert ("  ~ spend: cost 'amount x rate by model (gpt-4o 10, gpt-4o-mini 1; else 2)' -> "
            "'amount x rate by model (gpt-4o 12; else no match)'") in dry.stdout
    assert "  ~ tokens: enforce false -> true" in dry.stdout
    assert quotactl(address, "plans", "apply", str(changed)).returncode == 0
    with qc.QuotaClient(address, timeout_s=10) as client:
        team = client.get_plan("team")
    assert [(g.key, g.enforce, g.cost) for g in team.limit_groups] == [
        ("spend", True, qc.Cost(by="model", rates={"gpt-4o": 12})), ("tokens", True, None)]
