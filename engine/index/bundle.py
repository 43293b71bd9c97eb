"""The versioned bundle: a directory of models, indexes and tables described by a
``manifest.json``, published atomically and verified on load.

Layout of a bundle root (``paths.bundles``)::

    <root>/versions/<version>/manifest.json   one complete, immutable bundle per version
    <root>/current -> versions/<version>      the version being served (a symlink)
    <root>/.staging/                          bundles being written (never read)
    <root>/.trash/                            versions being deleted (never read)
    <root>/added_items.jsonl                  items added live (Engine.add_items), one JSON per line
    <root>/feedback.jsonl                     events recorded live (Engine.record), one JSON per line

Items added to a running engine are appended to ``added_items.jsonl`` (fsynced) and
replayed whenever an engine loads from the root, so they survive reloads and restarts;
the next ``make index`` copies the journal into the new bundle (``tables/added_items.jsonl``,
checksummed like every file), so a bundle also carries the items added before it.

Publishing writes the new bundle under ``.staging``, fsyncs every file and directory,
renames it into ``versions/`` (atomic within one filesystem), then swaps ``current`` by
renaming a fresh symlink over it (atomic too). A crash at any moment therefore leaves
``current`` pointing at a complete version. Loading checks the format version, that every
file listed exists with its size and sha256, and says which file is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from engine import journal
from engine.errors import TandemError

log = logging.getLogger("tandem.bundle")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VERSIONS = "versions"
CURRENT = "current"
STAGING = ".staging"
TRASH = ".trash"  # versions being deleted (see prune)


class BundleError(TandemError):
    """A bundle is missing, incomplete, corrupted or of another format."""


ADDED_ITEMS = "added_items.jsonl"


@dataclass
class DatasetInfo:
    """The data a bundle was built from."""

    name: str
    fingerprint: str
    n_users: int
    n_items: int
    n_ratings: int
    implicit: bool = False  # what a like is on this data (engine.data.dataset.liked_mask)


@dataclass
class Manifest:
    """``manifest.json``, typed: what a bundle version holds and how it was built.
    :func:`publish` fills ``version``, ``created_at`` and ``files``; readers get one from
    :class:`LoadedBundle`. Keys missing from bundles of earlier builds take defaults."""

    dataset: DatasetInfo
    models: dict  # per model: its size, config and training metrics (as the model saved them)
    indexes: dict  # name -> the IndexReport of engine.index.faiss_index, as JSON
    recall_floor: float
    user_top_items: dict = field(default_factory=lambda: {"k": 0, "indexes": []})
    segments: dict = field(default_factory=dict)  # key -> {"n_segments", "top_n"}
    genre_labels: list = field(default_factory=list)  # bundles before item_attributes: item_genres' labels
    # Item attribute name -> {"kind", "vocabulary", "position"} (BundleLayout.save_attributes).
    item_attributes: dict = field(default_factory=dict)
    # {"offset"}: the bytes of the root's feedback log the data included (engine.data.feedback).
    feedback: dict = field(default_factory=lambda: {"offset": 0})
    version: str = ""
    created_at: str = ""
    files: dict = field(default_factory=dict)  # relative path -> {"bytes", "sha256"}
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_json(cls, raw: dict) -> Manifest:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in raw.items() if key in known}
        values["dataset"] = DatasetInfo(
            **{key: value for key, value in raw["dataset"].items() if key in {f.name for f in fields(DatasetInfo)}}
        )
        return cls(**values)

    def to_json(self) -> dict:
        return asdict(self)


class BundleLayout:
    """Where each part of one bundle version lives: the only code that knows the file
    names. The index builder writes through it, the engine and tools read through it::

        <version>/manifest.json                 format, dataset, models, indexes, recall, checksums
        <version>/cf/, towers/                  the models (engine.models.artifacts format)
        <version>/ranker/                       the learned ranker, when trained (engine.models.ranker),
                                                with its rating model in ranker/rating/ (explicit data)
        <version>/<index>.faiss                 the vector indexes (cf_l2, cf_ip, towers_ip)
        <version>/tables/<table>.npy            per-item and per-user tables (TABLES)
        <version>/tables/added_items.jsonl      items added live before this version was built
        <version>/segments/<key>_<part>.npy     segment popularity (SEGMENT_PARTS)
        <version>/attributes/<k>.npy            item attributes for filters (Manifest.item_attributes)
    """

    # name -> what it holds (every table is a .npy read with allow_pickle=False)
    TABLES = {
        "item_ids": "[n_items] external item ids, in label order",
        "user_ids": "[n_users] external user ids",
        "popularity": "[n_items] interaction counts",
        "seen_indptr": "[n_users + 1] CSR row pointers of each user's training items",
        "seen_indices": "the CSR item indices",
        "seen_values": "their values (ratings; the value of implicit data): live feedback's fold-in reads them",
        "recent_liked": "[n_users, 5] each user's latest likes, latest first, -1 pads",
        "item_neighbours": "[n_items, 32] nearest items by CF squared distance, -1 pads",
        "item_cooccurring": "[n_items, 100] most similar items by co-occurrence (cosine of users), -1 pads",
        "item_cooccurrence": "[n_items, 100] their cosine similarities",
        "item_like_rate": "[n_items] share of the item's interactions that are likes, shrunk (ranker feature)",
        "item_mean_rating": "[n_items] the item's mean rating, shrunk toward the global mean (ranker feature)",
        "user_like_rate": "[n_users] share of the user's interactions that are likes, shrunk (ranker feature)",
        "item_ease_from": "[n_items, 100] the items of largest EASE weight into each item (<= 4,000 items)",
        "item_ease_weight": "[n_items, 100] those weights B[j, i]",
        "item_trend": "[n_items] log(1 + interactions in the latest tenth of the period) (ranker feature)",
        "item_age": "[n_items] share of the period since the item's first interaction (ranker feature)",
        "user_top_cf_ip": "[n_users, user_top_k] each user's top unseen items in cf_ip, -1 pads",
        "user_top_towers_ip": "[n_users, user_top_k] the same in towers_ip",
        "cf_item_vectors": "[n_items, f] CF item vectors",
        "cf_item_offsets": "[n_items] CF item offsets",
        "tower_item_vectors": "[n_items, d] item-tower vectors",
        "item_titles": "[n_items] display titles (when the data has them)",
        "item_genres": "[n_items, n_genres] genre flags (bundles before item attributes)",
    }
    SEGMENT_PARTS = ("values", "user", "top_items", "top_counts")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    def model(self, name: str) -> Path:
        """The directory of model ``name`` (``cf``, ``towers``)."""
        return self.path / name

    def index(self, name: str) -> Path:
        return self.path / f"{name}.faiss"

    def milvus_index(self, name: str) -> Path:
        """The descriptor of an index kept in Milvus (engine.index.milvus_index)."""
        return self.path / f"{name}.milvus.json"

    def table(self, name: str) -> Path:
        if name not in self.TABLES:
            raise KeyError(f"no bundle table named {name!r}; tables: {sorted(self.TABLES)}")
        return self.path / "tables" / f"{name}.npy"

    @property
    def added_items(self) -> Path:
        return self.path / "tables" / ADDED_ITEMS

    def segment(self, key: str, part: str) -> Path:
        if part not in self.SEGMENT_PARTS:
            raise KeyError(f"no segment part {part!r}; parts: {self.SEGMENT_PARTS}")
        return self.path / "segments" / f"{key}_{part}.npy"

    def has_table(self, name: str) -> bool:
        """Whether this version has the table (optional ones, and bundles built before a table existed)."""
        return self.table(name).is_file()

    def load_table(self, name: str, mmap: bool = False, optional: bool = False):
        """A table's array (``mmap``: mapped read-only instead of read); None for a
        missing ``optional`` table."""
        import numpy as np

        if optional and not self.has_table(name):
            return None
        return np.load(self.table(name), allow_pickle=False, mmap_mode="r" if mmap else None)

    def load_segment(self, key: str, part: str):
        import numpy as np

        return np.load(self.segment(key, part), allow_pickle=False)

    def save_table(self, name: str, array) -> None:
        """Write a table (into a version being staged)."""
        import numpy as np

        self.table(name).parent.mkdir(parents=True, exist_ok=True)
        np.save(self.table(name), array, allow_pickle=False)

    def save_segment(self, key: str, part: str, array) -> None:
        import numpy as np

        self.segment(key, part).parent.mkdir(parents=True, exist_ok=True)
        np.save(self.segment(key, part), array, allow_pickle=False)

    def save_attributes(self, attributes) -> dict:
        """Write item attributes (:class:`~engine.data.attributes.ItemAttributes`), one
        file each, named by position (an attribute's name may be any text); returns the
        manifest's ``item_attributes`` entry."""
        import numpy as np

        info = {}
        for k, (name, attribute) in enumerate(attributes.attributes.items()):
            path = self.attribute(k)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, attribute.values, allow_pickle=False)
            info[name] = {"kind": attribute.kind, "vocabulary": list(attribute.vocabulary), "position": k}
        return info

    def attribute(self, position: int) -> Path:
        """The file of the item attribute at ``position`` of the manifest's ``item_attributes``."""
        return self.path / "attributes" / f"{int(position)}.npy"

    def load_attributes(self, manifest: Manifest):
        """The item attributes of this version (bundles built before attributes: their
        genres, when they have them)."""
        import numpy as np

        from engine.data.attributes import LABELS, Attribute, ItemAttributes

        if not manifest.item_attributes and self.has_table("item_genres"):
            genres = self.load_table("item_genres").astype(np.uint8)
            return ItemAttributes({"genres": Attribute(LABELS, genres, tuple(manifest.genre_labels))})
        return ItemAttributes(
            {
                name: Attribute(
                    info["kind"],
                    np.load(self.attribute(info["position"]), allow_pickle=False),
                    tuple(info["vocabulary"]),
                )
                for name, info in manifest.item_attributes.items()
            }
        )


