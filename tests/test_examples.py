"""The examples in examples/ run as a reader runs them, against one real quotad and the local
model server (a peer speaking the OpenAI and Anthropic APIs on 127.0.0.1), and the counters
the server reports afterwards are exactly what each example says it committed.

The command-line examples run as scripts in a child interpreter; the FastAPI guard runs in
process through fastapi's TestClient. Every test has its own user, so they share the servers.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest

from quotad_client import QuotaClient
from server_process import ROOT, ServerProcess

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import as modules too

import local_model_server  # noqa: E402  (examples/)

SCRIPT_TIMEOUT_S = 120.0
EXIT_MODEL_FAILED = 1
EXIT_QUOTA_EXHAUSTED = 3
EXAMPLE_SCRIPTS = ("openai_chat.py", "openai_stream.py", "multi_provider.py", "fastapi_guard.py")


@pytest.fixture(scope="module")
def quotad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("examples") / "data").start()
    try:
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def model_server() -> Iterator[local_model_server.LocalModelServer]:
    server = local_model_server.LocalModelServer("127.0.0.1:0").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def quota(quotad: ServerProcess) -> Iterator[QuotaClient]:
    with QuotaClient(quotad.address) as client:
        yield client


@pytest.fixture
def user() -> str:
    return f"user-{uuid.uuid4().hex[:12]}"


def run_example(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=SCRIPT_TIMEOUT_S, cwd=ROOT)


def openai_args(quotad: ServerProcess, model_server: local_model_server.LocalModelServer,
                user: str) -> tuple[str, ...]:
    return ("--quotad", quotad.address, "--base-url", f"{model_server.base_url}/v1",
            "--user", user)


def tokens_of_an_echo(prompt: str, max_tokens: int) -> int:
    """What the local model server reports for one user message: prompt plus reply."""
    messages = [{"role": "user", "content": prompt}]
    return (local_model_server.prompt_tokens(messages)
            + len(local_model_server.answer_words(messages, max_tokens)))


def committed(stdout: str) -> int:
    return int(re.search(r"committed (\d+) tokens", stdout).group(1))


# --- openai_chat.py -------------------------------------------------------------------------

def test_openai_chat_commits_the_tokens_the_reply_reports_and_returns_the_rest(
        quotad, model_server, quota, user):
    prompt = "Write a haiku about quotas"
    done = run_example("openai_chat.py", *openai_args(quotad, model_server, user),
                       "--max-tokens", "50", prompt)
    assert done.returncode == 0, done.stderr
    assert "reply: You said: Write a haiku about quotas" in done.stdout
    assert committed(done.stdout) == tokens_of_an_echo(prompt, 50)
    tokens = quota.usage(user)["tokens"]
    assert (tokens.used, tokens.held) == (tokens_of_an_echo(prompt, 50), 0)


def test_openai_chat_releases_the_hold_when_the_model_call_fails(
        quotad, model_server, quota, user):
    done = run_example("openai_chat.py", *openai_args(quotad, model_server, user),
                       "--model", local_model_server.MISSING_MODEL)
    assert done.returncode == EXIT_MODEL_FAILED
    assert "the model call failed (NotFoundError" in done.stderr
    assert "was released" in done.stderr
    tokens = quota.usage(user)["tokens"]
    assert (tokens.used, tokens.held) == (0, 0)
    assert [event.kind for event in quota.list_events(user).events] == ["reserve", "release"]


def test_openai_chat_says_which_group_is_exhausted_and_when_it_resets(
        quotad, model_server, quota, user):
    done = run_example("openai_chat.py", *openai_args(quotad, model_server, user),
                       "--plan", "free", "--model", "gpt-4o")  # free: no premium tokens
    assert done.returncode == EXIT_QUOTA_EXHAUSTED
    resets_at = quota.usage(user)["premium_tokens"].resets_at
    assert (f"quota exhausted: {user} has 0 left in limit group 'premium_tokens'"
            in done.stderr)
    assert f"it resets at {resets_at.isoformat()}" in done.stderr
    assert "reply:" not in done.stdout  # the model was never called


# --- openai_stream.py -----------------------------------------------------------------------

def test_openai_stream_extends_the_hold_and_commits_the_final_usage_chunk(
        quotad, model_server, quota, user):
    prompt = "one two three four five six seven eight"
    done = run_example("openai_stream.py", *openai_args(quotad, model_server, user),
                       "--max-tokens", "100", "--extend-every-s", "0", prompt)
    assert done.returncode == 0, done.stderr
    assert f"reply: You said: {prompt}\n" in done.stdout
    extensions = int(re.search(r"extended the hold (\d+) times", done.stdout).group(1))
    assert extensions >= 1
    assert "(the usage chunk)" in done.stdout
    assert committed(done.stdout) == tokens_of_an_echo(prompt, 100)
    tokens = quota.usage(user)["tokens"]
    assert (tokens.used, tokens.held) == (tokens_of_an_echo(prompt, 100), 0)
    kinds = [event.kind for event in quota.list_events(user).events]
    assert kinds == ["reserve", *["extend"] * extensions, "commit"]


def test_openai_stream_releases_the_hold_when_the_stream_cannot_start(
        quotad, model_server, quota, user):
    done = run_example("openai_stream.py", *openai_args(quotad, model_server, user),
                       "--model", local_model_server.MISSING_MODEL)
    assert done.returncode == EXIT_MODEL_FAILED
    assert "was released" in done.stderr
    tokens = quota.usage(user)["tokens"]
    assert (tokens.used, tokens.held) == (0, 0)


# --- multi_provider.py ----------------------------------------------------------------------

def multi_provider_args(quotad, model_server, user) -> tuple[str, ...]:
    return ("--quotad", quotad.address, "--openai-base-url", f"{model_server.base_url}/v1",
            "--anthropic-base-url", model_server.base_url, "--user", user)


def test_multi_provider_counts_both_providers_in_total_and_premium_models_in_premium(
        quotad, model_server, quota, user):
    prompt = "Compare two providers"
    done = run_example("multi_provider.py", *multi_provider_args(quotad, model_server, user),
                       "--max-tokens", "40", prompt)
    assert done.returncode == 0, done.stderr
    assert "openai.chat (gpt-4o-mini): reserved" in done.stdout
    assert "anthropic.messages (claude-opus-4-1): reserved" in done.stdout
    assert re.search(r"anthropic\.messages .* on tokens, premium_tokens\n", done.stdout)
    each = tokens_of_an_echo(prompt, 40)  # both providers echo, one token per word
    usage = quota.usage(user)
    assert usage.plan_id == "two-providers"
    assert (usage["tokens"].used, usage["tokens"].held) == (2 * each, 0)
    assert (usage["premium_tokens"].used, usage["premium_tokens"].held) == (each, 0)
    events = quota.list_events(user).events
    assert [(event.kind, event.event_type) for event in events] == [
        ("reserve", "openai.chat"), ("commit", "openai.chat"),
        ("reserve", "anthropic.messages"), ("commit", "anthropic.messages")]


def test_multi_provider_releases_the_anthropic_hold_when_that_call_fails(
        quotad, model_server, quota, user):
    done = run_example("multi_provider.py", *multi_provider_args(quotad, model_server, user),
                       "--anthropic-model", local_model_server.MISSING_MODEL)
    assert done.returncode == EXIT_MODEL_FAILED
    assert "a model call failed (NotFoundError" in done.stderr
    usage = quota.usage(user)
    assert usage["tokens"].held == 0 and usage["tokens"].used > 0  # the OpenAI call counted
    assert usage["premium_tokens"].used == 0


# --- fastapi_guard.py -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded_api(quotad):
    from fastapi.testclient import TestClient

    import fastapi_guard
    app = fastapi_guard.create_app(quotad.address)
    with TestClient(app) as client:
        yield client


def test_fastapi_guard_commits_what_the_endpoint_used(guarded_api, quota, user):
    quota.subscribe(user, "pro")
    answer = guarded_api.post("/v1/generate", headers={"X-User-Id": user},
                              json={"prompt": "hello quota", "max_tokens": 20})
    assert answer.status_code == 200, answer.text
    tokens = quota.usage(user)["tokens"]
    assert (tokens.used, tokens.held) == (answer.json()["tokens"], 0)
    assert answer.json()["reserved"] > answer.json()["tokens"]


def test_fastapi_guard_answers_429_with_retry_after_until_the_window_resets(
        guarded_api, quota, user):
    quota.subscribe(user, "free")
    before = datetime.now(timezone.utc)
    answer = guarded_api.post("/v1/generate", headers={"X-User-Id": user},
                              json={"prompt": "hello", "model": "gpt-4o"})
    after = datetime.now(timezone.utc)
    assert answer.status_code == 429
    resets_at = quota.usage(user)["premium_tokens"].resets_at
    assert answer.json()["detail"]["limit_group"] == "premium_tokens"
    assert answer.json()["detail"]["resets_at"] == resets_at.isoformat()
    retry_after_s = int(answer.headers["Retry-After"])
    assert (math.ceil((resets_at - after).total_seconds()) <= retry_after_s
            <= math.ceil((resets_at - before).total_seconds()))
    assert quota.usage(user)["tokens"].held == 0


def test_fastapi_guard_releases_the_hold_when_the_endpoint_fails(guarded_api, quota, user):
    quota.subscribe(user, "pro")
    answer = guarded_api.post("/v1/generate", headers={"X-User-Id": user},
                              json={"prompt": "hello", "model": "no-such-model"})
    assert answer.status_code == 502
    tokens = quota.usage(user)["tokens"]
    assert (tokens.used, tokens.held) == (0, 0)
    assert [event.kind for event in quota.list_events(user).events] == ["reserve", "release"]


def test_fastapi_guard_answers_403_for_a_user_without_a_plan(guarded_api, user):
    answer = guarded_api.post("/v1/generate", headers={"X-User-Id": user},
                              json={"prompt": "hello"})
    assert answer.status_code == 403


# --- every example --------------------------------------------------------------------------

@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS)
def test_each_example_says_how_to_run_it_and_the_readme_points_to_it(script: str):
    source = (EXAMPLES / script).read_text(encoding="utf-8")
    docstring = source.split('"""')[1]
    assert f"examples/{script}" in docstring and "--quotad" in docstring
    assert f"(examples/{script})" in (ROOT / "README.md").read_text(encoding="utf-8")
    done = run_example(script, "--help")
    assert done.returncode == 0 and "--quotad" in done.stdout
