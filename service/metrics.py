"""Prometheus metrics: request counts and latencies of this process, and audit metrics read from the store.

Audit states, stage durations, tokens and steps are computed at scrape time from ``status.json`` files,
so every API replica reports the same numbers and none has to watch the pipeline. A finished audit's
status never changes, so it is read once and remembered; each scrape lists the audits and reads only the
unfinished ones, and its result is reused for ``cache_s`` seconds. METRICS.md describes every metric.
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

from workers.status import STAGES, AuditState, AuditStatus, AuditStore
from workers.storage import StorageError

log = logging.getLogger(__name__)

STAGE_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
"""Stage durations range from seconds (toy audits) to a day (paper-scale extraction)."""
FINISHED = (AuditState.SUCCEEDED, AuditState.FAILED, AuditState.CANCELLED)


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


class StoreCollector(Collector):
    """Audit metrics derived from the store on scrape."""

    def __init__(self, audits: AuditStore, cache_s: float) -> None:
        self.audits, self.cache_s = audits, cache_s
        self._finished: dict[str, AuditSummary] = {}
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

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one answered request."""
        labels = (method, route, str(status))
        self.http_requests.labels(*labels).inc()
        self.http_latency.labels(*labels).observe(seconds)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
