"""Plans from a TOML file (`quotad serve --plans FILE`), loaded idempotently at start-up.

    [[plans]]
    id = "free"
    name = "Free"
      [[plans.limit_groups]]
      key = "tokens"            # unique within the plan
      label = "Tokens"
      unit = "tokens"
      quota = 100_000
      window = "month"          # minute, hour, day, week, month, lifetime
      match = { event_types = ["openai.*"], metadata = { model = ["gpt-4o"] } }
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from quotad.core.errors import InvalidArgument
from quotad.core.plans import LimitGroup, Match, MetadataMatch, Plan, Window


class PlansFileError(Exception):
    pass


def load_plans(path: Path) -> list[Plan]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise PlansFileError(f"{path}: {error}") from error
    plans = []
    for index, entry in enumerate(document.get("plans", [])):
        try:
            plans.append(plan_from_dict(entry))
        except (InvalidArgument, KeyError, TypeError, ValueError) as error:
            raise PlansFileError(f"{path}: plans[{index}]: {error}") from error
    ids = [plan.id for plan in plans]
    if len(set(ids)) != len(ids):
        raise PlansFileError(f"{path}: plan ids must be unique, got {ids}")
    return plans


def plan_from_dict(entry: dict[str, Any]) -> Plan:
    return Plan(
        id=entry["id"],
        name=entry.get("name", ""),
        limit_groups=tuple(_group(group) for group in entry.get("limit_groups", [])),
    )


def _group(group: dict[str, Any]) -> LimitGroup:
    match = group.get("match", {})
    window = group["window"]
    if window.upper() not in Window.__members__:
        raise ValueError(f"window {window!r} is not one of "
                         f"{', '.join(w.lower() for w in Window.__members__)}")
    return LimitGroup(
        key=group["key"],
        label=group.get("label", ""),
        unit=group.get("unit", ""),
        quota=group["quota"],
        window=Window[window.upper()],
        match=Match(
            event_types=tuple(match.get("event_types", ())),
            metadata=tuple(MetadataMatch(key=key, values=tuple(values))
                           for key, values in match.get("metadata", {}).items()),
        ),
    )
