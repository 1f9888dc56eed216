"""Start-up, serving and shutdown of one quotad process.

Start: lock the data directory, listen with health NOT_SERVING (calls get UNAVAILABLE),
replay the log, expire holds that ran out while down, load --plans, then SERVING.
SIGTERM or SIGINT: NOT_SERVING, drain in-flight calls, flush, exit 0. A storage failure:
NOT_SERVING, stop at once, exit 1 (memory is ahead of disk and must never be served).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from quotad.core import limits
from quotad.storage import snapshot_child
from quotad.storage.codec import state_digest
from quotad.core.commands import SetIdempotencyRetention, UpsertPlan
from quotad.core.machine import Core
from quotad.api.admission import Admission
from quotad.api.http_api import HttpApi, split_host
from quotad.api.metrics import Metrics, MetricsInterceptor
from quotad.plans_file import load_plans
from quotad.api.auth import DEFAULT_APP, Authenticator
from quotad.api.gate import Gate, GateState, is_loopback
from quotad.api.service import REGISTERED_METHODS, http_usage_authorizer, method_handlers
from quotad.cluster import FileShardMapSource, Ownership, ShardMapError
from quotad.cluster.catalog import Catalog, CatalogBehind
from quotad.cluster.control import ControlPlane
from quotad.cluster.etcd import EtcdUnavailable
from quotad.api.convert import plan_from_proto
from quotad.core.plans import Plan
from quotad.cluster.limits import LEASE_TTL_S_DEFAULT, LEASE_TTL_S_MAX, LEASE_TTL_S_MIN
from quotad_contract.limits import SHARD_ID_MAX
from quotad_contract.shards import EtcdTarget, format_slots
from quotad_contract.v1 import quotad_pb2
from quotad.storage.wal import MAP_SIZE_BYTES_DEFAULT, WriteAheadLog
from quotad.engine.headroom import LogHeadroom
from quotad.engine.recovery import recover
from quotad.engine.writer import (
    AUDIT_RETENTION_NS_DEFAULT, SNAPSHOT_EVERY_RECORDS_DEFAULT, SNAPSHOT_EVERY_S_DEFAULT, Writer,
)

log = logging.getLogger("quotad.server")

SWITCH_INTERVAL_S = 0.0005
"""The GIL hand-over interval: short, so the log thread gets the GIL back soon after a sync
while the event loop is busy (Python's default of 5 ms throttles group commit)."""
GC_THRESHOLDS = (20_000, 20, 100)
"""Cyclic GC generation thresholds while serving. Python's default (700, 10, 10) collects
the young generation every 700 allocations; each call allocates dozens of objects, and the
state is acyclic (dataclasses, dicts, tuples), so collecting less often cut the p99 of
coalesced pairs about in half (`python -m bench`) at no cost in memory worth measuring."""
SERVICE_NAMES = ("quotad.v1.QuotaService", "quotad.v1.AdminService")
NS_PER_HOUR = 3600 * limits.NS_PER_S


def collect_as_serving() -> None:
    """The cyclic collector as the server runs it once recovered: what lives now is frozen
    (long-lived: never scanned again) and the thresholds are GC_THRESHOLDS. The benches that
    measure the server's steps in-process call it too."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("./quotad-data")
    plans: Path | None = None
    map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT
    reflection: bool = False
    snapshot_every_records: int = SNAPSHOT_EVERY_RECORDS_DEFAULT
    snapshot_every_s: float = SNAPSHOT_EVERY_S_DEFAULT
    audit_retention_ns: int = AUDIT_RETENTION_NS_DEFAULT
    audit_retention_bytes: int = 0
    """The log's live data is kept under this: past it, the oldest records go even inside
    audit_retention_ns, never those of the keys' retention (idempotency_retention_ns). 0:
    three quarters of the log's room on its disk at start, or of the map if smaller
    (log_bytes_max)."""
    idempotency_retention_ns: int = limits.IDEMPOTENCY_RETENTION_NS_MIN
    """How long an idempotency key is remembered after its first use (logged when it
    changes: SetIdempotencyRetention). Its records stay at least that long."""
    log_state_digest: bool = False
    """Log a digest of the whole state when serving starts and when stopped (costs a pass
    over the state): a restart must start from the digest the last stop ended with."""
    metrics_listen: str = ""
    """HOST:PORT for Prometheus metrics over HTTP; empty: none."""
    http_listen: str = ""
    """HOST:PORT for the browser endpoint (GET /v1/usage); empty: none."""
    cors_origins: tuple[str, ...] = ()
    """Origins (https://app.example.com) whose pages may read the browser endpoint."""
    http_read_timeout_s: float = limits.HTTP_REQUEST_READ_TIMEOUT_S
    """How long one HTTP request may take to arrive, from its first byte."""
    http_allowed_hosts: tuple[str, ...] = ()
    """With API keys: the Host headers (name or address, maybe with a port) the browser
    endpoint answers; empty: any. Without keys it answers loopback names only, always."""
    admin_key: str = field(default="", repr=False)
    """Empty: "open" mode (no keys, app "default", loopback only). Set: every call needs a
    key, and this one may create, list and revoke the keys of every app."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """PEM certificate chain and private key: serve TLS (both, or neither)."""
    admission_operations: int = limits.ADMISSION_OPERATIONS
    """Operations admitted and not yet answered, at most; past it calls are shed
    (RESOURCE_EXHAUSTED OVERLOADED). See api/admission.py."""

    commit_delay_ms: int = limits.COMMIT_DELAY_MS_DEFAULT
    """While calls overlap and the wait fills, a small batch of records waits this long for
    more before it is written (limits.COMMIT_DELAY_MS_MAX; Writer._linger); 0: none."""
    pending_calls_per_method: int = limits.PENDING_CALLS_PER_METHOD
    """Calls of one method received and not yet taken by a handler, at most; one arriving
    while that many wait is refused by grpc's core (the caller sees CANCELLED). The methods
    outside the data path share one such queue (service.REGISTERED_METHODS)."""
    shard_map_file: Path | None = None
    shard_id: int | None = None
    """A shard of a cluster: the shard map (JSON) and this shard's id in it (both, or
    neither: a server alone, owning every user)."""
    cluster: str = ""
    """A shard of a cluster whose control plane is etcd: etcd://HOST:PORT/NAME (with
    shard_id, instead of shard_map_file). Empty: none."""
    lease_ttl_s: int = LEASE_TTL_S_DEFAULT
    """With cluster: the TTL of the shard id's etcd lease, which it serves only while it
    holds."""

    def __post_init__(self) -> None:
        self._check_address("--listen", self.listen, callers=True)
        if self.admin_key and not (
                limits.ADMIN_KEY_BYTES_MIN <= len(self.admin_key.encode("utf-8"))
                <= limits.ADMIN_KEY_BYTES_MAX
                and self.admin_key.isascii() and self.admin_key.isprintable()
                and " " not in self.admin_key):
            raise ValueError(
                f"admin key: must be {limits.ADMIN_KEY_BYTES_MIN} to "
                f"{limits.ADMIN_KEY_BYTES_MAX} printable ASCII characters without spaces "
                "(for example the output of `openssl rand -hex 32`)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        if self.map_size_bytes < 1024**2:
            raise ValueError("--map-size-gib must be at least 1 MiB")
        if self.snapshot_every_records < 1 or self.snapshot_every_s <= 0:
            raise ValueError("--snapshot-every-records and --snapshot-every-s must be positive")
        if self.metrics_listen:
            self._check_address("--metrics-listen", self.metrics_listen, callers=False)
        if self.audit_retention_ns < 0:
            raise ValueError("--audit-retention-days must not be negative")
        if not (limits.IDEMPOTENCY_RETENTION_NS_MIN <= self.idempotency_retention_ns
                <= limits.IDEMPOTENCY_RETENTION_NS_MAX):
            raise ValueError("--idempotency-retention-hours must be "
                             f"{limits.IDEMPOTENCY_RETENTION_NS_MIN // NS_PER_HOUR} to "
                             f"{limits.IDEMPOTENCY_RETENTION_NS_MAX // NS_PER_HOUR:,} (90 days)")
        if not 0 <= self.audit_retention_bytes < self.map_size_bytes:
            raise ValueError("--audit-retention-gib must be at least 0 (0: three quarters of "
                             "the map) and below --map-size-gib: the log needs room to grow "
                             "between prunes")
        if not (limits.ADMISSION_OPERATIONS_MIN <= self.admission_operations
                <= limits.ADMISSION_OPERATIONS_MAX):
            raise ValueError(f"--admission-operations must be {limits.ADMISSION_OPERATIONS_MIN} "
                             f"to {limits.ADMISSION_OPERATIONS_MAX:,}")
        if not 0 <= self.commit_delay_ms <= limits.COMMIT_DELAY_MS_MAX:
            raise ValueError(f"--commit-delay-ms must be 0 to {limits.COMMIT_DELAY_MS_MAX}")
        if not (limits.PENDING_CALLS_PER_METHOD_MIN <= self.pending_calls_per_method
                <= limits.PENDING_CALLS_PER_METHOD_MAX):
            raise ValueError("--pending-calls-per-method must be "
                             f"{limits.PENDING_CALLS_PER_METHOD_MIN} to "
                             f"{limits.PENDING_CALLS_PER_METHOD_MAX:,}")
        self._check_http()
        self._check_shard()

    def log_bytes_max(self, room_bytes: int) -> int:
        """The bound on the log's live data that pruning keeps: audit_retention_bytes, or by
        default a share (LOG_RETENTION_BYTES_SHARE) of the log's room, room_bytes (what its
        file uses and the disk's free bytes, at start), or of the map if smaller."""
        assert room_bytes >= 0
        return self.audit_retention_bytes or max(1, int(
            min(room_bytes, self.map_size_bytes) * limits.LOG_RETENTION_BYTES_SHARE))

    def _check_shard(self) -> None:
        if self.cluster and self.shard_map_file is not None:
            raise ValueError("--cluster and --shard-map are two sources of the shard map: "
                             "give one")
        if self.cluster:
            try:
                EtcdTarget.parse(self.cluster)
            except ShardMapError as error:
                raise ValueError(f"--cluster: {error}") from None
            if self.shard_id is None:
                raise ValueError("--cluster needs --shard-id: this shard's id in the map")
        elif (self.shard_map_file is None) != (self.shard_id is None):
            raise ValueError("--shard-map and --shard-id go together: give both or neither "
                             "(or --cluster with --shard-id)")
        if self.shard_id is not None and not 0 <= self.shard_id <= SHARD_ID_MAX:
            raise ValueError(f"--shard-id must be 0 to {SHARD_ID_MAX}")
        if not LEASE_TTL_S_MIN <= self.lease_ttl_s <= LEASE_TTL_S_MAX:
            raise ValueError(f"--lease-ttl-s must be {LEASE_TTL_S_MIN} to {LEASE_TTL_S_MAX} "
                             "seconds")

    def _check_address(self, flag: str, address: str, *, callers: bool) -> None:
        """HOST:PORT (port 0 picks one). An address that takes callers' calls (gRPC, the
        HTTP endpoint) must be loopback unless API keys are on."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{flag} {address!r}: expected HOST:PORT")
        if callers and not self.admin_key and not is_loopback(host):
            raise ValueError(
                f"{flag} {address!r}: without API keys quotad serves only a loopback "
                "address (127.0.0.1, ::1, localhost); set an admin key (QUOTAD_ADMIN_KEY or "
                "--admin-key-file) to serve other addresses"
            )

    def _check_http(self) -> None:
        if self.http_listen:
            self._check_address("--http-listen", self.http_listen, callers=True)
        if len(self.cors_origins) > limits.HTTP_CORS_ORIGINS_MAX:
            raise ValueError(f"--cors-origin: at most {limits.HTTP_CORS_ORIGINS_MAX} origins")
        for origin in self.cors_origins:
            check_origin(origin)
        if self.http_allowed_hosts and not self.admin_key:
            raise ValueError("--http-allowed-host: without API keys the browser endpoint "
                             "answers loopback Host names only (localhost, 127.0.0.1, [::1]); "
                             "set an admin key to serve other names")
        if len(self.http_allowed_hosts) > limits.HTTP_ALLOWED_HOSTS_MAX:
            raise ValueError(f"--http-allowed-host: at most {limits.HTTP_ALLOWED_HOSTS_MAX} "
                             "hosts")
        for host in self.http_allowed_hosts:
            if (len(host.encode()) > limits.HTTP_ALLOWED_HOST_BYTES_MAX
                    or host != host.strip().lower() or split_host(host) is None):
                raise ValueError(
                    f"--http-allowed-host {host!r}: expected a lowercase host name or address "
                    "as a browser sends it in Host, with or without a port (quota.example.com, "
                    f"quota.example.com:8443, [2001:db8::1]), of at most "
                    f"{limits.HTTP_ALLOWED_HOST_BYTES_MAX} bytes")
        if not (limits.HTTP_REQUEST_READ_TIMEOUT_S_MIN <= self.http_read_timeout_s
                <= limits.HTTP_REQUEST_READ_TIMEOUT_S_MAX):
            raise ValueError("--http-read-timeout-s must be "
                             f"{limits.HTTP_REQUEST_READ_TIMEOUT_S_MIN} to "
                             f"{limits.HTTP_REQUEST_READ_TIMEOUT_S_MAX} seconds")


def pending_calls_options(calls_max: int) -> list[tuple[str, int]]:
    """grpc server options that bound each method's queue of calls not yet taken by a
    handler to `calls_max`: a call that arrives while that many wait is refused by grpc's
    core. (grpc refuses at random between its two limits, "random early detection"; one
    apart, there is no random share: below the hard limit every call is queued.)"""
    return [("grpc.server.max_pending_requests", calls_max - 1),
            ("grpc.server.max_pending_requests_hard_limit", calls_max)]


def check_origin(origin: str) -> None:
    """A CORS origin is exact: scheme://host[:port], as a browser sends it in Origin."""
    problem = f"--cors-origin {origin!r}: expected an origin such as https://app.example.com"
    if len(origin.encode()) > limits.HTTP_CORS_ORIGIN_BYTES_MAX:
        raise ValueError(f"{problem} of at most {limits.HTTP_CORS_ORIGIN_BYTES_MAX} bytes")
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError:
        raise ValueError(problem) from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.path
            or parts.query or parts.fragment or "@" in parts.netloc
            or origin != f"{parts.scheme}://{parts.netloc}" or origin.lower() != origin):
        raise ValueError(problem)


