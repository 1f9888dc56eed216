"""Plans from a TOML file (`quotad serve --plans FILE`), loaded idempotently at start-up.

The file is read by the contract's parser (`quotad_contract.plans`, which quotactl and the
client use too: an unknown key is an error naming it), and each plan is converted and
validated exactly as the `plan` of an UpsertPlan request.
"""

from __future__ import annotations

from pathlib import Path

from quotad.api import convert
from quotad.core.errors import InvalidArgument
from quotad.core.plans import Plan
from quotad_contract.plans import PlansFileError, load_plans_file


def load_plans(path: Path) -> list[Plan]:
    """The plans of the file, each valid; else PlansFileError naming the file and field."""
    plans = []
    for index, message in enumerate(load_plans_file(path)):
        try:
            plans.append(convert.plan_from_proto(message))
        except InvalidArgument as error:  # fields named as in the file: plans[i].quota
            raise PlansFileError(f"{path}: " + "; ".join(
                f"plans[{index}]{_file_field(violation.field)}: {violation.description}"
                for violation in error.violations)) from error
    return plans


def _file_field(field: str) -> str:
    """A field of the contract's Plan as the file names it: a cost's default_rate is its
    `default` there, a rate group's period its `period_s`."""
    field = field.removeprefix("plan").replace(".cost.default_rate", ".cost.default")
    return field + "_s" if field.endswith(".period") else field
