"""The engine being served, swapped atomically on reload (hot reload), and the writes
that must not race a reload (items added live, the other processes' journal lines)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from engine.index import bundle
from engine.service.metrics import Metrics
from engine.serving.engine import Engine, EngineConfig
from engine.serving.feedback import Recorded

log = logging.getLogger("tandem.server")


class EngineHolder:
    """The engine being served, swapped atomically on reload."""

    def __init__(self, root: str | Path, engine_config: EngineConfig | None = None, metrics: Metrics | None = None):
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
                if manifest.version == previous:
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
            fresh.sync_feedback()
            self.engine = fresh  # the swap: one reference assignment
            self.loaded_at, self._served_target = time.time(), target
            self.reloads += 1
            if self.metrics:
                self.metrics.reloads.labels("ok").inc()
                self.metrics.info.set(len(fresh.items))
            log.info(json.dumps({"event": "reloaded", "version": fresh.version, "previous": previous}))
            return True, fresh.version, previous, ""

    def reload_and_catch_up(self) -> tuple[bool, str, str, str]:
        """What an admin's reload does (gRPC ``Reload``, ``POST /v1/reload``): :meth:`reload`,
        then serve what the other processes of the root wrote (items added, events
        recorded), whatever the version; returns :meth:`reload`'s answer."""
        answer = self.reload()
        self.sync_added_items()
        self.sync_feedback()
        return answer

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

    def record(self, events: list[dict]) -> Recorded:
        """Record events on the serving engine, under the reload lock (as
        :meth:`add_items`): a new engine replays the log, so an event recorded on the old
        one while it loaded is applied by the sync before the swap."""
        with self._reload_lock:
            return self.engine.record(events)

    def sync_feedback(self) -> int:
        """Apply the events other processes of this root recorded (their log lines)."""
        return self.engine.sync_feedback()

    def sync_added_items(self) -> int:
        """Serve the items other processes of this root added (their journal lines)."""
        added = self.engine.sync_added_items()
        if added and self.metrics:
            self.metrics.info.set(len(self.engine.items))
        return added