def event_loop_name() -> str:
    """The running event loop's package: "uvloop", or "asyncio" (quotad.cli.run_server)."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


async def serve(config: Config) -> int:
    """Runs until SIGTERM/SIGINT (returns 0) or a storage failure (returns 1)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    plans = load_plans(config.plans) if config.plans else []
    control = await open_control_plane(config)
    ownership = control.ownership if control is not None else load_ownership(config)
    try:
        wal = WriteAheadLog(config.data_dir, map_size_bytes=config.map_size_bytes)  # the lock
    except BaseException:
        if control is not None:
            await control.close()
        raise
    process = _Process(config, wal, control)
    process.gate.ownership = ownership
    await process.listen_not_serving()
    core = await process.recover_core()
    if core is None:
        return 1
    writer = process.start_writer(core)
    await writer.expire_due()
    await process.set_idempotency_retention(writer)
    in_catalog: frozenset[str] = frozenset()
    if control is not None:
        try:
            in_catalog = await process.join_catalog(
                control, writer, core, own_plan_ids=frozenset(plan.id for plan in plans))
        except CatalogBehind as error:
            log.error("cannot join the cluster's catalog", extra={"error": str(error)})
            await process.drain_flush_and_exit()
            return 2
    for plan in plans:
        if plan.id in in_catalog:  # the catalog's plan wins over the file's
            continue
        await writer.execute(UpsertPlan(app=DEFAULT_APP, plan=plan))
    if control is not None and not await process.hold_lease(control):
        return await process.drain_flush_and_exit()  # stopped while waiting for the lease
    await process.report_serving(plans_loaded=len(plans))
    await process.stop.wait()
    return await process.drain_flush_and_exit()


