"""A FastAPI endpoint guarded by quotad. A dependency reserves the request's upper bound of
tokens before the endpoint runs, and commits what the endpoint used once it returns (or
releases the hold if it raises). A user over quota gets 429 Too Many Requests with
`Retry-After`: the seconds until the denying group's window resets.

Run it (quotad with the example plans), from the checkout:

    .venv/bin/pip install -e '.[examples]'
    ./start --plans examples/plans.toml &                 # quotad on 127.0.0.1:50051
    .venv/bin/python examples/fastapi_guard.py            # the API on 127.0.0.1:8080
    curl -i 127.0.0.1:8080/v1/generate -H 'X-User-Id: user-42' \\
         -H 'Content-Type: application/json' -d '{"prompt": "hello", "max_tokens": 100}'

--quotad (or QUOTAD_TARGET) says where quotad is, --listen where to serve. The user must have
a plan (`quotactl subscribe` or the client's `subscribe`); `--subscribe USER:PLAN` does it at
start-up. quotad unreachable answers 503: the guard fails closed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel, Field
from quotad_client import (AsyncHold, AsyncQuotaClient, FailedPrecondition, QuotadError,
                           QuotaExceeded)

EVENT_TYPE = "openai.chat"
PROMPT_OVERHEAD_TOKENS_MAX = 8
LISTEN_DEFAULT = "127.0.0.1:8080"


class GenerateRequest(BaseModel):
    prompt: str = Field(max_length=16_384)
    model: str = "gpt-4o-mini"
    max_tokens: int = Field(default=256, ge=1, le=4_096)


@dataclass
class Guarded:
    """What the guard hands the endpoint: the request, its user and the open hold."""
    body: GenerateRequest
    user_id: str
    hold: AsyncHold


def retry_after_s(resets_at: datetime | None, now: datetime) -> str | None:
    """Whole seconds until resets_at, at least 1 (None: a lifetime quota never resets)."""
    if resets_at is None:
        return None
    return str(max(1, math.ceil((resets_at - now).total_seconds())))


async def token_guard(request: Request, body: GenerateRequest,
                      user_id: Annotated[str, Header(alias="X-User-Id",
                                                     min_length=1)]) -> AsyncIterator[Guarded]:
    """The dependency: reserve before the endpoint, commit (or release) after it."""
    quota: AsyncQuotaClient = request.app.state.quota
    bound = len(body.prompt.encode()) + PROMPT_OVERHEAD_TOKENS_MAX + body.max_tokens
    try:
        hold = await quota.reserve(user_id, EVENT_TYPE, bound, metadata={"model": body.model})
    except QuotaExceeded as denied:
        retry_after = retry_after_s(denied.resets_at, datetime.now(timezone.utc))
        raise HTTPException(
            status_code=429,
            detail={"error": "quota exhausted", "limit_group": denied.denied_by,
                    "remaining": denied.remaining,
                    "resets_at": denied.resets_at.isoformat() if denied.resets_at else None},
            headers={"Retry-After": retry_after} if retry_after else None) from denied
    except FailedPrecondition as error:  # NO_PLAN: the user has no subscription
        raise HTTPException(status_code=403, detail=f"no plan for this user ({error})") from error
    except QuotadError as error:  # fail closed: no quota answer, no model call
        raise HTTPException(status_code=503, detail="quota service unavailable") from error
    async with hold:  # commits hold.actual when the endpoint returns, releases if it raises
        yield Guarded(body=body, user_id=user_id, hold=hold)


def generate_reply(prompt: str, max_tokens: int) -> tuple[str, int]:
    """Your model call; here an echo, one token per word. Returns the reply and its tokens."""
    words = ["You", "said:", *prompt.split()][:max_tokens]
    return " ".join(words), len(prompt.split()) + len(words)


def create_app(quotad_target: str, subscriptions: tuple[tuple[str, str], ...] = ()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncQuotaClient(quotad_target) as quota:
            for user_id, plan_id in subscriptions:
                await quota.subscribe(user_id, plan_id)
            app.state.quota = quota
            yield

    app = FastAPI(title="An API guarded by quotad", lifespan=lifespan)

    @app.post("/v1/generate")
    async def generate(guarded: Annotated[Guarded, Depends(token_guard)]) -> dict:
        if guarded.body.model == "no-such-model":
            raise HTTPException(status_code=502, detail="the model call failed")
        reply, tokens = generate_reply(guarded.body.prompt, guarded.body.max_tokens)
        guarded.hold.actual = tokens  # committed by the guard once this returns
        return {"reply": reply, "tokens": tokens, "reserved": guarded.hold.amount}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quotad", default=os.environ.get("QUOTAD_TARGET", "127.0.0.1:50051"),
                        help="quotad's gRPC address (default: QUOTAD_TARGET or %(default)s)")
    parser.add_argument("--listen", default=LISTEN_DEFAULT, metavar="HOST:PORT",
                        help="(default: %(default)s)")
    parser.add_argument("--subscribe", action="append", default=[], metavar="USER:PLAN",
                        help="subscribe USER to PLAN at start-up (repeat for several)")
    args = parser.parse_args(argv)
    import uvicorn  # only to serve: the tests drive the app through fastapi's TestClient

    subscriptions = tuple((user, plan) for user, _, plan in
                          (item.partition(":") for item in args.subscribe))
    host, _, port = args.listen.rpartition(":")
    print(f"POST http://{args.listen}/v1/generate, guarded by quotad at {args.quotad}",
          flush=True)
    uvicorn.run(create_app(args.quotad, subscriptions), host=host, port=int(port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
