"""Plans written as data (a TOML file, or a dict in Python) -> the contract's `Plan` message.

The one parser of that shape: `quotad serve --plans`, `quotactl plans apply` and the client's
`upsert_plan(dict)` all use it, so a plan means the same wherever it is written.

    [[plans]]
    id = "pro"
    name = "Pro"
      [[plans.limit_groups]]
      key = "premium_tokens"    # unique within the plan
      label = "Premium tokens"
      unit = "tokens"
      quota = 50_000
      window = "month"          # minute, hour, day, week, month, lifetime
      match = { event_types = ["openai.*"], metadata = { model = ["gpt-4o"] } }
      enforce = true            # false: a soft limit (counts, shows overage, never denies)
      cost = { by = "model", rates = { "gpt-4o" = 10, "gpt-4o-mini" = 1 }, default = 1 }
      [[plans.limit_groups]]
      key = "tokens_per_minute"
      quota = 40_000            # a rate group: a bucket of 40,000 tokens...
      kind = "rate"             # quota (the default: a calendar quota), rate or balance
      period_s = 60             # ...refilled over 60 s; a rate group has no window
      [[plans.limit_groups]]
      key = "credits"
      kind = "balance"          # a credit balance: its quota is the user's live grants
      grant = { amount = 1000, every = "month", rollover_max = 200, priority = 0 }
                                # a recurring grant each month, what is left of the last
                                # one (up to 200) rolled over; optional

It is strict about the shape: an unknown key at any level is an error naming its path
(`plans[1].limit_groups[0].match.metdata`: a misspelt key is never dropped, which would make
a group count more than it says), and so is a value of the wrong type. A string stands for a
list of one (`event_types = "openai.*"`). What the values may be (lengths, counts, quotas) is
the server's to check, with the same answer however the plan came.

Standard library and the generated messages only: the client and the server share it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quotad_contract import limits
from quotad_contract.v1 import quotad_pb2 as pb

PLANS_FILE_KEYS = ("plans",)
PLAN_KEYS = ("id", "name", "limit_groups")
LIMIT_GROUP_KEYS = ("key", "label", "unit", "quota", "window", "match", "enforce", "cost",
                    "kind", "period_s", "grant")
"""`period_s` is the contract's LimitGroup.period, in whole seconds."""
MATCH_KEYS = ("event_types", "metadata")
GRANT_KEYS = ("amount", "every", "rollover_max", "priority")
"""A balance group's recurring grant; `every` is a window name (minute ... month)."""
COST_KEYS = ("by", "rates", "default")
"""`default` is the contract's Cost.default_rate."""
WINDOW_NAMES = tuple(name.lower() for name, value in pb.Window.items() if value)
"""minute, hour, day, week, month, lifetime: a plan names its windows in lower case."""
KIND_NAMES = tuple(name.removeprefix("LIMIT_KIND_").lower()
                   for name, value in pb.LimitKind.items() if value)
"""quota, rate, balance: a plan names a group's kind in lower case."""


class PlansFileError(ValueError):
    """A plans file that cannot be read, or holds a mistake; the message names the file and
    the key."""


def plan_from_dict(plan: Mapping[str, Any], where: str = "plan") -> pb.Plan:
    """A plan written as data, as the contract's message. Unknown keys and unknown windows are
    ValueError, values of the wrong type TypeError, each naming its path from `where`."""
    _check_keys(plan, PLAN_KEYS, where)
    message = pb.Plan(id=_text(plan, "id", where), name=_text(plan, "name", where))
    groups = plan.get("limit_groups", [])
    if not isinstance(groups, (list, tuple)):
        raise TypeError(f"{where}.limit_groups: expected a list of limit groups, got {groups!r}")
    for index, group in enumerate(groups):
        message.limit_groups.append(_group(group, f"{where}.limit_groups[{index}]"))
    return message


def plans_from_toml(text: str) -> list[pb.Plan]:
    """The plans of a plans file's text; errors name each key's path from `plans[i]`."""
    document = tomllib.loads(text)
    _check_keys(document, PLANS_FILE_KEYS, "")
    entries = document.get("plans", [])
    if not isinstance(entries, list):
        raise TypeError("plans: expected [[plans]] tables")
    plans = [plan_from_dict(entry, f"plans[{index}]") for index, entry in enumerate(entries)]
    ids = [plan.id for plan in plans]
    if len(set(ids)) != len(ids):
        raise ValueError(f"plans: ids must be unique, got {ids}")
    return plans


def load_plans_file(path: Path) -> list[pb.Plan]:
    """The plans of a TOML file; any mistake is a PlansFileError naming the file and key."""
    try:
        return plans_from_toml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise PlansFileError(f"{path}: cannot read it ({error})") from error
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as error:
        raise PlansFileError(f"{path}: {error}") from error


# --- one level at a time -------------------------------------------------------------------

def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_keys(given: Any, allowed: tuple[str, ...], where: str) -> None:
    if not isinstance(given, Mapping):
        raise TypeError(f"{where or 'the file'}: expected a table of {', '.join(allowed)}, "
                        f"got {given!r}")
    unknown = [_path(where, str(key)) for key in given if key not in allowed]
    if unknown:
        raise ValueError(f"unknown key {', '.join(unknown)} (expected some of: "
                         f"{', '.join(allowed)})")


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise TypeError(f"{_path(where, key)}: expected a string, got {value!r}")
    return value


