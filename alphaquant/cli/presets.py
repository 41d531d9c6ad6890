"""Quantization plans by name: the presets shipped inside the package (``alphaquant/presets/*.json``,
package data, so they are there after any kind of install), or a plan file given by path."""
from __future__ import annotations

import os
from importlib import resources

PRESETS = resources.files("alphaquant") / "presets"


class PlanNotFound(ValueError):
    """Neither a plan file nor a preset of that name."""


def preset_names() -> list[str]:
    """Names of the shipped presets (file names without .json)."""
    return sorted(p.name[:-5] for p in PRESETS.iterdir() if p.name.endswith(".json"))


def resolve_plan(name: str) -> tuple[str, dict]:
    """(plan name, validated plan) for a plan file path or a preset name.

    Raises PlanNotFound, or alphaquant.plans.PlanError for a plan that is not valid; the whole plan
    is checked here, quantizers included, so nothing long runs before a bad plan is reported.
    """
    from ..plans import load_plan

    if os.path.isfile(name):
        return os.path.splitext(os.path.basename(name))[0], load_plan(name)
    preset = PRESETS / f"{name}.json"
    if os.sep in name or "/" in name or not name or not preset.is_file():
        raise PlanNotFound(f"plan {name!r} is neither a file nor a preset; presets: {', '.join(preset_names())}")
    with resources.as_file(preset) as path:
        return name, load_plan(path)
