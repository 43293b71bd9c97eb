"""The gRPC service: a thin servicer over :class:`engine.Engine`, with hot reload.

``protos/tandem/v1/tandem.proto`` is the contract. This module only translates between
its messages and the engine's Python API (:mod:`engine.serving.engine` does the work), maps
errors to status codes, and runs the server around it:

- **hot reload** — :class:`EngineHolder` keeps the serving engine; ``Reload`` and a
  watcher of the bundle root's ``current`` pointer load the new version *beside* the old
  one and swap a single reference. A request takes the reference once, at its start, so
  in-flight requests finish on the version they began with; a bundle that fails to load
  leaves the old version serving and the reason is reported (reply, log, metric);
- **errors** — a bad request (:class:`~engine.errors.InvalidRequest` from the engine,
  the limits here, or bytes that are not a valid message) is ``INVALID_ARGUMENT``, an
  unknown item id ``NOT_FOUND``; anything else is a bug: logged with its traceback and
  answered ``INTERNAL``. Messages never echo a huge value back;
- **security** — an optional bearer token (``authorization: Bearer <token>`` metadata),
  required on the Admin service and on ``AddItems`` (a write every user sees), or on
  every rpc with ``token_all``; TLS from a certificate and key;
- **operations** — the standard health service and server reflection, Prometheus
  metrics on an HTTP port, JSON-lines logs, graceful shutdown on SIGTERM.
"""

from __future__ import annotations

import bisect
import hmac
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from engine.errors import InvalidRequest, ServeError, UnknownIdError, shorten
from engine.index import bundle
from engine.results import Recommendations
from engine.service.rpc import tandem_pb2 as pb
from engine.service.rpc import tandem_pb2_grpc as pb_grpc
from engine.serving.engine import Engine, EngineConfig
from engine.settings import ServerConfig

log = logging.getLogger("tandem.server")

# Seconds a graceful stop may run past server.grace before the process exits anyway.
SHUTDOWN_MARGIN = 15.0

RECOMMENDER = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"].full_name
# Recommender rpcs that change what every user sees: they need the token like Admin's.
ADMIN_WRITES = (f"/{RECOMMENDER}/AddItems",)
# A status message is cut to this many characters (gRPC carries it in the metadata).
MAX_STATUS_MESSAGE = 1000


