"""Prometheus metrics on their own port (`--metrics-listen`), served by prometheus-client's
own HTTP thread, never by the event loop.

    quotad_requests_total{method, code}     calls answered, by RPC and status code
    quotad_request_seconds{method}          latency, request in to answer out
    quotad_denials_total{group}             Reserve / Track denials, by the group that denied
    quotad_live_holds                       holds not yet committed, released or expired
    quotad_flush_records                    records per LMDB transaction (group commit size)
    quotad_flush_seconds                    one LMDB transaction with its sync
    quotad_log_sequence                     the last durable log sequence number
    quotad_http_requests_total{status}      browser endpoint answers, by HTTP status
    quotad_batch_operations                 operations per Batch call (client-side coalescing)
    quotad_log_bytes                        bytes of the LMDB file in use (read when scraped)
    quotad_log_map_bytes                    the most the LMDB file may grow to (--map-size-gib)
    quotad_log_live_bytes                   bytes of its pages holding data (read when scraped):
                                            what --audit-retention-gib bounds
    quotad_log_live_bytes_max               that bound, as the server took it at start (by
                                            default three quarters of the disk's room)
    quotad_audit_trail_seconds              how far back the log reaches: the age of its oldest
                                            record (read when scraped)
    quotad_log_records_pruned_total         log records pruned, past the retention or the size
                                            bound
    quotad_shed_calls_total{method, reason} calls refused without any work: reason
                                            "overloaded" (RESOURCE_EXHAUSTED OVERLOADED at the
                                            admission limit) or "deadline" (DEADLINE_EXCEEDED,
                                            the deadline passed before the call started)
    quotad_admitted_operations              operations admitted and not yet answered
    quotad_snapshots_total                  snapshots of the state stored in the log
    quotad_snapshot_deltas_total            of those, deltas (the users changed since the
                                            last whole one)
    quotad_snapshot_children_cpu_seconds_total
                                            CPU time (user + system) of the forked children
                                            that made them: per operation, divide its rate
                                            by quotad_log_sequence's
    quotad_snapshot_children_failed_total   snapshot children that failed (the next one is
                                            due as usual)
    quotad_event_loop_cpu_seconds_total     time the event loop's thread ran on a CPU
    quotad_event_loop_waiting_seconds_total time it was ready to run but waited for a CPU
                                            (every core held by other processes or the
                                            server's own threads): a rate that rises under
                                            load says the server is short of CPU, not of work
                                            (Linux's /proc schedstat, read when scraped)

And prometheus-client's standard process and Python collectors, read when scraped:
process_cpu_seconds_total (the server's own CPU, its snapshot children's apart),
process_resident_memory_bytes, process_open_fds, python_gc_collections_total{generation} and
the like.

Denials inside a Batch count too, by group, like those of Reserve and Track.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, start_http_server)
from prometheus_client.core import CounterMetricFamily

_LATENCY_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_FLUSH_BUCKETS_RECORDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 8192)
_BATCH_BUCKETS_OPERATIONS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter("quotad_requests", "Calls answered, by RPC and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("quotad_request_seconds", "Latency of a call, in to out",
                                 ["method"], buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.denials = Counter("quotad_denials", "Denials, by the limit group that denied",
                               ["group"], registry=self.registry)
        self.live_holds = Gauge("quotad_live_holds", "Holds that are still live",
                                registry=self.registry)
        self.flush_records = Histogram("quotad_flush_records", "Records per LMDB transaction",
                                       buckets=_FLUSH_BUCKETS_RECORDS, registry=self.registry)
        self.flush_seconds = Histogram("quotad_flush_seconds", "One LMDB transaction and sync",
                                       buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.http_requests = Counter("quotad_http_requests",
                                     "Browser endpoint answers, by HTTP status", ["status"],
                                     registry=self.registry)
        self.log_sequence = Gauge("quotad_log_sequence", "Last durable log sequence number",
                                  registry=self.registry)
        self.batch_operations = Histogram("quotad_batch_operations", "Operations per Batch call",
                                          buckets=_BATCH_BUCKETS_OPERATIONS,
                                          registry=self.registry)
        self.log_bytes = Gauge("quotad_log_bytes", "Bytes of the LMDB file in use",
                               registry=self.registry)
        self.log_map_bytes = Gauge("quotad_log_map_bytes", "Most bytes the LMDB file may use",
                                   registry=self.registry)
        self.log_live_bytes = Gauge("quotad_log_live_bytes",
                                    "Bytes of the LMDB file's pages holding data",
                                    registry=self.registry)
        self.log_live_bytes_max = Gauge("quotad_log_live_bytes_max",
                                        "The bound pruning keeps the log's live data under",
                                        registry=self.registry)
        self.audit_trail_seconds = Gauge("quotad_audit_trail_seconds",
                                         "Age of the log's oldest record",
                                         registry=self.registry)
        self.admitted_operations = Gauge("quotad_admitted_operations",
                                         "Operations admitted and not yet answered",
                                         registry=self.registry)

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint; returns the port it listens on."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]

    def observe_flush(self, records: int, seconds: float, last_sequence: int) -> None:
        self.flush_records.observe(records)
        self.flush_seconds.observe(seconds)
        self.log_sequence.set(last_sequence)

    def watch_live_holds(self, count: Callable[[], int]) -> None:
        self.live_holds.set_function(count)

    def watch_log(self, wal: Any) -> None:
        """Reads the LMDB environment's sizes when scraped: meta-page reads, and one read
        transaction for the tables' page counts."""
        def read(size: Callable[[], float]) -> Callable[[], float]:
            def value() -> float:
                try:
                    return float(size())
                except Exception:  # closed at shutdown: no figure rather than a failed scrape
                    return float("nan")
            return value

        self.log_bytes.set_function(read(wal.used_bytes))
        self.log_map_bytes.set_function(read(wal.map_bytes))
        self.log_live_bytes.set_function(read(wal.live_bytes))

        def audit_trail_s() -> float:
            oldest_ns = wal.record_now_ns(wal.first_sequence())
            return 0.0 if oldest_ns is None else max(0, time.time_ns() - oldest_ns) / 1e9

        self.audit_trail_seconds.set_function(read(audit_trail_s))

    def watch_pruning(self, records_pruned: Callable[[], int]) -> None:
        """quotad_log_records_pruned_total, read from the writer's count when scraped."""
        self.registry.register(_PrunedCollector(records_pruned))

    def watch_snapshots(self, writer: Any) -> None:
        """Snapshots stored, and their children's CPU and failures, read from the writer's
        counts when scraped."""
        self.registry.register(_SnapshotsCollector(writer))

    def watch_event_loop(self, thread_id: int) -> None:
        """The event loop thread's time on a CPU and waiting for one, read when scraped from
        /proc/self/task/THREAD_ID/schedstat (threading.get_native_id() on that thread);
        nothing where the kernel keeps no such figures."""
        self.registry.register(_EventLoopCollector(
            Path(f"/proc/self/task/{thread_id}/schedstat")))

    def watch_admission(self, admission: Any) -> None:
        """Shed calls and admitted operations, read from the admission counters when scraped:
        shedding costs no metrics work on the hot path."""
        self.registry.register(_ShedCollector(admission))
        self.admitted_operations.set_function(lambda: admission.admitted)

    def observe_response(self, method: str, request: Any, response: Any) -> None:
        """Denials by group (Batch results included) and Batch sizes."""
        denied_by = getattr(response, "denied_by", "")
        if denied_by:
            self.denials.labels(denied_by).inc()
        elif method == "Batch":
            self.batch_operations.observe(len(request.operations))
            for result in response.results:
                kind = result.WhichOneof("result")
                if kind in ("reserve", "track"):
                    denied_by = getattr(result, kind).denied_by
                    if denied_by:
                        self.denials.labels(denied_by).inc()


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every unary call, and counts denials by group."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(self, continuation: Callable[[Any], Any],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        metrics = self._metrics

        async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                response = await inner(request, context)
                metrics.observe_response(method, request, response)
                return response
            except BaseException:
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                metrics.requests.labels(method, code).inc()
                metrics.latency.labels(method).observe(time.perf_counter() - started)

        return handler._replace(unary_unary=measured)


