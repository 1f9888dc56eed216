"""`quotad serve --config FILE.toml`, and the request id of every call."""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from quotad import cli, config_file
from quotad.core import limits
from quotad.config_file import ConfigFileError
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as stubs
from server_process import EXAMPLE_PLANS, ROOT, START_TIMEOUT_S, ServerProcess

EXAMPLE_CONFIG = ROOT / "examples" / "quotad.toml"
LOG_WAIT_S = 10.0


class ConfiguredServer(ServerProcess):
    """`quotad serve --config FILE` and nothing else unless given."""

    def __init__(self, config: Path, *extra_args: str) -> None:
        super().__init__(config.parent, plans=None, extra_args=extra_args)
        self.config = config

    def start(self, listen: str = "") -> ConfiguredServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "quotad", "serve", "--config", str(self.config),
             *self.extra_args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ))
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.address = self.wait_for("serving", START_TIMEOUT_S)["address"]
        return self


@pytest.fixture
def configured(tmp_path):
    started: list[ConfiguredServer] = []

    def start(text: str, *extra_args: str) -> ConfiguredServer:
        folder = tmp_path / "etc"
        folder.mkdir(exist_ok=True)
        shutil.copy(EXAMPLE_PLANS, folder / "plans.toml")
        (folder / "quotad.toml").write_text(text)
        process = ConfiguredServer(folder / "quotad.toml", *extra_args)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.close()


def wait_for_line(server: ServerProcess, **fields: object) -> dict:
    deadline = time.monotonic() + LOG_WAIT_S
    while time.monotonic() < deadline:
        for line in list(server.log_lines):
            if all(line.get(key) == value for key, value in fields.items()):
                return line
        time.sleep(0.02)
    raise AssertionError(f"no log line with {fields}: {server.log_lines[-5:]}")


def test_a_server_started_with_only_a_config_file_takes_every_setting_from_it(configured):
    server = configured('listen = "127.0.0.1:0"\ndata_dir = "data"\nplans = "plans.toml"\n'
                        'metrics_listen = "127.0.0.1:0"\nlog_state_digest = true\n'
                        'log_level = "debug"\nsnapshot_every_records = 10\n')
    serving = server.last("serving")
    assert serving["plans_loaded"] == 2 and serving["metrics"] and "state_digest" in serving
    assert (server.config.parent / "data" / "data.mdb").exists()  # relative to the file
    with grpc.insecure_channel(server.address) as channel:
        plans, call = stubs.AdminServiceStub(channel).ListPlans.with_call(
            pb.ListPlansRequest(), metadata=(("x-request-id", "list-1"),), timeout=10)
    assert [p.id for p in plans.plans] == ["free", "pro"]
    assert ("x-request-id", "list-1") in [(m.key, m.value) for m in call.trailing_metadata()]
    wait_for_line(server, message="call", method="/quotad.v1.AdminService/ListPlans",
                  request_id="list-1")  # debug: an access log, and the id to match it


def test_command_line_flags_win_over_the_config_file(configured, tmp_path):
    server = configured('listen = "127.0.0.1:0"\ndata_dir = "data"\nlog_state_digest = true\n',
                        "--data-dir", str(tmp_path / "flag-data"), "--no-log-state-digest")
    assert "state_digest" not in server.last("serving")
    assert (tmp_path / "flag-data" / "data.mdb").exists()
    assert not (server.config.parent / "data").exists()


@pytest.mark.parametrize("text, named", [
    ('lisen = "127.0.0.1:0"\n', "'lisen'"),
    ('snapshot_every_records = "many"\n', "'snapshot_every_records' must be an integer"),
    ("reflection = 1\n", "'reflection' must be true or false"),
    ('log_level = "loud"\n', "'log_level' must be one of debug, info, warning, error"),
    ("map_size_gib = true\n", "'map_size_gib' must be a number"),
    ('data_dir = ""\n', "'data_dir' must be a non-empty path string"),
    ("listen = [\n", "quotad.toml"),
])
def test_an_unknown_key_a_wrong_type_or_a_bad_file_exits_2_naming_it(tmp_path, text, named):
    config = tmp_path / "quotad.toml"
    config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "quotad", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("quotad: --config ") and named in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_reach_the_config_in_its_units(tmp_path):
    config = tmp_path / "quotad.toml"
    config.write_text("map_size_gib = 2\naudit_retention_days = 1.5\n")
    kwargs = config_file.config_kwargs(config_file.load(config))
    assert kwargs["map_size_bytes"] == 2 * 1024**3
    assert kwargs["audit_retention_ns"] == int(1.5 * config_file.NS_PER_DAY)