def append_added_items(path: str | Path, records: list[dict]) -> None:
    """Append items (``{"item_id", "features", "title", "dataset"}``) to a journal file,
    durably (fsynced before returning), under the journal's lock (:mod:`engine.journal`)."""
    payload = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records).encode("utf-8")
    journal.append(path, payload)


def read_added_items(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """The items of a journal file from byte ``offset`` on (none when the file does not
    exist), and the offset after the last whole line read, to continue from (see
    :mod:`engine.journal`: a partial last line waits, a bad line is logged and skipped)."""
    data, end = journal.read_bytes(path, offset)
    return journal.records(path, data, offset, _added_item), end


def _added_item(record: dict) -> dict:
    """One journal line as an added item's record (``ValueError`` when it is not one)."""
    if not isinstance(record.get("item_id"), str):
        raise ValueError("expected an object with a string item_id")
    features = record.get("features") or {}
    if not isinstance(features, dict):
        raise ValueError("features must be an object")
    return {
        "item_id": record["item_id"],
        "features": dict(features),
        "title": str(record.get("title", "") or ""),
        # The dataset the item was added to (records from before it was written: None).
        "dataset": record.get("dataset"),
    }


def root_of(bundle_path: str | Path) -> Path | None:
    """The bundle root a version directory was published under (``None`` otherwise)."""
    bundle_path = Path(bundle_path)
    return bundle_path.parent.parent if bundle_path.parent.name == VERSIONS else None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_version_name() -> str:
    """A sortable, unique version name: UTC time to the microsecond plus the pid."""
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S.%f}Z-{os.getpid()}"


