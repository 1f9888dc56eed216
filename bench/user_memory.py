"""Memory per subscriber: what each end user costs the core's live state, in one process.

    .venv/bin/python -m bench.user_memory [--users 200000]

Subscribes --users users to a plan of two limit groups (tokens per month, calls per day) and
gives each one Track, as a live server makes them (no snapshot: a snapshot's load shares what
it can across users, and leaves the heap of its decoding behind). Memory lets go of what a
server's log would answer for as it goes, as the server does after each write. Prints the
anonymous RSS the users added, per user, the CPU per subscribe + track, and the objects the
cyclic collector tracks per user (each one a full collection walks).
"""

from __future__ import annotations

import gc
import os
import time

from bench.procfs import memory_bytes
from quotad.core import commands as c
from quotad.core.machine import Core
from quotad.core.plans import LimitGroup, Match, Plan, Window

from .harness import doc_parser

APP = "default"
USERS_MAX = 5_000_000
FORGET_EVERY_USERS = 8192
"""As recovery does every 8,192 records: the records made are durable, memory lets go."""


def _plan() -> Plan:
    matched = Match(event_types=("openai.*",))
    return Plan(id="bench", limit_groups=(
        LimitGroup(key="tokens", label="Tokens", unit="tokens", quota=10**15,
                   window=Window.MONTH, match=matched),
        LimitGroup(key="calls", label="Calls", unit="calls", quota=10**9, window=Window.DAY,
                   match=matched)))


def measure(users: int) -> dict[str, float]:
    core = Core()
    now_ns = 1_800_000_000 * 10**9

    def apply(command: object) -> None:
        nonlocal now_ns
        now_ns += 1000
        outcome = core.apply(command, now_ns)
        assert outcome.error is None, outcome.error

    apply(c.UpsertPlan(app=APP, plan=_plan()))
    user_ids = [f"user-{number:07d}" for number in range(users)]  # made before measuring
    gc.collect()
    tracked_before = len(gc.get_objects())
    anon_before = memory_bytes(os.getpid())["RssAnon"]
    cpu_before_s = time.process_time()
    for number, user_id in enumerate(user_ids):
        apply(c.UpsertSubscription(app=APP, user_id=user_id, plan_id="bench"))
        apply(c.Track(app=APP, user_id=user_id, event_type="openai.chat", amount=5))
        if number % FORGET_EVERY_USERS == 0:
            core.forget_durable(core.sequence)
            core.clear_users_changed()  # as a snapshot does
    core.forget_durable(core.sequence)
    core.clear_users_changed()
    cpu_s = time.process_time() - cpu_before_s
    gc.collect()
    anon_bytes = memory_bytes(os.getpid())["RssAnon"] - anon_before
    assert core.users_count() == users
    return {"bytes_per_user": anon_bytes / users,
            "cpu_us_per_user": cpu_s / users * 1e6,
            "tracked_objects_per_user": (len(gc.get_objects()) - tracked_before) / users}


def main() -> None:
    parser = doc_parser("bench.user_memory", __doc__)
    parser.add_argument("--users", type=int, default=200_000, metavar="N",
                        help=f"users to subscribe, 1 to {USERS_MAX:,} (default: 200,000)")
    options = parser.parse_args()
    if not 1 <= options.users <= USERS_MAX:
        parser.error(f"--users must be 1 to {USERS_MAX:,}")
    figures = measure(options.users)
    print(f"{options.users:,} users subscribed live, two counters each in use")
    print(f"bytes_per_user            {figures['bytes_per_user']:8.0f}   (anonymous RSS)")
    print(f"cpu_us_per_user           {figures['cpu_us_per_user']:8.1f}   (subscribe + track)")
    print(f"tracked_objects_per_user  {figures['tracked_objects_per_user']:8.2f}")


if __name__ == "__main__":
    main()