class _Histogram:
    """A Prometheus histogram with one label, counted in plain Python under one lock:
    observing is a bisect and two additions per value (prometheus_client's own histogram
    takes a lock for each bucket, count and sum, which is most of a request's metrics cost)."""

    def __init__(self, name: str, documentation: str, label: str, buckets: tuple, registry):
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = tuple(float(b) for b in buckets)
        self._series: dict[str, list] = {}  # label value -> [count per bucket..., count above, sum]
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, values: Iterable[tuple[str, float]]) -> None:
        """Record ``(label value, observation)`` pairs."""
        with self._lock:
            for label, value in values:
                series = self._series.get(label)
                if series is None:
                    series = self._series[label] = [0] * (len(self.bounds) + 2)
                series[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket with le >= value
                series[-1] += value

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = {label: list(series) for label, series in self._series.items()}
        for label, series in sorted(snapshot.items()):
            cumulative = list(itertools.accumulate(series[:-1]))
            family.add_metric(
                [label], [(floatToGoString(b), n) for b, n in zip(self.bounds + (math.inf,), cumulative)], series[-1]
            )
        yield family


class _Metrics:
    """Prometheus metrics of one server (its own registry, so several servers can live
    in one process, as in the tests)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tandem_requests", "Requests by rpc and status code", ["rpc", "code"], registry=self.registry
        )
        self.latency = _Histogram(
            "tandem_request_seconds",
            "Request latency by rpc",
            "rpc",
            (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            self.registry,
        )
        self.candidates = _Histogram(
            "tandem_candidates",
            "Candidates proposed per request by source",
            "source",
            (0, 10, 25, 50, 100, 200, 500, 1000, 5000),
            self.registry,
        )
        self.reloads = Counter("tandem_reloads", "Bundle reloads by outcome", ["outcome"], registry=self.registry)
        self.info = Gauge("tandem_bundle_items", "Items in the served catalogue", registry=self.registry)
        self._counters: dict = {}  # labelled counters, looked up once (labels() costs a lock and a dict)

    def observe_request(self, rpc: str, code: str, seconds: float) -> None:
        counter = self._counters.get((rpc, code))
        if counter is None:
            counter = self._counters[(rpc, code)] = self.requests.labels(rpc, code)
        counter.inc()
        self.latency.observe(((rpc, seconds),))

    def observe_candidates(self, counts: dict[str, int]) -> None:
        self.candidates.observe(counts.items())


class EngineHolder:
    """The engine being served, swapped atomically on reload."""

    def __init__(self, root: str | Path, engine_config: EngineConfig | None = None, metrics: _Metrics | None = None):
        self.root = Path(root)
        self.engine_config = engine_config or EngineConfig()
        self.metrics = metrics
        self._reload_lock = threading.Lock()
        self.reloads = 0
        self.engine = Engine.load(self.root, self.engine_config)
        self.loaded_at = time.time()
        self._served_target = self._target()
        if metrics:
            metrics.info.set(len(self.engine.items))

    def _target(self) -> str | None:
        try:
            return os.readlink(self.root / bundle.CURRENT)
        except OSError:
            return None

    def reload(self) -> tuple[bool, str, str, str]:
        """Load the version ``current`` points at and swap it in. Returns ``(reloaded,
        version, previous_version, message)``; on failure the old engine keeps serving."""
        with self._reload_lock:
            previous = self.engine.version
            target = self._target()
            try:
                path = bundle.resolve(self.root)
                manifest = bundle.read_manifest(path, verify=False)
                if manifest.get("version") == previous:
                    self._served_target = target
                    return False, previous, previous, f"already serving {previous}"
                fresh = Engine.load(path, self.engine_config)
            except Exception as e:  # noqa: BLE001 - any failure leaves the old version serving
                self._served_target = target  # do not retry a broken bundle in a loop
                if self.metrics:
                    self.metrics.reloads.labels("failed").inc()
                message = f"reload failed, still serving {previous}: {e}"
                log.error(json.dumps({"event": "reload_failed", "serving": previous, "error": str(e)}))
                return False, previous, previous, message
            # Items added to the old engine while the new one loaded are in the journal:
            # the new one serves them before it is swapped in.
            fresh.sync_added_items()
            self.engine = fresh  # the swap: one reference assignment
            self.loaded_at, self._served_target = time.time(), target
            self.reloads += 1
            if self.metrics:
                self.metrics.reloads.labels("ok").inc()
                self.metrics.info.set(len(fresh.items))
            log.info(json.dumps({"event": "reloaded", "version": fresh.version, "previous": previous}))
            return True, fresh.version, previous, ""

    def changed(self) -> bool:
        """Whether ``current`` points somewhere else than the last load looked at."""
        return self._target() != self._served_target

    def add_items(self, item_ids: list, features: list) -> int:
        """Add items to the serving engine. Under the reload lock, so that an addition
        never lands on an engine that a reload is about to replace; the new engine would
        also find it in the journal (:meth:`reload` syncs), but not a second time."""
        with self._reload_lock:
            n = self.engine.add_items(item_ids, features)
        if self.metrics:
            self.metrics.info.set(n)
        return n

    def sync_added_items(self) -> int:
        """Serve the items other processes of this root added (their journal lines)."""
        added = self.engine.sync_added_items()
        if added and self.metrics:
            self.metrics.info.set(len(self.engine.items))
        return added


# ------------------------------------------------------------ conversions
def _features(message_map) -> dict:
    out = {}
    for name, value in message_map.items():
        kind = value.WhichOneof("value")
        if kind == "number":
            out[name] = value.number
        elif kind == "text":
            out[name] = value.text
        elif kind == "numbers":
            out[name] = list(value.numbers.values)
        else:
            raise InvalidRequest(f"feature {shorten(name)} has no value")
    return out


def _reply(reply, recs: Recommendations):
    """``reply`` with ``recs`` added to its ``items`` field (in place: building ScoredItem
    messages first and passing them in would copy each one again), and the candidate
    counts where the reply has that field."""
    add = reply.items.add
    for i, s, src, t in zip(recs.item_ids.tolist(), recs.scores.tolist(), recs.sources, recs.titles):
        add(item_id=i, score=s, sources=src, title=t)
    if recs.candidates:
        reply.candidates.update(recs.candidates)
    return reply


def _recommend_options(request: pb.RecommendRequest) -> dict:
    # Unset k / n_candidates take the defaults; a 0 sent on purpose is refused, as the library does.
    return {
        "k": request.k if request.HasField("k") else 10,
        "n_candidates": request.n_candidates if request.HasField("n_candidates") else 500,
        "exclude_seen": not request.include_seen,
        "exclude_items": list(request.exclude_items),
        "include_items": list(request.include_items) or None,
        "filters": {"genres": list(request.genres)} if request.genres else None,
        "sources": list(request.sources) or None,
    }


class _BadRequest(InvalidRequest):
    """A request the server's own limits refuse (INVALID_ARGUMENT)."""


class _Undecodable:
    """Stands for request bytes that are not a valid message: the handler answers
    INVALID_ARGUMENT (a deserializer cannot set a status; gRPC would say INTERNAL)."""

    def __init__(self, error: Exception, size: int):
        self.error, self.size = error, size

    def ByteSize(self) -> int:
        return self.size


def _tolerant(deserializer):
    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - protobuf raises DecodeError, or others on garbage
            return _Undecodable(error, len(data))

    return deserialize


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """Recommender rpcs: each takes the serving engine once and calls one engine method."""

    def __init__(self, holder: EngineHolder, config: ServerConfig):
        self.holder, self.config = holder, config

    def Recommend(self, request, context):
        engine = self.holder.engine
        recs = engine.recommend(
            user_id=request.user_id or None,
            user_features=_features(request.user_features),
            ratings=dict(request.ratings) or None,
            **_recommend_options(request),
        )
        if self.holder.metrics:
            self.holder.metrics.observe_candidates(recs.candidates)
        return _reply(pb.RecommendResponse(version=engine.version), recs)

    def RecommendBatch(self, request, context):
        if len(request.user_ids) > self.config.max_batch:
            raise _BadRequest(f"{len(request.user_ids)} users in one batch; at most {self.config.max_batch}")
        engine = self.holder.engine
        users, options = list(request.user_ids), _recommend_options(request.options)
        if isinstance(options["k"], int) and len(users) * options["k"] > self.config.max_batch_results:
            raise _BadRequest(
                f"{len(users)} users x k={options['k']} results in one batch; at most "
                f"{self.config.max_batch_results:,} (server.max_batch_results): send fewer users "
                "or a smaller k"
            )
        remaining = context.time_remaining()  # a long batch stops once its deadline has passed
        results = engine.recommend_batch(
            users, deadline=None if remaining is None else time.monotonic() + remaining, **options
        )
        reply = pb.RecommendBatchResponse(version=engine.version)
        for r in results:
            _reply(reply.results.add(version=engine.version), r)
        size = reply.ByteSize()
        if size > 4 * self.config.max_message_bytes:  # the send limit set in TandemServer.start
            raise _BadRequest(
                f"the reply would be {size:,} bytes, over the {4 * self.config.max_message_bytes:,} "
                "byte limit: send fewer users or a smaller k"
            )
        return reply

    def SimilarItems(self, request, context):
        engine = self.holder.engine
        recs = engine.similar_items(request.item_id, k=request.k if request.HasField("k") else 10)
        return _reply(pb.SimilarItemsResponse(version=engine.version), recs)

    def Score(self, request, context):
        engine = self.holder.engine
        if len(request.item_ids) > engine.config.max_candidates:
            raise _BadRequest(f"{len(request.item_ids)} items to score; at most {engine.config.max_candidates}")
        recs = engine.score(
            user_id=request.user_id or None,
            item_ids=list(request.item_ids),
            user_features=_features(request.user_features),
            ratings=dict(request.ratings) or None,
        )
        return _reply(pb.ScoreResponse(version=engine.version), recs)

    def AddItems(self, request, context):
        if len(request.items) > self.config.max_batch:
            raise _BadRequest(f"{len(request.items)} items in one request; at most {self.config.max_batch}")
        features = []
        for item in request.items:
            f = _features(item.features)
            if item.title:
                f["title"] = item.title
            features.append(f)
        n = self.holder.add_items([item.item_id for item in request.items], features)
        return pb.AddItemsResponse(n_items=n, version=self.holder.engine.version)

    def Echo(self, request, context):
        return pb.EchoResponse(payload=request.payload)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, holder: EngineHolder, config: ServerConfig):
        self.holder, self.config = holder, config

    def Reload(self, request, context):
        reloaded, version, previous, message = self.holder.reload()
        self.holder.sync_added_items()  # the items other processes added, whatever the version
        return pb.ReloadResponse(reloaded=reloaded, version=version, previous_version=previous, message=message)

    def GetInfo(self, request, context):
        engine = self.holder.engine
        manifest = engine.bundle.manifest
        tabled = {"cf_ip": engine.sources["cf"].top_items, "towers_ip": engine.sources["towers"].top_items}
        indexes = [
            pb.IndexInfo(
                name=name,
                factory=r["factory"],
                metric=r["metric"],
                n_vectors=r["n_vectors"],
                dim=r["dim"],
                search_params={k: int(v) for k, v in (r["search_params"] or {}).items()},
                recall_at_k=float(r["recall_at_k"] or 0.0),
                k=int(r["k"]),
                user_top_k=0 if tabled.get(name) is None else tabled[name].shape[1],
            )
            for name, r in manifest["indexes"].items()
        ]
        return pb.GetInfoResponse(
            version=engine.version,
            created_at=manifest.get("created_at", ""),
            n_items=len(engine.items),
            n_users=len(engine.users),
            dataset=manifest["dataset"]["name"],
            data_fingerprint=manifest["dataset"]["fingerprint"],
            indexes=indexes,
            sources=sorted(engine.sources),
            max_k=engine.config.max_k,
            max_candidates=engine.config.max_candidates,
            max_batch=self.config.max_batch,
            loaded_seconds_ago=time.time() - self.holder.loaded_at,
            reloads=self.holder.reloads,
        )


