"""The one policy of quotad's bounded memos (counter heads, match rules, counter shapes,
idempotency rows looked up, Reserve expiries): at its limit a memo forgets everything."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(memo: dict[K, V], key: K, value: V, entries_max: int) -> None:
    """memo[key] = value, in a memo of at most entries_max entries: one that holds
    entries_max already is emptied first. A forgotten entry only costs its work again, and
    the memo keeps no order and pays nothing per entry to stay bounded."""
    if len(memo) >= entries_max:
        memo.clear()
    memo[key] = value
