"""The README's snippets run as written, against real servers, so they cannot drift.

Each ```python block of the README is run as it stands; the only changes are the ones a reader
makes: the server's address for the one the snippet names, and "your code" (the model call,
`notify`, the operator's admin key and CA) given as names. The HTML badge's script runs in
node against the browser endpoint, and the quotactl lines run as shell commands. One server in
the open mode with the example plans (as `./start` serves it) and one with keys and TLS (as
the Security model's operator serves it) serve the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import self_signed_certificate
from quotad_client import QuotaClient
from quotad_contract.plans import load_plans_file
from server_process import EXAMPLE_PLANS, ROOT, ServerProcess

README = (ROOT / "README.md").read_text(encoding="utf-8")
OPEN_TARGET = "127.0.0.1:50051"
"""The address the README's snippets name for the server of `./start`..."""
KEYED_TARGET = "quotad:50051"
"""... and for the operator's server, with keys and TLS (Security model)."""
BROWSER_ORIGIN = "https://quota.example.com"
ADMIN_KEY = "ak_" + "r" * 40
COMMAND_TIMEOUT_S = 60.0
NODE_TIMEOUT_S = 60.0
CROSSING_WAIT_S = 10.0
WATCH_SETTLE_S = (0.5, 2.0, 5.0)
"""How long each attempt lets the watch open before the change it must report."""
FOLLOW_LINE_WAIT_S = 30.0


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, re.S | re.M)


PYTHON_BLOCKS = {  # a call only that block makes -> its name here
    "call_the_model(": "guard", "watch_usage(": "watch", "create_key(": "security flow",
    'hold.counter("spend")': "price per model", "client.grant_credits(": "credit balances"}


def python_block(name: str) -> str:
    found = [block for block in blocks("python")
             if any(PYTHON_BLOCKS[call] == name for call in PYTHON_BLOCKS if call in block)]
    assert len(found) == 1, f"the README has {len(found)} {name} blocks"
    return found[0]


def run_python(block: str, targets: dict[str, str], **your_code: object) -> dict:
    for named, address in targets.items():
        block = block.replace(f'"{named}"', f'"{address}"')
    namespace: dict = {"__name__": "readme", **your_code}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def open_server(tmp_path_factory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("open") / "data").start()
    try:
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    folder = tmp_path_factory.mktemp("keyed")
    cert, key = self_signed_certificate(folder)
    process = ServerProcess(
        folder / "data", plans=None, env={"QUOTAD_ADMIN_KEY": ADMIN_KEY},
        extra_args=("--tls-cert", str(cert), "--tls-key", str(key),
                    "--http-listen", "127.0.0.1:0")).start()
    try:
        yield process, cert
    finally:
        process.close()


def test_every_python_block_of_the_readme_is_one_run_here():
    named = [[name for call, name in PYTHON_BLOCKS.items() if call in block]
             for block in blocks("python")]
    assert sorted(map(tuple, named)) == [("credit balances",), ("guard",), ("price per model",),
                                         ("security flow",), ("watch",)]


# --- Python ----------------------------------------------------------------------------------

def test_guarding_an_llm_call_commits_what_the_model_used(open_server, capsys):
    def call_the_model(prompt: str, max_tokens: int) -> SimpleNamespace:  # your code
        assert prompt and max_tokens == 4_000
        return SimpleNamespace(usage=SimpleNamespace(total_tokens=1_234))

    namespace = run_python(python_block("guard"), {OPEN_TARGET: open_server.address},
                           call_the_model=call_the_model, prompt="Say hello")
    namespace["client"].close()
    printed = capsys.readouterr().out.splitlines()
    assert "Tokens 1234 / 2000000 left: 1998766" in printed
    assert "Premium tokens 1234 / 50000 left: 48766" in printed


def test_the_price_per_model_block_counts_tokens_at_their_rate(tmp_path, capsys):
    server = ServerProcess(tmp_path / "data", plans=ROOT / "examples" / "pricing.toml").start()
    try:
        namespace = run_python(python_block("price per model"), {OPEN_TARGET: server.address})
        namespace["client"].close()
    finally:
        server.close()
    assert capsys.readouterr().out.splitlines() == ["10000", "4000"]


