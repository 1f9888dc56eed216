"""The generated stubs cannot drift from protos/: regenerate them and compare."""

from __future__ import annotations

from pathlib import Path

from quotad.protogen import generate_stubs
from server_process import ROOT


def test_installed_stubs_match_a_fresh_generation_from_protos(tmp_path: Path):
    fresh = generate_stubs(ROOT / "protos", tmp_path)
    assert fresh
    for path in fresh:
        installed = ROOT / path.relative_to(tmp_path)
        assert installed.exists(), f"{installed} is missing: reinstall to regenerate the stubs"
        assert installed.read_text() == path.read_text(), (
            f"{installed.name} differs from protos/: reinstall (pip install -e .) to regenerate"
        )


def test_every_contract_rpc_is_in_the_generated_services():
    from quotad_contract.v1 import quotad_pb2

    services = {s.name: {m.name for m in s.methods}
                for s in quotad_pb2.DESCRIPTOR.services_by_name.values()}
    assert services["QuotaService"] >= {"Reserve", "Commit", "Release", "Extend", "Track",
                                        "GetUsage"}
    assert services["AdminService"] >= {"UpsertPlan", "GetPlan", "ListPlans", "DeletePlan",
                                        "UpsertSubscription", "GetSubscription", "ListEvents"}
