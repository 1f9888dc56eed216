"""Checks a concurrent history of quota calls: no over-admission, and how many false denials.

Pure Python, no I/O: the input is a list of `Call`s (what each client sent, when, and what it
got back) and the quota of every (user, group); the output is a `Report`.

The model. Time is one clock shared by every client (time.monotonic_ns on one machine); a call
took effect at some instant strictly between its `start_ns` (taken before the request was sent)
and its `end_ns` (taken after the answer arrived), or never. So an effect is CERTAIN from the
end of a call that succeeded, and POSSIBLE from the start of any call that may have been applied
(one that succeeded, or one whose error does not say "not applied", such as UNAVAILABLE or
DEADLINE_EXCEEDED). Per (user, group), four step functions of time bound the real counters:

    used_lo <= used <= used_hi        held_lo <= held <= held_hi
    load_lo = used_lo + held_lo <= used + held <= used_hi + held_hi = load_hi

- A hold (an allowed Reserve of `a` on its groups) is certainly held from its Reserve's end
  until the earliest start of a Commit/Release of it, or its earliest possible expiry (the
  Reserve's start + ttl; a successful Extend found the hold live and replaces that by its own
  start + ttl; any Extend that may have been applied may have shortened it to its start +
  ttl); it is possibly held from its Reserve's start until the earliest end of a successful
  Commit/Release, or its latest possible expiry (the latest end + ttl of the Reserve and the
  successful Extends; none if an Extend's outcome is unknown).
- A Commit of `c` adds c to `used`: certainly from its end, possibly from its start. A Track of
  x > 0 (enforced, allowed) likewise. A refund (Track of x < 0) lowers `used`: it counts in the
  lower bound from its start and in the upper bound from its end.
- The server clamps `used` at 0 on a refund; the bounds above are linear, so the checker proves
  the clamp never fired: used_lo never goes below 0 (then no order of the calls could reach
  below 0 either). A history where it might have fired is refused (`OutsideModel`), as are the
  two recorded overage paths the invariant exempts (Commit above the reserved amount, Track
  without enforce of a positive amount): they are allowed to exceed a quota, so a history
  containing them cannot be checked for over-admission this way.

Checks, per (user, group) with quota q:
- over-admission at an instant: load_lo(t) > q for some t (the certainly held and used amounts
  alone exceed the quota); each maximal such episode counts once;
- over-admission by an admission: an allowed Reserve/enforced Track of `a` whose groups had
  load_lo(t) + a > q at every instant t it could have been applied (before its own end);
- false denial: a denied Reserve/enforced Track of `a` although every matched group had
  load_hi(t) + a <= q at every instant it could have been applied: room even counting every
  possibly held and used amount. (A denial is "justified" when some group had
  load_lo(t) + a > q throughout; otherwise it is "undetermined": it raced other calls.)
- counters: every counter a successful response carries (the state right after the call was
  applied) lies within [min lo, max hi] of used, held and used + held over the call's interval;
- anomalies: answers no correct server gives (a hold committed twice, committed and released,
  a commit of a hold never granted, a refused refund, a denial whose own counters show room).

Costs. A group with a cost counts amount x rate; a call's `rates` give the rate of each of its
`groups` (none: 1 each), as the client knows them from the plan and the call's metadata. A
hold's rates are its Reserve's, and its Commit counts at them (the server fixes them when the
hold is taken). Every amount above, held, used, admitted or denied, is the counted one.

Rate buckets. `check_buckets` proves the bucket invariant from the server's own times: no
bucket ever grants more than its capacity plus its refill. For every interval [a, b] of the
server times of allowed Reserves, what the holds taken in it kept for good (a successful
Commit's counted amount; a hold released, expired or of unknown end keeps at least nothing)
is at most capacity + capacity x (b - a) // period + 1. Why it holds for a correct server:
what is taken in [a, b] and not given back by b sits in the bucket at b (at most its
capacity), or has refilled within [a, b] (at most that much, the 1 for the carried part of a
token); a hold's tokens refill only from its commit, which makes it stricter still. Only
Reserve and Commit of at most the reserved amount may touch a checked bucket: a Track could
take tokens with no time of its own to check.

`Report.exact(user, group, t)` gives (used, held) at time t when the bounds meet there (every
call before t finished with a definite answer and no hold could be expiring around t), for the
final cross-check against GetUsage.
"""

from __future__ import annotations

import bisect
from array import array
import math
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

