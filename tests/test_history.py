"""Concurrent history check against the real server, and the checker's own tests.

C asyncio clients on a few hot users issue random Reserve / Commit / Release / Extend / Track
calls; every call is recorded with its start, its end, its request and its outcome, and
`history_checker.check` proves from the timings alone that no instant had the certainly held
and used amounts above a quota, counts false denials, and checks every counter the answers
carried. At the end GetUsage must equal what the history implies, exactly.

The calls go two ways, one run each: `unary` (one RPC per call, raw stubs) and `client` (one
AsyncQuotaClient with its defaults shared by every caller, as a process of users would: calls
made together travel as one Batch RPC, each mutation with an idempotency key). A call in a
batch is still its own entry in the history, its interval the time its caller awaited it,
which holds the batch's whole RPC: applied somewhere in it, as the checker assumes.

Sizes: 64 clients, 10^4 calls by default; QUOTAD_LONG=1 runs 10^6; QUOTAD_HISTORY_OPS=N and
QUOTAD_HISTORY_CLIENTS=C set them explicitly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import os
import random
import time
from collections import defaultdict

import grpc
import pytest

from history_checker import (
    LOAD_HI, Call, Observed, OutsideModel, check, check_buckets, check_credits,
)
from quotad_client import AsyncQuotaClient, QuotadError
from quotad_contract.v1 import quotad_pb2 as pb
from quotad_contract.v1 import quotad_pb2_grpc as stubs
from test_metrics import _scrape as scrape  # the server's metrics: what it saw, by RPC

G, P = "all", "premium"  # limit groups: every event; premium events only


# --- the checker on hand-built histories -----------------------------------------------------

def quotas_for(*users: str, all_: int = 10, premium: int = 4) -> dict[tuple[str, str], int]:
    return {key: value for user in users for key, value in (((user, G), all_),
                                                             ((user, P), premium))}


def reserve(client, start, end, amount, hold, *, allowed=True, groups=(G,), user="u",
            counters=(), code="OK", denied_by="", rates=()):
    return Call(client, "reserve", user, start, end, groups=groups, amount=amount, hold=hold,
                allowed=allowed, code=code, counters=counters, rates=rates,
                denied_by=denied_by or ("" if allowed else groups[-1]))


def end_call(kind, client, start, end, hold, amount=None, *, code="OK", user="u", counters=()):
    return Call(client, kind, user, start, end, amount=amount, hold=hold, code=code,
                counters=counters)


def track(client, start, end, amount, *, enforce=True, allowed=True, groups=(G,), user="u",
          code="OK", counters=(), rates=()):
    return Call(client, "track", user, start, end, groups=groups, amount=amount,
                enforce=enforce, allowed=allowed, code=code, counters=counters, rates=rates,
                denied_by="" if allowed else groups[-1])


def test_two_holds_certainly_held_together_above_the_quota_are_an_over_admission():
    history = [
        reserve(1, 0, 10, 6, "a"),
        reserve(2, 20, 30, 6, "b"),  # starts after "a" was certainly held: no room for 6
    ]
    report = check(history, quotas_for("u"))
    kinds = sorted(v.kind for v in report.over_admissions)
    assert kinds == ["admission", "instant"], report.over_admissions
    instant = next(v for v in report.over_admissions if v.kind == "instant")
    assert (instant.user, instant.group, instant.time_ns, instant.value) == ("u", G, 30, 12)


def test_usage_plus_a_hold_above_the_quota_is_an_over_admission_too():
    history = [
        reserve(1, 0, 10, 5, "a"),
        end_call("commit", 1, 20, 30, "a", 5),
        track(2, 40, 50, 6),  # 5 used + 6 > 10, certainly
    ]
    report = check(history, quotas_for("u"))
    assert [v.kind for v in report.over_admissions] == ["instant", "admission"]


def test_a_correct_sequential_history_passes_and_gives_the_exact_final_state():
    history = [
        reserve(1, 0, 10, 6, "a", counters=(Observed(G, 0, 6),)),
        reserve(2, 20, 30, 6, "b", allowed=False, counters=(Observed(G, 0, 6),)),
        end_call("extend", 1, 32, 34, "a"),
        end_call("commit", 1, 40, 50, "a", 4, counters=(Observed(G, 4, 0),)),
        track(2, 60, 70, 5, counters=(Observed(G, 9, 0),)),
        track(2, 80, 90, -3, enforce=False, counters=(Observed(G, 6, 0),)),
        reserve(3, 100, 110, 4, "c", counters=(Observed(G, 6, 4),)),
        end_call("commit", 3, 120, 130, "c", counters=(Observed(G, 10, 0),)),  # all 4
        track(1, 140, 150, 1, allowed=False, counters=(Observed(G, 10, 0),)),
        Call(9, "usage", "u", 200, 210, groups=(G,), counters=(Observed(G, 10, 0),)),
    ]
    report = check(history, quotas_for("u"))
    assert report.over_admissions == []
    assert report.false_denials == [] and report.denials == 2 and report.justified_denials == 2
    assert report.counter_mismatches == [] and report.anomalies == []
    assert report.exact("u", G, 205) == (10, 0)
    assert report.exact("u", G, 125) is None  # the commit is in flight
    assert report.exact("u", G, 105) is None  # so is the reserve
    assert report.ops == 9


def test_a_release_racing_a_reserve_may_have_made_room_first():
    history = [
        reserve(1, 0, 10, 6, "a"),
        end_call("release", 1, 15, 25, "a"),
        reserve(2, 12, 20, 6, "b"),  # may have been applied after the release
    ]
    report = check(history, quotas_for("u"))
    assert report.over_admissions == []


def test_a_denial_while_even_the_possible_load_left_room_is_a_false_denial():
    history = [
        reserve(1, 0, 10, 6, "a"),
        end_call("release", 1, 15, 20, "a"),
        reserve(2, 30, 40, 6, "b", allowed=False, counters=(Observed(G, 0, 6),)),
    ]
    report = check(history, quotas_for("u"))
    assert report.false_denials == [2] and report.denials == 1
    assert report.false_denial_rate == 1.0
    assert report.counter_mismatches  # held 6 is impossible after the release
    assert "false denials 1 (100.00% of 1 denials" in report.summary(2)


def test_a_denial_racing_a_release_is_not_false_but_undetermined():
    history = [
        reserve(1, 0, 10, 6, "a"),
        end_call("release", 1, 15, 35, "a"),
        reserve(2, 30, 40, 6, "b", allowed=False, counters=(Observed(G, 0, 6),)),
    ]
    report = check(history, quotas_for("u"))
    assert report.false_denials == [] and report.undetermined_denials == 1
    assert report.counter_mismatches == [] and report.anomalies == []


def test_every_matched_group_counts_all_or_nothing():
    quotas = quotas_for("u", all_=10, premium=4)
    fine = [
        reserve(1, 0, 10, 3, "a", groups=(G, P)),
        reserve(2, 20, 30, 3, "b", groups=(G, P), allowed=False,
                counters=(Observed(G, 0, 3), Observed(P, 0, 3))),
        reserve(3, 40, 50, 3, "c", groups=(G,)),
    ]
    report = check(fine, quotas)
    assert report.over_admissions == [] and report.false_denials == []
    assert report.anomalies == [] and report.counter_mismatches == []
    over = [*fine[:1], reserve(2, 20, 30, 3, "b", groups=(G, P))]
    assert [(v.kind, v.group) for v in check(over, quotas).over_admissions] == [
        ("instant", P), ("admission", P)]


def test_an_ambiguous_outcome_is_possible_but_never_certain():
    history = [
        reserve(1, 0, 10, 6, "a", code="DEADLINE_EXCEEDED"),
        reserve(2, 20, 30, 6, "b"),  # "a" may never have been applied: no over-admission
        reserve(3, 40, 50, 6, "c", allowed=False, counters=(Observed(G, 0, 12),)),
    ]
    report = check(history, quotas_for("u"))
    assert report.over_admissions == [] and report.false_denials == []
    assert report.counter_mismatches == []  # 12 held is possible if "a" was applied
    assert report.exact("u", G, 60) is None
    # A definite refusal changed nothing: then 12 held is impossible.
    refused = [reserve(1, 0, 10, 6, "a", code="INVALID_ARGUMENT"), *history[1:]]
    assert check(refused, quotas_for("u")).counter_mismatches


def test_a_hold_is_certain_only_until_its_earliest_possible_expiry():
    def reserve_ttl(client, start, end, hold, ttl_ns, **kwargs):
        return Call(client, "reserve", "u", start, end, groups=(G,), amount=6, hold=hold,
                    ttl_ns=ttl_ns, **kwargs)

    history = [
        reserve_ttl(1, 0, 10, "a", 100),  # expires in [100, 110]
        reserve(2, 200, 210, 6, "b"),
        end_call("release", 2, 220, 230, "b"),
        reserve_ttl(3, 300, 310, "c", 100),  # expires in [400, 410]
        reserve(4, 405, 415, 6, "d"),  # "c" may still be held, but not certainly
    ]
    report = check(history, quotas_for("u"))
    assert report.over_admissions == []
    # A successful Extend keeps "c" certainly held until 320 + 10_000 at least.
    extended = [*history[:4], Call(3, "extend", "u", 320, 330, hold="c", ttl_ns=10_000)]
    denied = reserve(4, 500, 510, 6, "d", allowed=False, counters=(Observed(G, 0, 6),))
    report = check([*extended, denied], quotas_for("u"))
    assert report.false_denials == [] and report.justified_denials == 1
    assert report.counter_mismatches == []
    report = check([*extended, reserve(4, 500, 510, 6, "d")], quotas_for("u"))
    assert [v.kind for v in report.over_admissions] == ["instant", "admission"]
    # An Extend to 5 ns may have ended it at 325 already.
    shortened = [*history[:4], Call(3, "extend", "u", 320, 330, hold="c", ttl_ns=5,
                                    code="UNAVAILABLE"), reserve(4, 340, 350, 6, "d")]
    assert check(shortened, quotas_for("u")).over_admissions == []


def test_calls_of_one_batch_share_its_interval_and_are_checked_one_by_one():
    # One Batch RPC from 0 to 10 carried both Reserves: each is its own entry with the
    # batch's interval. Both granted: 12 certainly held from 10 on, above the quota of 10.
    batch = [reserve(1, 0, 10, 6, "a"), reserve(2, 0, 10, 6, "b")]
    assert [v.kind for v in check(batch, quotas_for("u")).over_admissions] == ["instant"]
    # Applied in order within the batch, the second is denied with the first one's hold in
    # its counters: a raced denial, not a false one; a Release and a Reserve sharing a
    # later batch may have been applied in either order: room either way.
    history = [
        reserve(1, 0, 10, 6, "a", counters=(Observed(G, 0, 6),)),
        reserve(2, 0, 10, 6, "b", allowed=False, counters=(Observed(G, 0, 6),)),
        end_call("release", 1, 20, 30, "a", counters=(Observed(G, 0, 6),)),
        reserve(2, 20, 30, 6, "c", counters=(Observed(G, 0, 6),)),
    ]
    report = check(history, quotas_for("u"))
    assert report.over_admissions == [] and report.anomalies == []
    assert report.denials == report.undetermined_denials == 1 and report.false_denials == []
    assert report.counter_mismatches == []
    assert report.exact("u", G, 40) == (0, 6)


def test_a_priced_group_counts_amount_times_rate_and_its_commit_the_holds_rate():
    """premium counts 3 per unit: 2 units are 6 of its 4, though 2 of all's 10."""
    priced = (G, P)
    over = check([reserve(0, 0, 10, 2, "a", groups=priced, rates=(1, 3))], quotas_for("u"))
    assert [(v.group, v.value) for v in over.over_admissions] == [(P, 6), (P, 6)]
    history = [
        reserve(0, 0, 10, 1, "a", groups=priced, rates=(1, 3),
                counters=(Observed(G, 0, 1), Observed(P, 0, 3))),
        end_call("commit", 0, 20, 30, "a", counters=(Observed(G, 1, 0), Observed(P, 3, 0))),
        track(1, 40, 50, 1, groups=priced, rates=(1, 2), allowed=False,
              counters=(Observed(G, 1, 0), Observed(P, 3, 0))),  # 3 + 2 > 4: justified
        track(1, 60, 70, -1, groups=priced, rates=(1, 3),
              counters=(Observed(G, 0, 0), Observed(P, 0, 0))),
    ]
    report = check(history, quotas_for("u"))
    assert (report.over_admissions, report.false_denials, report.anomalies,
            report.counter_mismatches) == ([], [], [], [])
    assert report.justified_denials == 1
    assert report.exact("u", P, 35) == (3, 0) and report.exact("u", G, 35) == (1, 0)
    # the same denial at rate 1 had room: a false denial, and its counter shows the room
    false = check(history[:2] + [dataclasses.replace(history[2], rates=(1, 1))],
                  quotas_for("u"))
    assert false.false_denials == [2] and false.anomalies