def _shard(ownership: Ownership | None) -> dict[str, object]:
    """For the serving line of a shard of a cluster: its id and slots (nothing when alone)."""
    if ownership is None or not ownership.clustered:
        return {}
    slots = ownership.owned
    return {"shard_id": ownership.shard_id, "slots": format_slots(slots)}


async def open_control_plane(config: Config) -> ControlPlane | None:
    """With --cluster: etcd reached, the map loaded and this shard id in it (ValueError
    naming what is wrong otherwise); None without."""
    if not config.cluster:
        return None
    assert config.shard_id is not None  # checked by Config
    return await ControlPlane.open(EtcdTarget.parse(config.cluster), config.shard_id,
                                   config.lease_ttl_s)


def load_ownership(config: Config) -> Ownership | None:
    """This shard's slots from --shard-map and --shard-id; None for a server alone.
    ValueError naming what is wrong with the map."""
    if config.shard_map_file is None or config.shard_id is None:
        return None
    try:
        return Ownership.of(FileShardMapSource(config.shard_map_file).load(), config.shard_id)
    except ShardMapError as error:
        raise ValueError(f"--shard-map {config.shard_map_file}: {error}") from None


class _Process:
    """The parts of one serving process, which serve() starts one step after another."""

    writer: Writer
    core: Core
    _headroom_task: asyncio.Task[None]
    """Warns while the log would fill its map or disk within a day (from start_writer on)."""
    log_bytes_max: int
    """The bound on the log's live data that pruning keeps (from start_writer on)."""

    def __init__(self, config: Config, wal: WriteAheadLog,
                 control: ControlPlane | None = None) -> None:
        self.config = config
        self.wal = wal
        self.control = control
        """A shard of a cluster in etcd: the map it follows and the lease it must hold."""
        self._health_updates: set[asyncio.Task[None]] = set()
        self.stop = asyncio.Event()
        """Set by SIGTERM, SIGINT or a storage failure."""
        self.failure: list[BaseException] = []
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        self.gate = Gate()
        self.health_servicer = health.aio.HealthServicer()
        self.metrics = Metrics()
        self.measured = bool(config.metrics_listen)  # no per-call metrics work unless served
        self.server = self._grpc_server()
        self.http_api = HttpApi(self.gate, authorize=http_usage_authorizer(self.gate),
                                cors_origins=config.cors_origins,
                                read_timeout_s=config.http_read_timeout_s,
                                metrics=self.metrics if self.measured else None,
                                loopback_hosts_only=not config.admin_key,
                                allowed_hosts=config.http_allowed_hosts)
        self.address = self.http_address = self.metrics_address = ""
        self.recovery_started = 0.0

    def _grpc_server(self) -> grpc.aio.Server:
        """The gRPC server with every service on it, not yet listening."""
        config = self.config
        interceptors = [MetricsInterceptor(self.metrics)] if self.measured else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limits.MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", limits.RESPONSE_BYTES_MAX),
            ("grpc.so_reuseport", 0),
            *pending_calls_options(config.pending_calls_per_method),
        ])
        admission = Admission(config.admission_operations)
        self.metrics.watch_admission(admission)
        for service, table in method_handlers(self.gate, admission).items():
            # the data path registered: grpc's core matches each of its methods to its own
            # queue of received calls; the rest share the one queue of unregistered calls
            registered = REGISTERED_METHODS.get(service, frozenset())
            if registered:
                server.add_registered_method_handlers(
                    service, {name: table[name] for name in registered})
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                service, {name: handler for name, handler in table.items()
                          if name not in registered}),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, server)
        if config.reflection:
            names = [quotad_pb2.DESCRIPTOR.services_by_name[n.split(".")[-1]].full_name
                     for n in SERVICE_NAMES]
            reflection.enable_server_reflection(
                (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server

    def _fail(self, error: BaseException) -> None:
        self.failure.append(error)
        self.stop.set()

    async def listen_not_serving(self) -> None:
        """Listens for gRPC (and HTTP) with health NOT_SERVING: calls get UNAVAILABLE until
        the state is recovered. ValueError if an address or the TLS files cannot be had."""
        config, server = self.config, self.server
        try:
            if config.tls_cert is not None and config.tls_key is not None:
                credentials = grpc.ssl_server_credentials(
                    [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
                port = server.add_secure_port(config.listen, credentials)
            else:
                port = server.add_insecure_port(config.listen)
        except OSError as error:
            self.wal.close()
            raise ValueError(f"--tls-cert/--tls-key: cannot read ({error})") from error
        except RuntimeError as error:  # grpc's way of saying the address is taken or invalid
            self.wal.close()
            raise ValueError(f"--listen {config.listen}: cannot listen there ({error})") from error
        await _set_health(self.health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self.address = f"{config.listen.rpartition(':')[0]}:{port}"
        if self.gate.ownership is None:  # alone: the one shard of a map of its own
            self.gate.ownership = Ownership.alone(self.address)
        if config.http_listen:
            http_host, _, http_port = config.http_listen.rpartition(":")
            try:
                http_port = await self.http_api.start(http_host, int(http_port),
                                                      _https_context(config))
                self.http_address = f"{http_host}:{http_port}"
            except OSError as error:
                await server.stop(0)
                self.wal.close()
                raise ValueError(f"--http-listen {config.http_listen}: cannot listen there "
                                 f"({error})") from error
        log.info("listening", extra={"address": self.address, "http": self.http_address,
                                     "state": "starting", "event_loop": event_loop_name()})

    async def recover_core(self) -> Core | None:
        """The core from the snapshot and the log; None, having stopped listening, if the
        log cannot be trusted."""
        self.recovery_started = time.monotonic()
        try:
            core = await asyncio.get_running_loop().run_in_executor(None, recover, self.wal)
        except Exception as error:  # a log we cannot trust: refuse to serve anything
            log.critical("cannot recover the log, refusing to start",
                         extra={"error": str(error)})
            await self.http_api.close()
            await self.server.stop(0)
            self.wal.close()
            if self.control is not None:
                await self.control.close()
            return None
        collect_as_serving()
        return core

    def start_writer(self, core: Core) -> Writer:
        """The writer over the recovered core, and the metrics that watch it."""
        config, metrics = self.config, self.metrics
        leftovers = snapshot_child.remove_leftovers(config.data_dir)
        if leftovers:
            log.info("removed unfinished snapshot files", extra={"files": leftovers})
        self._set_log_bytes_max()  # after the leftovers: their room is the log's again
        writer = Writer(core, self.wal, on_failure=self._fail, fork_snapshots=hasattr(os, "fork"),
                        on_flush=metrics.observe_flush if self.measured else None,
                        snapshot_every_records=config.snapshot_every_records,
                        snapshot_every_s=config.snapshot_every_s,
                        audit_retention_ns=config.audit_retention_ns,
                        audit_retention_bytes=self.log_bytes_max,
                        commit_delay_s=config.commit_delay_ms / 1000)
        writer.start()
        metrics.watch_live_holds(lambda: len(core.expiry))
        metrics.watch_log(self.wal)
        metrics.log_live_bytes_max.set(self.log_bytes_max)
        metrics.watch_pruning(lambda: writer.records_pruned)
        metrics.watch_snapshots(writer)
        metrics.watch_event_loop(threading.get_native_id())  # called on the loop's thread
        if config.metrics_listen:
            metrics_host, _, metrics_port = config.metrics_listen.rpartition(":")
            bound = metrics.serve(metrics_host, int(metrics_port))
            self.metrics_address = f"{metrics_host}:{bound}"
        self.writer, self.core = writer, core
        self._headroom_task = asyncio.create_task(self._watch_headroom(),
                                                  name="quotad-log-headroom")
        return writer

    def _set_log_bytes_max(self) -> None:
        """The bound on the log's live data, logged: --audit-retention-gib, or by default
        three quarters of its room on the disk as it starts (of the map if smaller). A bound
        set larger than the disk's room is said once: the disk would fill first, and stop the
        server (fail-stop)."""
        used_bytes, map_bytes = self.wal.used_bytes(), self.wal.map_bytes()
        try:
            disk_free_bytes: int | None = self.wal.disk_free_bytes()
        except OSError:
            disk_free_bytes = None  # the headroom task says once that it cannot read it
        room_bytes = map_bytes if disk_free_bytes is None else used_bytes + disk_free_bytes
        self.log_bytes_max = self.config.log_bytes_max(room_bytes)
        assert 0 < self.log_bytes_max < map_bytes, (self.log_bytes_max, map_bytes)
        log.info("the log's live data is kept under %.1f GiB%s", self.log_bytes_max / 1024**3,
                 "" if self.config.audit_retention_bytes else
                 " (three quarters of its room on the disk, or of the map if smaller: "
                 "--audit-retention-gib sets it)",
                 extra={"audit_retention_bytes": self.log_bytes_max, "room_bytes": room_bytes,
                        "map_bytes": map_bytes})
        growth_left_bytes = self.log_bytes_max - used_bytes
        if disk_free_bytes is not None and disk_free_bytes < growth_left_bytes:
            log.warning("the disk under the data directory has less room than the log may "
                        "grow under --audit-retention-gib: it would fill first and stop the "
                        "server; lower --audit-retention-gib or give the data directory a "
                        "larger disk", extra={
                            "disk_free_bytes": disk_free_bytes,
                            "growth_left_bytes": growth_left_bytes,
                            "audit_retention_bytes": self.log_bytes_max})

    async def _watch_headroom(self) -> None:
        """Logs a warning while the log would fill its map or disk within a day at the rate
        it grows (engine/headroom.py); samples every LOG_GROWTH_SAMPLE_EVERY_S (~4 us each,
        `timeit`)."""
        headroom = LogHeadroom(self.log_bytes_max)
        wal = self.wal
        map_bytes = wal.map_bytes()  # set when the environment was opened
        disk_unread = False
        while True:
            try:
                disk_free_bytes = wal.disk_free_bytes()
            except OSError as error:  # watch the map alone; say so once
                if not disk_unread:
                    log.warning("cannot read the data directory's free disk space; "
                                "watching the map alone", extra={"error": str(error)})
                disk_unread, disk_free_bytes = True, map_bytes
            soon = headroom.sample(time.monotonic(), wal.used_bytes(), map_bytes,
                                   disk_free_bytes, self.writer.kept_ns())
            if soon is not None:
                log.warning("the log will fill its %s within a day at its rate of growth; "
                            "raise --map-size-gib or give the data directory a larger disk, "
                            "or lower --audit-retention-days", soon.bound, extra={
                                "bound": soon.bound, "used_bytes": soon.used_bytes,
                                "left_bytes": soon.left_bytes,
                                "growth_bytes_per_s": round(soon.growth_bytes_per_s),
                                "fills_in_h": round(soon.fills_in_s / 3600, 2)})
            await asyncio.sleep(limits.LOG_GROWTH_SAMPLE_EVERY_S)

    async def set_idempotency_retention(self, writer: Writer) -> None:
        """Logs --idempotency-retention-hours when it is not the one in force (a record:
        replay then answers each repeat as it was answered)."""
        wanted_ns = self.config.idempotency_retention_ns
        if writer.core.idempotency_retention_ns == wanted_ns:
            return
        result = await writer.execute(SetIdempotencyRetention(retention_ns=wanted_ns))
        log.info("idempotency keys are remembered %s h from their first use (they were %s h)",
                 _hours(result.retention_ns), _hours(result.previous_ns), extra={
                     "idempotency_retention_s": result.retention_ns // limits.NS_PER_S,
                     "previous_s": result.previous_ns // limits.NS_PER_S})

    async def join_catalog(self, control: ControlPlane, writer: Writer, core: Core, *,
                           own_plan_ids: frozenset[str] = frozenset()) -> frozenset[str]:
        """Applies what changed in the cluster's catalog in etcd since this shard's state last
        applied a change of it (the whole catalog the first time), then follows it; the
        catalog's changes go there from now on. own_plan_ids: the default app's plans of this
        shard's --plans file, its own (never deleted for being absent from the catalog). The
        ids of the default app's plans in the catalog (a --plans file does not override
        them); CatalogBehind when this shard's state is ahead of etcd."""
        catalog = Catalog(control.etcd, control.target, decode_plan=_plan_from_value,
                          execute=writer.execute, applied_revision=core.catalog_revision,
                          held=core.catalog_entries,
                          own_plans=frozenset((DEFAULT_APP, plan_id) for plan_id in own_plan_ids))
        resumed_from = catalog.applied_revision
        in_catalog: frozenset[str] = frozenset()
        try:
            changes = await catalog.catch_up()
            in_catalog = frozenset(plan_id for app, plan_id in catalog.plans_read
                                   if app == DEFAULT_APP)
            log.info("catalog applied", extra={"changes": changes,
                                               "resumed_from_revision": resumed_from,
                                               "applied_revision": catalog.applied_revision,
                                               "revision": catalog.followed_revision})
        except EtcdUnavailable as error:
            log.warning("cannot read the catalog from etcd now; applying it once etcd answers",
                        extra={"error": str(error)})
        control.follow_catalog(catalog)
        self.gate.catalog = catalog
        return in_catalog

    async def hold_lease(self, control: ControlPlane) -> bool:
        """Follows the map and takes the shard id's lease, waiting (NOT_SERVING, calls
        refused UNAVAILABLE) while another process holds it: True once held, False when
        stopped first. From then on the gate lets calls through only while it is held."""
        lease = control.start(holder={"address": self.address},
                              on_change=self._lease_changed)
        self.gate.fence = lease
        acquired = asyncio.create_task(lease.acquired.wait())
        stopped = asyncio.create_task(self.stop.wait())
        await asyncio.wait((acquired, stopped), return_when=asyncio.FIRST_COMPLETED)
        acquired.cancel()
        stopped.cancel()
        return lease.acquired.is_set() and not self.stop.is_set()

    def _lease_changed(self, held: bool) -> None:
        """The lease was taken again, or not renewed in time: health says so (calls are
        let through, or refused, by the gate itself)."""
        if self.gate.state is not GateState.SERVING:
            return
        status = (health_pb2.HealthCheckResponse.SERVING if held
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        update = asyncio.create_task(_set_health(self.health_servicer, status))
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)

    async def report_serving(self, *, plans_loaded: int) -> None:
        """Opens the gate to calls and reports SERVING."""
        config, core = self.config, self.core
        self.gate.auth = Authenticator(config.admin_key, core.keys)
        self.gate.writer, self.gate.state = self.writer, GateState.SERVING
        await _set_health(self.health_servicer,
                          health_pb2.HealthCheckResponse.SERVING if self.gate.serving
                          else health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("serving", extra={"address": self.address, "records": core.sequence,
                                   "recovery_s": round(time.monotonic() - self.recovery_started, 3),
                                   "plans_loaded": plans_loaded, "metrics": self.metrics_address,
                                   "keys": "on" if config.admin_key else "off",
                                   "tls": config.tls_cert is not None,
                                   "http": self.http_address,
                                   **_shard(self.gate.ownership),
                                   **_digest(config, core)})

    async def drain_flush_and_exit(self) -> int:
        """NOT_SERVING, in-flight calls drained (at once after a failure), everything
        flushed and closed: the exit status, 0 or 1 after a failure."""
        failure, writer, core = self.failure, self.writer, self.core
        self.gate.state = GateState.FAILED if failure else GateState.DRAINING
        await _set_health(self.health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.http_api.stop_accepting()
        await self.server.stop(0 if failure else limits.DRAIN_S)
        await self.http_api.close()
        await writer.close()
        self._headroom_task.cancel()
        self.wal.close()
        if self.control is not None:
            await self.control.close()
        if failure:
            log.critical("stopped after a failure", extra={"error": repr(failure[0])})
            return 1
        log.info("stopped", extra={"records": core.sequence, "batches": writer.batches,
                                   "records_written": writer.records_written,
                                   "records_pruned": writer.records_pruned,
                                   "batches_on_log_thread": writer.batches_on_log_thread,
                                   "lingered_batches": writer.lingered_batches,
                                   "lingered_records": writer.lingered_records,
                                   "snapshots": writer.snapshots,
                                   "snapshot_deltas": writer.snapshot_deltas,
                                   "snapshot_children_failed": writer.snapshot_children_failed,
                                   "snapshot_children_cpu_s": round(
                                       writer.snapshot_children_cpu_s, 3),
                                   "snapshot_stall_ms_max": round(
                                       writer.snapshot_stall_s_max * 1e3, 3),
                                   **_digest(self.config, core)})
        return 0


def _hours(duration_ns: int) -> str:
    """A duration as hours, without a fraction when whole."""
    return f"{duration_ns / NS_PER_HOUR:g}"


def _plan_from_value(value: bytes) -> Plan:
    """A plan of the catalog in etcd: a quotad.v1.Plan message."""
    return plan_from_proto(quotad_pb2.Plan.FromString(value))


def _https_context(config: Config) -> ssl.SSLContext | None:
    """With --tls-cert/--tls-key the browser endpoint serves HTTPS with the same certificate
    (a page served over HTTPS may not fetch plain HTTP)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"--tls-cert/--tls-key: cannot load for HTTPS ({error})") from error
    return context


def _digest(config: Config, core: Core) -> dict[str, str]:
    return {"state_digest": state_digest(core)} if config.log_state_digest else {}


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, status)
