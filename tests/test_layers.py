"""The layers hold by construction, not by habit: each is checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE_MODULES = ("quotad.core.machine", "quotad.core.holds", "quotad.core.commands",
                "quotad.core.plans", "quotad.core.windows", "quotad.core.errors",
                "quotad.core.limits")
IO_MODULES = ("asyncio", "grpc", "lmdb")


def _loaded_after_importing(modules: tuple[str, ...], watched: tuple[str, ...]) -> list[str]:
    program = (
        "import sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        f"print(','.join(m for m in {watched!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          check=True, timeout=60)
    return [name for name in done.stdout.strip().split(",") if name]


def test_the_core_imports_no_asyncio_grpc_or_lmdb():
    assert _loaded_after_importing(PURE_MODULES, IO_MODULES) == []


@pytest.mark.parametrize("module", ["quotad_client", "quotad_client.ctl", "quotad_contract",
                                    "quotad_contract.limits", "quotad_contract.plans",
                                    "quotad_contract.tokens", "quotad_contract.errors",
                                    "quotad_contract.zones", "quotad_contract.shards",
                                    "quotad_contract.v1.quotad_pb2"])
def test_the_client_and_the_contract_never_import_the_server_package(module: str):
    assert _loaded_after_importing((module,), ("quotad",)) == []


def test_the_contract_imports_no_grpc_until_its_services_are_asked_for():
    assert _loaded_after_importing(("quotad_contract", "quotad_contract.limits",
                                    "quotad_contract.plans", "quotad_contract.tokens",
                                    "quotad_contract.errors", "quotad_contract.shards"),
                                   IO_MODULES) == []