def test_histories_outside_the_model_are_refused():
    with pytest.raises(OutsideModel, match="above the reserved"):
        check([reserve(1, 0, 10, 3, "a"), end_call("commit", 1, 20, 30, "a", 4)],
              quotas_for("u"))
    with pytest.raises(OutsideModel, match="without enforce"):
        check([track(1, 0, 10, 3, enforce=False)], quotas_for("u"))
    # A refund that may overlap the usage it refunds might have met the clamp at 0.
    with pytest.raises(OutsideModel, match="clamp"):
        check([track(1, 0, 10, 3), track(2, 5, 15, -3)], quotas_for("u"))
    check([track(1, 0, 10, 3), track(2, 10, 15, -3)], quotas_for("u"))


def test_answers_no_correct_server_gives_are_anomalies():
    history = [
        reserve(1, 0, 10, 3, "a"),
        end_call("commit", 1, 20, 30, "a"),
        end_call("release", 1, 40, 50, "a"),
        reserve(2, 60, 70, 3, "b", allowed=False, counters=(Observed(G, 3, 0),)),
        end_call("commit", 2, 80, 90, "b"),
    ]
    anomalies = check(history, quotas_for("u")).anomalies
    assert len(anomalies) == 3, anomalies
    assert "1 commits and 1 releases" in anomalies[0]
    assert "never granted" in anomalies[1]
    assert "shows room" in anomalies[2]


