"""Prometheus metrics: request counts and latencies of this process, and audit metrics read from the store.

Audit states, stage durations, tokens and steps are computed at scrape time from ``status.json`` files,
so every API replica reports the same numbers and none has to watch the pipeline. A finished audit's
status never changes, so it is read once and remembered; each scrape lists the audits and reads only the
unfinished ones, and its result is reused for ``cache_s`` seconds. The last screening run (``dfc-audit
screen``, a CronJob that exits after each pass) is read the same way from ``screening/latest.json``.
METRICS.md describes every metric.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.screening.summary import ERROR_REASONS, LATEST_KEY, SKIP_REASONS, ScreeningSummary, read_latest
from workers.pipeline.status import STAGES, AuditState, AuditStatus, AuditStore
from workers.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

STAGE_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
"""Stage durations range from seconds (toy audits) to a day (paper-scale extraction)."""
FINISHED = (AuditState.SUCCEEDED, AuditState.FAILED, AuditState.CANCELLED)
OTHER_REASON = "other"
"""The ``reason`` label of a reason this API does not know (a newer screener's), so the label set stays closed."""


class AuditSummary(NamedTuple):
    """The few numbers of one status that metrics need."""

    state: AuditState
    progress: float
    stage_seconds: dict[str, float]
    tokens_extracted: float
    training_steps: float


def summarise(status: AuditStatus) -> AuditSummary:
    """Reduce a status to its metric inputs (counters named ``tokens_extracted*`` and ``training_step``)."""
    tokens = sum(v for k, v in status.counters.items() if k.startswith("tokens_extracted"))
    return AuditSummary(
        status.state, status.progress, dict(status.stage_seconds), tokens, status.counters.get("training_step", 0.0)
    )


class _CachedCollector(Collector):
    """A collector whose metrics come from the store, computed at most once per ``cache_s`` seconds."""

    def __init__(self, cache_s: float) -> None:
        self.cache_s = cache_s
        self._cached: tuple[float, list[Metric]] | None = None
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        # Declaring nothing keeps registration from running a scrape (which would read the store).
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self.cache_s:
                return self._cached[1]
            metrics = self._scrape()
            self._cached = (time.monotonic(), metrics)
            return metrics

    def _scrape(self) -> list[Metric]:
        raise NotImplementedError


class StoreCollector(_CachedCollector):
    """Audit metrics derived from the store on scrape."""

    def __init__(self, audits: AuditStore, cache_s: float) -> None:
        super().__init__(cache_s)
        self.audits = audits
        self._finished: dict[str, AuditSummary] = {}

    def _read(self) -> dict[str, AuditSummary]:
        summaries: dict[str, AuditSummary] = {}
        for audit_id in self.audits.ids():
            summary = self._finished.get(audit_id)
            if summary is None:
                try:
                    summary = summarise(self.audits.status(audit_id))
                except KeyError:
                    continue
                if summary.state.finished:
                    self._finished[audit_id] = summary
            summaries[audit_id] = summary
        # Forget audits removed from the bucket.
        self._finished = {k: v for k, v in self._finished.items() if k in summaries}
        return summaries

    def _scrape(self) -> list[Metric]:
        start = time.perf_counter()
        up = GaugeMetricFamily("dfc_store_up", "1 if the last scrape could read the audit records, else 0.")
        try:
            summaries = self._read()
        except StorageError as e:
            log.warning("metrics scrape could not read the store: %s", e)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        by_state = GaugeMetricFamily("dfc_audits", "Audits in each state now.", labels=["state"])
        finished = CounterMetricFamily(
            "dfc_audits_finished", "Audits that ended in each final state (in the store).", labels=["state"]
        )
        for state in AuditState:
            count = sum(s.state is state for s in summaries.values())
            by_state.add_metric([state.value], count)
            if state in FINISHED:
                finished.add_metric([state.value], count)
        progress = GaugeMetricFamily(
            "dfc_audit_progress", "Fraction done of each unfinished audit.", labels=["audit_id", "state"]
        )
        for audit_id, s in summaries.items():
            if not s.state.finished:
                progress.add_metric([audit_id, s.state.value], s.progress)
        tokens = CounterMetricFamily(
            "dfc_tokens_extracted", "Tokens run through either model, summed over all audits in the store."
        )
        tokens.add_metric([], sum(s.tokens_extracted for s in summaries.values()))
        steps = CounterMetricFamily("dfc_training_steps", "Crosscoder training steps, summed over all audits.")
        steps.add_metric([], sum(s.training_steps for s in summaries.values()))
        scrape = GaugeMetricFamily("dfc_store_scrape_seconds", "Time the last scrape spent reading the store.")
        scrape.add_metric([], time.perf_counter() - start)
        return [up, by_state, finished, progress, self._stage_histogram(summaries.values()), tokens, steps, scrape]

    @staticmethod
    def _stage_histogram(summaries: Iterable[AuditSummary]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "dfc_audit_stage_duration_seconds", "Wall time of each finished pipeline stage.", labels=["stage"]
        )
        durations: dict[str, list[float]] = {stage.value: [] for stage in STAGES}
        for s in summaries:
            for stage, seconds in s.stage_seconds.items():
                durations.setdefault(stage, []).append(seconds)
        for stage, values in durations.items():
            buckets = [(str(float(le)), sum(v <= le for v in values)) for le in STAGE_BUCKETS_S]
            buckets.append(("+Inf", len(values)))
            family.add_metric([stage], buckets, sum_value=sum(values))
        return family


class ScreeningCollector(_CachedCollector):
    """The last screening run's summary, read from the bucket on scrape and reused for ``cache_s`` seconds.

    A scrape never fails because of it: an unreadable summary (storage down, a corrupt or foreign document)
    gives ``dfc_screening_up 0`` and no other screening series, with one warning until it is readable again.
    """

    def __init__(self, store: ObjectStore, cache_s: float) -> None:
        super().__init__(cache_s)
        self.store = store
        self._failing = False

    def _scrape(self) -> list[Metric]:
        up = GaugeMetricFamily("dfc_screening_up", "1 if the last scrape could read the screening summary, else 0.")
        try:
            summary = read_latest(self.store)
        except Exception as e:  # storage, JSON or schema errors alike: the scrape must still answer
            if not self._failing:
                log.warning(
                    "metrics cannot read the screening summary %s (logged once until it recovers): %s", LATEST_KEY, e
                )
            self._failing = True
            up.add_metric([], 0)
            return [up]
        if self._failing:
            log.info("metrics can read the screening summary %s again", LATEST_KEY)
        self._failing = False
        up.add_metric([], 1)
        return [up, *screening_families(summary)]


def _by_reason(summary: ScreeningSummary, outcome: str, known: tuple[str, ...]) -> dict[str, int]:
    """Results with ``outcome`` per reason: every known reason (0 if none), plus ``other`` only when non-zero."""
    counts = dict.fromkeys(known, 0)
    for m in summary.models:
        if m.outcome == outcome:
            reason = m.reason if m.reason in counts else OTHER_REASON
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def screening_families(summary: ScreeningSummary | None) -> list[Metric]:
    """The screening metrics of one summary; before the first run (None) the timestamps are 0 and the rest empty."""
    last_run = GaugeMetricFamily(
        "dfc_screening_last_run_timestamp_seconds", "When the last screening run finished (Unix time; 0: never)."
    )
    last_success = GaugeMetricFamily(
        "dfc_screening_last_success_timestamp_seconds",
        "When the last screening run without errors finished (Unix time; 0: none recorded).",
    )
    success = GaugeMetricFamily("dfc_screening_last_run_success", "1 if the last screening run had no errors, else 0.")
    duration = GaugeMetricFamily("dfc_screening_last_run_duration_seconds", "Wall time of the last screening run.")
    seen = GaugeMetricFamily("dfc_screening_last_run_models_seen", "Models the last screening run looked at.")
    submitted = GaugeMetricFamily(
        "dfc_screening_last_run_models_submitted", "Models the last screening run submitted for audit."
    )
    skipped = GaugeMetricFamily(
        "dfc_screening_last_run_models_skipped", "Models the last screening run skipped, by reason.", labels=["reason"]
    )
    errors = GaugeMetricFamily(
        "dfc_screening_last_run_models_errors",
        "Models the last screening run could not handle (retried next run), by reason.",
        labels=["reason"],
    )
    families: list[Metric] = [last_run, last_success, success, duration, seen, submitted, skipped, errors]
    if summary is None:
        last_run.add_metric([], 0)
        last_success.add_metric([], 0)
        return families
    finished = summary.finished_at or summary.started_at
    last_run.add_metric([], finished.timestamp())
    last_success.add_metric([], summary.last_success_at.timestamp() if summary.last_success_at else 0)
    success.add_metric([], 1 if summary.succeeded else 0)
    duration.add_metric([], (finished - summary.started_at).total_seconds())
    seen.add_metric([], len(summary.models))
    submitted.add_metric([], sum(m.outcome == "submitted" for m in summary.models))
    for family, outcome, known in ((skipped, "skipped", SKIP_REASONS), (errors, "error", ERROR_REASONS)):
        for reason, count in _by_reason(summary, outcome, known).items():
            family.add_metric([reason], count)
    return families


class ServiceMetrics:
    """A registry of the app's own (so two apps in one process, e.g. in tests, never share counts)."""

    def __init__(self, audits: AuditStore, cache_s: float = 5.0) -> None:
        # `*_created` series double the output and no dashboard uses them; the switch is process-wide in
        # prometheus_client, and the API is the only exporter in its process.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "dfc_http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=self.registry
        )
        self.http_latency = Histogram(
            "dfc_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.submitted = Counter(
            "dfc_audits_submitted", "Audits created and handed to Ray by this API process.", registry=self.registry
        )
        self.cancel_requests = Counter(
            "dfc_audit_cancel_requests", "Cancellations requested through this API process.", registry=self.registry
        )
        self.registry.register(StoreCollector(audits, cache_s))
        self.registry.register(ScreeningCollector(audits.store, cache_s))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one answered request."""
        labels = (method, route, str(status))
        self.http_requests.labels(*labels).inc()
        self.http_latency.labels(*labels).observe(seconds)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
