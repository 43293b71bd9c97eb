"""The HTTP/JSON face and the web page: FastAPI over the same
:class:`~engine.service.holder.EngineHolder` as the gRPC servicers.

``tandem serve --http-port P`` serves it beside gRPC, in the same process, on the same
engine (hot reload, items added, events recorded: one state). Its rules are the gRPC
service's:

- **validation** — the engine's own (ids, k, features, filters, events) and the server's
  limits (:mod:`engine.service.limits`); a body that is not the documented JSON is
  refused before the engine sees it;
- **errors** — JSON bodies ``{"error": {"status", "code", "message"}}``: 400
  ``INVALID_ARGUMENT`` for a bad request, 401 ``UNAUTHENTICATED`` for a missing or wrong
  token, 404 ``NOT_FOUND`` for an unknown id or path, 413 for a body over
  ``server.max_message_bytes``, 500 ``INTERNAL`` (logged with its traceback) for a bug;
- **auth** — ``Authorization: Bearer <token>`` on the writes (``POST /v1/items``,
  ``POST /v1/feedback``) and the admin routes (``/v1/info``, ``/v1/reload``), or on
  every ``/v1`` route with ``server.token_all``; TLS from the server's certificate.

``GET /openapi.json`` is the OpenAPI document of every route; ``GET /`` is the web page
(``engine/service/web``: plain HTML, CSS and JavaScript, no build step), which reads
the routes under ``/v1`` and the page data of :mod:`engine.service.inspect`.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from engine.errors import InvalidRequest, ServeError, UnknownIdError
from engine.results import Recommendations
from engine.service import inspect
from engine.service.holder import EngineHolder
from engine.service.limits import capped, check_batch, check_batch_results, check_scored, server_info
from engine.settings import ServerConfig

log = logging.getLogger("tandem.server")

WEB = Path(__file__).resolve().parent / "web"

# ------------------------------------------------------------ request bodies
FeatureValue = float | str | list[float] | list[str]


class _Body(BaseModel):
    # Unknown fields are refused (a typo never passes silently); numbers given for ids are
    # read as their text, as the gRPC messages' string ids are.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class RecommendOptions(_Body):
    """Options of a recommendation, as ``Engine.recommend`` takes them."""

    k: int = Field(10, description="how many items")
    n_candidates: int = Field(500, description="candidates retrieval passes to ranking")
    include_seen: bool = Field(False, description="keep the user's training items and given ratings")
    exclude_items: list[str] = Field(default_factory=list, description="never recommend these items")
    include_items: list[str] | None = Field(None, description="recommend among these items only")
    filters: dict[str, Any] | None = Field(
        None,
        description='attribute filters, all must hold: {"genres": ["Comedy"]} (any of), '
        '{"tags": {"all": [...]}}, {"price": {"lt": 100}}',
    )
    sources: list[str] | None = Field(None, description="retrieval sources to use (default: all)")
    explain: bool = Field(False, description="return each item's top features (with the ranker)")

    def engine_options(self) -> dict:
        return {
            "k": self.k,
            "n_candidates": self.n_candidates,
            "exclude_seen": not self.include_seen,
            "exclude_items": self.exclude_items,
            "include_items": self.include_items,
            "filters": self.filters,
            "sources": self.sources,
            "explain": self.explain,
        }


class RecommendBody(RecommendOptions):
    """One user: a known id, or a new user from features and/or ratings (or both)."""

    user_id: str | None = Field(None, description="external user id; unknown ids fall back on the rest")
    user_features: dict[str, FeatureValue] = Field(default_factory=dict, description="a new user's raw features")
    ratings: dict[str, float] = Field(default_factory=dict, description="{item_id: rating} given with the request")


class BatchBody(_Body):
    user_ids: list[str]
    options: RecommendOptions = Field(default_factory=RecommendOptions)


class ScoreBody(_Body):
    item_ids: list[str]
    user_id: str | None = None
    user_features: dict[str, FeatureValue] = Field(default_factory=dict)
    ratings: dict[str, float] = Field(default_factory=dict)


class NewItem(_Body):
    item_id: str
    title: str = ""
    features: dict[str, FeatureValue] = Field(default_factory=dict)


class AddItemsBody(_Body):
    items: list[NewItem]


class Event(_Body):
    user_id: str
    item_id: str
    kind: str
    value: float | None = None
    timestamp: float | None = None


class FeedbackBody(_Body):
    events: list[Event]


# ------------------------------------------------------------ replies
class ScoredItem(BaseModel):
    item_id: str
    score: float
    sources: list[str]
    title: str
    explanation: list[dict] = []


class RecommendReply(BaseModel):
    version: str
    metric: str = Field(description='"score" (higher is better) or "squared_distance" (lower is better)')
    items: list[ScoredItem]
    candidates: dict[str, int] = Field(default_factory=dict, description="candidates proposed per source")
    served_by: str = Field("", description="how the user was known")


class BatchReply(BaseModel):
    version: str
    results: list[RecommendReply]


def _reply(recs: Recommendations, version: str) -> dict:
    explanations = recs.explanations or [[]] * len(recs)
    return {
        "version": version,
        "metric": recs.metric,
        "items": [
            {"item_id": i, "score": s, "sources": list(src), "title": t, "explanation": e}
            for i, s, src, t, e in zip(
                recs.item_ids.tolist(), recs.scores.tolist(), recs.sources, recs.titles, explanations
            )
        ],
        "candidates": recs.candidates,
        "served_by": recs.served_by,
    }


def _ratings(ratings: dict[str, float]) -> Mapping[object, float] | None:
    """A request's ratings as the engine takes them (None for none)."""
    return cast("Mapping[object, float]", ratings) if ratings else None


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": capped(message)}}, status, headers=headers
    )