# --- rate buckets on hand-built histories ----------------------------------------------------

B = "bucket"


def granted(at_ns: int, amount: int, hold: str, *, user="u"):
    """An allowed Reserve of the bucket the server applied at at_ns."""
    return Call(1, "reserve", user, at_ns, at_ns + 1, groups=(B,), amount=amount, hold=hold,
                server_ns=at_ns)


def test_a_bucket_granting_within_its_capacity_plus_refill_passes():
    buckets = {("u", B): (10, 10)}  # 10 tokens, refilled over 10 ns: one a ns
    history = [granted(0, 10, "a"), end_call("commit", 1, 2, 3, "a"),
               granted(5, 5, "b"), end_call("commit", 1, 6, 7, "b"),
               granted(6, 2, "c"), end_call("commit", 1, 7, 8, "c", 1)]
    report = check_buckets(history, buckets)
    assert report.overdraws == [] and report.grants == 3
    assert report.least_slack == 1  # 0 .. 6: 16 kept of 10 + 6 + 1


def test_a_bucket_granting_past_its_capacity_plus_refill_is_an_overdraw():
    buckets = {("u", B): (10, 10)}
    history = [granted(0, 10, "a"), end_call("commit", 1, 2, 3, "a"),
               granted(1, 10, "b"), end_call("commit", 1, 2, 3, "b")]
    [overdraw] = check_buckets(history, buckets).overdraws
    assert (overdraw.start_ns, overdraw.end_ns, overdraw.kept, overdraw.allowed) == (
        0, 1, 20, 12)


def test_a_released_hold_and_a_commit_of_less_keep_only_what_was_committed():
    buckets = {("u", B): (10, 10)}
    history = [granted(0, 10, "a"), end_call("release", 1, 2, 3, "a"),
               granted(1, 10, "b"), end_call("commit", 1, 2, 3, "b", 2),
               granted(2, 10, "c"), end_call("commit", 1, 3, 4, "c")]
    assert check_buckets(history, buckets).overdraws == []  # 0 + 2 + 10 of 10 + 2 + 1


def test_bucket_histories_outside_the_model_are_refused():
    buckets = {("u", B): (10, 10)}
    with pytest.raises(OutsideModel, match="Track"):
        check_buckets([track(1, 0, 1, 3, groups=(B,))], buckets)
    with pytest.raises(OutsideModel, match="server time"):
        check_buckets([reserve(1, 0, 1, 3, "a", groups=(B,))], buckets)


# --- the checker against a simulated server, correct or broken -------------------------------

