"""The gRPC servicers: each rpc translates its request message into one engine call
and the result into its reply message (the engine does the work); request limits of
the server, and request bytes that are not a message, are refused here."""

from __future__ import annotations

import time

from engine.errors import InvalidRequest, shorten
from engine.results import Recommendations
from engine.service.holder import EngineHolder
from engine.service.limits import LimitExceeded, check_batch, check_batch_results, check_scored, server_info
from engine.service.rpc import tandem_pb2 as pb
from engine.service.rpc import tandem_pb2_grpc as pb_grpc
from engine.settings import ServerConfig


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
        elif kind == "labels":
            out[name] = list(value.labels.values)
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
    for item, explained in zip(reply.items, recs.explanations):
        item.explanation.extend(pb.FeatureContribution(**part) for part in explained)
    if recs.candidates:
        reply.candidates.update(recs.candidates)
    if recs.served_by:
        reply.served_by = recs.served_by
    return reply


def _recommend_options(request: pb.RecommendRequest) -> dict:
    # Unset k / n_candidates take the defaults; a 0 sent on purpose is refused, as the library does.
    return {
        "k": request.k if request.HasField("k") else 10,
        "n_candidates": request.n_candidates if request.HasField("n_candidates") else 500,
        "exclude_seen": not request.include_seen,
        "exclude_items": list(request.exclude_items),
        "include_items": list(request.include_items) or None,
        "filters": _filters(request),
        "sources": list(request.sources) or None,
        "explain": request.explain,
    }


_BOUNDS = ("lt", "lte", "gt", "gte")


def _filters(request: pb.RecommendRequest) -> dict | None:
    """The request's AttributeFilter messages (and its genres) as the library's filters
    (engine.data.attributes): any_of / all_of, or numeric bounds."""
    filters: dict = {"genres": list(request.genres)} if request.genres else {}
    for f in request.filters:
        bounds = {op: getattr(f, op) for op in _BOUNDS if f.HasField(op)}
        given = [part for part, present in (("any_of", f.any_of), ("all_of", f.all_of), ("bounds", bounds)) if present]
        if len(given) != 1:
            raise InvalidRequest(
                f"filter on {shorten(f.attribute)} must set exactly one of any_of, all_of or numeric bounds, "
                f"got {', '.join(given) or 'none'}"
            )
        if f.attribute in filters:
            raise InvalidRequest(f"attribute {shorten(f.attribute)} filtered twice: give one filter per attribute")
        filters[f.attribute] = {"any": list(f.any_of)} if f.any_of else {"all": list(f.all_of)} if f.all_of else bounds
    return filters or None


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
        engine = self.holder.engine
        users, options = list(request.user_ids), _recommend_options(request.options)
        check_batch_results(len(users), options["k"], self.config)
        remaining = context.time_remaining()  # a long batch stops once its deadline has passed
        results = engine.recommend_batch(
            users, deadline=None if remaining is None else time.monotonic() + remaining, **options
        )
        reply = pb.RecommendBatchResponse(version=engine.version)
        for r in results:
            _reply(reply.results.add(version=engine.version), r)
        size = reply.ByteSize()
        if size > 4 * self.config.max_message_bytes:  # the send limit set in TandemServer.start
            raise LimitExceeded(
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
        check_scored(len(request.item_ids), engine)
        recs = engine.score(
            user_id=request.user_id or None,
            item_ids=list(request.item_ids),
            user_features=_features(request.user_features),
            ratings=dict(request.ratings) or None,
        )
        return _reply(pb.ScoreResponse(version=engine.version), recs)

    def AddItems(self, request, context):
        check_batch(len(request.items), "items", self.config)
        features = []
        for item in request.items:
            f = _features(item.features)
            if item.title:
                f["title"] = item.title
            features.append(f)
        n = self.holder.add_items([item.item_id for item in request.items], features)
        return pb.AddItemsResponse(n_items=n, version=self.holder.engine.version)

    def RecordFeedback(self, request, context):
        check_batch(len(request.events), "events", self.config)
        events = []
        for event in request.events:
            record = {"user_id": event.user_id, "item_id": event.item_id, "kind": event.kind}
            if event.HasField("value"):
                record["value"] = event.value
            if event.HasField("timestamp"):
                record["timestamp"] = event.timestamp
            events.append(record)
        recorded = self.holder.record(events)
        return pb.RecordFeedbackResponse(
            recorded=recorded.events, new_users=recorded.new_users, version=self.holder.engine.version
        )

    def Echo(self, request, context):
        return pb.EchoResponse(payload=request.payload)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, holder: EngineHolder, config: ServerConfig):
        self.holder, self.config = holder, config

    def Reload(self, request, context):
        reloaded, version, previous, message = self.holder.reload_and_catch_up()
        return pb.ReloadResponse(reloaded=reloaded, version=version, previous_version=previous, message=message)

    def GetInfo(self, request, context):
        info = server_info(self.holder, self.config)
        info["indexes"] = [pb.IndexInfo(**index) for index in info["indexes"]]
        return pb.GetInfoResponse(**info)
