"""Guard an OpenAI chat completion with quotad: reserve an upper bound of the tokens, call the
model, commit the tokens it really used, release the hold if the call fails, and say clearly
when the user's quota is exhausted.

Run it offline (quotad with the example plans, and the local model server), from the checkout:

    .venv/bin/pip install -e '.[examples]'
    ./start --plans examples/plans.toml &                 # quotad on 127.0.0.1:50051
    .venv/bin/python examples/local_model_server.py &     # a model on 127.0.0.1:8000
    .venv/bin/python examples/openai_chat.py --user user-42 "Write a haiku about quotas"

Against OpenAI itself: --base-url https://api.openai.com/v1, with OPENAI_API_KEY set.
--quotad (or QUOTAD_TARGET) and --base-url (or OPENAI_BASE_URL) say where the two servers are.
Exit status: 0 done; 1 the model call failed (the hold was released); 3 quota exhausted.
"""

from __future__ import annotations

import argparse
import os
import sys

import openai
from quotad_client import QuotaClient, QuotaExceeded

EVENT_TYPE = "openai.chat"
TOKENS_PER_MESSAGE_MAX = 8
"""Tokens a chat format adds around each message (OpenAI's adds 3 or 4): an upper bound."""
EXIT_MODEL_FAILED = 1
EXIT_QUOTA_EXHAUSTED = 3


def prompt_tokens_max(messages: list[dict[str, str]]) -> int:
    """An upper bound of the prompt's tokens without a tokenizer: a token is at least one
    byte of text, so the bytes of the messages bound their tokens."""
    return sum(len(message["content"].encode()) + TOKENS_PER_MESSAGE_MAX
               for message in messages)


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", default="Write a haiku about quotas")
    parser.add_argument("--user", default="user-42", help="the end user (default: %(default)s)")
    parser.add_argument("--plan", default="pro",
                        help="subscribe the user to this plan first, idempotently "
                             "(default: %(default)s; '' leaves the subscription alone)")
    parser.add_argument("--model", default="gpt-4o-mini", help="(default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=200,
                        help="the most the reply may take (default: %(default)s)")
    parser.add_argument("--quotad", default=os.environ.get("QUOTAD_TARGET", "127.0.0.1:50051"),
                        help="quotad's gRPC address (default: QUOTAD_TARGET or %(default)s)")
    parser.add_argument("--base-url",
                        default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                        help="the OpenAI-compatible API (default: OPENAI_BASE_URL or "
                             "%(default)s, the local model server)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    model = openai.OpenAI(base_url=args.base_url,
                          api_key=os.environ.get("OPENAI_API_KEY", "unused-by-a-local-server"))
    messages = [{"role": "user", "content": args.prompt}]
    bound = prompt_tokens_max(messages) + args.max_tokens
    with QuotaClient(args.quotad) as quota:
        if args.plan:
            quota.subscribe(args.user, args.plan)
        try:
            # Reserve the most the call can cost; the with block commits hold.actual on exit,
            # or releases the hold if the block raises (the model call failed).
            with quota.reserve(args.user, EVENT_TYPE, bound,
                               metadata={"model": args.model}) as hold:
                print(f"reserved {bound} tokens for {args.user} ({EVENT_TYPE}, {args.model})")
                reply = model.chat.completions.create(model=args.model, messages=messages,
                                                      max_tokens=args.max_tokens)
                print(f"reply: {reply.choices[0].message.content}")
                if reply.usage is not None:  # no usage: keep the reserved bound, the safe side
                    hold.actual = reply.usage.total_tokens
        except QuotaExceeded as denied:
            when = f"; it resets at {denied.resets_at.isoformat()}" if denied.resets_at else ""
            print(f"quota exhausted: {args.user} has {denied.remaining} left in limit group "
                  f"{denied.denied_by!r}, {bound} {EVENT_TYPE} tokens asked{when}",
                  file=sys.stderr)
            return EXIT_QUOTA_EXHAUSTED
        except openai.APIError as error:
            print(f"the model call failed ({type(error).__name__}: {error}); "
                  f"the hold of {bound} tokens was released", file=sys.stderr)
            return EXIT_MODEL_FAILED
        committed = hold.commit_result
        assert committed is not None
        print(f"committed {committed.committed} tokens, returned {committed.returned} of the "
              f"{bound} reserved")
        for counter in quota.usage(args.user).counters:
            print(f"{counter.key}: {counter.used} used of {counter.quota}, "
                  f"{counter.remaining} left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
