"""The null-calibrated checks as an audit applies them: each ranked feature's statistics read from the steer
stage's output, and the calibration they are compared with (the spec's, else the one shipped with the package,
made by ``benchmarks/calibrate.py`` on null pairs). The science is in ``dfc/analysis/null.py``."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from dfc.analysis.null import FindingStatistics, NullCalibration, NullVerdict, describe
from workers.report.schema import NullCheck

BUILTIN = ("workers.report", "null_calibration.json")
"""The shipped calibration (package data), written by ``benchmarks/calibrate.py``."""


def finding_statistics(steer_side: dict[str, Any]) -> dict[int, FindingStatistics]:
    """Per ranked feature of one model: divergence and removal KL (screened), specificity (swept: the feature's
    KL on its own contexts over a random direction's, median over α), ranking score."""
    screens = steer_side.get("screens", {})
    swept = {r["feature"]: r for r in steer_side.get("features", [])}
    out = {}
    for entry in steer_side.get("ranking", []):
        f = entry["feature"]
        screen = screens.get(str(f))
        ratio = swept[f]["random_control"]["median_ratio"] if f in swept else None
        out[f] = FindingStatistics(
            divergence=None if screen is None else screen["divergence"],
            removal_kl=None if screen is None else max(0.0, screen["kl"]),
            specificity=None if ratio is None else 1.0 / max(ratio, 1e-12),
            score=entry["score"],
        )
    return out


def audit_statistics(steering: dict[str, Any]) -> list[FindingStatistics]:
    """Every ranked feature of both models of one audit (``analysis/steering.json``): on a null pair, the null."""
    return [s for side in steering.get("sides", {}).values() for s in finding_statistics(side).values()]


def null_checks(verdict: NullVerdict) -> list[NullCheck]:
    """A finding's verdict against the null as the report's rows, each with its sentence."""
    return [NullCheck(name=o.name, value=o.value, threshold=o.threshold, percentile=o.percentile, passed=o.passed,
                      text=describe(o)) for o in verdict.outcomes]  # fmt: skip


@cache
def builtin_calibration() -> NullCalibration:
    """The calibration shipped with the package."""
    text = resources.files(BUILTIN[0]).joinpath(BUILTIN[1]).read_text()
    return NullCalibration.from_dict(json.loads(text))


def calibration_for(spec_calibration: dict[str, Any] | None) -> NullCalibration:
    """The spec's calibration when it gives one (a null pair of the user's own scale), else the shipped one."""
    return builtin_calibration() if spec_calibration is None else NullCalibration.from_dict(spec_calibration)
