"""The worker's Prometheus metrics (``prometheus_client``), off unless
``ckanext.webhooks.metrics_port`` is set.

Celery's prefork pool runs deliveries in several processes: the counters and
histograms they update live in ``prometheus_client``'s multiprocess files
(``PROMETHEUS_MULTIPROC_DIR``, a fresh directory per worker, set before the
pool forks), and the worker's main process serves them, summed, beside the
gauges read from the database at each scrape (backlog, oldest waits, hooks
by state, workers alive), on ``metrics_host`` (loopback by default).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Optional

from . import settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300, 3600)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram
        self.deliveries = Counter(
            "ckanext_webhooks_deliveries", "Delivery outcomes as recorded: success, retry "
            "(failed, to be tried again), given_up, refused (4xx, 410 or a refused address) "
            "and withheld (not sent: the reader may no longer see it, a plugin vetoed it...)",
            ["outcome", "topic"])
        self.attempt_seconds = Histogram(
            "ckanext_webhooks_attempt_duration_seconds",
            "Duration of each delivery attempt that was sent", ["outcome"],
            buckets=_LATENCY_BUCKETS)
        self.commit_to_receipt = Histogram(
            "ckanext_webhooks_commit_to_receipt_seconds",
            "From the commit of the change to a receiver's 2xx answer being recorded",
            buckets=_LATENCY_BUCKETS)
        self.backed_off = Gauge(
            "ckanext_webhooks_hosts_backed_off",
            "Receivers in a worker process's slow lane now", multiprocess_mode="livesum")


_metrics: Optional[_Metrics] = None


def enabled() -> bool:
    return bool(settings.metrics_port()) and bool(os.environ.get(MULTIPROC_ENV))


def _get() -> Optional[_Metrics]:
    global _metrics
    if _metrics is None and enabled():
        _metrics = _Metrics()
    return _metrics


# --- in the processes that deliver ------------------------------------------------------

def recorded(outcome: str, topic: str, duration: Optional[float] = None,
             since_commit: Optional[float] = None) -> None:
    metrics = _get()
    if metrics is None:
        return
    metrics.deliveries.labels(outcome, topic or "unknown").inc()
    if duration is not None:
        metrics.attempt_seconds.labels(outcome).observe(duration)
    if since_commit is not None and outcome == "success":
        metrics.commit_to_receipt.observe(max(0.0, since_commit))


def hosts_backed_off(count: int) -> None:
    metrics = _get()
    if metrics is not None:
        metrics.backed_off.set(count)


# --- in the worker's main process -------------------------------------------------------------

def prepare_worker() -> None:
    """Before the pool forks: a fresh multiprocess directory, when metrics are on."""
    if not settings.metrics_port():
        return
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="ckanext-webhooks-metrics-")


def process_gone(pid: int) -> None:
    if enabled():
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


def serve() -> None:
    """Serve /metrics from the worker's main process (a thread of its own)."""
    port = settings.metrics_port()
    if not port or not os.environ.get(MULTIPROC_ENV):
        return
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(_DatabaseCollector())
    start_http_server(port, addr=settings.metrics_host(), registry=registry)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host(), port)


def cleanup() -> None:
    directory = os.environ.get(MULTIPROC_ENV)
    if directory and directory.startswith(tempfile.gettempdir()) \
            and "ckanext-webhooks-metrics-" in directory:
        shutil.rmtree(directory, ignore_errors=True)


class _DatabaseCollector:
    """Gauges read from the database at each scrape."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily
        import sqlalchemy as sa
        from ckan import model
        alive = 3 * settings.heartbeat_seconds()
        try:
            with model.meta.engine.connect() as conn:
                row = conn.execute(sa.text("""
                    SELECT (SELECT count(*) FROM webhooks_event WHERE fanned_out IS NULL)
                               AS backlog,
                           (SELECT coalesce(extract(epoch FROM now() - min(created)), 0)
                              FROM webhooks_event WHERE fanned_out IS NULL) AS backlog_age,
                           (SELECT count(*) FROM webhooks_delivery WHERE due <= now()) AS due,
                           (SELECT coalesce(extract(epoch FROM now() - min(due)), 0)
                              FROM webhooks_delivery WHERE due <= now()) AS due_age,
                           (SELECT count(*) FROM webhooks
                             WHERE active AND failing_since IS NULL) AS healthy,
                           (SELECT count(*) FROM webhooks
                             WHERE active AND failing_since IS NOT NULL) AS failing,
                           (SELECT count(*) FROM webhooks WHERE NOT active) AS paused,
                           (SELECT count(*) FROM webhooks_worker
                             WHERE beat > now() - make_interval(secs => :alive)) AS workers
                """), {"alive": alive}).mappings().one()
        except Exception as error:  # noqa: BLE001 - a scrape must not kill the worker
            log.warning("metrics: could not read the database: %s", error)
            return
        yield GaugeMetricFamily("ckanext_webhooks_outbox_backlog",
                                "Events committed and not fanned out yet", row["backlog"])
        yield GaugeMetricFamily("ckanext_webhooks_outbox_oldest_age_seconds",
                                "Age of the oldest event not fanned out yet (0: none)",
                                float(row["backlog_age"]))
        yield GaugeMetricFamily("ckanext_webhooks_deliveries_due",
                                "Deliveries due now, not yet claimed by a worker", row["due"])
        yield GaugeMetricFamily("ckanext_webhooks_delivery_oldest_due_age_seconds",
                                "How long the oldest due delivery has waited (0: none)",
                                float(row["due_age"]))
        hooks = GaugeMetricFamily("ckanext_webhooks_hooks", "Hooks by state", labels=["state"])
        for state in ("healthy", "failing", "paused"):
            hooks.add_metric([state], row[state])
        yield hooks
        yield GaugeMetricFamily("ckanext_webhooks_workers_alive",
                                "Workers whose heartbeat is fresh", row["workers"])
