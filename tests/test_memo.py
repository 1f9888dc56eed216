"""The bounded memos' one policy (core/memo.py): at its limit a memo forgets everything."""

from __future__ import annotations

from quotad.core.memo import remember


def test_a_memo_keeps_up_to_its_limit_then_forgets_everything_for_the_next_entry() -> None:
    memo: dict[str, int] = {}
    remember(memo, "a", 1, entries_max=2)
    remember(memo, "b", 2, entries_max=2)
    assert memo == {"a": 1, "b": 2}
    remember(memo, "c", 3, entries_max=2)
    assert memo == {"c": 3}


def test_a_key_remembered_again_at_the_limit_also_starts_over() -> None:
    memo = {"a": 1, "b": 2}
    remember(memo, "a", 10, entries_max=2)
    assert memo == {"a": 10}