def staging_dir(root: str | Path) -> Path:
    """A fresh directory to write a bundle into, on the same filesystem as ``root``.
    Leftovers of crashed publishers (their process gone) are removed first."""
    root = Path(root)
    staging = root / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    for old in staging.iterdir():
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = staging / new_version_name()
    path.mkdir()
    return path


@contextlib.contextmanager
def staging(root: str | Path):
    """:func:`staging_dir` as a context: the directory is removed if the body raises
    (a publish refused or failed leaves nothing behind)."""
    path = staging_dir(root)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(staged: str | Path, root: str | Path, manifest: Manifest, keep: int = 5) -> Path:
    """Finish a staged bundle and make it ``current``.

    Fills the manifest's ``version``, ``created_at`` and ``files`` table (size and sha256
    of every file), writes it, fsyncs, renames the directory into ``versions/`` and swaps
    ``current``. Keeps the newest ``keep`` versions (and always the current one).
    Returns the published version's path.
    """
    staged, root = Path(staged), Path(root)
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    version = staged.name
    files = {}
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        rel = path.relative_to(staged).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        _fsync_path(path)
    full = replace(manifest, version=version, created_at=datetime.now(timezone.utc).isoformat(), files=files)
    manifest_path = staged / MANIFEST
    with open(manifest_path, "w") as f:
        json.dump(full.to_json(), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({p.parent for p in staged.rglob("*")} | {staged}, key=lambda p: -len(p.parts)):
        _fsync_path(d)

    versions = root / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    final = versions / version
    os.rename(staged, final)
    _fsync_path(versions)
    set_current(root, version)
    prune(root, keep)
    clean_leftovers(root)
    return final


def set_current(root: str | Path, version: str) -> None:
    """Point ``current`` at ``versions/<version>`` with one atomic rename."""
    root = Path(root)
    if not (root / VERSIONS / version / MANIFEST).is_file():
        raise BundleError(f"{root / VERSIONS / version}: no such complete version")
    tmp = root / f".{CURRENT}.{os.getpid()}.{time.monotonic_ns()}"
    os.symlink(f"{VERSIONS}/{version}", tmp)
    os.replace(tmp, root / CURRENT)
    _fsync_path(root)
    _point_milvus_aliases(root, root / VERSIONS / version)


def _point_milvus_aliases(root: Path, version_path: Path) -> None:
    """Milvus's view of ``current``: the root's alias of each index the version keeps in
    Milvus moves to that version's collection (:mod:`engine.index.milvus_index`)."""
    indexes = read_manifest(version_path, verify=False).indexes
    if any("milvus" in report for report in indexes.values()):
        from engine.index import milvus_index

        milvus_index.point_aliases(root, indexes)


def list_versions(root: str | Path) -> list[str]:
    """Complete versions, oldest first (names sort chronologically)."""
    versions = Path(root) / VERSIONS
    if not versions.is_dir():
        return []
    return sorted(p.name for p in versions.iterdir() if (p / MANIFEST).is_file())


def current_version(root: str | Path) -> str | None:
    link = Path(root) / CURRENT
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def prune(root: str | Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions, never the current one. Each is first
    moved out of ``versions/`` in one atomic rename, then deleted: a deletion cut short
    by a crash never leaves a half-deleted directory that looks like a version."""
    current = current_version(root)
    versions = list_versions(root)
    doomed = [v for v in versions[:-keep] if v != current]
    for v in doomed:
        indexes = read_manifest(Path(root) / VERSIONS / v, verify=False).indexes
        _discard(Path(root), Path(root) / VERSIONS / v)
        if any("milvus" in report for report in indexes.values()):  # its collections go with it
            from engine.index import milvus_index

            milvus_index.drop_version(indexes)
    return doomed


def clean_leftovers(root: str | Path) -> list[str]:
    """Delete what killed publishes and prunes left: directories under ``versions/``
    without a manifest (a complete version always has one: it arrives by one rename)
    and ``.trash/``. Run after every publish; returns the names removed."""
    root = Path(root)
    removed = []
    versions = root / VERSIONS
    current = current_version(root)
    for path in sorted(versions.iterdir()) if versions.is_dir() else []:
        if path.is_dir() and not (path / MANIFEST).is_file() and path.name != current:
            _discard(root, path)
            removed.append(path.name)
    trash = root / TRASH
    if trash.is_dir():
        for path in trash.iterdir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"{TRASH}/{path.name}")
    return removed


def _discard(root: Path, path: Path) -> None:
    """Move ``path`` into ``<root>/.trash`` (atomic), then delete it."""
    trash = root / TRASH
    trash.mkdir(exist_ok=True)
    target = trash / f"{path.name}.{os.getpid()}.{time.monotonic_ns()}"
    try:
        os.rename(path, target)
    except FileNotFoundError:  # another publish removed it first
        return
    shutil.rmtree(target, ignore_errors=True)


def rollback(root: str | Path) -> str:
    """Point ``current`` at the version published before it; returns that version."""
    current = current_version(root)
    versions = list_versions(root)
    if current is None or current not in versions:
        raise BundleError(f"{root}: no current version to roll back from")
    position = versions.index(current)
    if position == 0:
        raise BundleError(f"{root}: {current} is the oldest version kept; nothing to roll back to")
    previous = versions[position - 1]
    set_current(root, previous)
    return previous


def resolve(path: str | Path) -> Path:
    """A bundle directory from either a bundle itself or a root holding ``current``."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / CURRENT).exists():
        return (path / CURRENT).resolve()
    raise BundleError(f"{path}: neither a bundle (no {MANIFEST}) nor a bundle root (no {CURRENT})")


def read_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read and (by default) verify a bundle: format version, and the presence, size and
    sha256 of every listed file. Raises :class:`BundleError` naming the bad file."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: corrupted ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: expected format version {FORMAT_VERSION}, found {manifest.get('format_version')!r}")
    if not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: no file table")
    if verify:
        for rel, info in manifest["files"].items():
            f = bundle / rel
            if not f.is_file():
                raise BundleError(f"{f}: missing from the bundle")
            size = f.stat().st_size
            if size != info["bytes"]:
                raise BundleError(f"{f}: expected {info['bytes']} bytes, found {size} (truncated or replaced)")
            digest = sha256_file(f)
            if digest != info["sha256"]:
                raise BundleError(
                    f"{f}: checksum mismatch (expected sha256 {info['sha256'][:12]}..., found {digest[:12]}...)"
                )
    try:
        return Manifest.from_json(manifest)
    except (KeyError, TypeError) as e:
        raise BundleError(f"{path}: not a manifest of this format ({e})") from None


class LoadedBundle:
    """A verified bundle opened for reading: manifest, item ids, and its FAISS indexes
    (loaded on first use with the search parameters tuned at build time)."""

    def __init__(self, path: str | Path, verify: bool = True):

        from engine.data import IdMap

        self.path = resolve(path)
        self.manifest = read_manifest(self.path, verify=verify)
        self.layout = BundleLayout(self.path)
        self.items = IdMap(self.layout.load_table("item_ids"), "item")
        self.users = IdMap(self.layout.load_table("user_ids"), "user")
        self._indexes: dict = {}
        for name, report in self.manifest.indexes.items():
            if report["n_vectors"] != len(self.items):
                raise BundleError(
                    f"{self.path / MANIFEST}: index {name} holds {report['n_vectors']} vectors, "
                    f"expected one per item ({len(self.items)})"
                )

    @property
    def version(self) -> str:
        return self.manifest.version

    def index(self, name: str):
        """The vector index ``name`` (``cf_l2``, ``cf_ip``, ``towers_ip``): a
        :class:`~engine.index.faiss_index.FaissIndex` with its tuned search parameters,
        or a :class:`~engine.index.milvus_index.MilvusIndex` for a bundle built with
        ``index.backend = "milvus"``."""
        from engine.index.faiss_index import FaissIndex
        from engine.index.milvus_index import MilvusIndex

        if name not in self._indexes:
            report = self.manifest.indexes.get(name)
            if report is None:
                raise BundleError(f"{self.path}: no index named {name!r}")
            index: FaissIndex | MilvusIndex
            if "milvus" in report:
                path = self.layout.milvus_index(name)
                index = MilvusIndex.load(path)
            else:
                path = self.layout.index(name)
                index = FaissIndex.load(path, report["metric"], report["search_params"])
            if index.dim != report["dim"] or len(index) != report["n_vectors"]:
                raise BundleError(
                    f"{path}: expected {report['n_vectors']} x {report['dim']}, found {len(index)} x {index.dim}"
                )
            self._indexes[name] = index
        return self._indexes[name]

    def similar_items(self, item_id: object, k: int = 10, item_vectors=None):
        """Items nearest ``item_id`` by squared distance between CF item vectors, through
        the ``cf_l2`` index, the item itself excluded: :class:`~engine.results.Recommendations`
        whose scores are squared distances, nearest first.

        The query is the item's exact vector (not ``index.reconstruct``: a PQ index only
        holds codes): from ``item_vectors`` when the caller already holds them (the
        Engine's CF model), else from the bundle's ``tables/cf_item_vectors.npy``."""
        import numpy as np

        i = self.items.index(item_id)
        if item_vectors is None:
            if not hasattr(self, "_cf_item_vectors"):
                self._cf_item_vectors = self.layout.load_table("cf_item_vectors")
            item_vectors = self._cf_item_vectors
        query = item_vectors[i][None, :]
        dist, labels = self.index("cf_l2").search(query, k + 1)
        keep = (labels[0] >= 0) & (labels[0] != i)
        labels, dist = labels[0][keep][:k], dist[0][keep][:k]
        from engine.results import SQUARED_DISTANCE, Recommendations

        ids = self.items.external(labels)
        return Recommendations(ids, dist.astype(np.float32), [("cf_l2",)] * len(ids), metric=SQUARED_DISTANCE)