def test_the_example_config_holds_every_setting_at_its_default():
    values = config_file.load(EXAMPLE_CONFIG)
    defaults = vars(cli.parser().parse_args(["serve"]))
    no_default = {"plans", "admin_key", "admin_key_file", "tls_cert", "tls_key",  # commented out
                  "shard_map", "shard_id", "cluster"}
    assert set(values) == {s.key for s in config_file.SETTINGS} - no_default
    for key, value in values.items():
        if key != "data_dir":  # a path relative to the file, not to the working directory
            assert value == defaults[key], key
    assert values["data_dir"] == EXAMPLE_CONFIG.parent / "quotad-data"


def serve_flags() -> dict[str, str]:
    """`quotad serve`'s flags, each with the name its value has (--cors-origin: cors_origin)."""
    serve = next(action for action in cli.parser()._actions
                 if isinstance(action, argparse._SubParsersAction)).choices["serve"]
    return {action.option_strings[0]: action.dest for action in serve._actions
            if action.option_strings and action.dest not in ("help", "config")}


def test_every_serve_flag_is_a_config_key_of_its_name_and_no_other_key_is_taken():
    keys = {setting.key for setting in config_file.SETTINGS}
    flags = serve_flags()
    assert {flag[2:].replace("-", "_") for flag in flags} == set(flags.values())
    assert keys == set(flags.values()) | {"admin_key"}  # a key is never a command-line flag


def test_the_readme_shows_the_example_config_file_as_it_is():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Configuration file"):]
    snippet = section[section.index("```toml\n") + len("```toml\n"):section.index("```\n\n")]
    assert snippet == EXAMPLE_CONFIG.read_text(encoding="utf-8")


