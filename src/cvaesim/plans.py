"""How many cells of each type to simulate, for the command line and the simulate rule alike (free of
TensorFlow, so that the command line imports it without loading TensorFlow)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from . import InputError, did_you_mean


def cell_plan(cell_types: list[str], real_counts: dict[str, int], per_type: int | Mapping[str, int],
              total: int | None, asked_by: str) -> dict[str, int]:
    """``total`` cells split as the real cells are; else ``per_type`` cells of every type, or, where it maps
    type names to numbers, that many of each type it names (and none of the others). ``asked_by`` names the
    setting in errors."""
    if total is not None:
        return proportional_plan(cell_types, real_counts, total)
    if not isinstance(per_type, Mapping):
        return dict.fromkeys(cell_types, per_type)
    plan = {str(name): n for name, n in per_type.items()}  # YAML reads Louvain clusters' names 0, 1, ... as numbers
    unknown = [name for name in plan if name not in cell_types]
    if unknown:
        raise InputError(f"{asked_by}: unknown cell types {unknown}{did_you_mean(unknown, cell_types)}; the cell "
                         f"types are {cell_types} (types the filter dropped, as its log says, are not among them)")
    if not sum(plan.values()):
        raise InputError(f"{asked_by}: no cells asked for: every number is 0")
    return plan


def store_cell_plan(cell_types, per_type: int | Mapping[str, int], total: int | None, asked_by: str) -> dict[str, int]:
    """``cell_plan`` for the cells of an image store, given its categorical ``obs['cell_type']``."""
    return cell_plan(list(cell_types.cat.categories), cell_types.value_counts().to_dict(), per_type, total, asked_by)


def proportional_plan(cell_types: list[str], real_counts: dict[str, int], total: int) -> dict[str, int]:
    """``total`` cells split across the types as the real cells are, by largest remainders so that the
    parts add up to the total; types whose share rounds to no cell are left out."""
    real_total = sum(real_counts.get(name, 0) for name in cell_types)
    quotas = {name: total * real_counts.get(name, 0) / real_total for name in cell_types}
    plan = {name: math.floor(quota) for name, quota in quotas.items()}
    by_remainder = sorted(cell_types, key=lambda name: plan[name] - quotas[name])
    for name in by_remainder[: total - sum(plan.values())]:
        plan[name] += 1
    return {name: n for name, n in plan.items() if n}