OK = "OK"
NOT_APPLIED_CODES = frozenset({
    "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS",
    "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED", "OUT_OF_RANGE",
    "UNIMPLEMENTED",
})
"""Errors that say the call changed nothing. Any other error may hide an applied call."""

KINDS = frozenset({"reserve", "commit", "release", "extend", "track", "usage"})
INF = math.inf
USED_LO, USED_HI, HELD_LO, HELD_HI, LOAD_LO, LOAD_HI = range(6)
"""The bound series of each (user, group)."""


class OutsideModel(ValueError):
    """The history contains something the checker cannot bound exactly."""


@dataclass(frozen=True, slots=True)
class Observed:
    """One counter as a response showed it."""

    group: str
    used: int
    held: int
    quota: int | None = None
    """A credit balance's quota as shown (its live grants); None where the plan's is known."""


@dataclass(frozen=True, slots=True)
class Call:
    """One call and its outcome.

    `hold` names a hold: the label the client gave its Reserve (unique per Reserve), and the
    same label on the Commit/Release/Extend of that hold. `groups` are the limit groups the
    event matches (Reserve, Track; usage: the groups whose counters were read), and `rates`
    what one unit of its amount counts in each (empty: 1 in every group). `amount`: Reserve
    amount; Commit amount (None: the reserved amount); signed Track amount.
    `code` is "OK" or the gRPC status code's name; `allowed` the answer of a Reserve/Track.
    """

    client: int
    kind: str
    user: str
    start_ns: int
    end_ns: int
    groups: tuple[str, ...] = ()
    rates: tuple[int, ...] = ()
    amount: int | None = None
    hold: str = ""
    ttl_ns: int = 60_000_000_000
    enforce: bool = True
    code: str = OK
    allowed: bool = True
    denied_by: str = ""
    counters: tuple[Observed, ...] = ()
    server_ns: int | None = None
    """The server's time the call was applied at, when its answer says so (an allowed
    Reserve's: its expires_at less its ttl). Rate buckets are checked on it."""

    @property
    def ok(self) -> bool:
        return self.code == OK

    @property
    def rated(self) -> tuple[tuple[str, int], ...]:
        """(group, rate) of each group the call's event matches."""
        return tuple(zip(self.groups, self.rates or (1,) * len(self.groups)))

    @property
    def maybe_applied(self) -> bool:
        return self.code == OK or self.code not in NOT_APPLIED_CODES

    @property
    def ambiguous(self) -> bool:
        return self.code != OK and self.code not in NOT_APPLIED_CODES


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str  # "instant" | "admission"
    user: str
    group: str
    time_ns: int
    value: int
    quota: int
    call: int | None = None  # index into the history


@dataclass(frozen=True, slots=True)
class CounterMismatch:
    call: int
    group: str
    field: str
    value: int
    low: int
    high: int


@dataclass
class Report:
    ops: int
    over_admissions: list[Violation]
    denials: int
    false_denials: list[int]
    justified_denials: int
    undetermined_denials: int
    counter_mismatches: list[CounterMismatch]
    anomalies: list[str]
    codes: Tally[str]
    series: dict[tuple[str, str], "_Series"] = field(repr=False)

    @property
    def false_denial_rate(self) -> float:
        return len(self.false_denials) / self.denials if self.denials else 0.0

    def exact(self, user: str, group: str, t_ns: int) -> tuple[int, int] | None:
        """(used, held) at t if the history determines it exactly, else None."""
        series = self.series.get((user, group))
        if series is None:
            return (0, 0)
        used_lo, used_hi, held_lo, held_hi = (series.at(k, t_ns) for k in range(4))
        if used_lo != used_hi or held_lo != held_hi:
            return None
        return used_lo, held_lo

    def peak(self, quotas: Mapping[tuple[str, str], int], which: int = LOAD_LO) -> float:
        """The highest load_lo (or another series) reached, as a fraction of its quota."""
        return max((max(s.values[which]) / quotas[key] for key, s in self.series.items()
                    if quotas[key]), default=0.0)

    def summary(self, clients: int) -> str:
        return (f"history: {self.ops} ops, {clients} clients, over-admissions "
                f"{len(self.over_admissions)}, false denials {len(self.false_denials)} "
                f"({100 * self.false_denial_rate:.2f}% of {self.denials} denials; "
                f"{self.justified_denials} justified, {self.undetermined_denials} raced)")


