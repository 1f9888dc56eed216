"""One strict plans parser (quotad_contract.plans) behind every way a plan is written: `quotad
serve --plans`, `quotactl plans apply` and `client.upsert_plan(dict)`. A misspelt key is an
error naming it with its path, wherever it is, and nothing changes."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest

import quotad_client as qc
from quotad_contract.plans import PlansFileError, load_plans_file, plan_from_dict
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as stubs
from server_process import EXAMPLE_PLANS, ROOT
from test_ctl import quotactl

PREMIUM_GROUP = '''\
[[plans]]
id = "free"
name = "Free"
  [[plans.limit_groups]]
  key = "tokens"
  quota = 100
  window = "month"
[[plans]]
id = "premium"
  [[plans.limit_groups]]
  key = "premium_tokens"
  quota = 10
{window}
  match = {{ {metadata} = {{ model = ["gpt-4o"] }} }}
'''
WELL_SPELT = PREMIUM_GROUP.format(window='  window = "day"', metadata="metadata")
MISSPELLINGS = {
    # next to `window`, `windwo` would be dropped and its group left as it is
    "windwo": (PREMIUM_GROUP.format(window='  window = "day"\n  windwo = "day"',
                                    metadata="metadata"),
               "plans[1].limit_groups[0].windwo"),
    # dropped, `metdata` would make the premium group count every model
    "metdata": (PREMIUM_GROUP.format(window='  window = "day"', metadata="metdata"),
                "plans[1].limit_groups[0].match.metdata"),
}


def state_digest(address: str) -> pb.GetStateDigestResponse:
    with grpc.insecure_channel(address) as channel:
        return stubs.AdminServiceStub(channel).GetStateDigest(pb.GetStateDigestRequest(),
                                                              timeout=10)


def test_the_well_spelt_file_reads_as_the_plans_it_says(tmp_path: Path):
    path = tmp_path / "plans.toml"
    path.write_text(WELL_SPELT)
    free, premium = load_plans_file(path)
    assert free == pb.Plan(id="free", name="Free", limit_groups=[
        pb.LimitGroup(key="tokens", quota=100, window=pb.MONTH)])
    assert premium.limit_groups[0].window == pb.DAY
    assert [(m.key, list(m.values)) for m in premium.limit_groups[0].match.metadata] == [
        ("model", ["gpt-4o"])]


@pytest.mark.parametrize("misspelt", sorted(MISSPELLINGS))
def test_a_misspelt_key_is_named_with_its_path_by_the_parser(misspelt: str, tmp_path: Path):
    text, key_path = MISSPELLINGS[misspelt]
    path = tmp_path / "plans.toml"
    path.write_text(text)
    with pytest.raises(PlansFileError) as error:
        load_plans_file(path)
    assert str(error.value).startswith(f"{path}: unknown key {key_path} ")


@pytest.mark.parametrize("plan, key_path", [
    ({"plans": []}, "plan.plans"),
    ({"id": "p", "limit_groups": [{"key": "k"}, {"key": "l", "qouta": 1}]},
     "plan.limit_groups[1].qouta"),
    ({"id": "p", "limit_groups": [{"key": "k", "match": {"event_type": "x"}}]},
     "plan.limit_groups[0].match.event_type"),
])
def test_unknown_keys_are_named_at_every_level(plan: dict, key_path: str):
    with pytest.raises(ValueError) as error:
        plan_from_dict(plan)
    assert str(error.value).startswith(f"unknown key {key_path} ")


def test_a_file_with_another_top_level_table_or_repeated_ids_is_refused(tmp_path: Path):
    path = tmp_path / "plans.toml"
    for text, message in (('[[plan]]\nid = "x"\n', "unknown key plan "),
                          ('[[plans]]\nid = "x"\n[[plans]]\nid = "x"\n', "ids must be unique")):
        path.write_text(text)
        with pytest.raises(PlansFileError, match=message):
            load_plans_file(path)


@pytest.mark.parametrize("misspelt", sorted(MISSPELLINGS))
def test_quotad_serve_refuses_a_misspelt_plans_file_naming_the_key_and_changes_nothing(
        misspelt: str, start_server, tmp_path: Path):
    text, key_path = MISSPELLINGS[misspelt]
    first = start_server()
    before = state_digest(first.address)
    assert first.stop() == 0
    path = tmp_path / "plans.toml"
    path.write_text(text)
    refused = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(first.data_dir), "--plans", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2
    assert f"unknown key {key_path} " in refused.stderr and "Traceback" not in refused.stderr
    again = start_server(first.data_dir, plans=None)
    assert state_digest(again.address) == before


def test_quotad_serve_names_an_invalid_plan_field_as_it_is_in_the_file(tmp_path: Path):
    path = tmp_path / "plans.toml"
    path.write_text(WELL_SPELT.replace("quota = 10\n", "quota = -1\n"))
    refused = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--plans", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2
    assert f"{path}: plans[1].limit_groups[0].quota: must be 0 to " in refused.stderr


@pytest.mark.parametrize("misspelt", sorted(MISSPELLINGS))
def test_quotactl_plans_apply_refuses_a_misspelt_file_naming_the_key_and_changes_nothing(
        misspelt: str, server, tmp_path: Path):
    text, key_path = MISSPELLINGS[misspelt]
    path = tmp_path / "plans.toml"
    path.write_text(text)
    before = state_digest(server.address)
    result = quotactl(server.address, "plans", "apply", str(path))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"quotactl: {path}: unknown key {key_path} ")
    assert result.stderr.count("\n") == 1
    assert state_digest(server.address) == before


@pytest.mark.parametrize("misspelt", sorted(MISSPELLINGS))
def test_client_upsert_plan_refuses_a_misspelt_dict_naming_the_key_and_changes_nothing(
        misspelt: str, server):
    text, key_path = MISSPELLINGS[misspelt]
    premium = tomllib.loads(text)["plans"][1]
    before = state_digest(server.address)
    with qc.QuotaClient(server.address) as client:
        with pytest.raises(ValueError) as error:
            client.upsert_plan(premium)
    assert f"unknown key {key_path.replace('plans[1]', 'plan')} " in str(error.value)
    assert state_digest(server.address) == before


def test_the_example_plans_file_means_the_same_through_every_entry_point(server):
    """What `--plans` loaded equals what the client and quotactl read from the same file."""
    with qc.QuotaClient(server.address) as client:
        served = [qc.plan_to_proto(plan) for plan in client.list_plans()]
        from_dicts = [qc.plan_to_proto(entry)
                      for entry in tomllib.loads(EXAMPLE_PLANS.read_text())["plans"]]
    assert served == from_dicts == load_plans_file(EXAMPLE_PLANS)
    unchanged = quotactl(server.address, "plans", "apply", str(EXAMPLE_PLANS))
    assert unchanged.returncode == 0 and "2 unchanged; nothing to apply" in unchanged.stdout


def test_quotactl_leaves_limits_to_the_server_which_refuses_naming_the_field(server, tmp_path):
    """Plans are applied in file order until the first refusal: `free` (valid) is put in
    place, `premium` (a quota below 0) is refused and not stored."""
    path = tmp_path / "plans.toml"
    path.write_text(WELL_SPELT.replace("quota = 10\n", "quota = -1\n"))
    result = quotactl(server.address, "plans", "apply", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith("quotactl: INVALID_ARGUMENT: plan.limit_groups[0].quota")
    with qc.QuotaClient(server.address) as client:
        assert client.get_plan("free").limit_groups[0].quota == 100
        with pytest.raises(qc.NotFound):
            client.get_plan("premium")