# ------------------------------------------------------------ interceptor
def _status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status of an exception raised while serving: only the engine's own request
    errors are the client's fault; anything else (a ValueError from inside NumPy
    included) is INTERNAL."""
    if isinstance(error, UnknownIdError):
        code, message = grpc.StatusCode.NOT_FOUND, str(error)
    elif isinstance(error, InvalidRequest):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
    elif isinstance(error, TimeoutError):
        code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(error)
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"
    return code, message if len(message) <= MAX_STATUS_MESSAGE else message[:MAX_STATUS_MESSAGE] + "..."


class _Interceptor(grpc.ServerInterceptor):
    """Authentication, then error mapping, metrics and a log line around every rpc."""

    def __init__(self, config: ServerConfig, metrics: _Metrics | None):
        self.config, self.metrics = config, metrics
        self._expected = f"Bearer {config.token}".encode() if config.token else None

    def _authorised(self, method: str, metadata) -> bool:
        if self._expected is None:
            return True
        if not (self.config.token_all or method.startswith(f"/{ADMIN}/") or method in ADMIN_WRITES):
            return True
        given = dict(metadata or ()).get("authorization", "")
        return hmac.compare_digest(given.encode(), self._expected)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not method.startswith("/tandem."):
            return handler  # health checks and reflection stay open (load balancers, tools)
        rpc = method.rsplit("/", 1)[-1]
        authorised = self._authorised(method, handler_call_details.invocation_metadata)
        inner, metrics = handler.unary_unary, self.metrics

        def call(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not authorised:
                    code = grpc.StatusCode.UNAUTHENTICATED
                    context.abort(code, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")
                if isinstance(request, _Undecodable):
                    raise _BadRequest(f"the request is not a valid {rpc} message: {str(request.error)[:200]}")
                size = request.ByteSize()
                if size > self.config.max_message_bytes:
                    raise _BadRequest(f"request of {size:,} bytes; at most {self.config.max_message_bytes:,}")
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    context.abort(code, "the deadline passed before the request was served")
                return inner(request, context)
            except Exception as error:  # noqa: BLE001 - every failure becomes a status code
                if code != grpc.StatusCode.OK or context.code() not in (None, grpc.StatusCode.OK):
                    code = context.code() or code
                    raise  # already aborted with its own status
                code, message = _status_of(error)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception(json.dumps({"event": "internal_error", "rpc": rpc}))
                context.abort(code, message)
            finally:
                seconds = time.perf_counter() - start
                if metrics:
                    metrics.observe_request(rpc, code.name, seconds)
                if log.isEnabledFor(logging.DEBUG) or code != grpc.StatusCode.OK:
                    log.log(
                        logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO,
                        json.dumps({"event": "rpc", "rpc": rpc, "code": code.name, "ms": round(seconds * 1e3, 3)}),
                    )

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


# ------------------------------------------------------------ the server
class TandemServer:
    """A running Tandem gRPC server over the bundle root ``root``.

    >>> server = TandemServer("artifacts/bundles", ServerConfig(port=0)).start()
    >>> server.port  # the bound port
    """

    def __init__(self, root: str | Path, config: ServerConfig | None = None, engine_config: EngineConfig | None = None):
        self.config = config or ServerConfig()
        if bool(self.config.tls_cert) != bool(self.config.tls_key):
            raise ValueError("TLS needs both a certificate (tls_cert) and a key (tls_key)")
        self.metrics = _Metrics()
        self.holder = EngineHolder(root, engine_config, self.metrics)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stop = threading.Event()
        self._server = None
        self._metrics_http: Any = None

    def start(self) -> TandemServer:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        cfg = self.config
        # gRPC core answers RESOURCE_EXHAUSTED above its own limit, before any handler;
        # it is set above ours so that a request over max_message_bytes reaches the
        # interceptor and gets INVALID_ARGUMENT with the limit in the message.
        options = [
            ("grpc.max_receive_message_length", 4 * cfg.max_message_bytes),
            ("grpc.max_send_message_length", 4 * cfg.max_message_bytes),
            ("grpc.so_reuseport", int(cfg.reuse_port)),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.workers),
            interceptors=[_Interceptor(cfg, self.metrics)],
            options=options,
        )
        pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(self.holder, cfg), server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(self.holder, cfg), server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            RECOMMENDER,
            ADMIN,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_cert and cfg.tls_key:
                creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                self.port = server.add_secure_port(address, creds)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind to address"
            self.port = 0
        if self.port == 0:
            raise ServeError(
                f"cannot serve on {address}: the address is in use or cannot be bound "
                "(only the processes of one `tandem serve --processes N` share a port)"
            )
        server.start()
        self._server = server
        for name in ("", RECOMMENDER, ADMIN):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if cfg.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        if cfg.watch_interval > 0:
            threading.Thread(target=self._watch, name="tandem-watch-current", daemon=True).start()
        log.info(
            json.dumps(
                {
                    "event": "started",
                    "address": f"{cfg.host}:{self.port}",
                    "tls": bool(cfg.tls_cert),
                    "auth": bool(cfg.token),
                    "version": self.holder.engine.version,
                    "metrics_port": self.metrics_port,
                }
            )
        )
        return self

    def _watch(self) -> None:
        """Every watch_interval: a new ``current`` is loaded, and items other processes
        of the root added (the journal) are served, so that an acknowledged addition
        reaches every process within about that time."""
        while not self._stop.wait(self.config.watch_interval):
            try:
                if self.holder.changed():
                    self.holder.reload()
                self.holder.sync_added_items()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception(json.dumps({"event": "watch_failed"}))

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting requests; in-flight ones get ``grace`` seconds to finish."""
        if self._server is None:
            return
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self._server.stop(self.config.grace if grace is None else grace).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        log.info(json.dumps({"event": "stopped", "version": self.holder.engine.version}))
        self._server = None

    def wait(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            self._server.wait_for_termination()

    def serve_until_signal(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        done = threading.Event()

        def handle(signum, frame):
            log.info(json.dumps({"event": "signal", "signal": signal.Signals(signum).name}))
            done.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        # Python runs signal handlers in the main thread, between bytecodes. A signal the
        # kernel delivers to another thread (gRPC's) does not interrupt a wait without a
        # timeout, so the main thread wakes up regularly to run a pending handler.
        while not done.wait(0.2):
            pass
        # A shutdown that cannot finish (a wedged thread) must not keep the process and its
        # port alive: past grace + SHUTDOWN_MARGIN seconds the process exits with code 1.
        watchdog = threading.Timer(self.config.grace + SHUTDOWN_MARGIN, _exit_stuck_shutdown)
        watchdog.daemon = True
        watchdog.start()
        self.stop()
        watchdog.cancel()


def _exit_stuck_shutdown() -> None:
    # Straight to stderr: the stuck thread may hold the logging locks.
    os.write(
        2,
        (
            json.dumps(
                {
                    "time": round(time.time(), 3),
                    "level": "ERROR",
                    "logger": "tandem.server",
                    "event": "shutdown_stuck",
                    "action": "exit 1",
                }
            )
            + "\n"
        ).encode(),
    )
    os._exit(1)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, and the message (itself JSON when
    the server logged an event)."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            body = json.loads(record.getMessage())
        except ValueError:
            body = {"message": record.getMessage()}
        out = {"time": round(record.created, 3), "level": record.levelname, "logger": record.name, **body}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("tandem")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
