"""`quotactl` as a real subprocess against a real server."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

import quotad_client as qc
from quotad_client import ctl
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as stubs
from server_process import EXAMPLE_PLANS, ROOT

CTL_TIMEOUT_S = 60.0


def quotactl(address: str, *args: str, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotad_client.ctl", "--target", address, *args],
                          capture_output=True, text=True, timeout=CTL_TIMEOUT_S, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def sequence(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return stubs.AdminServiceStub(channel).GetStateDigest(
            pb.GetStateDigestRequest(), timeout=10).sequence


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int,
                          starts: str) -> None:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(starts), result.stderr


@pytest.fixture
def bare_server(start_server):
    """A real server with no plans loaded."""
    return start_server(plans=None)


def test_plans_apply_shows_a_diff_applies_and_a_second_run_is_unchanged(bare_server, tmp_path):
    address = bare_server.address
    first = quotactl(address, "plans", "apply", str(EXAMPLE_PLANS))
    assert first.returncode == 0, first.stderr
    assert "plan free (Free): new" in first.stdout
    assert "  + tokens (Tokens): 100000 tokens per month; events openai.*" in first.stdout
    assert "2 new, 0 changed, 0 unchanged; applied 2" in first.stdout

    before = sequence(address)
    second = quotactl(address, "plans", "apply", str(EXAMPLE_PLANS))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        "plan free (Free): unchanged", "plan pro (Pro): unchanged",
        "0 new, 0 changed, 2 unchanged; nothing to apply"]
    assert sequence(address) == before

    changed = tmp_path / "plans.toml"
    text = EXAMPLE_PLANS.read_text().replace("2_000_000", "3_000_000")
    changed.write_text(text[:text.rindex("  [[plans.limit_groups]]")])  # pro loses premium
    dry = quotactl(address, "plans", "apply", str(changed), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "plan pro (Pro): changed" in dry.stdout
    assert "  ~ tokens: quota 2000000 -> 3000000" in dry.stdout
    assert "  - premium_tokens: removed (was premium_tokens" in dry.stdout
    assert "dry run: nothing applied" in dry.stdout
    assert sequence(address) == before

    applied = quotactl(address, "plans", "apply", str(changed))
    assert applied.returncode == 0 and "0 new, 1 changed, 1 unchanged; applied 1" in applied.stdout
    with qc.QuotaClient(address, timeout_s=10) as client:
        pro = client.get_plan("pro")
    assert [(g.key, g.quota) for g in pro.limit_groups] == [("tokens", 3_000_000)]


def test_plans_list_and_show_readable_and_as_json(server):
    listed = quotactl(server.address, "plans", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["ID    NAME  GROUPS",
                                          "free  Free  tokens, premium_tokens",
                                          "pro   Pro   tokens, premium_tokens"]
    shown = quotactl(server.address, "plans", "show", "pro")
    assert shown.stdout.splitlines() == [
        "plan pro (Pro)",
        "  tokens (Tokens): 2000000 tokens per month; events openai.*",
        "  premium_tokens (Premium tokens): 50000 tokens per month; model in gpt-4o, gpt-4-turbo",
    ]
    as_json = json.loads(quotactl(server.address, "plans", "show", "pro", "--json").stdout)
    assert as_json["limit_groups"][1] == {
        "key": "premium_tokens", "label": "Premium tokens", "unit": "tokens", "quota": 50000,
        "window": "month", "match": {"event_types": [],
                                     "metadata": {"model": ["gpt-4o", "gpt-4-turbo"]}}}


def test_subscribe_then_usage_shows_used_held_and_remaining(server):
    subscribed = quotactl(server.address, "subscribe", "u1", "pro", "--time-zone", "Asia/Tokyo")
    assert subscribed.stdout == "u1: subscribed to plan pro (time zone Asia/Tokyo)\n"
    again = quotactl(server.address, "subscribe", "u1", "pro", "--time-zone", "Asia/Tokyo")
    assert "unchanged" in again.stdout
    with qc.QuotaClient(server.address, timeout_s=10) as client:
        client.commit(client.reserve("u1", "openai.chat", 500).reservation_id, 300)
        client.reserve("u1", "openai.chat", 200, metadata={"model": "gpt-4o"}, ttl_s=600)
    usage = quotactl(server.address, "usage", "u1")
    assert usage.returncode == 0, usage.stderr
    lines = usage.stdout.splitlines()
    assert lines[0] == "user u1, plan pro"
    assert lines[1].split() == ["GROUP", "WINDOW", "USED", "HELD", "QUOTA", "REMAINING",
                                "OVERAGE", "RESETS", "AT", "FULL", "AT"]
    tokens, premium = (line.split() for line in lines[2:])
    assert tokens[:7] == ["tokens", "month", "300", "200", "2000000", "1999500", "0"]
    assert premium[:7] == ["premium_tokens", "month", "0", "200", "50000", "49800", "0"]
    assert tokens[7].endswith("T15:00:00Z")  # midnight in Tokyo, in UTC


def _lines_of(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_events_lists_the_trail_and_follow_prints_new_events_until_sigterm(server):
    with qc.QuotaClient(server.address, timeout_s=10) as client:
        client.subscribe("u1", "pro")
        client.commit(client.reserve("u1", "openai.chat", 50).reservation_id)
        listed = quotactl(server.address, "events", "u1", "--since", "1h")
        assert listed.returncode == 0, listed.stderr
        kinds = [line.split()[1] for line in listed.stdout.splitlines()]
        assert kinds == ["reserve", "commit"]
        assert "amount=50  allowed  reservation=" in listed.stdout.splitlines()[0]

        follow = subprocess.Popen(
            [sys.executable, "-m", "quotad_client.ctl", "--target", server.address, "events", "u1",
             "-f", "--interval-s", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=ROOT)
        try:
            lines = _lines_of(follow)
            assert [lines.get(timeout=CTL_TIMEOUT_S).split()[1] for _ in range(2)] == [
                "reserve", "commit"]
            client.track("u1", "openai.embed", 7, metadata={"model": "small"})
            new = lines.get(timeout=CTL_TIMEOUT_S).split()
            assert new[1:4] == ["track", "openai.embed", "amount=7"] and "model=small" in new
            follow.send_signal(signal.SIGTERM)
            assert follow.wait(timeout=CTL_TIMEOUT_S) == 0
            assert lines.empty()  # nothing printed twice
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait(timeout=CTL_TIMEOUT_S)


def test_ctrl_c_ends_events_follow_at_once_whenever_it_lands(server):
    """SIGINT at random moments of a follow that polls every 0.1 s, so that some land in the
    middle of a call: each time the process exits 0, within the bound, printing nothing
    twice."""
    rng = random.Random(5)
    with qc.QuotaClient(server.address, timeout_s=10) as client:
        client.subscribe("u1", "pro")
        client.track("u1", "openai.embed", 1)
    for _ in range(6):
        follow = subprocess.Popen(
            [sys.executable, "-m", "quotad_client.ctl", "--target", server.address, "events",
             "u1", "-f", "--interval-s", "0.1"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            lines = _lines_of(follow)
            assert lines.get(timeout=CTL_TIMEOUT_S).split()[1] == "track"
            time.sleep(rng.uniform(0, 0.35))
            follow.send_signal(signal.SIGINT)
            assert follow.wait(timeout=CTL_TIMEOUT_S) == 0, follow.stderr.read()
        finally:
            if follow.poll() is None:
                follow.kill()
                follow.wait(timeout=CTL_TIMEOUT_S)


def test_events_show_a_threshold_crossing_with_its_group_and_percent(server):
    with qc.QuotaClient(server.address, timeout_s=10) as client:
        client.upsert_plan({"id": "tiny", "name": "Tiny", "limit_groups": [
            {"key": "renders", "label": "Renders", "unit": "renders", "quota": 10,
             "window": "lifetime", "match": {"event_types": ["render"]}}]})
        client.subscribe("t1", "tiny")
        client.track("t1", "render", 8)
    listed = quotactl(server.address, "events", "t1")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["track", "threshold"]
    assert "renders reached 80% (window from " in lines[1]


def test_refusals_are_one_line_on_stderr_and_exit_1(server):
    assert_one_line_error(quotactl(server.address, "plans", "show", "nope"), 1,
                          "quotactl: NOT_FOUND: ")
    assert_one_line_error(quotactl(server.address, "usage", "nobody"), 1,
                          "quotactl: FAILED_PRECONDITION: ")
    assert_one_line_error(quotactl(server.address, "subscribe", "u1", "pro", "--time-zone",
                                   "Mars/Olympus"), 1, "quotactl: INVALID_ARGUMENT: time_zone")


def test_keys_create_list_and_revoke_with_the_key_from_the_environment(start_server):
    admin_key = "ak_" + "q" * 40
    server = start_server(env={"QUOTAD_ADMIN_KEY": admin_key})
    as_admin = {"QUOTAD_API_KEY": admin_key}
    created = quotactl(server.address, "keys", "create", "--kind", "secret", "--app", "acme",
                       "--name", "backend", env=as_admin)
    assert created.returncode == 0, created.stderr
    line, secret = created.stdout.splitlines()
    key_id = line.split()[0]
    assert secret.startswith(f"sk_{key_id}_") and "secret  app=acme  name=backend" in line
    assert "shown only now" in created.stderr

    as_backend = {"QUOTAD_API_KEY": secret}
    listed = quotactl(server.address, "keys", "list", env=as_backend)
    assert listed.returncode == 0 and listed.stdout.startswith(key_id), listed
    assert secret not in listed.stdout  # never the secret again

    assert_one_line_error(quotactl(server.address, "keys", "list"), 1,
                          "quotactl: UNAUTHENTICATED")
    assert_one_line_error(quotactl(server.address, "keys", "list", "--app", "other",
                                   env=as_backend), 1, "quotactl: PERMISSION_DENIED")

    revoked = quotactl(server.address, "keys", "revoke", key_id, env=as_admin)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked
    assert_one_line_error(quotactl(server.address, "keys", "list", env=as_backend), 1,
                          "quotactl: UNAUTHENTICATED")


def test_bad_usage_a_bad_file_and_no_server_exit_2_without_a_traceback(server, tmp_path):
    bad_plans = tmp_path / "bad.toml"
    bad_plans.write_text('[[plans]]\nid = "x"\n[[plans.limit_groups]]\nkey = "k"\n'
                         'quota = 1\nwindow = "fortnight"\n')
    assert_one_line_error(quotactl(server.address, "plans", "apply", str(bad_plans)), 2,
                          "quotactl: ")
    assert_one_line_error(quotactl(server.address, "plans", "apply", str(tmp_path / "none")), 2,
                          "quotactl: ")
    unreachable = quotactl("127.0.0.1:1", "--timeout-s", "1", "plans", "list")
    assert_one_line_error(unreachable, 2, "quotactl: cannot reach quotad at 127.0.0.1:1")
    for args in ((), ("events",), ("events", "u1", "--since", "yesterday"),
                 ("events", "u1", "-f", "--interval-s", "0"), ("keys", "create")):
        result = quotactl(server.address, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result
        assert "error:" in result.stderr


@pytest.mark.parametrize("args", [(), ("plans",), ("plans", "apply"), ("plans", "list"),
                                  ("plans", "show"), ("plans", "delete"), ("subscribe",),
                                  ("subscriptions",), ("usage",), ("events",), ("keys",),
                                  ("keys", "create"), ("keys", "revoke"), ("keys", "list"),
                                  ("export",)])
def test_every_help_explains_with_an_example(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        ctl.main([*args, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: quotactl" in text
    if args not in ((), ("plans",), ("keys",)):
        assert "example:\n  quotactl " in text


def test_the_api_key_comes_only_from_the_environment_as_a_bearer_token(monkeypatch):
    monkeypatch.setenv(ctl.API_KEY_ENV, "sk_test")
    with ctl.connect("127.0.0.1:1", 1.0) as client:
        assert ("authorization", "Bearer sk_test") in client._config.metadata
    monkeypatch.delenv(ctl.API_KEY_ENV)
    with ctl.connect("127.0.0.1:1", 1.0) as client:
        assert not any(key == "authorization" for key, _ in client._config.metadata)
    assert "--api-key" not in ctl.parser().format_help()


def _json_lines(result: subprocess.CompletedProcess[str]) -> list:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _json_document(result: subprocess.CompletedProcess[str]):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_read_prints_json_with_json(server):
    quotactl(server.address, "subscribe", "u1", "pro", "--billing-customer-id", "cus_9")
    with qc.QuotaClient(server.address, timeout_s=10) as client:
        client.commit(client.reserve("u1", "openai.chat", 500).reservation_id, 300)
    (usage,) = _json_lines(quotactl(server.address, "usage", "u1", "--json"))
    assert (usage["user_id"], usage["plan_id"]) == ("u1", "pro")
    assert usage["counters"][0]["key"] == "tokens" and usage["counters"][0]["used"] == 300
    assert usage["counters"][0]["resets_at"].endswith("Z")
    events = _json_lines(quotactl(server.address, "events", "u1", "--json"))
    assert [event["kind"] for event in events] == ["reserve", "commit"]
    assert events[1]["amount"] == 300 and events[1]["reservation_id"].startswith("rsv_")
    plans = _json_document(quotactl(server.address, "plans", "list", "--json"))
    assert [plan["id"] for plan in plans] == ["free", "pro"]
    assert plans[1]["limit_groups"][0]["key"] == "tokens"
    (listed,) = _json_lines(quotactl(server.address, "subscriptions", "--json"))
    assert listed == {"user_id": "u1", "plan_id": "pro", "time_zone": "UTC",
                      "billing_customer_id": "cus_9"}


def test_keys_list_as_json_never_shows_a_secret(start_server):
    admin_key = "ak_" + "j" * 40
    server = start_server(env={"QUOTAD_ADMIN_KEY": admin_key})
    as_admin = {"QUOTAD_API_KEY": admin_key}
    created = quotactl(server.address, "keys", "create", "--kind", "public", "--app", "acme",
                       env=as_admin)
    secret = created.stdout.splitlines()[1]
    keys = _json_document(quotactl(server.address, "keys", "list", "--app", "acme", "--json",
                                   env=as_admin))
    assert [(key["app"], key["kind"], key["revoked_at"]) for key in keys] == [
        ("acme", "public", None)]
    assert secret not in json.dumps(keys)


def test_subscriptions_lists_every_page_by_plan(server):
    with qc.QuotaClient(server.address, timeout_s=10) as client:
        for number in range(5):
            client.subscribe(f"user-{number}", "pro" if number % 2 else "free")
        page = client.list_subscriptions(page_size=2)
        assert [s.user_id for s in page.subscriptions] == ["user-0", "user-1"]
        rest = client.list_subscriptions(page_size=2, page_token=page.next_page_token)
        assert [s.user_id for s in rest.subscriptions] == ["user-2", "user-3"]
    listed = quotactl(server.address, "subscriptions", "--plan", "pro")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["user-1", "user-3"]
    assert quotactl(server.address, "subscriptions", "--plan", "none").stdout == (
        "no subscriptions\n")


def test_plans_delete_removes_an_unused_plan_and_refuses_one_in_use(server):
    quotactl(server.address, "subscribe", "u1", "pro")
    assert_one_line_error(quotactl(server.address, "plans", "delete", "pro"), 1,
                          "quotactl: FAILED_PRECONDITION")
    deleted = quotactl(server.address, "plans", "delete", "free")
    assert deleted.returncode == 0 and deleted.stdout == "plan free: deleted\n", deleted
    assert_one_line_error(quotactl(server.address, "plans", "delete", "free"), 1,
                          "quotactl: NOT_FOUND")
    assert [p["id"] for p in _json_document(quotactl(server.address, "plans", "list",
                                                     "--json"))] == ["pro"]
