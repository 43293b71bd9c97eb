"""The gRPC service: a thin servicer over :class:`engine.Engine`, with hot reload.

``protos/tandem/v1/tandem.proto`` is the contract. This module only translates between
its messages and the engine's Python API (:mod:`engine.serving.engine` does the work), maps
errors to status codes, and runs the server around it:

- **live writes** — items added (``AddItems``) and events recorded (``RecordFeedback``)
  are journaled at the bundle root before the reply; every process reads the others'
  journal lines (within ``server.watch_interval`` and ``engine.feedback.sync_interval``);
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
  required on the Admin service and on the writes ``AddItems`` and ``RecordFeedback``,
  or on every rpc with ``token_all``; TLS from a certificate and key;
- **operations** — the standard health service and server reflection, Prometheus
  metrics on an HTTP port, JSON-lines logs, graceful shutdown on SIGTERM;
- **concurrency** — gRPC's asyncio server on an event loop of its own thread: one
  user's request runs inline on the loop, the long rpcs (``ON_THREADS``) on a pool of
  ``server.workers`` threads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from engine.errors import InvalidRequest, ServeError, UnknownIdError
from engine.service.holder import EngineHolder
from engine.service.limits import capped, check_size
from engine.service.metrics import Metrics
from engine.service.rpc import tandem_pb2 as pb
from engine.service.rpc import tandem_pb2_grpc as pb_grpc
from engine.service.servicers import AdminServicer, RecommenderServicer, _tolerant, _Undecodable
from engine.serving.engine import EngineConfig
from engine.settings import ServerConfig

if TYPE_CHECKING:
    from engine.service.http import HttpServer

log = logging.getLogger("tandem.server")

# Seconds a graceful stop may run past server.grace before the process exits anyway.
SHUTDOWN_MARGIN = 15.0

RECOMMENDER = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"].full_name
# Recommender rpcs that write (what every user sees, what a user did): they need the
# token like Admin's.
ADMIN_WRITES = (f"/{RECOMMENDER}/AddItems", f"/{RECOMMENDER}/RecordFeedback")


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
    return code, capped(message)


# Rpcs that run on the thread pool instead of the event loop: they can take long (a
# batch, a write that fsyncs, a reload) and would hold up every request behind them. The
# others (one user's request: well under a millisecond) run inline on the loop, which
# spares a thread hand-off per request (measured: 1,250-1,350 Recommend/s against
# 870-910 on gRPC's thread-pool server, on ML-100K with 4 clients).
UNAUTHENTICATED_MESSAGE = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"
ON_THREADS = frozenset({"RecommendBatch", "AddItems", "RecordFeedback", "Reload"})


class _Interceptor(grpc.aio.ServerInterceptor):
    """Authentication, then error mapping, metrics and a log line around every rpc."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None, pool: futures.Executor):
        self.config, self.metrics, self.pool = config, metrics, pool
        self._expected = f"Bearer {config.token}".encode() if config.token else None

    def _authorised(self, method: str, metadata) -> bool:
        if self._expected is None:
            return True
        if not (self.config.token_all or method.startswith(f"/{ADMIN}/") or method in ADMIN_WRITES):
            return True
        given = dict(metadata or ()).get("authorization", "")
        return hmac.compare_digest(given.encode(), self._expected)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not method.startswith("/tandem."):
            return handler  # health checks and reflection stay open (load balancers, tools)
        rpc = method.rsplit("/", 1)[-1]
        authorised = self._authorised(method, handler_call_details.invocation_metadata)
        inner, metrics, pool, on_threads = handler.unary_unary, self.metrics, self.pool, rpc in ON_THREADS

        async def call(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if not authorised:
                    code = grpc.StatusCode.UNAUTHENTICATED
                    await context.abort(
                        code, "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"
                    )
                if isinstance(request, _Undecodable):
                    raise InvalidRequest(f"the request is not a valid {rpc} message: {str(request.error)[:200]}")
                check_size(request.ByteSize(), self.config)
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    await context.abort(code, "the deadline passed before the request was served")
                if on_threads:
                    return await asyncio.get_running_loop().run_in_executor(pool, inner, request, context)
                return inner(request, context)
            except grpc.aio.AbortError:
                raise  # aborted above, with its own status
            except asyncio.CancelledError:  # the client gave up, or its deadline passed
                remaining = context.time_remaining()
                timed_out = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if timed_out else grpc.StatusCode.CANCELLED
                raise
            except Exception as error:  # noqa: BLE001 - every failure becomes a status code
                code, message = _status_of(error)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception(json.dumps({"event": "internal_error", "rpc": rpc}))
                await context.abort(code, message)
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
        self.metrics = Metrics()
        self.holder = EngineHolder(root, engine_config, self.metrics)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http: HttpServer | None = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._metrics_http: Any = None

    def _run(self, coroutine):
        """Run ``coroutine`` on the server's event loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self) -> TandemServer:
        # gRPC's asyncio server on an event loop of its own thread, so that this object
        # keeps a blocking API (start, stop, wait) for the CLI, the tests and the library.
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="tandem-grpc", daemon=True)
        self._loop_thread.start()
        try:
            self._run(self._start_grpc())
        except BaseException:
            self._close_loop()
            raise
        cfg = self.config
        if cfg.metrics_port is not None:
            from prometheus_client import start_http_server

            self._metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        if cfg.http_port is not None:
            from engine.service.http import HttpServer, create_app

            app = create_app(self.holder, cfg, cfg.eval_report or None)
            try:
                self.http = HttpServer(app, cfg.host, cfg.http_port, cfg.tls_cert, cfg.tls_key, cfg.reuse_port).start()
            except Exception:
                self._run(self._server.stop(0))  # all or nothing: no gRPC server left without its HTTP face
                self._close_loop()
                raise
        if cfg.watch_interval > 0:
            threading.Thread(target=self._watch, name="tandem-watch-current", daemon=True).start()
        if self.holder.engine_config.feedback.sync_interval > 0:
            threading.Thread(target=self._tail_feedback, name="tandem-tail-feedback", daemon=True).start()
        log.info(
            json.dumps(
                {
                    "event": "started",
                    "address": f"{cfg.host}:{self.port}",
                    "tls": bool(cfg.tls_cert),
                    "auth": bool(cfg.token),
                    "version": self.holder.engine.version,
                    "metrics_port": self.metrics_port,
                    "http_port": None if self.http is None else self.http.port,
                }
            )
        )
        return self

    async def _start_grpc(self) -> None:
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
        pool = futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="tandem-rpc")
        server = grpc.aio.server(
            migration_thread_pool=pool, interceptors=[_Interceptor(cfg, self.metrics, pool)], options=options
        )
        pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(self.holder, cfg), server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(self.holder, cfg), server)
        self.health = health.aio.HealthServicer()
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
        await server.start()
        self._server = server
        for name in ("", RECOMMENDER, ADMIN):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _close_loop(self) -> None:
        """Stop the event loop and wait until its thread has left it."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None
            if self._loop_thread is not None and self._loop_thread is not threading.current_thread():
                self._loop_thread.join(timeout=SHUTDOWN_MARGIN)

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

    def _tail_feedback(self) -> None:
        """Every engine.feedback.sync_interval: apply the events the other processes of
        the root recorded (their feedback log lines), so that an acknowledged event
        reaches every process within about that time."""
        while not self._stop.wait(self.holder.engine_config.feedback.sync_interval):
            try:
                self.holder.sync_feedback()
            except Exception:  # noqa: BLE001 - the tail must outlive any one failure
                log.exception(json.dumps({"event": "feedback_sync_failed"}))

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting requests; in-flight ones get ``grace`` seconds to finish."""
        if self._server is None:
            return
        grace = self.config.grace if grace is None else grace
        self._stop.set()
        self._run(self.health.enter_graceful_shutdown())
        if self.http is not None:
            self.http.stop(grace)
        self._run(self._server.stop(grace))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        log.info(json.dumps({"event": "stopped", "version": self.holder.engine.version}))
        # The gRPC server is released only once its loop has stopped: released before,
        # gRPC's shutdown closed its poller's socket while the loop still had that socket's
        # callback to run ("OSError: [Errno 9] Bad file descriptor", on most stops after a load).
        server, self._server = self._server, None
        self._close_loop()
        del server
        self._stopped.set()

    def wait(self) -> None:
        """Block until the server stops."""
        if self._server is not None:
            self._stopped.wait()

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