def _validation_message(error: RequestValidationError) -> str:
    """The first problems of a body that is not the documented JSON, with where they are."""
    parts = []
    for problem in error.errors()[:5]:
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


class _BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413 before the app parses it,
    whether it says its length or not (ASGI middleware: the body is read here, at most
    ``limit`` bytes of it, and handed on whole)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send, int(declared))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send, size)
            more = message.get("more_body", False)
        await self.app(
            scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive), send
        )

    async def _refuse(self, scope, receive, send, size: int):
        response = _error(413, "INVALID_ARGUMENT", f"request of {size:,} bytes or more; at most {self.limit:,}")
        await response(scope, receive, send)


def _replay(messages: list, then=None):
    """An ASGI receive that gives ``messages``, then defers to ``then`` (a disconnect)."""
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


class _Observed:
    """Counts every request in the Prometheus metrics as ``rpc="http_<route>"`` with its
    status and latency (ASGI middleware: Starlette's ``@app.middleware`` costs a task and
    a stream per request)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            name = getattr(scope.get("endpoint"), "__name__", "unmatched")
            self.metrics.observe_request(f"http_{name}", str(status[0]), time.perf_counter() - start)


# ------------------------------------------------------------ the app
def create_app(holder: EngineHolder, config: ServerConfig, eval_report: str | Path | None = None) -> FastAPI:
    """The HTTP app over ``holder`` with ``config``'s token and limits. ``eval_report``:
    a ``tandem eval-pipeline`` JSON report the page plots when it exists."""
    app = FastAPI(
        title="Tandem",
        version="1",
        summary="Recommendations over HTTP/JSON: the gRPC service's calls, and the data of the web page.",
        docs_url=None,  # the interactive docs load their scripts from a CDN; /openapi.json is the document
        redoc_url=None,
    )
    expected = f"Bearer {config.token}".encode() if config.token else None
    metrics = holder.metrics

    def authorised(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return expected is None or hmac.compare_digest(given.encode(), expected)

    async def admin(request: Request) -> None:
        """Writes and admin routes: the token when the server has one."""
        if not authorised(request):
            raise _Unauthenticated()

    async def reads(request: Request) -> None:
        """Every other /v1 route: the token only with server.token_all."""
        if config.token_all and not authorised(request):
            raise _Unauthenticated()

    @app.exception_handler(_Unauthenticated)
    async def unauthenticated(request: Request, error: _Unauthenticated):
        return _error(
            401,
            "UNAUTHENTICATED",
            "missing or wrong bearer token (header 'Authorization: Bearer <token>')",
            {"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(UnknownIdError)
    async def not_found(request: Request, error: UnknownIdError):
        return _error(404, "NOT_FOUND", str(error))

    @app.exception_handler(InvalidRequest)
    async def invalid(request: Request, error: InvalidRequest):
        return _error(400, "INVALID_ARGUMENT", str(error))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError):
        return _error(400, "INVALID_ARGUMENT", _validation_message(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        code = "NOT_FOUND" if error.status_code == 404 else "INVALID_ARGUMENT"
        return _error(error.status_code, code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):
        log.exception(json.dumps({"event": "internal_error", "path": request.url.path}))
        return _error(500, "INTERNAL", f"internal error: {type(error).__name__}")

    if metrics is not None:
        app.add_middleware(_Observed, metrics=metrics)
    app.add_middleware(_BodyLimit, limit=config.max_message_bytes)

    # -------------------------------------------------- the gRPC service's calls
    # A short call (one user's request, the page's reads) runs on the event loop: engine
    # work holds the GIL, so a worker thread would add a hop and no parallelism. A long
    # one (a batch, a write that fsyncs, a reload) runs on the thread pool (plain def),
    # so that it never stalls the others.
    @app.post("/v1/recommend", response_model=RecommendReply, dependencies=[Depends(reads)], tags=["recommend"])
    async def recommend(body: RecommendBody):
        """Top k items for one user (Recommend)."""
        engine = holder.engine
        recs = engine.recommend(
            user_id=body.user_id,
            user_features=body.user_features,
            ratings=_ratings(body.ratings),
            **body.engine_options(),
        )
        if metrics is not None:
            metrics.observe_candidates(recs.candidates)
        return JSONResponse(_reply(recs, engine.version))

    @app.post("/v1/recommend/batch", response_model=BatchReply, dependencies=[Depends(reads)], tags=["recommend"])
    def recommend_batch(body: BatchBody):
        """Top k items for each of many known users (RecommendBatch)."""
        check_batch_results(len(body.user_ids), body.options.k, config)
        engine = holder.engine
        results = engine.recommend_batch(body.user_ids, **body.options.engine_options())
        return JSONResponse({"version": engine.version, "results": [_reply(r, engine.version) for r in results]})

    @app.get("/v1/similar", response_model=RecommendReply, dependencies=[Depends(reads)], tags=["recommend"])
    async def similar(item_id: str = Query(..., description="external item id"), k: int = Query(10)):
        """More like this: the items nearest an item by squared distance (SimilarItems)."""
        engine = holder.engine
        return JSONResponse(_reply(engine.similar_items(item_id, k=k), engine.version))

    @app.post("/v1/score", response_model=RecommendReply, dependencies=[Depends(reads)], tags=["recommend"])
    async def score(body: ScoreBody):
        """Exact ranking scores of given items for one user, best first (Score)."""
        engine = holder.engine
        check_scored(len(body.item_ids), engine)
        recs = engine.score(
            user_id=body.user_id,
            item_ids=body.item_ids,
            user_features=body.user_features,
            ratings=_ratings(body.ratings),
        )
        return JSONResponse(_reply(recs, engine.version))

    @app.post("/v1/items", dependencies=[Depends(admin)], tags=["write"])
    def add_items(body: AddItemsBody) -> dict:
        """Add items, embedded by the item tower from their features (AddItems; token)."""
        check_batch(len(body.items), "items", config)
        features = [{**item.features, **({"title": item.title} if item.title else {})} for item in body.items]
        n = holder.add_items([item.item_id for item in body.items], features)
        return {"n_items": n, "version": holder.engine.version}

    @app.post("/v1/feedback", dependencies=[Depends(admin)], tags=["write"])
    def record_feedback(body: FeedbackBody) -> dict:
        """Record what users did; served from their next request on (RecordFeedback; token)."""
        check_batch(len(body.events), "events", config)
        events = [event.model_dump(exclude_none=True) for event in body.events]
        recorded = holder.record(events)
        return {"recorded": recorded.events, "new_users": recorded.new_users, "version": holder.engine.version}

    @app.get("/v1/info", dependencies=[Depends(admin)], tags=["admin"])
    async def info() -> dict:
        """The served bundle and this server (GetInfo; token)."""
        return inspect.finite(server_info(holder, config))

    @app.post("/v1/reload", dependencies=[Depends(admin)], tags=["admin"])
    def reload() -> dict:
        """Load the version ``current`` points at (Reload; token)."""
        reloaded, version, previous, message = holder.reload_and_catch_up()
        return {"reloaded": reloaded, "version": version, "previous_version": previous, "message": message}

    @app.get("/healthz", tags=["admin"])
    async def health() -> dict:
        """Whether the server serves, and which version (open, for load balancers)."""
        return {"status": "SERVING", "version": holder.engine.version}

    # -------------------------------------------------- the page's data
    @app.get("/v1/history", dependencies=[Depends(reads)], tags=["inspect"])
    async def history(user_id: str, limit: int = Query(100, ge=1, le=10_000)) -> dict:
        """A user's history as served (training interactions and events), best first."""
        return inspect.user_history(holder.engine, user_id, limit)

    @app.get("/v1/items/search", dependencies=[Depends(reads)], tags=["inspect"])
    async def search_items(query: str, limit: int = Query(20, ge=1, le=1000)) -> list[dict]:
        """Items whose title or id contains the query, most popular first."""
        return inspect.search_items(holder.engine, query, limit)

    @app.get("/v1/schema", dependencies=[Depends(reads)], tags=["inspect"])
    async def schema() -> dict:
        """A new user's features, the item attributes filters read, the sources."""
        return inspect.schema(holder.engine)

    @app.get("/v1/models", dependencies=[Depends(reads)], tags=["inspect"])
    async def models() -> dict:
        """The parameters of the bundle's models and what their training measured."""
        return inspect.models(holder.engine)

    @app.get("/v1/plots/curves", dependencies=[Depends(reads)], tags=["inspect"])
    async def curves() -> dict:
        """The learning curves of the bundle's models."""
        return inspect.learning_curves(holder.engine)

    @app.get("/v1/plots/projection", dependencies=[Depends(reads)], tags=["inspect"])
    def projection(model: str = "towers", max_items: int = Query(inspect.PROJECTION_ITEMS, ge=3, le=20_000)) -> dict:
        """A 2-D PCA projection of item vectors, coloured by a label attribute."""
        return inspect.projection(holder.engine, model, max_items)

    @app.get("/v1/plots/evaluation", dependencies=[Depends(reads)], tags=["inspect"])
    async def evaluation() -> dict:
        """The eval-pipeline report's summary, when there is one."""
        found = inspect.evaluation(eval_report)
        return {"present": found is not None, **(found or {})}

    # -------------------------------------------------- the page
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app


class _Unauthenticated(Exception):
    pass


# ------------------------------------------------------------ the server
class HttpServer:
    """The app on uvicorn in a thread of the serving process. It binds its own socket,
    so that port 0 picks a free port that :attr:`port` then reports, and a group of
    ``tandem serve --processes N`` can share one port (``reuse_port``)."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        reuse_port: bool = False,
    ):
        self.app, self.host, self.requested_port = app, host, port
        self.tls_cert, self.tls_key, self.reuse_port = tls_cert, tls_key, reuse_port
        self.port: int | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/"

    def start(self, timeout: float = 30.0) -> HttpServer:
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted connections inherit it (Linux): without it, a reply written in two
        # parts (headers, then body) waits for the client's delayed ACK, 40 ms a request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as e:
            sock.close()
            raise ServeError(f"cannot serve HTTP on {self.host}:{self.requested_port}: {e.strerror}") from None
        sock.listen(128)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=self.tls_cert,
            ssl_keyfile=self.tls_key,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="tandem-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
