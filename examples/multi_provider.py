"""Two providers under one plan: OpenAI calls (`openai.chat`) and Anthropic calls
(`anthropic.messages`) both count in a "tokens" group, and calls of premium models (by the
`model` metadata, whichever provider serves them) also count in a smaller "premium_tokens" group.
One event hits every group it matches, all or nothing.

Run it offline (quotad, and the local model server that speaks both APIs), from the checkout:

    .venv/bin/pip install -e '.[examples]'
    ./start &                                             # quotad on 127.0.0.1:50051
    .venv/bin/python examples/local_model_server.py &     # a model on 127.0.0.1:8000
    .venv/bin/python examples/multi_provider.py --user user-7

It upserts the plan `two-providers` below (idempotent), subscribes the user, makes one call
to each provider with reserve / commit, and prints the counters after each. Against the real
providers: --openai-base-url https://api.openai.com/v1 --anthropic-base-url
https://api.anthropic.com with OPENAI_API_KEY and ANTHROPIC_API_KEY set. --quotad (or
QUOTAD_TARGET) says where quotad is. Exit status: 0 done; 1 a call failed; 3 quota exhausted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import anthropic
import openai
from quotad_client import QuotaClient, QuotaExceeded

PREMIUM_MODELS = ["gpt-4o", "claude-opus-4-1"]
PLAN = {
    "id": "two-providers",
    "name": "Two providers",
    "limit_groups": [
        {"key": "tokens", "label": "Tokens, every provider", "unit": "tokens",
         "quota": 200_000, "window": "month",
         "match": {"event_types": ["openai.*", "anthropic.*"]}},
        {"key": "premium_tokens", "label": "Premium model tokens", "unit": "tokens",
         "quota": 20_000, "window": "month",
         "match": {"metadata": {"model": PREMIUM_MODELS}}},
    ],
}
TOKENS_PER_MESSAGE_MAX = 8
"""Tokens a chat format adds around each message: an upper bound."""
EXIT_CALL_FAILED = 1
EXIT_QUOTA_EXHAUSTED = 3


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="Compare two providers in one line")
    parser.add_argument("--user", default="user-7", help="the end user (default: %(default)s)")
    parser.add_argument("--openai-model", default="gpt-4o-mini", help="(default: %(default)s)")
    parser.add_argument("--anthropic-model", default="claude-opus-4-1",
                        help="(default: %(default)s, a premium model in the plan)")
    parser.add_argument("--max-tokens", type=int, default=300,
                        help="the most each reply may take (default: %(default)s)")
    parser.add_argument("--quotad", default=os.environ.get("QUOTAD_TARGET", "127.0.0.1:50051"),
                        help="quotad's gRPC address (default: QUOTAD_TARGET or %(default)s)")
    parser.add_argument("--openai-base-url",
                        default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                        help="(default: OPENAI_BASE_URL or %(default)s)")
    parser.add_argument("--anthropic-base-url",
                        default=os.environ.get("ANTHROPIC_BASE_URL", "http://127.0.0.1:8000"),
                        help="(default: ANTHROPIC_BASE_URL or %(default)s)")
    return parser.parse_args(argv)


def guarded_call(quota: QuotaClient, user: str, event_type: str, model: str, bound: int,
                 call: Callable[[], tuple[str, int]]) -> None:
    """Reserves `bound` tokens, makes the call (it returns the reply and the tokens it used),
    commits them; a call that raises releases the hold."""
    with quota.reserve(user, event_type, bound, metadata={"model": model}) as hold:
        groups = ", ".join(counter.key for counter in hold.counters)
        print(f"{event_type} ({model}): reserved {bound} tokens on {groups}")
        reply, hold.actual = call()
        print(f"  reply: {reply}")
    assert hold.commit_result is not None
    for counter in hold.commit_result.counters:
        print(f"  committed {hold.commit_result.committed}: {counter.key} {counter.used} used "
              f"of {counter.quota}, {counter.remaining} left")


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    gpt = openai.OpenAI(base_url=args.openai_base_url,
                        api_key=os.environ.get("OPENAI_API_KEY", "unused-by-a-local-server"))
    claude = anthropic.Anthropic(
        base_url=args.anthropic_base_url,
        api_key=os.environ.get("ANTHROPIC_API_KEY", "unused-by-a-local-server"))
    messages = [{"role": "user", "content": args.prompt}]
    bound = len(args.prompt.encode()) + TOKENS_PER_MESSAGE_MAX + args.max_tokens

    def call_openai() -> tuple[str, int]:
        reply = gpt.chat.completions.create(model=args.openai_model, messages=messages,
                                            max_tokens=args.max_tokens)
        return reply.choices[0].message.content or "", reply.usage.total_tokens

    def call_anthropic() -> tuple[str, int]:
        reply = claude.messages.create(model=args.anthropic_model, messages=messages,
                                       max_tokens=args.max_tokens)
        text = "".join(block.text for block in reply.content if block.type == "text")
        return text, reply.usage.input_tokens + reply.usage.output_tokens

    with QuotaClient(args.quotad) as quota:
        quota.upsert_plan(PLAN)
        quota.subscribe(args.user, PLAN["id"])
        try:
            guarded_call(quota, args.user, "openai.chat", args.openai_model, bound, call_openai)
            guarded_call(quota, args.user, "anthropic.messages", args.anthropic_model, bound,
                         call_anthropic)
        except QuotaExceeded as denied:
            when = f"; it resets at {denied.resets_at.isoformat()}" if denied.resets_at else ""
            print(f"quota exhausted: {args.user} has {denied.remaining} left in limit group "
                  f"{denied.denied_by!r}, {bound} {denied.event_type} tokens asked{when}",
                  file=sys.stderr)
            return EXIT_QUOTA_EXHAUSTED
        except (openai.APIError, anthropic.APIError) as error:
            print(f"a model call failed ({type(error).__name__}: {error}); its hold was "
                  "released", file=sys.stderr)
            return EXIT_CALL_FAILED
        print(f"{args.user} on plan {PLAN['id']}:")
        for counter in quota.usage(args.user).counters:
            print(f"  {counter.label}: {counter.used} used of {counter.quota}, "
                  f"{counter.remaining} left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
