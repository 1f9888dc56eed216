"""Credit balances: the arithmetic of a BALANCE group's grants, in integers only.

A BALANCE group's quota is not a number of the plan: it is the sum of the user's live
grants. Its counter is an ordinary CounterState whose `held` is what live holds reserved on
the balance, and whose `balance` holds the grants. The rules, exactly:

- **Spend order.** Consumption takes from live grants by priority (lowest number first),
  then earliest expiry (no expiry last), then oldest (the order they were made in).
- **Available** = the remaining (granted - consumed) of live grants + what expired grants
  keep for holds - held. A hold reserves against it (pooled: a hold is not tied to grants);
  a Reserve, or an enforced Track, that does not fit is denied.
- **Consumption** (a commit's actual amount, a positive Track) takes first from what expired
  grants keep for holds (earliest expiry first), then from live grants in spend order.
  What no grant covers is owed; the next grant pays what is owed first.
- **Refunds** (a negative Track) pay back what is owed first, then return to grants newest
  consumption first: every take from a grant is numbered (`consumed_order`), and a refund
  returns to the grant taken from last, up to all it has consumed, then the one before. What
  would return to an expired grant is lost (its consumed goes down, nothing comes back).
- **Expiry** drops what is left of a grant up to what the balance has available: the part of
  it live holds need (held beyond the rest of the balance) is kept for them. As holds end,
  what the remaining holds no longer need is dropped (kept at most `held` in all).
- **Recurring grants** (a plan's `grant`): at the first change of the balance in a window of
  the grant's `every` (in the user's time zone), the previous recurring grant expires (its
  window ended) and a new one is made for the window: granted at its start, expiring at its
  end, of `amount` + the rollover. The rollover is what the previous recurring grant's
  expiry dropped, at most `rollover_max`, when that grant was the previous window's; when a
  whole window passed without a change (its grant was never spent), `rollover_max`.

Everything is bounded: at most GRANTS_PER_BALANCE_MAX grants with credit left (a grant
past it is refused) and SPENT_GRANTS_PER_BALANCE_MAX with none (all consumed, or expired)
kept for refunds; past it the one taken from longest ago is forgotten, its consumption
folded into one count (`forgotten_consumed`) that refunds reach at its last take and lose.
"""

from __future__ import annotations

from dataclasses import field
from zoneinfo import ZoneInfo

from quotad.core import limits
from quotad.core.plans import RecurringGrant
from quotad.core.values import replace, state_type
from quotad.core.windows import latest_window_bounds


@state_type
class Grant:
    grant_id: str
    amount: int
    """What was granted."""
    granted_at_ns: int
    expires_at_ns: int | None
    """None: never expires."""
    priority: int
    number: int
    """The balance's count of grants when this one was made: oldest first among equals."""
    consumed: int = 0
    consumed_order: int = 0
    """The balance's number of the last take from this grant (refunds: newest first)."""
    expired: bool = False
    kept: int = 0
    """An expired grant's remainder that live holds still need; 0 for a live grant."""
    recurring: bool = False

    @property
    def remaining(self) -> int:
        """What is left to spend: a live grant's unconsumed part, an expired one's kept."""
        return self.kept if self.expired else self.amount - self.consumed

    def spend_key(self) -> tuple[int, int, int, int]:
        expires = self.expires_at_ns
        return (self.priority, expires is None, expires or 0, self.number)


