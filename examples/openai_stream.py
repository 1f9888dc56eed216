"""Guard a streamed OpenAI chat completion with quotad: reserve an upper bound, stream the reply
with `stream_options={"include_usage": True}`, extend the hold while a long stream runs, and
commit the tokens of the final usage chunk when the stream ends (release it if the stream fails).

Run it offline (quotad with the example plans, and the local model server), from the checkout:

    .venv/bin/pip install -e '.[examples]'
    ./start --plans examples/plans.toml &                 # quotad on 127.0.0.1:50051
    .venv/bin/python examples/local_model_server.py &     # a model on 127.0.0.1:8000
    .venv/bin/python examples/openai_stream.py --user user-42 "Tell me a long story"

Against OpenAI itself: --base-url https://api.openai.com/v1, with OPENAI_API_KEY set.
--quotad (or QUOTAD_TARGET) and --base-url (or OPENAI_BASE_URL) say where the two servers are.
The hold lives --hold-ttl-s seconds and is extended by as much every --extend-every-s seconds
of streaming, so a caller that dies mid-stream frees it soon, and a long stream keeps it.
Exit status: 0 done; 1 the model call failed (the hold was released); 3 quota exhausted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

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
    parser.add_argument("prompt", nargs="?", default="Tell me a long story about quotas")
    parser.add_argument("--user", default="user-42", help="the end user (default: %(default)s)")
    parser.add_argument("--plan", default="pro",
                        help="subscribe the user to this plan first, idempotently "
                             "(default: %(default)s; '' leaves the subscription alone)")
    parser.add_argument("--model", default="gpt-4o-mini", help="(default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=500,
                        help="the most the reply may take (default: %(default)s)")
    parser.add_argument("--hold-ttl-s", type=float, default=30.0,
                        help="the hold's time to live, and each extension's (default: "
                             "%(default)s)")
    parser.add_argument("--extend-every-s", type=float, default=10.0,
                        help="extend the hold after this many seconds of streaming "
                             "(default: %(default)s)")
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
    extensions = 0
    with QuotaClient(args.quotad) as quota:
        if args.plan:
            quota.subscribe(args.user, args.plan)
        try:
            with quota.reserve(args.user, EVENT_TYPE, bound, metadata={"model": args.model},
                               ttl_s=args.hold_ttl_s) as hold:
                print(f"reserved {bound} tokens for {args.user} ({EVENT_TYPE}, {args.model}), "
                      f"held for {args.hold_ttl_s:g} s")
                stream = model.chat.completions.create(
                    model=args.model, messages=messages, max_tokens=args.max_tokens,
                    stream=True, stream_options={"include_usage": True})
                usage = None
                extended_at = time.monotonic()
                print("reply: ", end="")
                for chunk in stream:
                    for choice in chunk.choices:
                        print(choice.delta.content or "", end="", flush=True)
                    if chunk.usage is not None:  # the last chunk: choices empty, usage set
                        usage = chunk.usage
                    if time.monotonic() - extended_at >= args.extend_every_s:
                        hold.extend(args.hold_ttl_s)  # still streaming: keep the hold alive
                        extended_at = time.monotonic()
                        extensions += 1
                print()
                if usage is not None:  # no usage chunk: commit the reserved bound, to be safe
                    hold.actual = usage.total_tokens
        except QuotaExceeded as denied:
            when = f"; it resets at {denied.resets_at.isoformat()}" if denied.resets_at else ""
            print(f"quota exhausted: {args.user} has {denied.remaining} left in limit group "
                  f"{denied.denied_by!r}, {bound} {EVENT_TYPE} tokens asked{when}",
                  file=sys.stderr)
            return EXIT_QUOTA_EXHAUSTED
        except openai.APIError as error:
            print(f"\nthe model call failed ({type(error).__name__}: {error}); "
                  f"the hold of {bound} tokens was released", file=sys.stderr)
            return EXIT_MODEL_FAILED
        committed = hold.commit_result
        assert committed is not None
        print(f"extended the hold {extensions} times while streaming")
        source = "the usage chunk" if usage is not None else "no usage chunk: the bound"
        print(f"committed {committed.committed} tokens ({source}), returned "
              f"{committed.returned} of the {bound} reserved")
        for counter in quota.usage(args.user).counters:
            print(f"{counter.key}: {counter.used} used of {counter.quota}, "
                  f"{counter.remaining} left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