def test_the_credit_balances_block_grants_spends_and_refunds_in_order(tmp_path, capsys):
    server = ServerProcess(tmp_path / "data", plans=ROOT / "examples" / "credits.toml").start()
    try:
        namespace = run_python(python_block("credit balances"), {OPEN_TARGET: server.address})
        namespace["client"].close()
    finally:
        server.close()
    assert capsys.readouterr().out.splitlines() == [
        "6000", "1000 0 True", "5000 4800 False", "5000"]


class Crossed(Exception):
    """What the test's `notify` raises to end the watch once it has seen a crossing."""


def test_the_watch_block_notifies_a_threshold_crossing(open_server):
    crossings: list[tuple[str, str, int]] = []

    def notify(user_id: str, limit_group_key: str, percent: int) -> None:  # your code
        crossings.append((user_id, limit_group_key, percent))
        raise Crossed

    namespace = run_python(python_block("watch"), {OPEN_TARGET: open_server.address},
                           notify=notify)

    async def watch_while_tracking(client: QuotaClient, user_id: str, settle_s: float) -> bool:
        watching = asyncio.create_task(namespace["notify_crossings"](user_id))
        await asyncio.sleep(settle_s)  # a watch reports changes after it opened, not before
        await asyncio.to_thread(client.track, user_id, "render", 8)  # 80 % of 10
        try:
            await asyncio.wait_for(watching, CROSSING_WAIT_S)
        except Crossed:
            return True
        except asyncio.TimeoutError:
            return False
        return False

    with QuotaClient(open_server.address) as client:
        client.upsert_plan({"id": "watched", "limit_groups": [
            {"key": "renders", "quota": 10, "window": "lifetime"}]})
        for attempt, settle_s in enumerate(WATCH_SETTLE_S):
            user_id = f"watcher-{attempt}"
            client.subscribe(user_id, "watched")
            if asyncio.run(watch_while_tracking(client, user_id, settle_s)):
                break
    assert crossings == [(user_id, "renders", 80)]


def test_the_security_model_flow_reads_usage_with_the_browser_key(keyed_server):
    process, cert = keyed_server
    namespace = run_python(python_block("security flow"), {KEYED_TARGET: process.address},
                           ADMIN_KEY=ADMIN_KEY, CA_PEM=cert.read_bytes())
    for name in ("admin", "backend"):
        namespace[name].close()
    with QuotaClient(process.address, api_key=namespace["browser_key"],
                     user_token=namespace["token"], tls_root_cert=cert.read_bytes()) as browser:
        assert browser.usage("user-42").counter("tokens").remaining == 2_000_000


# --- the HTML badge, in node -------------------------------------------------------------------

BADGE_HARNESS = """
const PUBLIC_KEY = process.env.PUBLIC_KEY, USER_TOKEN = process.env.USER_TOKEN;
const shown = {textContent: "…"};
const document = {getElementById: (id) => id === "tokens-left" ? shown : null};
const setInterval = () => {};
%s
showTokensLeft().then(() => console.log(JSON.stringify(shown.textContent)));
"""


def test_the_html_badge_shows_tokens_left_and_a_refusals_message(keyed_server, tmp_path):
    if shutil.which("node") is None:
        pytest.skip("node must be on PATH to run the badge's script")
    process, cert = keyed_server
    [html] = blocks("html")
    script = re.search(r"<script>\n(.*)</script>", html, re.S)[1].replace(
        BROWSER_ORIGIN, f"https://{process.http_address}")
    (tmp_path / "badge.js").write_text(BADGE_HARNESS % script)
    with QuotaClient(process.address, api_key=ADMIN_KEY, tls_root_cert=cert.read_bytes()) as admin:
        backend_key = admin.create_key("secret", app="badge").secret
        public_key = admin.create_key("public", app="badge").secret
    with QuotaClient(process.address, api_key=backend_key,
                     tls_root_cert=cert.read_bytes()) as backend:
        for plan in load_plans_file(EXAMPLE_PLANS):
            backend.upsert_plan(plan)
        backend.subscribe("user-42", "pro")
        backend.track("user-42", "openai.chat", 16_000)
        token = backend.mint_user_token("user-42").token

    def badge(user_token: str) -> str:
        ran = subprocess.run(["node", str(tmp_path / "badge.js")], capture_output=True,
                             text=True, timeout=NODE_TIMEOUT_S,
                             env={**os.environ, "NODE_EXTRA_CA_CERTS": str(cert),
                                  "PUBLIC_KEY": public_key, "USER_TOKEN": user_token})
        assert ran.returncode == 0, ran.stderr
        return json.loads(ran.stdout.splitlines()[-1])

    assert badge(token) == "1984000 tokens left"
    refused = badge("ut1.not-a-token")
    assert refused not in ("…", "") and "tokens left" not in refused