class _PrunedCollector:
    """quotad_log_records_pruned_total, from the writer's own count."""

    def __init__(self, records_pruned: Callable[[], int]) -> None:
        self._records_pruned = records_pruned

    def collect(self) -> Any:
        yield CounterMetricFamily("quotad_log_records_pruned",
                                  "Log records pruned, past the retention or the size bound",
                                  value=self._records_pruned())


class _SnapshotsCollector:
    """quotad_snapshots_total and the children's, from the writer's own counts."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def collect(self) -> Any:
        writer = self._writer
        yield CounterMetricFamily("quotad_snapshots", "Snapshots of the state stored in the log",
                                  value=writer.snapshots)
        yield CounterMetricFamily("quotad_snapshot_deltas",
                                  "Of those, deltas of the last whole one (the users changed "
                                  "since)", value=writer.snapshot_deltas)
        yield CounterMetricFamily("quotad_snapshot_children_cpu_seconds",
                                  "CPU time (user + system) of the snapshot children",
                                  value=writer.snapshot_children_cpu_s)
        yield CounterMetricFamily("quotad_snapshot_children_failed",
                                  "Snapshot children that failed",
                                  value=writer.snapshot_children_failed)


class _EventLoopCollector:
    """quotad_event_loop_cpu_seconds_total and quotad_event_loop_waiting_seconds_total."""

    def __init__(self, schedstat: Path) -> None:
        self._schedstat = schedstat

    def collect(self) -> Any:
        try:
            on_cpu_ns, waiting_ns, _ = self._schedstat.read_text().split()
        except (OSError, ValueError):  # no schedstat here: no figures rather than a failed scrape
            return
        yield CounterMetricFamily("quotad_event_loop_cpu_seconds",
                                  "Time the event loop's thread ran on a CPU",
                                  value=int(on_cpu_ns) / 1e9)
        yield CounterMetricFamily("quotad_event_loop_waiting_seconds",
                                  "Time the event loop's thread was ready to run but waited "
                                  "for a CPU", value=int(waiting_ns) / 1e9)


class _ShedCollector:
    """quotad_shed_calls_total{method, reason}, from the admission's own counter."""

    def __init__(self, admission: Any) -> None:
        self._admission = admission

    def collect(self) -> Any:
        family = CounterMetricFamily("quotad_shed_calls", "Calls refused without any work",
                                     labels=["method", "reason"])
        for (method, reason), count in sorted(list(self._admission.shed.items())):
            family.add_metric([method, reason], count)
        yield family