def simulate(seed: int, *, bug: str = "", clients: int = 8, ops_per_client: int = 80,
             quota_all: int = 40, quota_premium: int = 15) -> tuple[list[Call], dict, dict]:
    """A single-writer model server under concurrent clients: each call is applied at a random
    odd instant strictly between its even start and end. Premium is priced: a premium event
    counts 1, 2 or 3 per unit there (its model's rate). Returns the history, the quotas and
    the model's final counters."""
    rng = random.Random(seed)
    quotas = {("u", G): quota_all, ("u", P): quota_premium}
    state = {G: [0, 0], P: [0, 0]}  # used, held
    holds: dict[str, tuple[tuple[str, ...], int, str, tuple[int, ...]]] = {}
    """label -> groups, amount, status, rates"""
    live: dict[int, list[str]] = defaultdict(list)
    net: dict[tuple[int, str], int] = defaultdict(int)
    left = {c: ops_per_client for c in range(clients)}
    history: list[Call] = []
    queue: list[tuple[int, int, str, int, dict]] = []
    serial = 0

    def push(time_ns: int, what: str, client: int, call: dict) -> None:
        nonlocal serial
        serial += 1
        heapq.heappush(queue, (time_ns, serial, what, client, call))

    def counters(groups):
        return tuple(Observed(g, *state[g]) for g in groups)

    def room(groups, rates, amount):
        for g, rate in zip(groups, rates):
            used, held = state[g]
            if bug == "ignore_held":
                held = 0
            if used + held + amount * rate > quotas[("u", g)] - (3 if bug == "deny_early"
                                                                   else 0):
                return g
        return ""

    def event():
        """(groups, rates) of an event: every event is in all, a premium one in premium too."""
        return rng.choice([((G,), (1,)), ((G, P), (1, rng.choice([1, 2, 3])))])

    def start(client: int, now: int) -> None:
        if left[client] == 0:
            return
        left[client] -= 1
        call: dict = {"start": now}
        mine, r = live[client], rng.random()
        if mine and (left[client] < len(mine) or r < 0.35):
            call["kind"] = rng.choice(["commit", "commit", "release"])
            call["hold"] = mine.pop(rng.randrange(len(mine)))
            if call["kind"] == "commit":
                call["amount"] = rng.choice([None, rng.randint(0, holds[call["hold"]][1])])
        elif mine and r < 0.4:
            call["kind"], call["hold"] = "extend", rng.choice(mine)
        elif r < 0.55:
            groups, rates = event()
            call.update(kind="track", amount=rng.randint(1, 8), groups=groups, rates=rates)
        elif r < 0.7 and net[(client, G)] > 0:
            groups, rates = (((G, P), (1, rng.choice([1, 2, 3])))
                             if net[(client, P)] > 0 and rng.random() < 0.5 else ((G,), (1,)))
            most = min(net[(client, g)] // rate for g, rate in zip(groups, rates))
            if most == 0:
                groups, rates, most = (G,), (1,), net[(client, G)]
            call.update(kind="track", amount=-rng.randint(1, most), groups=groups,
                        rates=rates)
        else:
            serial_label = f"{client}.{left[client]}"
            groups, rates = event()
            call.update(kind="reserve", amount=rng.randint(1, 10), hold=serial_label,
                        groups=groups, rates=rates)
        apply_at = now + 2 * rng.randint(0, 6) + 1
        push(apply_at, "apply", client, call)
        call["end"] = apply_at + 2 * rng.randint(0, 6) + 1

    def apply(client: int, call: dict) -> None:
        kind = call["kind"]
        if kind == "reserve":
            groups, rates, amount = call["groups"], call["rates"], call["amount"]
            call["denied_by"] = room(groups, rates, amount)
            call["allowed"] = not call["denied_by"]
            if call["allowed"]:
                for g, rate in zip(groups, rates):
                    state[g][1] += amount * rate
                holds[call["hold"]] = (groups, amount, "live", rates)
            call["counters"] = counters(groups)
        elif kind == "track":
            groups, rates, amount = call["groups"], call["rates"], call["amount"]
            call["denied_by"] = room(groups, rates, amount) if amount > 0 else ""
            call["allowed"] = not call["denied_by"]
            if call["allowed"]:
                for g, rate in zip(groups, rates):
                    state[g][0] = max(0, state[g][0] + amount * rate)
            call["counters"] = counters(groups)
        elif kind in ("commit", "release"):
            groups, amount, _, rates = holds[call["hold"]]
            used = amount if call.get("amount") is None else call["amount"]
            for g, rate in zip(groups, rates):  # at the rates the hold was taken at
                if not (bug == "lost_release" and kind == "release"):
                    state[g][1] -= amount * rate
                if kind == "commit":
                    state[g][0] += used * rate
            holds[call["hold"]] = (groups, amount, kind, rates)
            call["counters"] = counters(groups)

    def end(client: int, call: dict) -> None:
        kind = call["kind"]
        groups, rates = call.get("groups", ()), call.get("rates", ())
        if kind in ("commit", "release", "extend"):
            groups, rates = holds[call["hold"]][0], holds[call["hold"]][3]
        history.append(Call(
            client, kind, "u", call["start"], call["end"], groups=call.get("groups", ()),
            rates=call.get("rates", ()), amount=call.get("amount"), hold=call.get("hold", ""),
            allowed=call.get("allowed", True), denied_by=call.get("denied_by", ""),
            counters=call.get("counters", ())))
        if kind == "reserve" and call["allowed"]:
            live[client].append(call["hold"])
        elif kind == "commit":
            used = holds[call["hold"]][1] if call["amount"] is None else call["amount"]
            for g, rate in zip(groups, rates):
                net[(client, g)] += used * rate
        elif kind == "track" and call["allowed"]:
            for g, rate in zip(groups, rates):
                net[(client, g)] += call["amount"] * rate
        push(call["end"] + 2 * rng.randint(0, 3), "start", client, {})

    for client in range(clients):
        push(2 * rng.randint(0, 5), "start", client, {})
    while queue:
        now, _, what, client, call = heapq.heappop(queue)
        if what == "start":
            start(client, now)
        elif what == "apply":
            apply(client, call)
            push(call["end"], "end", client, call)
        else:
            end(client, call)
    final = {g: tuple(state[g]) for g in (G, P)}
    return history, quotas, final


def test_the_checker_finds_nothing_wrong_with_a_correct_single_writer():
    denials = 0
    for seed in range(30):
        history, quotas, final = simulate(seed)
        report = check(history, quotas)
        assert report.over_admissions == [], seed
        assert report.false_denials == [] and report.anomalies == [], seed
        assert report.counter_mismatches == [], (seed, report.counter_mismatches[:3])
        last = max(call.end_ns for call in history)
        assert {g: report.exact("u", g, last) for g in (G, P)} == final, seed
        denials += report.denials
    assert denials > 100  # the simulation does contend


def test_the_checker_catches_a_server_that_ignores_holds():
    found = sum(bool(check(*simulate(seed, bug="ignore_held")[:2]).over_admissions)
                for seed in range(30))
    assert found >= 25, found


def test_the_checker_catches_a_server_that_denies_with_room_left():
    found = 0
    for seed in range(30):
        report = check(*simulate(seed, bug="deny_early")[:2])
        found += bool(report.false_denials) and bool(report.anomalies)
    assert found >= 25, found


def test_the_checker_catches_a_release_that_keeps_its_hold():
    found = 0
    for seed in range(30):
        history, quotas, _ = simulate(seed, bug="lost_release")
        report = check(history, quotas)
        found += bool(report.counter_mismatches)
    assert found >= 25, found


# --- the real server -------------------------------------------------------------------------

USERS = ("hot0", "hot1", "hot2", "hot3")
EVENT_GROUPS = {"chat": (G,), "premium.chat": (G, P)}
MODEL_RATES = {"mini": 1, "large": 3}
"""Premium is priced by model: a premium event counts its amount x this there."""
QUOTA_ALL, QUOTA_PREMIUM = 1000, 300
TTL_S = 60
LIVE_HOLDS_PER_CLIENT = 2
CROWDED = 0.6
RPC_TIMEOUT_S = 30.0
HOLD_AGE_MAX_NS = TTL_S * 1_000_000_000 // 4
"""A client ends a hold this old first: nothing comes near its expiry."""


def workload_size() -> tuple[int, int, float]:
    """(operations, clients, time limit in seconds)."""
    long_run = os.environ.get("QUOTAD_LONG") == "1"
    ops = int(os.environ.get("QUOTAD_HISTORY_OPS", 10**6 if long_run else 10**4))
    clients = int(os.environ.get("QUOTAD_HISTORY_CLIENTS", 64))
    return ops, clients, max(40.0, ops / 100)  # 10^4: 40 s; 10^6: 10^4 s


PLAN = pb.Plan(id="history", name="History", limit_groups=[
    pb.LimitGroup(key=G, label="All", unit="units", quota=QUOTA_ALL, window=pb.LIFETIME,
                  match=pb.Match(event_types=["*"])),
    pb.LimitGroup(key=P, label="Premium", unit="units", quota=QUOTA_PREMIUM,
                  window=pb.LIFETIME, match=pb.Match(event_types=["premium.*"]),
                  cost=pb.Cost(by="model", rates=MODEL_RATES)),
])


def rates_of(event_type: str, model: str) -> tuple[int, ...]:
    """What one unit of the event counts in each of its groups."""
    return tuple(MODEL_RATES[model] if group == P else 1 for group in EVENT_GROUPS[event_type])


def observed(response) -> tuple[Observed, ...]:
    return tuple(Observed(c.key, c.used, c.held) for c in response.counters)


class UnaryCalls:
    """Each call its own unary RPC, through raw stubs."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = stubs.QuotaServiceStub(channel)

    async def reserve(self, user: str, event_type: str, amount: int, model: str):
        r = await self.stub.Reserve(pb.ReserveRequest(
            user_id=user, event_type=event_type, amount=amount, ttl={"seconds": TTL_S},
            metadata={"model": model}), timeout=RPC_TIMEOUT_S)
        return r.allowed, r.denied_by, r.reservation_id, observed(r)

    async def commit(self, reservation_id: str, amount: int | None):
        request = pb.CommitRequest(reservation_id=reservation_id)
        if amount is not None:
            request.amount = amount
        r = await self.stub.Commit(request, timeout=RPC_TIMEOUT_S)
        return r.committed, observed(r)

    async def release(self, reservation_id: str):
        r = await self.stub.Release(pb.ReleaseRequest(reservation_id=reservation_id),
                                    timeout=RPC_TIMEOUT_S)
        return observed(r)

    async def extend(self, reservation_id: str) -> None:
        await self.stub.Extend(pb.ExtendRequest(reservation_id=reservation_id,
                                                ttl={"seconds": TTL_S}), timeout=RPC_TIMEOUT_S)

    async def track(self, user: str, event_type: str, amount: int, enforce: bool, model: str):
        r = await self.stub.Track(pb.TrackRequest(
            user_id=user, event_type=event_type, amount=amount, enforce=enforce,
            metadata={"model": model}), timeout=RPC_TIMEOUT_S)
        return r.allowed, r.denied_by, observed(r)

    async def usage(self, user: str):
        return observed(await self.stub.GetUsage(pb.GetUsageRequest(user_id=user),
                                                 timeout=RPC_TIMEOUT_S))


class ClientCalls:
    """The same calls through one AsyncQuotaClient with its defaults: what the callers have
    in flight together is coalesced into Batch RPCs, every mutation gets an idempotency key,
    UNAVAILABLE is retried under that key."""

    def __init__(self, client: AsyncQuotaClient) -> None:
        self.client = client

    async def reserve(self, user: str, event_type: str, amount: int, model: str):
        hold = await self.client.reserve(user, event_type, amount, ttl_s=TTL_S,
                                         metadata={"model": model}, raise_on_deny=False)
        return hold.allowed, hold.denied_by, hold.reservation_id, observed(hold)

    async def commit(self, reservation_id: str, amount: int | None):
        result = await self.client.commit(reservation_id, amount)
        return result.committed, observed(result)

    async def release(self, reservation_id: str):
        return observed(await self.client.release(reservation_id))

    async def extend(self, reservation_id: str) -> None:
        await self.client.extend(reservation_id, TTL_S)

    async def track(self, user: str, event_type: str, amount: int, enforce: bool, model: str):
        result = await self.client.track(user, event_type, amount, enforce=enforce,
                                         metadata={"model": model}, raise_on_deny=False)
        return result.allowed, result.denied_by, observed(result)

    async def usage(self, user: str):
        return observed(await self.client.usage(user))


class Client:
    """One caller: its holds, what it has used per (user, group), its share of the calls."""

    def __init__(self, index: int, calls: UnaryCalls | ClientCalls, budget: int,
                 deadline_ns: int, history: list[Call],
                 users: tuple[str, ...] = USERS) -> None:
        self.index = index
        self.users = users
        """The hot users it picks from."""
        self.calls = calls
        self.budget = budget
        self.deadline_ns = deadline_ns
        self.history = history
        self.rng = random.Random(index)
        self.live: list[tuple[str, str, str, int, str, int, str]] = []
        """(label, user, event type, amount, reservation id, reserved at, model)."""
        self.net: dict[tuple[str, str], int] = defaultdict(int)
        """Usage (counted) this client recorded and did not refund yet: what it may refund."""
        self.serial = 0
        self.seen: dict[tuple[str, str], int] = defaultdict(int)
        """The `used` of each (user, group) in the last answer that showed it."""

    async def call(self, method, *args):
        """(start, end, what the call returned or None, the status code's name)."""
        start = time.monotonic_ns()
        try:
            response, code = await method(*args), "OK"
        except grpc.aio.AioRpcError as error:
            response, code = None, error.code().name
        except QuotadError as error:
            response, code = None, error.code.name
        return start, time.monotonic_ns(), response, code

    async def run(self) -> None:
        rng = self.rng
        for done in range(self.budget):
            now = time.monotonic_ns()
            left = self.budget - done  # this call included
            closing = left <= len(self.live) or now > self.deadline_ns
            if closing and not self.live:
                return
            may_hold = left >= len(self.live) + 2 and len(self.live) < LIVE_HOLDS_PER_CLIENT
            r, user = rng.random(), rng.choice(self.users)
            event_type = rng.choice(list(EVENT_GROUPS))
            if self.live and (closing or r < 0.3 or now - self.live[0][5] > HOLD_AGE_MAX_NS):
                oldest = now - self.live[0][5] > HOLD_AGE_MAX_NS
                hold = self.live.pop(0 if oldest else rng.randrange(len(self.live)))
                await (self.commit(hold) if rng.random() < 0.7 else self.release(hold))
            elif self.live and r < 0.35:
                await self.extend(rng.choice(self.live))
            elif self.net[(user, G)] > 0 and (r < 0.45 or self.crowded(user) and r < 0.7):
                await self.refund(user)
            elif r < 0.55:
                await self.track(user, event_type, rng.randint(1, 20))
            elif may_hold:
                await self.reserve(user, event_type, rng.randint(1, 40),
                                   rng.choice(list(MODEL_RATES)))
            elif self.live:
                await self.commit(self.live.pop(rng.randrange(len(self.live))))
            else:
                await self.track(user, event_type, rng.randint(1, 20))

    def record(self, call: Call) -> None:
        self.history.append(call)
        for counter in call.counters:
            self.seen[(call.user, counter.group)] = counter.used

    def crowded(self, user: str) -> bool:
        """The user's last seen usage is past CROWDED of a quota: time to give some back."""
        return (self.seen[(user, G)] > CROWDED * QUOTA_ALL
                or self.seen[(user, P)] > CROWDED * QUOTA_PREMIUM)

    async def reserve(self, user: str, event_type: str, amount: int, model: str) -> None:
        self.serial += 1
        label = f"{self.index}.{self.serial}"
        start, end, response, code = await self.call(self.calls.reserve, user, event_type,
                                                     amount, model)
        allowed, denied_by, reservation_id, counters = response or (False, "", "", ())
        self.record(Call(
            self.index, "reserve", user, start, end, groups=EVENT_GROUPS[event_type],
            rates=rates_of(event_type, model), amount=amount, hold=label,
            ttl_ns=TTL_S * 10**9, code=code, allowed=allowed, denied_by=denied_by,
            counters=counters))
        if allowed:
            self.live.append((label, user, event_type, amount, reservation_id, start, model))

    async def commit(self, hold) -> None:
        label, user, event_type, reserved, reservation_id, _, model = hold
        amount = self.rng.choice([None, self.rng.randint(0, reserved)])
        start, end, response, code = await self.call(self.calls.commit, reservation_id,
                                                     amount)
        self.record(Call(self.index, "commit", user, start, end, amount=amount,
                         hold=label, code=code, counters=response[1] if response else ()))
        if response is not None:
            committed = response[0]
            assert committed == (reserved if amount is None else amount)
            for group, rate in zip(EVENT_GROUPS[event_type], rates_of(event_type, model)):
                self.net[(user, group)] += committed * rate

    async def release(self, hold) -> None:
        label, user, _, _, reservation_id, _, _ = hold
        start, end, response, code = await self.call(self.calls.release, reservation_id)
        self.record(Call(self.index, "release", user, start, end, hold=label,
                         code=code, counters=response or ()))

    async def extend(self, hold) -> None:
        label, user, _, _, reservation_id, _, _ = hold
        start, end, _, code = await self.call(self.calls.extend, reservation_id)
        self.record(Call(self.index, "extend", user, start, end, hold=label,
                         ttl_ns=TTL_S * 10**9, code=code))

    async def track(self, user: str, event_type: str, amount: int, enforce: bool = True,
                    model: str = "") -> None:
        model = model or self.rng.choice(list(MODEL_RATES))
        start, end, response, code = await self.call(self.calls.track, user, event_type,
                                                     amount, enforce, model)
        allowed, denied_by, counters = response or (False, "", ())
        rates = rates_of(event_type, model)
        self.record(Call(
            self.index, "track", user, start, end, groups=EVENT_GROUPS[event_type],
            rates=rates, amount=amount, enforce=enforce, code=code, allowed=allowed,
            denied_by=denied_by, counters=counters))
        if allowed or amount < 0:  # a refund that may have applied counts
            for group, rate in zip(EVENT_GROUPS[event_type], rates):
                self.net[(user, group)] += amount * rate

    async def refund(self, user: str) -> None:
        """Gives back part of what this client itself recorded: `used` never meets the 0
        clamp, so the history stays exactly checkable."""
        rng = self.rng
        event_type = "premium.chat" if self.net[(user, P)] > 0 and rng.random() < 0.5 else "chat"
        model = rng.choice(list(MODEL_RATES))
        most = min(self.net[(user, g)] // rate
                   for g, rate in zip(EVENT_GROUPS[event_type], rates_of(event_type, model)))
        if most == 0:  # less premium left than one unit at this model's rate
            event_type, most = "chat", self.net[(user, G)]
        amount = most if rng.random() < 0.5 else rng.randint(1, most)
        await self.track(user, event_type, -amount, enforce=rng.random() < 0.5, model=model)


async def run_calls(calls: UnaryCalls | ClientCalls, users: tuple[str, ...], ops: int,
                    clients: int, limit_s: float) -> tuple[list[Call], float]:
    """`clients` callers making `ops` calls in all on the users, then a GetUsage of each once
    every call finished: the history, and the seconds the calls took."""
    history: list[Call] = []
    began = time.monotonic()
    deadline_ns = time.monotonic_ns() + int(limit_s * 1e9)
    workers = [Client(i, calls, ops // clients + (i < ops % clients), deadline_ns, history,
                      users) for i in range(clients)]
    await asyncio.wait_for(asyncio.gather(*(w.run() for w in workers)),
                           timeout=limit_s + 2 * RPC_TIMEOUT_S)
    elapsed = time.monotonic() - began
    for user in users:  # the final state, after every call finished
        start = time.monotonic_ns()
        counters = await calls.usage(user)
        history.append(Call(-1, "usage", user, start, time.monotonic_ns(),
                            groups=(G, P), counters=counters))
    return history, elapsed


def assert_sound(history: list[Call], quotas: dict[tuple[str, str], int], report, ops: int,
                 limit_s: float, users: tuple[str, ...]) -> None:
    """What a correct server's history shows: every call answered OK, no anomaly, counters
    as the history implies, no over-admission, no false denial, a run that contended and
    came close to the quotas (so that the check had teeth), and GetUsage at the end exactly
    what the history implies."""
    attempts = sum(1 for c in history if c.kind == "reserve" or (
        c.kind == "track" and c.amount > 0))
    assert report.ops == ops, f"only {report.ops} of {ops} calls within {limit_s} s"
    assert set(report.codes) == {"OK"}, report.codes
    assert report.anomalies == [], report.anomalies[:10]
    assert report.counter_mismatches == [], report.counter_mismatches[:10]
    assert report.over_admissions == [], report.over_admissions[:10]
    # The server is a single writer: it denies only when the state it applies the call to
    # has no room, and that state is within the possible bounds. So no denial can be false.
    assert report.false_denials == [], [history[i] for i in report.false_denials[:10]]
    # The run contended: denials happened, and most calls were admitted.
    assert 0.02 * attempts < report.denials < 0.6 * attempts, (report.denials, attempts)
    # The check has teeth on this very history: the certain load came close to a quota, so
    # quotas 10% lower make it an over-admission.
    assert report.peak(quotas) >= 0.9
    tighter = {key: quota * 9 // 10 for key, quota in quotas.items()}
    assert check(history, tighter).over_admissions
    # GetUsage after the last call equals what the history implies, exactly.
    for call in history[-len(users):]:
        for counter in call.counters:
            expected = report.exact(call.user, counter.group, call.start_ns)
            assert expected == (counter.used, counter.held), (call.user, counter, expected)
            assert counter.held == 0  # every client ended its holds


async def run_history(address: str, transport: str, ops: int, clients: int,
                      limit_s: float) -> tuple[list[Call], float]:
    async with grpc.aio.insecure_channel(address) as channel:
        admin = stubs.AdminServiceStub(channel)
        await admin.UpsertPlan(pb.UpsertPlanRequest(plan=PLAN))
        for user in USERS:
            await admin.UpsertSubscription(pb.UpsertSubscriptionRequest(
                user_id=user, plan_id=PLAN.id))
        async with AsyncQuotaClient(address, timeout_s=RPC_TIMEOUT_S) as client:
            calls = UnaryCalls(channel) if transport == "unary" else ClientCalls(client)
            return await run_calls(calls, USERS, ops, clients, limit_s)


@pytest.mark.parametrize("transport", ["unary", "client"])
def test_concurrent_history_against_the_real_server_has_no_over_admission(start_server,
                                                                          transport):
    ops, clients, limit_s = workload_size()
    server = start_server(extra_args=("--metrics-listen", "127.0.0.1:0"))
    history, elapsed = asyncio.run(run_history(server.address, transport, ops, clients,
                                               limit_s))
    seen = scrape(server.last("serving")["metrics"])
    batches = seen.get("quotad_batch_operations_count", 0)
    batched = seen.get("quotad_batch_operations_sum", 0)
    single = seen.get('quotad_batch_operations_bucket{le="1.0"}', 0)
    quotas = {(u, G): QUOTA_ALL for u in USERS} | {(u, P): QUOTA_PREMIUM for u in USERS}
    checked = time.monotonic()
    report = check(history, quotas)
    check_s = time.monotonic() - checked
    attempts = sum(1 for c in history if c.kind == "reserve" or (
        c.kind == "track" and c.amount > 0))
    print(f"\n{report.summary(clients)}")
    print(f"history: peak certain load {100 * report.peak(quotas):.1f}% of a quota, peak "
          f"possible load {100 * report.peak(quotas, LOAD_HI):.1f}%")
    print(f"history: {elapsed:.1f} s of calls ({report.ops / elapsed:.0f} calls/s), checked in "
          f"{check_s:.1f} s; {attempts} reserve/track attempts, {report.denials} denied; "
          f"codes {dict(report.codes)}; {transport}: {batches:.0f} Batch RPCs carried "
          f"{batched:.0f} operations ({batched / max(batches, 1):.1f} each)")

    # What the server saw arrive is what this run is named for.
    unary = sum(value for name, value in seen.items() if name.startswith(
        "quotad_requests_total") and any(f'method="{m}"' in name for m in (
            "Reserve", "Commit", "Release", "Extend", "Track", "GetUsage")))
    if transport == "unary":
        assert batches == 0 and unary == ops + len(USERS), (batches, unary)
    else:
        assert unary == 0 and batched == ops + len(USERS), (unary, batched)
        assert batches - single >= batches / 2, "most batches should carry several calls"
    assert_sound(history, quotas, report, ops, limit_s, USERS)


# --- rate buckets under 64 clients against the real server -----------------------------------

BUCKET_QUOTA, BUCKET_PERIOD_S = 2000, 1
BUCKET_USERS = ("rate0", "rate1")
BUCKET_PLAN = pb.Plan(id="buckets", name="Buckets", limit_groups=[
    pb.LimitGroup(key=B, label="Tokens per second", unit="tokens", quota=BUCKET_QUOTA,
                  kind=pb.LIMIT_KIND_RATE, period={"seconds": BUCKET_PERIOD_S},
                  match=pb.Match(event_types=["*"]))])


async def bucket_client(index: int, stub: stubs.QuotaServiceStub, budget: int,
                        history: list[Call]) -> None:
    """Reserves 1 .. 40 tokens, then commits all of it, commits less, or releases it."""
    rng = random.Random(1000 + index)
    serial = 0
    while budget > 0:
        user, amount = rng.choice(BUCKET_USERS), rng.randint(1, 40)
        serial += 1
        label = f"{index}.{serial}"
        start = time.monotonic_ns()
        r = await stub.Reserve(pb.ReserveRequest(
            user_id=user, event_type="chat", amount=amount, ttl={"seconds": TTL_S}),
            timeout=RPC_TIMEOUT_S)
        server_ns = (r.expires_at.seconds * 10**9 + r.expires_at.nanos - TTL_S * 10**9
                     if r.allowed else None)
        history.append(Call(index, "reserve", user, start, time.monotonic_ns(), groups=(B,),
                            amount=amount, hold=label, ttl_ns=TTL_S * 10**9,
                            allowed=r.allowed, denied_by=r.denied_by, counters=observed(r),
                            server_ns=server_ns))
        budget -= 1
        if not r.allowed or budget == 0:
            continue
        how = rng.random()
        start = time.monotonic_ns()
        if how < 0.3:
            await stub.Release(pb.ReleaseRequest(reservation_id=r.reservation_id),
                               timeout=RPC_TIMEOUT_S)
            history.append(Call(index, "release", user, start, time.monotonic_ns(),
                                hold=label))
        else:
            request = pb.CommitRequest(reservation_id=r.reservation_id)
            committed = amount if how < 0.7 else rng.randint(0, amount)
            request.amount = committed
            await stub.Commit(request, timeout=RPC_TIMEOUT_S)
            history.append(Call(index, "commit", user, start, time.monotonic_ns(),
                                amount=committed, hold=label))
        budget -= 1


def test_no_bucket_grants_more_than_its_capacity_plus_refill_under_64_clients(start_server):
    ops, clients, limit_s = workload_size()
    server = start_server()

    async def run() -> list[Call]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            admin = stubs.AdminServiceStub(channel)
            await admin.UpsertPlan(pb.UpsertPlanRequest(plan=BUCKET_PLAN))
            for user in BUCKET_USERS:
                await admin.UpsertSubscription(pb.UpsertSubscriptionRequest(
                    user_id=user, plan_id=BUCKET_PLAN.id))
            stub = stubs.QuotaServiceStub(channel)
            history: list[Call] = []
            await asyncio.wait_for(asyncio.gather(*(
                bucket_client(i, stub, ops // clients + (i < ops % clients), history)
                for i in range(clients))), timeout=limit_s + 2 * RPC_TIMEOUT_S)
            return history

    history = asyncio.run(run())
    period_ns = BUCKET_PERIOD_S * 10**9
    buckets = {(user, B): (BUCKET_QUOTA, period_ns) for user in BUCKET_USERS}
    report = check_buckets(history, buckets)
    reserves = [c for c in history if c.kind == "reserve"]
    denied = sum(1 for c in reserves if not c.allowed)
    print(f"\nbuckets: {len(history)} calls, {clients} clients, {report.grants} grants, "
          f"{denied} of {len(reserves)} reserves denied, overdraws {len(report.overdraws)}; "
          f"the closest interval came within {report.least_slack:.0f} tokens of capacity "
          f"plus refill ({BUCKET_QUOTA} a {BUCKET_PERIOD_S} s period)")
    assert report.overdraws == [], report.overdraws[:10]
    assert denied > 0.05 * len(reserves), "the buckets should have been contended"
    # The check has teeth on this very history: a bucket 10 % smaller is overdrawn.
    tighter = {key: (capacity * 9 // 10, period) for key, (capacity, period) in buckets.items()}
    assert check_buckets(history, tighter).overdraws


# --- credit balances: hand-built histories, then 64 clients against the real server ----------

C = "credits"


def credit_reserve(client: int, amount: int, hold: str, used: int, held: int, quota: int,
                   allowed: bool = True) -> Call:
    return Call(client, "reserve", "u", 0, 1, groups=(C,), amount=amount, hold=hold,
                allowed=allowed, counters=(Observed(C, used, held, quota),))


def test_a_balance_spent_within_its_grants_passes_and_its_totals_add_up():
    history = [credit_reserve(1, 6, "a", 0, 6, 10), credit_reserve(2, 5, "b", 0, 6, 10, False),
               end_call("commit", 1, 2, 3, "a", 4), credit_reserve(2, 5, "c", 4, 5, 10),
               end_call("release", 2, 4, 5, "c")]
    report = check_credits(history, C, {"order-1": 10}, Observed(C, 4, 0, 10), [(10, 6)])
    assert report.problems == [] and (report.committed, report.denied) == (4, 1)


def test_a_balance_below_zero_or_credit_consumed_twice_is_found():
    history = [credit_reserve(1, 6, "a", 0, 6, 10), credit_reserve(2, 5, "b", 0, 11, 10),
               end_call("commit", 1, 2, 3, "a"), end_call("commit", 2, 2, 3, "b")]
    problems = check_credits(history, C, {"k": 10}, Observed(C, 11, 0, 10),
                             [(10, 0)]).problems
    assert any("past the balance's 10" in p for p in problems)
    assert any("the grants lost 10 credits, the commits committed 11" in p for p in problems)
    assert any("quota 10 after 10 granted, and 11 committed" in p for p in problems)
    twice = check_credits([], C, {"k": 10, "k-again": 10}, Observed(C, 0, 0, 10), [(10, 10)])
    assert any("quota 10 after 20 granted" in p for p in twice.problems)


CREDITS_GRANT, CREDITS_TOP_UP, CREDITS_TOP_UPS = 1500, 200, 10
CREDITS_USER = "spender"
CREDITS_PLAN = pb.Plan(id="credits", name="Credits", limit_groups=[
    pb.LimitGroup(key=C, label="Credits", unit="credits", kind=pb.LIMIT_KIND_BALANCE,
                  match=pb.Match(event_types=["*"]))])


def observed_with_quota(response) -> tuple[Observed, ...]:
    return tuple(Observed(c.key, c.used, c.held, c.quota) for c in response.counters)


async def credits_client(index: int, stub: stubs.QuotaServiceStub, budget: int,
                         history: list[Call]) -> None:
    """Reserves 1 .. 40 credits, then commits all of it, commits less, or releases it."""
    rng = random.Random(2000 + index)
    serial = 0
    while budget > 0:
        amount = rng.randint(1, 40)
        serial += 1
        label = f"{index}.{serial}"
        start = time.monotonic_ns()
        r = await stub.Reserve(pb.ReserveRequest(
            user_id=CREDITS_USER, event_type="chat", amount=amount, ttl={"seconds": TTL_S}),
            timeout=RPC_TIMEOUT_S)
        history.append(Call(index, "reserve", CREDITS_USER, start, time.monotonic_ns(),
                            groups=(C,), amount=amount, hold=label, allowed=r.allowed,
                            denied_by=r.denied_by, counters=observed_with_quota(r)))
        budget -= 1
        if not r.allowed:
            await asyncio.sleep(0.001)  # out of credits until a top-up
            continue
        how = rng.random()
        start = time.monotonic_ns()
        if how < 0.3:
            released = await stub.Release(pb.ReleaseRequest(reservation_id=r.reservation_id),
                                          timeout=RPC_TIMEOUT_S)
            history.append(Call(index, "release", CREDITS_USER, start, time.monotonic_ns(),
                                hold=label, counters=observed_with_quota(released)))
        else:
            committed = amount if how < 0.7 else rng.randint(0, amount)
            response = await stub.Commit(pb.CommitRequest(reservation_id=r.reservation_id,
                                                          amount=committed),
                                         timeout=RPC_TIMEOUT_S)
            history.append(Call(index, "commit", CREDITS_USER, start, time.monotonic_ns(),
                                amount=committed, hold=label,
                                counters=observed_with_quota(response)))
        budget -= 1


async def credits_granter(stub: stubs.QuotaServiceStub, history: list[Call],
                          grants: dict[str, int]) -> None:
    """Tops the balance up now and then, each top-up sent twice at once with its key."""
    for n in range(CREDITS_TOP_UPS):
        await asyncio.sleep(0.05)
        key = f"top-up-{n}"
        grants[key] = CREDITS_TOP_UP
        request = pb.GrantCreditsRequest(user_id=CREDITS_USER, group_key=C,
                                         amount=CREDITS_TOP_UP, idempotency_key=key)
        start = time.monotonic_ns()
        answers = await asyncio.gather(*(stub.GrantCredits(request, timeout=RPC_TIMEOUT_S)
                                         for _ in range(2)))
        assert answers[0] == answers[1]  # the same grant, answered twice
        history.extend(Call(0, "grant", CREDITS_USER, start, time.monotonic_ns(),
                            counters=(Observed(C, a.counter.used, a.counter.held,
                                               a.counter.quota),)) for a in answers)


def test_no_credit_is_consumed_twice_and_holds_never_overdraw_under_64_clients(start_server):
    ops, clients, limit_s = workload_size()
    ops //= 2
    server = start_server()

    async def run() -> tuple[list[Call], dict[str, int], Observed, list[tuple[int, int]]]:
        async with grpc.aio.insecure_channel(server.address) as channel:
            admin = stubs.AdminServiceStub(channel)
            await admin.UpsertPlan(pb.UpsertPlanRequest(plan=CREDITS_PLAN))
            await admin.UpsertSubscription(pb.UpsertSubscriptionRequest(
                user_id=CREDITS_USER, plan_id=CREDITS_PLAN.id))
            stub = stubs.QuotaServiceStub(channel)
            grants = {"first": CREDITS_GRANT}
            await stub.GrantCredits(pb.GrantCreditsRequest(
                user_id=CREDITS_USER, group_key=C, amount=CREDITS_GRANT, priority=1,
                idempotency_key="first"), timeout=RPC_TIMEOUT_S)
            history: list[Call] = []
            await asyncio.wait_for(asyncio.gather(
                credits_granter(stub, history, grants), *(
                    credits_client(i, stub, ops // clients + (i < ops % clients), history)
                    for i in range(clients))), timeout=limit_s + 2 * RPC_TIMEOUT_S)
            usage = await stub.GetUsage(pb.GetUsageRequest(user_id=CREDITS_USER))
            listed = await stub.ListGrants(pb.ListGrantsRequest(user_id=CREDITS_USER))
            [counter] = observed_with_quota(usage)
            return history, grants, counter, [(g.granted, g.remaining) for g in listed.grants]

    history, grants, final, listed = asyncio.run(run())
    report = check_credits(history, C, grants, final, listed)
    print(f"\ncredits: {len(history)} calls, {clients} clients, {report.granted} granted in "
          f"{len(grants)} grants, {report.committed} committed, {report.denied} of "
          f"{report.reserves} reserves denied, {report.observed} counters checked")
    assert report.problems == [], report.problems[:10]
    assert len(listed) == len(grants) and report.observed >= report.reserves
    assert report.denied > 0.05 * report.reserves, "the balance should have run dry"
