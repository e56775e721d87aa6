"""Prometheus metrics at /metrics, with prometheus_client (its registry, types and exposition).

Two kinds:
- counted at scrape time from the store (every runner's work shows): tasks by step and state,
  the age of the oldest pending task, registered runners by kind. They come from the web's status
  snapshot (reader.py), so that a scrape does not query the store;
- fed by this daemon's engine, through its reporter (`Recorder` wraps the daemon's, so that the
  engine itself is not touched): attempts by step and outcome, tasks failed for good, task
  durations, commit transaction latency and batch size, scripts running now.

Label values are step names: data from the manifest, escaped by the library's exposition.
"""

from __future__ import annotations

import threading

from task_pipeline.state import Claimed, CommitReport

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STATES = ("pending", "running", "leased", "done", "failed", "tainted", "history")


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client import PlatformCollector, ProcessCollector

        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.tasks = Gauge("task_pipeline_tasks", "Tasks in the store by step and state (history: superseded)",
                           ["step", "state"], registry=r)
        self.oldest_pending = Gauge("task_pipeline_oldest_pending_age_seconds",
                                    "Age of the oldest pending task (0 when none is pending)", registry=r)
        self.runners = Gauge("task_pipeline_runners", "Runners and writers registered on the store, by kind",
                             ["kind"], registry=r)
        self.running = Gauge("task_pipeline_scripts_running", "Scripts this daemon is running now", registry=r)
        self.attempts = Counter("task_pipeline_attempts", "Attempts this daemon finished, by step and outcome "
                                "(ok, failed, interrupted, stale)", ["step", "outcome"], registry=r)
        self.failures = Counter("task_pipeline_task_failures", "Tasks that failed for good in this daemon (out of "
                                "retries)", ["step"], registry=r)
        self.duration = Histogram("task_pipeline_task_duration_seconds", "Run time of this daemon's attempts, by step",
                                  ["step"], buckets=DURATION_BUCKETS, registry=r)
        self.commit_seconds = Histogram("task_pipeline_commit_seconds", "Time of each commit transaction of a batch "
                                        "of results", buckets=COMMIT_BUCKETS, registry=r)
        self.commit_batch = Histogram("task_pipeline_commit_batch_tasks", "Results per commit transaction",
                                      buckets=BATCH_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels):
        # labels() looks the child up under a lock each time; the engine calls this per result
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            with self._lock:
                c = self._children[key] = metric.labels(*labels)
        return c

    # -- at scrape time -------------------------------------------------------------------

    def scraped(self, counts: list[dict], oldest_pending: float | None, runners: list[dict]) -> None:
        self.tasks.clear()
        for c in counts:
            for st in STATES:
                self.tasks.labels(c["step"], st).set(c[st])
        self.oldest_pending.set(oldest_pending or 0.0)
        self.runners.clear()
        kinds: dict[str, int] = {}
        for r in runners:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        for kind, n in kinds.items():
            self.runners.labels(kind).set(n)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format the scraper asks for: OpenMetrics when its Accept header prefers
        it (Prometheus does), else the text format."""
        from prometheus_client.exposition import choose_encoder

        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    # -- fed by the engine ----------------------------------------------------------------

    def started(self) -> None:
        self.running.inc()

    def committed(self, rep: CommitReport) -> None:
        n = 0
        for outcome, results in (("ok", rep.done), ("failed", rep.failed), ("failed", rep.retrying),
                                 ("interrupted", rep.requeued), ("stale", rep.stale)):
            for r in results:
                n += 1
                if not r.started:
                    continue   # leased and given back before its script ran: no attempt
                self.running.dec()
                self._child(self.attempts, r.step, outcome).inc()
                if outcome in ("ok", "failed"):
                    self._child(self.duration, r.step).observe(max(r.finished_at - r.started_at, 0.0))
        for r in rep.failed:
            self._child(self.failures, r.step).inc()
        if n:
            self.commit_seconds.observe(rep.seconds)
            self.commit_batch.observe(n)


class Recorder:
    """The daemon's reporter, with metrics: what the engine reports goes to both."""

    def __init__(self, inner, metrics: Metrics) -> None:
        self.inner, self.metrics = inner, metrics

    def task_started(self, c: Claimed) -> None:
        self.metrics.started()
        self.inner.task_started(c)

    def committed(self, rep: CommitReport) -> None:
        self.inner.committed(rep)
        self.metrics.committed(rep)

    def log(self, level: str, text: str) -> None:
        self.inner.log(level, text)