class _Series:
    """Step functions of one (user, group): values[k][i] holds from times[i] (after every
    change at that instant) until times[i + 1]; before times[0] every value is 0."""

    def __init__(self, changes: list[tuple[int, int, int]]) -> None:
        changes.sort(key=lambda change: change[0])
        self.times: list[int] = []
        self.values: list[array[int]] = [array("q") for _ in range(6)]
        current = [0, 0, 0, 0]
        for index, (time_ns, which, delta) in enumerate(changes):
            current[which] += delta
            if index + 1 < len(changes) and changes[index + 1][0] == time_ns:
                continue  # the value at an instant is the one after all its changes
            self.times.append(time_ns)
            for k in range(4):
                self.values[k].append(current[k])
            self.values[LOAD_LO].append(current[USED_LO] + current[HELD_LO])
            self.values[LOAD_HI].append(current[USED_HI] + current[HELD_HI])

    def at(self, which: int, t_ns: int) -> int:
        i = bisect.bisect_right(self.times, t_ns) - 1
        return self.values[which][i] if i >= 0 else 0

    def _window(self, which: int, start_ns: int, end_ns: int) -> tuple[array[int], bool]:
        """Every value taken in [start, end] (closed), and whether the initial 0 is one."""
        i = bisect.bisect_right(self.times, start_ns) - 1
        j = bisect.bisect_right(self.times, end_ns)
        return self.values[which][max(i, 0):j], i < 0

    def low(self, which: int, start_ns: int, end_ns: int) -> int:
        values, initial = self._window(which, start_ns, end_ns)
        return min(values, default=0) if not initial else min(min(values, default=0), 0)

    def high(self, which: int, start_ns: int, end_ns: int) -> int:
        values, initial = self._window(which, start_ns, end_ns)
        return max(values, default=0) if not initial else max(max(values, default=0), 0)


@dataclass
class _Hold:
    reserve: int
    extends: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # commits and releases