# --- quotactl, as the README writes its command lines -----------------------------------------

def quotactl_lines() -> list[list[str]]:
    """Each indented README line that runs quotactl: its commands, split at `;  `."""
    lines = [line.strip() for line in README.splitlines()
             if line.startswith("    ") and ".venv/bin/quotactl " in line]
    return [[command.strip() for command in re.sub(r"\s+#.*$", "", line).split(";  ")]
            for line in lines]


def quotactl(command: str, target: str, env: dict[str, str] | None = None,
             **placeholders: str) -> subprocess.Popen[str]:
    for placeholder, value in placeholders.items():
        command = command.replace(placeholder, value)
    words = shlex.split(command)
    assignments = {}
    while "=" in words[0] and not words[0].startswith("."):
        name, _, value = words.pop(0).partition("=")
        assignments[name] = value
    assert words[0] == ".venv/bin/quotactl", command
    executable = ROOT / words[0]
    if not executable.exists():  # a test run from another environment: its own quotactl
        executable = Path(sys.executable).parent / "quotactl"
    return subprocess.Popen(
        [str(executable), *words[1:]], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "QUOTAD_TARGET": target, **(env or {}), **assignments})


def finished(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=COMMAND_TIMEOUT_S)
    return process.returncode, out, err


def follow_until_a_line(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    """A command that polls until Ctrl-C: its first line, then Ctrl-C, then its exit code."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + FOLLOW_LINE_WAIT_S
    while not lines and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=COMMAND_TIMEOUT_S)
    reader.join(timeout=COMMAND_TIMEOUT_S)
    return code, lines


def test_the_readme_quotactl_lines_run_against_a_server_in_the_open_mode(open_server):
    commands = [command for line in quotactl_lines() for command in line
                if " keys " not in command]
    assert len(commands) == 13, commands
    outputs = []
    for command in commands:
        if command.endswith(" -f"):
            with QuotaClient(open_server.address) as client:  # an event for it to show
                client.track("user-42", "openai.chat", 1)
            code, lines = follow_until_a_line(quotactl(command, open_server.address))
            assert code == 0 and lines, (command, lines)
            continue
        code, out, err = finished(quotactl(command, open_server.address))
        assert code == 0, (command, err)
        outputs.append((command, out))
    applies = [out for command, out in outputs if "apply examples/plans.toml" in command]
    assert "unchanged" in applies[1]  # the second apply
    [shown] = [out for command, out in outputs if "show pro --json" in command]
    assert json.loads(shown)["id"] == "pro"
    [granted] = [out for command, out in outputs if " grant " in command]
    assert "granted 5000 credits" in granted
    [grants] = [out for command, out in outputs if " grants " in command]
    assert "5000" in grants and "recurring" in grants


def test_the_readme_quotactl_key_lines_run_against_a_server_with_keys(keyed_server):
    process, cert = keyed_server
    [create], [listing, revoke] = [line for line in quotactl_lines()
                                   if any(" keys " in command for command in line)]
    tls = {"QUOTAD_TLS_ROOT_CERT": str(cert)}
    code, out, err = finished(quotactl(create, process.address, tls, **{"$ADMIN_KEY": ADMIN_KEY}))
    assert code == 0, err
    line, secret = out.splitlines()
    key_id = line.split()[0]
    assert "app=acme" in line and "name=backend" in line and secret.startswith("sk_")
    code, out, err = finished(quotactl(listing, process.address, tls, **{"sk_...": secret}))
    assert code == 0 and f"{key_id}  secret  app=acme  name=backend" in out, err
    code, out, err = finished(quotactl(revoke, process.address, tls,
                                       **{"sk_...": secret, "KEY_ID": key_id}))
    assert code == 0 and "revoked" in out, err


def test_the_readme_googleapis_include_folder_command_prints_that_folder():
    [command] = [line.strip() for line in README.splitlines()
                 if line.startswith("    .venv/bin/python -c ")]
    words = shlex.split(command)
    ran = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True,
                         timeout=COMMAND_TIMEOUT_S, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr
    assert (Path(ran.stdout.strip()) / "google" / "rpc" / "status.proto").exists()