@state_type
class Balance:
    grants: list[Grant] = field(default_factory=list)
    """Live grants, and expired ones that keep something for holds or were consumed from."""
    owed: int = 0
    """Consumption no grant covered (an enforce=false Track, a commit above its hold)."""
    grants_made: int = 0
    takes: int = 0
    """How many takes from grants there were: the source of consumed_order."""
    recurring_window_start_ns: int | None = None
    """The window of the latest recurring grant made; None: none made yet."""
    recurring_window_end_ns: int | None = None
    forgotten_consumed: int = 0
    """What forgotten grants had consumed: refunds that reach it are lost."""
    forgotten_consumed_order: int = 0

    def copy(self) -> Balance:
        return replace(self, grants=[replace(grant) for grant in self.grants])

    # --- what the counter shows -----------------------------------------------------------

    def quota(self) -> int:
        """Live grants' amounts plus what expired grants keep for holds."""
        return sum(g.kept if g.expired else g.amount for g in self.grants)

    def used(self) -> int:
        """What live grants had consumed, plus what is owed."""
        return sum(g.consumed for g in self.grants if not g.expired) + self.owed

    def live_grants(self) -> list[Grant]:
        return [g for g in self.grants if not g.expired]

    def grants_with_credit(self) -> int:
        """Live grants with something left to spend: what GRANTS_PER_BALANCE_MAX bounds."""
        return sum(1 for g in self.grants if not g.expired and g.amount > g.consumed)

    def kept_total(self) -> int:
        return sum(g.kept for g in self.grants if g.expired)

    def available(self, held: int) -> int:
        """What a new hold may reserve (negative when holds were taken past it)."""
        return sum(g.remaining for g in self.grants) - held - self.owed

    # --- changes ---------------------------------------------------------------------------

    def add(self, grant_id: str, amount: int, granted_at_ns: int, expires_at_ns: int | None,
            priority: int, *, recurring: bool = False) -> Grant:
        """A new grant, which first pays what the balance owes."""
        assert amount >= 0 and self.grants_with_credit() < limits.GRANTS_PER_BALANCE_MAX
        self.grants_made += 1
        grant = Grant(grant_id=grant_id, amount=amount, granted_at_ns=granted_at_ns,
                      expires_at_ns=expires_at_ns, priority=priority,
                      number=self.grants_made, recurring=recurring)
        paid = min(self.owed, amount)
        if paid:
            self.owed -= paid
            self._take(grant, paid)
        self.grants.append(grant)
        return grant

    def _take(self, grant: Grant, amount: int) -> None:
        self.takes += 1
        grant.consumed += amount
        if grant.expired:
            grant.kept -= amount
        grant.consumed_order = self.takes
        assert grant.consumed <= grant.amount and grant.kept >= 0, grant

    def consume(self, amount: int) -> None:
        """Takes amount from what expired grants keep, then live grants in spend order; the
        rest is owed."""
        assert amount >= 0
        grants = self.grants
        if len(grants) == 1:  # the common case: nothing to order
            order = grants
        else:
            kept = sorted((g for g in grants if g.expired and g.kept),
                          key=lambda g: (g.expires_at_ns or 0, g.number))
            order = kept + sorted(self.live_grants(), key=Grant.spend_key)
        for grant in order:
            if amount == 0:
                break
            take = min(amount, grant.remaining)
            if take:
                self._take(grant, take)
                amount -= take
        self.owed += amount
        self._forget_spent()

    def refund(self, amount: int) -> None:
        """Pays back what is owed, then returns to grants newest take first; what lands on
        an expired grant is lost."""
        assert amount >= 0
        paid = min(self.owed, amount)
        self.owed -= paid
        amount -= paid
        takers: list[tuple[int, Grant | None]] = [
            (g.consumed_order, g) for g in self.grants if g.consumed]
        if self.forgotten_consumed:
            takers.append((self.forgotten_consumed_order, None))
        takers.sort(key=lambda taker: taker[0], reverse=True)
        for _, grant in takers:
            if amount == 0:
                break
            if grant is None:  # forgotten expired grants: lost
                back = min(amount, self.forgotten_consumed)
                self.forgotten_consumed -= back
            else:
                back = min(amount, grant.consumed)
                grant.consumed -= back
            amount -= back
        self._forget_spent()

    def expire(self, grant: Grant, held: int) -> int:
        """Ends a grant: drops its remainder up to what the balance has available, keeping
        the part live holds need. Returns what it dropped."""
        assert not grant.expired
        remaining = grant.amount - grant.consumed
        dropped = min(remaining, max(0, self.available(held)))
        grant.expired = True
        grant.kept = remaining - dropped
        self._forget_spent()
        return dropped

    def holds_ended(self, held: int) -> None:
        """After held went down: what expired grants keep past it is dropped, from the
        grants consumption would reach last."""
        excess = self.kept_total() - held
        if excess <= 0:
            return
        kept = sorted((g for g in self.grants if g.expired and g.kept),
                      key=lambda g: (g.expires_at_ns or 0, g.number), reverse=True)
        for grant in kept:
            drop = min(excess, grant.kept)
            grant.kept -= drop
            excess -= drop
            if excess == 0:
                break
        self._forget_spent()

    def _forget_spent(self) -> None:
        """Expired grants that keep nothing and had nothing consumed go; past
        SPENT_GRANTS_PER_BALANCE_MAX grants with nothing left, the one taken from longest
        ago is folded into forgotten_consumed. One pass when there is nothing to do."""
        spent = 0
        gone = False
        for g in self.grants:
            if g.expired and not g.kept and not g.consumed:
                gone = True
            elif not g.remaining:
                spent += 1
        if gone:
            self.grants = [g for g in self.grants if not g.expired or g.kept or g.consumed]
        if spent <= limits.SPENT_GRANTS_PER_BALANCE_MAX:
            return
        spent_grants = sorted((g for g in self.grants if not g.remaining),
                              key=lambda g: (g.consumed_order, g.number))
        for grant in spent_grants[:len(spent_grants) - limits.SPENT_GRANTS_PER_BALANCE_MAX]:
            self.grants.remove(grant)
            self.forgotten_consumed += grant.consumed
            self.forgotten_consumed_order = max(self.forgotten_consumed_order,
                                                grant.consumed_order)


def recurring_grant_id(window_start_ns: int) -> str:
    """A recurring grant's id: the same whenever it is made (a read shows the one a change
    will make)."""
    return f"grt_r{window_start_ns:016x}"


def credit_grant_id(sequence: int) -> str:
    """A GrantCredits grant's id: the record that made it."""
    return f"grt_{sequence:016x}"


def renewed(balance: Balance, grant: RecurringGrant, zone: ZoneInfo, held: int,
            now_ns: int) -> Balance | None:
    """A copy of the balance with its recurring grant of the window holding now_ns made (the
    previous one expired first), or None when it is made already. Never mutates, so that a
    read changes nothing; a change stores the copy."""
    if balance.recurring_window_end_ns is not None and now_ns < balance.recurring_window_end_ns:
        return None
    start_ns, end_ns = latest_window_bounds(grant.every, zone, now_ns)
    assert end_ns is not None
    renewed_balance = balance.copy()
    previous = next((g for g in renewed_balance.grants if g.recurring and not g.expired), None)
    dropped = 0 if previous is None else renewed_balance.expire(previous, held)
    if balance.recurring_window_end_ns is None:
        rollover = 0  # the first one
    elif balance.recurring_window_end_ns == start_ns:
        rollover = min(grant.rollover_max, dropped)
    else:  # a whole window passed without a change: its grant was left whole
        rollover = grant.rollover_max
    renewed_balance.add(recurring_grant_id(start_ns), grant.amount + rollover, start_ns,
                        end_ns, grant.priority, recurring=True)
    renewed_balance.recurring_window_start_ns = start_ns
    renewed_balance.recurring_window_end_ns = end_ns
    return renewed_balance
