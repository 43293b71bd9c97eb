"""Prometheus metrics of one server: requests and latency per rpc, candidates per
source, reloads, catalogue size (each server its own registry, so several can live in
one process, as in the tests)."""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Iterable


class LightHistogram:
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


class Metrics:
    """Prometheus metrics of one server (its own registry, so several servers can live
    in one process, as in the tests)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tandem_requests", "Requests by rpc and status code", ["rpc", "code"], registry=self.registry
        )
        self.latency = LightHistogram(
            "tandem_request_seconds",
            "Request latency by rpc",
            "rpc",
            (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            self.registry,
        )
        self.candidates = LightHistogram(
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