def check(history: Sequence[Call], quotas: Mapping[tuple[str, str], int], *,
          clock_slack_ns: int = 0) -> Report:
    """Checks the history. `quotas[(user, group)]` for every group a call names.
    `clock_slack_ns` widens expiry bounds for a server clock that may drift from the clients'."""
    anomalies: list[str] = []
    codes: Tally[str] = Tally(call.code for call in history)
    holds: dict[str, _Hold] = {}
    for index, call in enumerate(history):
        if call.kind not in KINDS:
            raise OutsideModel(f"call {index}: unknown kind {call.kind!r}")
        if call.end_ns < call.start_ns:
            raise OutsideModel(f"call {index}: ends before it starts")
        for group in call.groups:
            if (call.user, group) not in quotas:
                raise OutsideModel(f"call {index}: no quota for {(call.user, group)}")
        if call.rates and (len(call.rates) != len(call.groups)
                           or any(rate < 1 for rate in call.rates)):
            raise OutsideModel(f"call {index}: needs one rate of at least 1 per group")
        if call.kind == "reserve":
            if call.hold in holds:
                raise OutsideModel(f"call {index}: hold {call.hold!r} reserved twice")
            if call.amount is None or call.amount <= 0:
                raise OutsideModel(f"call {index}: a Reserve needs a positive amount")
            holds[call.hold] = _Hold(index)
        elif call.kind in ("commit", "release", "extend"):
            hold = holds.get(call.hold)
            if hold is None:
                raise OutsideModel(f"call {index}: {call.kind} of unknown hold {call.hold!r}")
            if not call.maybe_applied:
                continue
            (hold.extends if call.kind == "extend" else hold.ends).append(index)
            reserved = history[hold.reserve].amount
            if call.kind == "commit" and call.amount is not None and call.amount > reserved:
                raise OutsideModel(f"call {index}: commit of {call.amount} above the reserved "
                                   f"{reserved} (a recorded overage path)")
        elif call.kind == "track":
            if not call.amount:
                raise OutsideModel(f"call {index}: a Track needs a non-zero amount")
            if call.amount > 0 and not call.enforce:
                raise OutsideModel(f"call {index}: Track without enforce of a positive amount "
                                   f"(a recorded overage path)")

    # --- the bounds -----------------------------------------------------------------------
    changes: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)

    def add(user: str, rated: Iterable[tuple[str, int]], time_ns: float, which: int,
            amount: int) -> None:
        """The amount, counted at each group's rate, changes series `which` at time_ns."""
        if time_ns == INF:
            return
        for group, rate in rated:
            changes[(user, group)].append((int(time_ns), which, amount * rate))

    for label, hold in holds.items():
        reserve = history[hold.reserve]
        granted = reserve.ok and reserve.allowed
        if not (granted or reserve.ambiguous):
            for index in hold.ends:
                if history[index].ok:
                    anomalies.append(f"call {index}: {history[index].kind} succeeded for hold "
                                     f"{label!r}, which was never granted")
            continue
        extends = [history[i] for i in hold.extends]
        ends = [history[i] for i in hold.ends]
        # An Extend that succeeded found the hold live when it was applied, and set its
        # expiry to at least its start + ttl; one that may have been applied may have set it.
        done = [e for e in extends if e.ok]
        expiry_low = min([e.start_ns + e.ttl_ns for e in extends] + (
            [] if done else [reserve.start_ns + reserve.ttl_ns])) - clock_slack_ns
        if reserve.ambiguous or any(e.ambiguous for e in extends):
            expiry_high = INF
        else:
            expiry_high = max([reserve.end_ns + reserve.ttl_ns]
                              + [e.end_ns + e.ttl_ns for e in extends]) + clock_slack_ns
        certain_end = min([e.start_ns for e in ends] + [expiry_low])
        possible_end = min([e.end_ns for e in ends if e.ok] + [expiry_high])
        groups, amount = reserve.rated, reserve.amount  # the hold's rates are its Reserve's
        if granted and certain_end > reserve.end_ns:
            add(reserve.user, groups, reserve.end_ns, HELD_LO, amount)
            add(reserve.user, groups, certain_end, HELD_LO, -amount)
        add(reserve.user, groups, reserve.start_ns, HELD_HI, amount)
        add(reserve.user, groups, possible_end, HELD_HI, -amount)
        commits_ok = [e for e in ends if e.ok and e.kind == "commit"]
        releases_ok = [e for e in ends if e.ok and e.kind == "release"]
        if len(commits_ok) > 1 or (commits_ok and releases_ok):
            anomalies.append(f"hold {label!r}: {len(commits_ok)} commits and "
                             f"{len(releases_ok)} releases succeeded")
        for commit in ends:
            if commit.kind != "commit":
                continue
            used = amount if commit.amount is None else commit.amount
            add(reserve.user, groups, commit.start_ns, USED_HI, used)
            if commit.ok:
                add(reserve.user, groups, commit.end_ns, USED_LO, used)

    for index, call in enumerate(history):
        if call.kind != "track" or not call.maybe_applied:
            continue
        if call.ok and not call.allowed:
            if call.amount < 0:
                anomalies.append(f"call {index}: a refund was denied")
            continue
        if call.amount > 0:
            add(call.user, call.rated, call.start_ns, USED_HI, call.amount)
            if call.ok:
                add(call.user, call.rated, call.end_ns, USED_LO, call.amount)
        else:
            add(call.user, call.rated, call.start_ns, USED_LO, call.amount)
            if call.ok:
                add(call.user, call.rated, call.end_ns, USED_HI, call.amount)

    series = {key: _Series(key_changes) for key, key_changes in changes.items()}
    for (user, group), s in series.items():
        if min(s.values[USED_LO]) < 0:
            raise OutsideModel(f"{(user, group)}: refunds might have met the clamp at 0 "
                               f"(used could go down to {min(s.values[USED_LO])})")

    # --- over-admission at an instant -----------------------------------------------------
    over: list[Violation] = []
    for (user, group), s in sorted(series.items()):
        quota = quotas[(user, group)]
        inside = False
        for time_ns, value in zip(s.times, s.values[LOAD_LO]):
            if value > quota and not inside:
                over.append(Violation("instant", user, group, time_ns, value, quota))
            inside = value > quota

    # --- admissions and denials -----------------------------------------------------------
    denials = justified = undetermined = 0
    false_denials: list[int] = []
    for index, call in enumerate(history):
        if call.kind not in ("reserve", "track") or not call.ok or call.amount <= 0:
            continue
        matched = [(g, series.get((call.user, g)), quotas[(call.user, g)], call.amount * rate)
                   for g, rate in call.rated]  # each with the amount it counts there
        if call.allowed:
            for group, s, quota, amount in matched:
                # Before its own end the call's own amount is not in load_lo.
                low = s.low(LOAD_LO, call.start_ns, call.end_ns - 1) if s else 0
                if low + amount > quota:
                    over.append(Violation("admission", call.user, group, call.start_ns,
                                          low + amount, quota, index))
            continue
        denials += 1
        if not matched:
            anomalies.append(f"call {index}: denied although it matches no group")
            continue
        if all((s.high(LOAD_HI, call.start_ns, call.end_ns) if s else 0) + amount <= quota
               for _, s, quota, amount in matched):
            false_denials.append(index)
        elif any(s and s.low(LOAD_LO, call.start_ns, call.end_ns) + amount > quota
                 for _, s, quota, amount in matched):
            justified += 1
        else:
            undetermined += 1
        shown = {c.group: c for c in call.counters}
        if call.denied_by not in shown:
            anomalies.append(f"call {index}: denied by {call.denied_by!r}, not among its "
                             f"counters {sorted(shown)}")
        else:
            c = shown[call.denied_by]
            amount = next(a for g, _, _, a in matched if g == call.denied_by)
            if c.used + c.held + amount <= quotas[(call.user, call.denied_by)]:
                anomalies.append(f"call {index}: denied by {call.denied_by!r} whose counter "
                                 f"shows room: {c}")

    # --- the counters the answers carried -------------------------------------------------
    mismatches: list[CounterMismatch] = []
    for index, call in enumerate(history):
        if not call.ok:
            continue
        for observed in call.counters:
            s = series.get((call.user, observed.group))
            for name, value, lo, hi in (
                    ("used", observed.used, USED_LO, USED_HI),
                    ("held", observed.held, HELD_LO, HELD_HI),
                    ("used+held", observed.used + observed.held, LOAD_LO, LOAD_HI)):
                low = s.low(lo, call.start_ns, call.end_ns) if s else 0
                high = s.high(hi, call.start_ns, call.end_ns) if s else 0
                if not low <= value <= high:
                    mismatches.append(CounterMismatch(index, observed.group, name, value,
                                                      low, high))

    ops = sum(1 for call in history if call.kind != "usage")
    return Report(ops=ops, over_admissions=over, denials=denials, false_denials=false_denials,
                  justified_denials=justified, undetermined_denials=undetermined,
                  counter_mismatches=mismatches, anomalies=anomalies, codes=codes,
                  series=series)