def _strings(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise TypeError(f"{where}: expected a string or a list of strings, got {value!r}")
    return list(items)


def _window(value: Any, where: str) -> int:
    if isinstance(value, str) and value.lower() in WINDOW_NAMES:
        return pb.Window.Value(value.upper())
    if isinstance(value, int) and not isinstance(value, bool) and value in pb.Window.values():
        return value
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        raise ValueError(f"{where}: unknown window {value!r}; expected one of "
                         f"{', '.join(WINDOW_NAMES)}")
    raise TypeError(f"{where}: expected a window name such as 'month', got {value!r}")


def _group(group: Any, where: str) -> pb.LimitGroup:
    _check_keys(group, LIMIT_GROUP_KEYS, where)
    quota = group.get("quota", 0)
    if isinstance(quota, bool) or not isinstance(quota, int):
        raise TypeError(f"{where}.quota: expected an integer, got {quota!r}")
    message = pb.LimitGroup(key=_text(group, "key", where), label=_text(group, "label", where),
                            unit=_text(group, "unit", where), quota=quota)
    if "window" in group:  # left out, it stays unspecified: the server names it
        message.window = _window(group["window"], f"{where}.window")
    if "match" in group:
        message.match.CopyFrom(_match(group["match"], f"{where}.match"))
    enforce = group.get("enforce", True)
    if not isinstance(enforce, bool):
        raise TypeError(f"{where}.enforce: expected true or false, got {enforce!r}")
    if not enforce:  # true is the contract's default: left unset, as the server answers it
        message.enforce = False
    if "cost" in group:
        message.cost.CopyFrom(_cost(group["cost"], f"{where}.cost"))
    _kind_and_period(group, message, where)
    return message


def _kind_and_period(group: Mapping[str, Any], message: pb.LimitGroup, where: str) -> None:
    kind = group.get("kind", "quota")
    if not isinstance(kind, str):
        raise TypeError(f"{where}.kind: expected a kind name such as 'rate', got {kind!r}")
    if kind.lower() not in KIND_NAMES:
        raise ValueError(f"{where}.kind: unknown kind {kind!r}; expected one of "
                         f"{', '.join(KIND_NAMES)}")
    if kind.lower() != "quota":  # the contract's default: left unset, as the server answers it
        message.kind = pb.LimitKind.Value(f"LIMIT_KIND_{kind.upper()}")
    if message.kind in (pb.LIMIT_KIND_RATE, pb.LIMIT_KIND_BALANCE) and "window" not in group:
        message.window = pb.LIFETIME  # no calendar window: as the server answers
    if "grant" in group:
        message.grant.CopyFrom(_recurring_grant(group["grant"], f"{where}.grant"))
        if message.kind != pb.LIMIT_KIND_BALANCE:
            raise ValueError(f"{where}.grant: only a group of kind = \"balance\" has a grant")
    if "period_s" not in group:  # a rate group without one: the server names it
        return
    period_s = group["period_s"]
    if isinstance(period_s, bool) or not isinstance(period_s, int):
        raise TypeError(f"{where}.period_s: expected whole seconds, got {period_s!r}")
    low_s = limits.RATE_PERIOD_NS_MIN // limits.NS_PER_S
    high_s = limits.RATE_PERIOD_NS_MAX // limits.NS_PER_S
    if not low_s <= period_s <= high_s:
        raise ValueError(f"{where}.period_s: a period is {low_s} to {high_s} s, got {period_s}")
    if message.kind != pb.LIMIT_KIND_RATE:
        raise ValueError(f"{where}.period_s: only a group of kind = \"rate\" has a period")
    message.period.seconds = period_s


def _integer(table: Mapping[str, Any], key: str, where: str) -> int:
    value = table.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_path(where, key)}: expected an integer, got {value!r}")
    return value


def _recurring_grant(grant: Any, where: str) -> pb.RecurringGrant:
    """What the values may be (amount, rollover_max within it, priority) is the server's to
    check; here only the shape."""
    _check_keys(grant, GRANT_KEYS, where)
    message = pb.RecurringGrant(amount=_integer(grant, "amount", where),
                                rollover_max=_integer(grant, "rollover_max", where),
                                priority=_integer(grant, "priority", where))
    if "every" in grant:  # left out, it stays unspecified: the server names it
        message.every = _window(grant["every"], f"{where}.every")
    return message


def _rate(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected an integer rate, got {value!r}")
    if not 1 <= value <= limits.COST_RATE_MAX:
        raise ValueError(f"{where}: a rate is 1 to {limits.COST_RATE_MAX}, got {value}")
    return value


def _cost(cost: Any, where: str) -> pb.Cost:
    _check_keys(cost, COST_KEYS, where)
    rates = cost.get("rates", {})
    if not isinstance(rates, Mapping):
        raise TypeError(f"{where}.rates: expected a table of value = rate, got {rates!r}")
    if len(rates) > limits.COST_RATES_PER_GROUP_MAX:
        raise ValueError(f"{where}.rates: at most {limits.COST_RATES_PER_GROUP_MAX} rates, "
                         f"got {len(rates)}")
    message = pb.Cost(by=_text(cost, "by", where))
    for value, rate in rates.items():
        if not isinstance(value, str):
            raise TypeError(f"{where}.rates: expected string keys, got {value!r}")
        message.rates[value] = _rate(rate, f"{where}.rates.{value}")
    if "default" in cost:
        message.default_rate = _rate(cost["default"], f"{where}.default")
    return message


def _match(match: Any, where: str) -> pb.Match:
    _check_keys(match, MATCH_KEYS, where)
    metadata = match.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{where}.metadata: expected a table of key = [values], got {metadata!r}")
    message = pb.Match(event_types=_strings(match.get("event_types", []),
                                            f"{where}.event_types"))
    for key, values in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}.metadata: expected string keys, got {key!r}")
        message.metadata.add(key=key, values=_strings(values, f"{where}.metadata.{key}"))
    return message
