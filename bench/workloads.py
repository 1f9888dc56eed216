"""What the benchmark asks for: the plan, the users (Zipf hot/cold), and each unit of work.

A *unit* is what one in-flight slot does before it starts the next one: a reserve and its
commit (or release), a lone track, or a reserve that is denied or left to expire. Every target
(quotad, the Redis peers, the echo peer) is driven with the same units from the same seeds.

The plan (one per user, the same for everyone) mirrors examples/plans.toml's "free" plan:

    tokens          quota 10^12 per month   matches openai.*   (never runs out in a run)
    premium_tokens  quota 0     per month   matches model=gpt-4o (denies every request for it)
    credits         a credit balance        matches credits.*, priced per model (x1, x4), its
                    recurring grant of 10^15 a month made at a user's first use (never runs
                    out in a run)

So a denial is a real quota decision (quotad checks every matched group and finds no room in
premium_tokens), and the denial rate is exactly the share of units that ask for the premium
model, whatever the throughput or the run length: usage grows by at most a few 10^9 tokens per
user in a long run, far below the tokens quota.

Workloads (shares are of units):
    pairs    reserve + commit (commit 30-100 % of the reserved amount)
    release  reserve + release
    track    one Track (enforce off unless --track-enforce)
    mix      80 % reserve + commit, 9 % reserve + release, 1 % reserve with a 1 s TTL left to
             expire, 10 % reserve of the premium model (denied): about 90 % of reserves are
             allowed, 10 % denied, 1 % expire
    credits  reserve + commit as pairs, of a credits.chat event: it holds and spends credits
             of the balance alone, amount x the model's rate, as a pairs event counts in the
             tokens quota alone (quotad and echo only: the Redis peers keep no balances)
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

WORKLOADS = ("pairs", "release", "track", "mix", "credits")

PLAN_ID = "bench"
EVENT_TYPE = "openai.chat"
MODEL = "gpt-4o-mini"
PREMIUM_MODEL = "gpt-4o"
TOKENS_QUOTA = 10**12
QUOTAS = {"tokens": TOKENS_QUOTA, "premium_tokens": 0}
# The groups each model's events match (what quotad works out from the plan's match rules;
# the Redis peer is told by its client).
CREDIT_MODELS = {"credit-small": 1, "credit-large": 4}
"""The models the credits workload asks for, with the credits they cost per token."""
CREDITS_MONTHLY = 10**15
CREDITS_EVENT_TYPE = "credits.chat"
EVENT_TYPES = {model: CREDITS_EVENT_TYPE for model in CREDIT_MODELS}
"""The event type of a model's events: EVENT_TYPE unless named here."""
GROUPS = {MODEL: ("tokens",), PREMIUM_MODEL: ("tokens", "premium_tokens"),
          **{model: ("credits",) for model in CREDIT_MODELS}}
PLAN = {
    "id": PLAN_ID,
    "name": "Bench",
    "limit_groups": [
        {"key": "tokens", "label": "Tokens", "unit": "tokens", "quota": QUOTAS["tokens"],
         "window": "month", "match": {"event_types": ["openai.*"]}},
        {"key": "premium_tokens", "label": "Premium tokens", "unit": "tokens",
         "quota": QUOTAS["premium_tokens"], "window": "month",
         "match": {"metadata": {"model": [PREMIUM_MODEL]}}},
        {"key": "credits", "label": "Credits", "unit": "credits", "kind": "balance",
         "match": {"event_types": ["credits.*"]},
         "cost": {"by": "model", "rates": CREDIT_MODELS, "default": 1},
         "grant": {"amount": CREDITS_MONTHLY, "every": "month"}},
    ],
}

AMOUNT_MIN, AMOUNT_MAX = 500, 4000
DEFAULT_TTL_S = 60.0
EXPIRE_TTL_S = 1.0  # the smallest TTL quotad takes

# mix: cumulative shares of unit kinds
MIX_SHARES = (("denied", 0.10), ("expire", 0.01), ("release", 0.09), ("commit", 0.80))
_MIX_CUMULATIVE = tuple(itertools.accumulate(share for _, share in MIX_SHARES))
_MIX_KINDS = tuple(kind for kind, _ in MIX_SHARES)

# the kind of unit each plain workload repeats
_PLAIN = {"pairs": "commit", "release": "release", "track": "track", "credits": "commit"}
_CREDIT_MODEL_NAMES = tuple(CREDIT_MODELS)
# operations (RPCs or scripts) a unit of each kind makes
OPS_PER_UNIT = {"commit": 2, "release": 2, "track": 1, "expire": 1, "denied": 1}


def user_id(index: int) -> str:
    return f"user-{index:07d}"


def parse_workloads(text: str) -> list[str]:
    names = list(WORKLOADS) if text.strip() == "all" else [
        name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"unknown workload(s) {unknown or text!r}; choose from "
                         f"{', '.join(WORKLOADS)} or all")
    return list(dict.fromkeys(names))


class ZipfUsers:
    """Picks user ids with P(rank k) proportional to 1 / k^s (s = 0: uniform)."""

    def __init__(self, users: int, s: float, rng: random.Random) -> None:
        if users < 1:
            raise ValueError("users must be >= 1")
        self._ids = [user_id(i) for i in range(users)]
        self._cumulative = list(itertools.accumulate(1.0 / (rank ** s)
                                                     for rank in range(1, users + 1)))
        self._total = self._cumulative[-1]
        self._rng = rng

    def pick(self) -> str:
        index = bisect.bisect_left(self._cumulative, self._rng.random() * self._total)
        return self._ids[min(index, len(self._ids) - 1)]

    def share_of_top(self, fraction: float) -> float:
        """The share of picks that go to the hottest `fraction` of users."""
        top = max(1, int(len(self._ids) * fraction))
        return self._cumulative[top - 1] / self._total


@dataclass(slots=True)
class Unit:
    kind: str
    """commit | release | track | expire | denied"""
    user: str
    amount: int
    actual: int
    model: str
    ttl_s: float

    @property
    def ops(self) -> int:
        return OPS_PER_UNIT[self.kind]


class UnitMaker:
    def __init__(self, workload: str, users: ZipfUsers, rng: random.Random) -> None:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}")
        self._workload = workload
        self._users = users
        self._rng = rng

    def next(self) -> Unit:
        rng = self._rng
        if self._workload == "mix":
            kind = _MIX_KINDS[min(bisect.bisect_right(_MIX_CUMULATIVE, rng.random()),
                                  len(_MIX_KINDS) - 1)]
        else:
            kind = _PLAIN[self._workload]
        amount = rng.randint(AMOUNT_MIN, AMOUNT_MAX)
        actual = int(amount * rng.uniform(0.3, 1.0))
        if self._workload == "credits":
            model = _CREDIT_MODEL_NAMES[rng.random() < 0.5]
        else:
            model = PREMIUM_MODEL if kind == "denied" else MODEL
        return Unit(kind=kind, user=self._users.pick(), amount=amount, actual=actual,
                    model=model,
                    ttl_s=EXPIRE_TTL_S if kind == "expire" else DEFAULT_TTL_S)