def test_the_cors_origin_key_lets_that_origin_read_and_the_old_plural_key_is_refused(
        configured, tmp_path):
    server = configured('listen = "127.0.0.1:0"\ndata_dir = "data"\nhttp_listen = "127.0.0.1:0"\n'
                        'cors_origin = ["https://app.example.com"]\n')
    host, _, port = server.last("serving")["http"].rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=LOG_WAIT_S)
    try:
        connection.request("OPTIONS", "/v1/usage?user_id=u1", headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "GET"})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 204
    assert response.getheader("access-control-allow-origin") == "https://app.example.com"
    config = tmp_path / "plural.toml"
    config.write_text('cors_origins = ["https://app.example.com"]\n')
    refused = subprocess.run([sys.executable, "-m", "quotad", "serve", "--config", str(config)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert refused.returncode == 2 and "unknown key 'cors_origins'" in refused.stderr


def test_a_callers_request_id_is_echoed_and_names_its_refused_call_in_the_log(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = stubs.QuotaServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Reserve(pb.ReserveRequest(user_id="u1", event_type="x", amount=0),
                         metadata=(("x-request-id", "checkout-42"),), timeout=10)
        assert ("x-request-id", "checkout-42") in [  # with the status: no extra send
            (m.key, m.value) for m in refused.value.trailing_metadata()]
        line = wait_for_line(server, message="refused", request_id="checkout-42")
        assert line["code"] == "INVALID_ARGUMENT" and line["level"] == "info"
        assert line["method"] == "/quotad.v1.QuotaService/Reserve"
        assert line["status_message"].startswith("amount:")

        ids = []
        admin = stubs.AdminServiceStub(channel)
        longest = "x" * limits.REQUEST_ID_BYTES_MAX
        with pytest.raises(grpc.RpcError) as kept:  # at the limit: the caller's own
            admin.GetPlan(pb.GetPlanRequest(id="nope"), metadata=(("x-request-id", longest),),
                          timeout=10)
        assert ("x-request-id", longest) in [
            (m.key, m.value) for m in kept.value.trailing_metadata()]
        for given in ((), (("x-request-id", "x" * (limits.REQUEST_ID_BYTES_MAX + 1)),),
                      (("x-request-id", ""),)):
            with pytest.raises(grpc.RpcError) as missing:
                admin.GetPlan(pb.GetPlanRequest(id="nope"), metadata=given, timeout=10)
            made = dict((m.key, m.value) for m in missing.value.trailing_metadata())
            ids.append(made["x-request-id"])
            assert wait_for_line(server, message="refused", request_id=ids[-1])["code"] == (
                "NOT_FOUND")
        _, served = admin.ListPlans.with_call(pb.ListPlansRequest(), timeout=10)
        # At info a call that succeeds is logged nowhere, so no id comes back to match.
        assert "x-request-id" not in dict((m.key, m.value) for m in served.trailing_metadata())
    assert len(set(ids)) == 3 and all(0 < len(i) <= 128 and i.isprintable() for i in ids)
    assert not any(line.get("message") == "call" for line in server.log_lines)  # info: quiet


def test_a_watch_has_a_request_id_too(server):
    with grpc.insecure_channel(server.address) as channel:
        stream = stubs.QuotaServiceStub(channel).WatchUsage(
            pb.WatchUsageRequest(user_id="nobody"), metadata=(("x-request-id", "watch-7"),),
            timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            next(stream)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("x-request-id", "watch-7") in [
            (m.key, m.value) for m in refused.value.initial_metadata()]
    line = wait_for_line(server, message="refused", request_id="watch-7")
    assert line["method"] == "/quotad.v1.QuotaService/WatchUsage"


ADMIN_KEY = "ak_" + "k" * 40


def test_an_admin_key_in_the_config_file_needs_an_owner_only_file(tmp_path):
    config = tmp_path / "quotad.toml"
    config.write_text(f'admin_key = "{ADMIN_KEY}"\n')
    config.chmod(0o644)
    with pytest.raises(ConfigFileError, match="chmod 600"):
        config_file.load(config)
    config.chmod(0o600)
    assert config_file.config_kwargs(config_file.load(config))["admin_key"] == ADMIN_KEY


def test_an_admin_key_from_the_config_file_turns_keys_on(configured, tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "quotad.toml").touch(mode=0o600)
    server = configured(f'listen = "127.0.0.1:0"\ndata_dir = "data"\nadmin_key = "{ADMIN_KEY}"\n')
    with grpc.insecure_channel(server.address) as channel:
        admin = stubs.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            admin.ListKeys(pb.ListKeysRequest(app="acme"))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        keys = admin.ListKeys(pb.ListKeysRequest(app="acme"),
                              metadata=[("authorization", f"Bearer {ADMIN_KEY}")])
        assert list(keys.keys) == []


def test_an_admin_key_file_named_in_the_config_file_turns_keys_on(configured, tmp_path):
    (tmp_path / "etc").mkdir()
    key_file = tmp_path / "etc" / "admin.key"
    key_file.write_text(ADMIN_KEY + "\n")
    key_file.chmod(0o600)
    server = configured('listen = "127.0.0.1:0"\ndata_dir = "data"\n'
                        'admin_key_file = "admin.key"\n')  # relative to the file's folder
    with grpc.insecure_channel(server.address) as channel:
        keys = stubs.AdminServiceStub(channel).ListKeys(
            pb.ListKeysRequest(app="acme"), metadata=[("authorization", f"Bearer {ADMIN_KEY}")])
    assert list(keys.keys) == []


def test_the_admin_key_may_not_come_from_two_places(tmp_path):
    config = tmp_path / "quotad.toml"
    config.write_text(f'admin_key = "{ADMIN_KEY}"\nlisten = "127.0.0.1:0"\n')
    config.chmod(0o600)
    result = subprocess.run(
        [sys.executable, "-m", "quotad", "serve", "--config", str(config),
         "--data-dir", str(tmp_path / "data")],
        env={**os.environ, "QUOTAD_ADMIN_KEY": ADMIN_KEY}, capture_output=True, text=True,
        timeout=30, cwd=ROOT)
    assert result.returncode == 2
    assert "set twice" in result.stderr
