"""A client in another language, built from protos/ alone, against the real server.

examples/node/reserve_commit.js follows the README's "Other languages" section: it loads
protos/quotad/v1/quotad.proto with @grpc/proto-loader (google/rpc/status.proto from
googleapis-common-protos), reserves, commits, gets a denial, and decodes the
grpc-status-details-bin trailer of refused calls into BadRequest and ErrorInfo. It prints its
answers as JSON; these tests check them, and the server's state through the Python client.

The two npm packages are installed once per test session into a temporary folder; the tests
are skipped only when node or npm is not on PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import google.rpc.status_pb2
import pytest

from quotad_client import QuotaClient
from server_process import ROOT, ServerProcess

SCRIPT = ROOT / "examples" / "node" / "reserve_commit.js"
NPM_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")
NPM_INSTALL_TIMEOUT_S = 300.0
NODE_RUN_TIMEOUT_S = 120.0
GOOGLEAPIS_PROTOS = Path(google.rpc.status_pb2.__file__).parents[2]
"""The folder holding google/rpc/status.proto, as googleapis-common-protos installs it."""
LOADER_OPTIONS = ("keepCase: true", "longs: String", "enums: String", "defaults: true",
                  "oneofs: true")

USER_ID = "node-user"
PLAN = {"id": "node", "name": "Node", "limit_groups": [
    {"key": "tokens", "label": "Tokens", "unit": "tokens", "quota": 10_000,
     "window": "month", "match": {"event_types": ["openai.*"]}}]}


@pytest.fixture(scope="session")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm must be on PATH to run a Node client")
    prefix = tmp_path_factory.mktemp("npm")
    installed = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), *NPM_PACKAGES],
        capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT_S)
    assert installed.returncode == 0, f"npm install failed:\n{installed.stderr}"
    return prefix / "node_modules"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real quotad in the open mode, with one plan and one subscriber, set up from Python."""
    process = ServerProcess(tmp_path_factory.mktemp("quotad") / "data", plans=None).start()
    try:
        with QuotaClient(process.address) as client:
            client.upsert_plan(PLAN)
            client.subscribe(USER_ID, "node")
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def answers(node_modules: Path, server: ServerProcess) -> dict:
    ran = subprocess.run(
        ["node", str(SCRIPT), server.address, str(GOOGLEAPIS_PROTOS), USER_ID],
        capture_output=True, text=True, timeout=NODE_RUN_TIMEOUT_S,
        env={**os.environ, "NODE_PATH": str(node_modules)})
    assert ran.returncode == 0, f"the Node client failed:\n{ran.stderr}"
    return json.loads(ran.stdout)


def test_node_reserves_and_commits_and_the_server_holds_what_it_committed(
        server: ServerProcess, answers: dict) -> None:
    reserve, commit = answers["reserve"], answers["commit"]
    assert reserve["allowed"] is True
    assert re.fullmatch(r"rsv_[0-9a-f]{24}", reserve["reservation_id"])
    [counter] = reserve["counters"]
    # int64 as strings, enums by name, exactly as the proto names them (snake_case).
    assert (counter["key"], counter["window"], counter["quota"], counter["held"]) == (
        "tokens", "MONTH", "10000", "4000")
    assert isinstance(reserve["expires_at"]["seconds"], str)
    assert (commit["committed"], commit["returned"], commit["expired"]) == ("1234", "2766", False)
    with QuotaClient(server.address) as client:
        tokens = client.usage(USER_ID).counter("tokens")
    assert (tokens.used, tokens.held, tokens.remaining) == (1234, 0, 8766)


def test_a_denial_reaches_node_with_its_zero_values(answers: dict) -> None:
    denied = answers["denied"]
    assert (denied["allowed"], denied["denied_by"], denied["reservation_id"]) == (
        False, "tokens", "")
    [counter] = denied["counters"]
    assert (counter["used"], counter["held"]) == ("1234", "0")


def test_node_decodes_the_bad_request_of_an_invalid_call(answers: dict) -> None:
    invalid = answers["invalid"]
    assert (invalid["code"], invalid["code_name"]) == (3, "INVALID_ARGUMENT")
    [bad_request] = invalid["details"]
    assert bad_request["type"] == "google.rpc.BadRequest"
    fields = {violation["field"] for violation in bad_request["field_violations"]}
    assert fields == {"user_id", "amount"}


def test_node_decodes_the_error_info_reason_of_a_user_with_no_plan(answers: dict) -> None:
    no_plan = answers["no_plan"]
    assert (no_plan["code"], no_plan["code_name"]) == (9, "FAILED_PRECONDITION")
    [info] = no_plan["details"]
    assert (info["type"], info["reason"], info["domain"]) == (
        "google.rpc.ErrorInfo", "NO_PLAN", "quotad")


def test_node_tells_batch_results_apart_by_their_oneof(answers: dict) -> None:
    usage, error = answers["batch"]
    assert usage["result"] == "get_usage"
    assert (usage["answer"]["plan_id"], usage["answer"]["counters"][0]["used"]) == (
        "node", "1234")
    assert (error["result"], error["code"]) == ("error", 3)
    [bad_request] = error["details"]
    assert [v["field"] for v in bad_request["field_violations"]] == ["user_id"]


def test_the_readme_and_the_node_client_use_the_same_loader_options() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Other languages"):]
    section = section[:section.index("\n## ", 1)]
    script = SCRIPT.read_text()
    for option in LOADER_OPTIONS:
        assert option in section and option in script, option
