"""Credit balances as plans are written (`kind = "balance"`, `grant = { amount, every,
rollover_max, priority }`): the contract's parser reads them strictly, naming each key's
path, the server names what it refuses as the file names it, and quotactl applies, shows and
reads a balance back unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quotad.core.plans import Kind, RecurringGrant, Window
from quotad.plans_file import load_plans
from quotad_contract.plans import plan_from_dict
from quotad_contract.v1 import quotad_pb2 as pb
from server_process import ROOT

CREDITS_PLANS = ROOT / "examples" / "credits.toml"


def plan_with(**group_fields) -> dict:
    return {"id": "p", "limit_groups": [{"key": "credits", **group_fields}]}


def test_a_balance_group_reads_as_the_contracts_kind_and_recurring_grant():
    group = plan_from_dict(plan_with(kind="balance", grant={
        "amount": 1000, "every": "month", "rollover_max": 200, "priority": 2})).limit_groups[0]
    assert (group.kind, group.window, group.quota) == (pb.LIMIT_KIND_BALANCE, pb.LIFETIME, 0)
    assert (group.grant.amount, group.grant.every, group.grant.rollover_max,
            group.grant.priority) == (1000, pb.MONTH, 200, 2)
    assert not plan_from_dict(plan_with(kind="balance")).limit_groups[0].HasField("grant")


def test_the_example_plan_loads_as_a_balance_priced_per_model_with_a_monthly_grant():
    [plan] = load_plans(CREDITS_PLANS)
    [group] = plan.limit_groups
    assert (group.kind, group.window, group.quota) == (Kind.BALANCE, Window.LIFETIME, 0)
    assert group.grant == RecurringGrant(amount=1000, every=Window.MONTH, rollover_max=200)
    assert group.cost is not None and dict(group.cost.rates)["gpt-4o"] == 10


@pytest.mark.parametrize("group_fields, error, message", [
    ({"kind": "credit"}, ValueError,
     "plan.limit_groups[0].kind: unknown kind 'credit'; expected one of quota, rate, balance"),
    ({"kind": "balance", "grant": {"amount": 10, "evry": "day"}}, ValueError,
     "unknown key plan.limit_groups[0].grant.evry "),
    ({"kind": "balance", "grant": {"amount": "10", "every": "day"}}, TypeError,
     "plan.limit_groups[0].grant.amount: expected an integer"),
    ({"kind": "balance", "grant": {"amount": 10, "every": "fortnight"}}, ValueError,
     "plan.limit_groups[0].grant.every: unknown window 'fortnight'"),
    ({"kind": "balance", "grant": 10}, TypeError, "plan.limit_groups[0].grant: expected a table"),
    ({"quota": 5, "window": "day", "grant": {"amount": 10, "every": "day"}}, ValueError,
     "plan.limit_groups[0].grant: only a group of kind = \"balance\" has a grant"),
])
def test_a_misspelt_mistyped_or_misplaced_grant_is_named_with_its_path(group_fields, error,
                                                                       message):
    with pytest.raises(error) as raised:
        plan_from_dict(plan_with(**group_fields))
    assert str(raised.value).startswith(message)


def test_quotad_serve_names_a_balance_groups_bad_fields_as_in_the_file(tmp_path: Path):
    path = tmp_path / "plans.toml"
    path.write_text('[[plans]]\nid = "p"\n  [[plans.limit_groups]]\n  key = "credits"\n'
                    '  quota = 5\n  kind = "balance"\n'
                    '  grant = { amount = 100, every = "lifetime", rollover_max = 101 }\n')
    refused = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--plans", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2
    for field in ("quota", "grant.every", "grant.rollover_max"):
        assert f"plans[0].limit_groups[0].{field}: " in refused.stderr, (field, refused.stderr)


def test_quotactl_applies_and_shows_a_balance_and_reads_it_back_unchanged(start_server):
    from test_ctl import quotactl

    address = start_server(plans=None).address
    first = quotactl(address, "plans", "apply", str(CREDITS_PLANS))
    assert first.returncode == 0, first.stderr
    line = ("credits (Credits): a balance of grants, 1000 credits granted every month "
            "(rollover up to 200); events openai.*, image.*; amount x rate by model "
            "(gpt-4o 10, gpt-4o-mini 1; else 2)")
    assert f"  + {line}" in first.stdout
    again = quotactl(address, "plans", "apply", str(CREDITS_PLANS))
    assert "1 unchanged; nothing to apply" in again.stdout  # read back as it was written
    assert quotactl(address, "plans", "show", "credits").stdout.splitlines()[1] == f"  {line}"
    balance = json.loads(quotactl(address, "plans", "show", "credits", "--json").stdout)[
        "limit_groups"][0]
    assert (balance["kind"], "window" in balance, "quota" in balance) == ("balance", False,
                                                                          False)
    assert balance["grant"] == {"amount": 1000, "every": "month", "rollover_max": 200,
                                "priority": 0}