# --- rate buckets ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BucketOverdraw:
    """Holds taken from start_ns to end_ns (server time) kept more than the bucket allows."""

    user: str
    group: str
    start_ns: int
    end_ns: int
    kept: int
    allowed: int


@dataclass
class BucketReport:
    grants: int
    overdraws: list[BucketOverdraw]
    least_slack: float | None
    """The least any interval kept below its bound (capacity + refill + 1), in tokens: near
    0 is a bucket taken to its very limit, negative an overdraw; None without grants."""


def check_buckets(history: Sequence[Call],
                  buckets: Mapping[tuple[str, str], tuple[int, int]]) -> BucketReport:
    """Checks every (user, group) of `buckets`, each (capacity, period_ns), against the
    bucket invariant (see the module's prose)."""
    commits: dict[str, int] = {}
    reserves: dict[str, Call] = {}
    for index, call in enumerate(history):
        touched = [g for g in call.groups if (call.user, g) in buckets]
        if call.kind == "track" and touched:
            raise OutsideModel(f"call {index}: a Track of a checked bucket")
        if call.kind == "reserve":
            reserves[call.hold] = call
            if touched and call.ok and call.allowed and call.server_ns is None:
                raise OutsideModel(f"call {index}: an allowed Reserve without its server time")
        elif call.kind == "commit" and call.ok:
            reserved = reserves[call.hold].amount
            amount = reserved if call.amount is None else call.amount
            if amount > reserved:
                raise OutsideModel(f"call {index}: commit above the reserved amount")
            if call.hold in commits:
                raise OutsideModel(f"call {index}: hold {call.hold!r} committed twice")
            commits[call.hold] = amount
    taken: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for label, reserve in reserves.items():
        if not (reserve.ok and reserve.allowed):
            continue
        for group, rate in reserve.rated:
            if (reserve.user, group) in buckets:
                taken[(reserve.user, group)].append(
                    (reserve.server_ns, commits.get(label, 0) * rate))
    overdraws: list[BucketOverdraw] = []
    slacks = []
    for (user, group), grants in sorted(taken.items()):
        capacity, period_ns = buckets[(user, group)]
        found, slack = _overdraws(user, group, sorted(grants), capacity, period_ns)
        overdraws.extend(found)
        slacks.append(slack)
    return BucketReport(grants=sum(len(g) for g in taken.values()), overdraws=overdraws,
                        least_slack=min(slacks, default=None))


