"""Checks calibrated on null pairs (dfc/analysis/null.py): thresholds are percentiles of the null features, a
finding passes when every measured check is above its threshold, and the report's sentence says both numbers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dfc.analysis.null import (
    CheckOutcome,
    FindingStatistics,
    NullCalibration,
    calibrate,
    describe,
    judge,
    quantile,
)


def null_features(rng: random.Random, n: int) -> list[FindingStatistics]:
    return [
        FindingStatistics(rng.gauss(0, 0.1), rng.expovariate(20), rng.lognormvariate(0, 0.5), rng.random())
        for _ in range(n)
    ]


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_quantiles_are_numpys_linear_interpolation(q):
    values = [random.Random(3).random() for _ in range(37)]
    assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_a_high_percentile_lets_few_null_features_through_and_a_planted_one_passes():
    rng = random.Random(0)
    audits = [null_features(rng, 80) for _ in range(3)]
    calibration = calibrate(audits, {"divergence": 99, "removal_kl": 50, "specificity": 50})
    assert calibration.null_pairs == 3 and calibration.null_features == 240
    # Divergence alone at the 99th percentile passes at most ~1% of 240 (the conjunction fewer still).
    assert sum(calibration.passing_per_pair) <= 3
    planted = FindingStatistics(divergence=4.8, removal_kl=0.5, specificity=5.0, score=0.9)
    verdict = judge(planted, calibration)
    assert verdict.passed and verdict.failed == []
    shared_reencoding = planted._replace(divergence=0.0)
    assert not judge(shared_reencoding, calibration).passed
    assert judge(shared_reencoding, calibration).failed == ["divergence"]


def test_an_unmeasured_check_is_not_applied_but_nothing_measured_is_no_pass():
    calibration = NullCalibration({"divergence": 0.2, "specificity": 2.0}, {"divergence": 99, "specificity": 50}, 3, 60)
    unswept = FindingStatistics(divergence=1.0, removal_kl=None, specificity=None, score=None)
    verdict = judge(unswept, calibration)
    assert verdict.passed and [o.passed for o in verdict.outcomes] == [True, None]
    assert not judge(FindingStatistics(None, None, None, None), calibration).passed


def test_a_calibration_survives_its_json_round_trip():
    rng = random.Random(1)
    calibration = calibrate([null_features(rng, 20)], {"divergence": 99, "score": 90}, source="unit test")
    assert NullCalibration.from_dict(calibration.to_dict()) == calibration


def test_a_scan_entry_passes_when_above_every_scan_threshold_set():
    features = ({"divergence": 0.2}, {"divergence": 99}, 3, 60)
    assert NullCalibration(*features).scan_passes(9.0, 4.0) is None  # the scan is uncalibrated
    by_gap = NullCalibration(*features, scan_gap=6.0, scan_percentile=99)
    assert by_gap.scan_passes(9.0, None) is True and by_gap.scan_passes(5.0, 9.0) is False
    both = NullCalibration(*features, scan_gap=6.0, scan_salience=4.75, scan_percentile=99)
    assert both.scan_passes(9.0, 5.0) is True and both.scan_passes(9.0, 4.0) is False
    assert both.scan_passes(9.0, None) is None  # salience needed but not measured (an entry with nothing to compare)
    old = NullCalibration.from_dict({**NullCalibration(*features).to_dict(), "scan_salience": 4.75})
    assert old.scan_gap is None and old.scan_passes(0.1, 5.0) is True  # a 1.6 calibration: salience only
    assert NullCalibration.from_dict(both.to_dict()) == both


def test_unknown_statistics_and_empty_nulls_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="unknown check statistics"):
        calibrate([null_features(random.Random(0), 5)], {"loudness": 99})
    with pytest.raises(ValueError, match="calibrate on at least one null pair"):
        calibrate([[]], {"divergence": 99})


def test_the_comparison_reads_as_a_sentence():
    assert describe(CheckOutcome("divergence", 4.8, 0.2, 99, True)) == "divergence 4.8 nats; null 99th percentile 0.2"
    assert describe(CheckOutcome("removal_kl", None, 0.01, 50, None)).startswith("removal kl not measured; null 50th")
    assert "null 91st percentile" in describe(CheckOutcome("score", 0.5, 0.4, 91, True))


def test_the_spec_names_the_same_check_statistics_as_the_science():
    from dfc.analysis.null import STATISTICS
    from workers.spec import CHECK_STATISTICS

    # Named twice on purpose (the API reads specs without importing dfc): the two lists must not drift apart.
    assert CHECK_STATISTICS == STATISTICS
