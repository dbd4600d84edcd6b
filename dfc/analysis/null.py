"""False-positive checks calibrated on null pairs: a check is only a check if something fails it.

Two models with nothing planted between them still give a crosscoder "exclusive" features (independently
trained models encode the same concepts in different bases), and some of those rank high. Whatever ranks and
passes the checks on such a *null pair* is a false positive by construction, so the null distribution of each
check's statistic sets its threshold (SCIENCE.md §11): a finding passes a check when its statistic is above the
null's chosen percentile. Pure data and arithmetic: the null features come from audits of null pairs
(``benchmarks/calibrate.py``), the findings from the audit being reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

STATISTICS: tuple[str, ...] = ("divergence", "removal_kl", "specificity", "score")
"""What each check reads of a finding, in the order the report shows them:
``divergence`` — nats of behavioural divergence from the other model (``dfc.behaviour.divergence``);
``removal_kl`` — next-token KL where the feature fires when it is removed there;
``specificity`` — the feature direction's KL on its own contexts over a random direction's of the same norm
(median over the steering sweep's α; only for the swept features);
``score`` — the ranking score (relative to the audit's own features, so the weakest of the four)."""
UNITS = {"divergence": "nats", "removal_kl": "nats", "specificity": "×", "score": ""}


class FindingStatistics(NamedTuple):
    """One feature's statistics as the checks read them (None: not measured for this feature)."""

    divergence: float | None
    removal_kl: float | None
    specificity: float | None
    score: float | None

    def get(self, name: str) -> float | None:
        return getattr(self, name)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0–1) of ``values``, linearly interpolated (NumPy's default)."""
    if not values:
        raise ValueError("no null values to take a quantile of; calibrate on at least one null pair")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class NullCalibration:
    """Thresholds of the checks, each a percentile of the null features' statistic, and what they let through."""

    thresholds: dict[str, float]
    """Statistic → threshold; a finding passes that check when its value is above it."""
    percentiles: dict[str, float]
    """Statistic → the null percentile (0–100) its threshold is."""
    null_pairs: int
    """Null pairs audited for the calibration."""
    null_features: int
    """Null features (both models' ranked features, every null pair) the percentiles were taken over."""
    passing_per_pair: list[int] = field(default_factory=list)
    """Per calibration null pair: its features that pass every check (false positives by construction)."""
    source: str = ""
    """Where the calibration came from (the pairs, the recipe), for the report."""
    scan_salience: float | None = None
    """The behaviour-first scan: the salience (``dfc.behaviour.scan.salience``) an entry must be above; None: not
    checked on salience (with ``scan_gap`` None too, the scan is uncalibrated)."""
    scan_percentile: float | None = None
    """Which null percentile of the null pairs' scan entries ``scan_salience`` and ``scan_gap`` are."""
    scan_gap: float | None = None
    """The behaviour-first scan: the gap (nats, at the entry's representative context) an entry must be above."""

    def scan_passes(self, gap: float | None, salience: float | None) -> bool | None:
        """Whether a scan entry passes the null: above every scan threshold set (``scan_gap``, ``scan_salience``);
        None when none is set, or the entry lacks a statistic one needs."""
        checks = [(self.scan_gap, gap), (self.scan_salience, salience)]
        needed = [(threshold, value) for threshold, value in checks if threshold is not None]
        if not needed or any(value is None for _, value in needed):
            return None
        return all(value > threshold for threshold, value in needed)  # type: ignore[operator]

    @property
    def passing_per_pair_mean(self) -> float:
        return sum(self.passing_per_pair) / len(self.passing_per_pair) if self.passing_per_pair else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NullCalibration:
        return cls(
            thresholds={k: float(v) for k, v in data["thresholds"].items()},
            percentiles={k: float(v) for k, v in data["percentiles"].items()},
            null_pairs=int(data["null_pairs"]),
            null_features=int(data["null_features"]),
            passing_per_pair=[int(n) for n in data.get("passing_per_pair", [])],
            source=str(data.get("source", "")),
            scan_salience=None if data.get("scan_salience") is None else float(data["scan_salience"]),
            scan_percentile=None if data.get("scan_percentile") is None else float(data["scan_percentile"]),
            scan_gap=None if data.get("scan_gap") is None else float(data["scan_gap"]),
        )


class CheckOutcome(NamedTuple):
    """One check of one finding against the null."""

    name: str
    value: float | None
    """The finding's statistic (None: not measured, so the check is not applied)."""
    threshold: float
    percentile: float
    passed: bool | None
    """Whether ``value`` is above ``threshold``; None when not measured."""


class NullVerdict(NamedTuple):
    """Every check of one finding; it passes when no measured check fails and at least one was measured."""

    outcomes: list[CheckOutcome]

    @property
    def passed(self) -> bool:
        measured = [o for o in self.outcomes if o.passed is not None]
        return bool(measured) and all(o.passed for o in measured)

    @property
    def failed(self) -> list[str]:
        return [o.name for o in self.outcomes if o.passed is False]


def calibrate(
    null_audits: Sequence[Iterable[FindingStatistics]],
    percentiles: Mapping[str, float],
    *,
    source: str = "",
) -> NullCalibration:
    """Thresholds at the given percentiles of the null features' statistics (every null audit pooled), and
    how many of each null audit's own features pass them all (the in-sample false-positive count)."""
    audits = [list(a) for a in null_audits]
    unknown = sorted(set(percentiles) - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown check statistics {unknown}; choose from {list(STATISTICS)}")
    thresholds = {}
    for name, pct in percentiles.items():
        values = [v for a in audits for f in a if (v := f.get(name)) is not None and math.isfinite(v)]
        thresholds[name] = quantile(values, pct / 100.0)
    calibration = NullCalibration(
        thresholds=thresholds,
        percentiles=dict(percentiles),
        null_pairs=len(audits),
        null_features=sum(len(a) for a in audits),
        source=source,
    )
    passing = [sum(judge(f, calibration).passed for f in a) for a in audits]
    return NullCalibration(**{**calibration.to_dict(), "passing_per_pair": passing})


def judge(finding: FindingStatistics, calibration: NullCalibration) -> NullVerdict:
    """Each calibrated check of ``finding``: its value, the null threshold, whether it is above."""
    outcomes = []
    for name in STATISTICS:
        if name not in calibration.thresholds:
            continue
        value, threshold = finding.get(name), calibration.thresholds[name]
        passed = None if value is None or not math.isfinite(value) else value > threshold
        outcomes.append(CheckOutcome(name, value, threshold, calibration.percentiles[name], passed))
    return NullVerdict(outcomes)


def describe(outcome: CheckOutcome) -> str:
    """``divergence 4.8 nats; null 99th percentile 0.2`` — how a finding compares with the null."""
    unit = UNITS.get(outcome.name, "")
    pct = f"{outcome.percentile:g}"
    suffix = "th" if not pct.endswith(("1", "2", "3")) or pct.endswith(("11", "12", "13")) else \
        {"1": "st", "2": "nd", "3": "rd"}[pct[-1]]  # fmt: skip
    value = "not measured" if outcome.value is None else f"{outcome.value:.3g}{' ' + unit if unit else ''}"
    return f"{outcome.name.replace('_', ' ')} {value}; null {pct}{suffix} percentile {outcome.threshold:.3g}"