def _overdraws(user: str, group: str, grants: list[tuple[int, int]], capacity: int,
               period_ns: int) -> tuple[list[BucketOverdraw], float]:
    """Every interval [t_i, t_j] of the grants, sorted by time: kept(i..j) <= capacity +
    refill + 1, with refill = capacity x (t_j - t_i) / period_ns exact (so at least its
    floor). Times period_ns: (kept(..j) x P - capacity x t_j) - (kept(..i-1) x P - capacity x
    t_i) <= (capacity + 1) x P, so one pass keeping the least second term so far finds the
    worst interval ending at each grant. Returns those that overdraw, and the least slack in
    tokens."""
    found: list[BucketOverdraw] = []
    kept_before = [0]  # kept_before[i]: what grants[:i] kept
    least = (INF, 0)  # (kept_before[i] x P - capacity x t_i, i)
    bound = (capacity + 1) * period_ns
    least_slack = INF
    for j, (time_ns, kept) in enumerate(grants):
        least = min(least, (kept_before[j] * period_ns - capacity * time_ns, j))
        kept_before.append(kept_before[j] + kept)
        slack = bound - (kept_before[j + 1] * period_ns - capacity * time_ns - least[0])
        least_slack = min(least_slack, slack / period_ns)
        if slack < 0:
            start_ns = grants[least[1]][0]
            found.append(BucketOverdraw(
                user, group, start_ns, time_ns, kept_before[j + 1] - kept_before[least[1]],
                capacity + capacity * (time_ns - start_ns) // period_ns + 1))
    return found, least_slack


# --- credit balances --------------------------------------------------------------------------


@dataclass
class CreditsReport:
    """What a history of one balance group shows: every problem found, and the totals."""

    problems: list[str]
    granted: int
    """What the distinct grants (by idempotency key) added up to."""
    committed: int
    reserves: int
    denied: int
    observed: int
    """Counters of the balance checked in answers."""


def check_credits(history: list[Call], group: str, grants: dict[str, int],
                  final_counter: Observed, final_grants: list[tuple[int, int]]) -> CreditsReport:
    """A balance group that only Reserve, Commit (at most the reserved amount), Release and
    GrantCredits (each key sent more than once) touched, none of whose holds or grants
    expired:

    - never below zero through holds: every counter an answer showed has used + held within
      its quota (the live grants), as the server held it at that instant;
    - no credit consumed twice, none lost: what the grants lost (granted - remaining, each
      within 0 ... granted) is exactly what the commits committed, which is the final used,
      within what was granted;
    - a grant repeated with its key granted once: the final quota is the distinct grants'.
    """
    problems: list[str] = []
    reserved: dict[str, int] = {}
    committed = reserves = denied = observed = 0
    for call in history:
        if call.code != OK:
            problems.append(f"call {call.kind} of client {call.client}: {call.code}")
        for counter in call.counters:
            if counter.group != group:
                continue
            observed += 1
            assert counter.quota is not None, "a balance's counters carry their quota"
            if counter.used + counter.held > counter.quota:
                problems.append(f"{call.kind} of client {call.client} showed used {counter.used}"
                                f" + held {counter.held} past the balance's {counter.quota}")
        if call.kind == "reserve":
            reserves += 1
            if call.allowed:
                reserved[call.hold] = call.amount or 0
            else:
                denied += 1
        elif call.kind == "commit":
            held = reserved.pop(call.hold)
            amount = held if call.amount is None else call.amount
            if amount > held:
                raise OutsideModel("a commit above its hold is outside the credits model")
            committed += amount
        elif call.kind == "release":
            reserved.pop(call.hold)
        elif call.kind != "grant":
            raise OutsideModel(f"{call.kind} is outside the credits model")
    granted = sum(grants.values())
    consumed = 0
    for amount, remaining in final_grants:
        if not 0 <= remaining <= amount:
            problems.append(f"a grant of {amount} shows {remaining} remaining")
        consumed += amount - remaining
    if consumed != committed:
        problems.append(f"the grants lost {consumed} credits, the commits committed {committed}")
    if final_counter.used != committed or final_counter.held != 0:
        problems.append(f"the balance ends with used {final_counter.used} and held "
                        f"{final_counter.held}, after {committed} committed and every hold ended")
    if final_counter.quota != granted or committed > granted:
        problems.append(f"the balance ends with quota {final_counter.quota} after {granted} "
                        f"granted, and {committed} committed")
    return CreditsReport(problems, granted, committed, reserves, denied, observed)
