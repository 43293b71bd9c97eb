"""A Python client of the Tandem gRPC service.

>>> from engine.client import Client
>>> with Client("localhost:50051") as client:
...     recs = client.recommend("196", k=5)
...     for item_id, score, sources in recs: ...

Methods mirror :class:`engine.Engine` and return the same
:class:`~engine.serving.engine.Recommendations` (``item_ids``, ``scores``, ``sources``,
``titles``), so code can switch between the embedded library and the service.
Failures raise :class:`grpc.RpcError`; ``error.code()`` is ``INVALID_ARGUMENT`` for a
bad request, ``NOT_FOUND`` for an unknown item, ``UNAUTHENTICATED`` without the token,
``DEADLINE_EXCEEDED`` past ``timeout``. The first two are also the library's own types,
as the embedded engine raises them: :class:`~engine.errors.InvalidRequest` and
:class:`~engine.errors.UnknownIdError` (:class:`RemoteInvalidRequest`,
:class:`RemoteUnknownId`), so one ``except`` serves both faces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np

from engine.errors import InvalidRequest, UnknownIdError, shorten
from engine.results import SCORE, SQUARED_DISTANCE, Recommendations
from engine.service.rpc import tandem_pb2 as pb
from engine.service.rpc import tandem_pb2_grpc as pb_grpc


def _feature_map(features: Mapping | None) -> dict:
    out = {}
    for name, value in (features or {}).items():
        if isinstance(value, str):
            out[name] = pb.FeatureValue(text=value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            out[name] = pb.FeatureValue(labels=pb.TextList(values=list(value)))
        elif isinstance(value, (list, tuple, np.ndarray)):
            out[name] = pb.FeatureValue(numbers=pb.NumberList(values=[float(v) for v in value]))
        else:
            out[name] = pb.FeatureValue(number=float(value))
    return out


def _attribute_filter(name: object, condition: object) -> pb.AttributeFilter:
    """A library filter (engine.data.attributes) as its message: values (any of),
    ``{"any": [...]}`` / ``{"all": [...]}``, or numeric bounds ``{"lt": 100, ...}``."""
    if isinstance(condition, str):
        return pb.AttributeFilter(attribute=str(name), any_of=[condition])
    if isinstance(condition, (list, tuple)):
        return pb.AttributeFilter(attribute=str(name), any_of=[str(v) for v in condition])
    if isinstance(condition, Mapping) and set(condition) <= {"any", "all"} and len(condition) == 1:
        ((op, values),) = condition.items()
        values = [values] if isinstance(values, str) else [str(v) for v in values]
        if op == "any":
            return pb.AttributeFilter(attribute=str(name), any_of=values)
        return pb.AttributeFilter(attribute=str(name), all_of=values)
    if isinstance(condition, Mapping) and condition and set(condition) <= {"lt", "lte", "gt", "gte"}:
        message = pb.AttributeFilter(attribute=str(name))
        try:
            for op, bound in condition.items():
                setattr(message, op, float(bound))
            return message
        except (TypeError, ValueError):
            pass
    raise InvalidRequest(
        f"filter {shorten(name)} takes values (any of), {{'any': [...]}}, {{'all': [...]}} or numeric bounds "
        f"(lt, lte, gt, gte), got {shorten(condition)}"
    )


def _recommendations(items, candidates=None, metric: str = SCORE, served_by: str = "") -> Recommendations:
    return Recommendations(
        np.array([i.item_id for i in items], dtype=str),
        np.array([i.score for i in items], np.float32),
        [tuple(i.sources) for i in items],
        [i.title for i in items],
        dict(candidates or {}),
        metric,
        served_by,
        # Explanations only where the request asked for them (every item then has one).
        [
            [{"feature": c.feature, "value": c.value, "contribution": c.contribution} for c in i.explanation]
            for i in items
        ]
        if any(len(i.explanation) for i in items)
        else [],
    )


class _RemoteError(grpc.RpcError):
    """A failed call, with the failed call's ``code()`` and ``details()``."""

    def __init__(self, error: grpc.RpcError):
        self._error = error
        super().__init__(error.details())

    def code(self) -> grpc.StatusCode:
        return self._error.code()

    def details(self) -> str:
        return self._error.details()

    def __str__(self) -> str:
        return self._error.details() or ""


class RemoteInvalidRequest(_RemoteError, InvalidRequest):
    """``INVALID_ARGUMENT`` from the server: an :class:`~engine.errors.InvalidRequest`."""


class RemoteUnknownId(_RemoteError, UnknownIdError):
    """``NOT_FOUND`` from the server: an :class:`~engine.errors.UnknownIdError`."""


_AS_LIBRARY_ERROR = {grpc.StatusCode.INVALID_ARGUMENT: RemoteInvalidRequest, grpc.StatusCode.NOT_FOUND: RemoteUnknownId}


class Client:
    """A connection to a Tandem server.

    Args:
        target: ``host:port``.
        token: bearer token sent as ``authorization: Bearer <token>`` metadata.
        tls: use TLS; ``root_certificates`` (PEM bytes or a file path) verifies a
            self-signed server certificate (default: the system's roots).
        timeout: default deadline of each call, in seconds.
        server_name: TLS host name to verify when it differs from ``target``'s host.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        timeout: float = 10.0,
        server_name: str | None = None,
    ):
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if tls or root_certificates is not None:
            roots = root_certificates
            if isinstance(roots, (str, Path)):
                roots = Path(roots).read_bytes()
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self._recommender = pb_grpc.RecommenderStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)

    # -------------------------------------------------------------- plumbing
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float | None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            as_library = _AS_LIBRARY_ERROR.get(error.code())
            if as_library is None:
                raise
            raise as_library(error) from None

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (raises ``grpc.FutureTimeoutError``)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    # ------------------------------------------------------------ recommender
    @staticmethod
    def _recommend_request(
        user_id=None,
        user_features=None,
        ratings=None,
        k=10,
        n_candidates=500,
        exclude_seen=True,
        exclude_items=(),
        include_items=None,
        filters=None,
        sources=None,
        explain=False,
    ):
        return pb.RecommendRequest(
            user_id="" if user_id is None else str(user_id),
            user_features=_feature_map(user_features),
            ratings={str(i): float(r) for i, r in (ratings or {}).items()},
            k=k,
            n_candidates=n_candidates,
            include_seen=not exclude_seen,
            exclude_items=[str(i) for i in exclude_items],
            include_items=[str(i) for i in include_items or ()],
            filters=[_attribute_filter(name, condition) for name, condition in (filters or {}).items()],
            sources=list(sources or ()),
            explain=explain,
        )

    def recommend(
        self,
        user_id: object | None = None,
        user_features: Mapping | None = None,
        ratings: Mapping[object, float] | None = None,
        k: int = 10,
        n_candidates: int = 500,
        exclude_seen: bool = True,
        exclude_items: Sequence[object] = (),
        include_items: Sequence[object] | None = None,
        filters: Mapping | None = None,
        sources: Sequence[str] | None = None,
        explain: bool = False,
        timeout: float | None = None,
    ) -> Recommendations:
        """Top ``k`` items for one user; the arguments are :meth:`engine.Engine.recommend`'s."""
        request = self._recommend_request(
            user_id,
            user_features,
            ratings,
            k,
            n_candidates,
            exclude_seen,
            exclude_items,
            include_items,
            filters,
            sources,
            explain,
        )
        reply = self._call(self._recommender.Recommend, request, timeout)
        return _recommendations(reply.items, reply.candidates, served_by=reply.served_by)

    def recommend_batch(
        self, user_ids: Sequence[object], k: int = 10, timeout: float | None = None, **options
    ) -> list[Recommendations]:
        """:meth:`recommend` for many users with the same options, in order."""
        request = pb.RecommendBatchRequest(
            user_ids=[str(u) for u in user_ids], options=self._recommend_request(k=k, **options)
        )
        reply = self._call(self._recommender.RecommendBatch, request, timeout)
        return [_recommendations(r.items, r.candidates, served_by=r.served_by) for r in reply.results]

    def similar_items(self, item_id: object, k: int = 10, timeout: float | None = None) -> Recommendations:
        """Items nearest ``item_id`` (scores are squared distances, ascending)."""
        reply = self._call(self._recommender.SimilarItems, pb.SimilarItemsRequest(item_id=str(item_id), k=k), timeout)
        return _recommendations(reply.items, metric=SQUARED_DISTANCE)

    def score(
        self,
        user_id: object | None = None,
        item_ids: Sequence[object] = (),
        user_features: Mapping | None = None,
        ratings: Mapping[object, float] | None = None,
        timeout: float | None = None,
    ) -> Recommendations:
        """Exact scores of the given items for one user, best first."""
        request = pb.ScoreRequest(
            user_id="" if user_id is None else str(user_id),
            item_ids=[str(i) for i in item_ids],
            user_features=_feature_map(user_features),
            ratings={str(i): float(r) for i, r in (ratings or {}).items()},
        )
        return _recommendations(self._call(self._recommender.Score, request, timeout).items)

    def add_items(
        self, item_ids: Sequence[object], item_features: Sequence[Mapping], timeout: float | None = None
    ) -> int:
        """Add items (features plus an optional ``"title"``) to the live index; returns
        the catalogue size."""
        if len(item_ids) != len(item_features):
            raise InvalidRequest("add_items needs one feature dict per item id")
        items = []
        for item_id, features in zip(item_ids, item_features):
            features = dict(features)
            title = str(features.pop("title", ""))
            items.append(pb.NewItem(item_id=str(item_id), features=_feature_map(features), title=title))
        return self._call(self._recommender.AddItems, pb.AddItemsRequest(items=items), timeout).n_items

    def record(self, events: Sequence[Mapping], timeout: float | None = None) -> dict[str, int]:
        """Record events (``{"user_id", "item_id", "kind", "value", "timestamp"}``, the last
        two optional), as :meth:`engine.Engine.record`; returns ``{"recorded", "new_users"}``."""
        messages = []
        for event in events:
            if not isinstance(event, Mapping):
                raise InvalidRequest(f"an event must be a mapping, got {shorten(event)}")
            try:
                messages.append(pb.FeedbackEvent(**{key: value for key, value in event.items() if value is not None}))
            except (TypeError, ValueError) as e:  # an unknown field, a value of the wrong type
                raise InvalidRequest(f"bad event {shorten(event)}: {e}") from None
        reply = self._call(self._recommender.RecordFeedback, pb.RecordFeedbackRequest(events=messages), timeout)
        return {"recorded": reply.recorded, "new_users": reply.new_users}

    def echo(self, payload: bytes = b"", timeout: float | None = None) -> bytes:
        return self._call(self._recommender.Echo, pb.EchoRequest(payload=payload), timeout).payload

    # ------------------------------------------------------------------ admin
    def reload(self, timeout: float | None = None) -> dict:
        """Ask the server to load the bundle ``current`` points at: ``{"reloaded",
        "version", "previous_version", "message"}``."""
        reply = self._call(self._admin.Reload, pb.ReloadRequest(), timeout)
        return {
            "reloaded": reply.reloaded,
            "version": reply.version,
            "previous_version": reply.previous_version,
            "message": reply.message,
        }

    def info(self, timeout: float | None = None) -> dict:
        """What the server is serving (GetInfo) as a dict."""
        from google.protobuf.json_format import MessageToDict

        reply = self._call(self._admin.GetInfo, pb.GetInfoRequest(), timeout)
        return MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The standard health check's status name (``SERVING``, ``NOT_SERVING``, ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout if timeout is None else timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
