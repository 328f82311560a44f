"""The model registry: immutable, hashed copies of model directories, aliases, lineage and an audit log.

    reg = Registry("/srv/jaxclf-registry")
    v = reg.register("runs/default/model", name="sentiment", tags={"data": "2024-06"})  # sentiment@v1
    reg.set_alias("sentiment", "v1", "production")
    reg.resolve("sentiment@production")        # Path of the copy, after checking its hash

    jaxclf registry --root /srv/jaxclf-registry register runs/default/model --name sentiment
    python -m jaxclf.registry --root /srv/jaxclf-registry show sentiment@production

Layout of the root (a local directory; SQLite's WAL mode does not work on network filesystems):

    registry.db           the index (SQLite, WAL): models, versions, aliases, the audit log
    models/NAME/vN/       one immutable copy per version; its files are read-only
    tmp/                  work in progress (registrations being copied, deletions); never read

A version is visible exactly when its row is committed, and the row is committed only after its
directory is complete, hashed, fsynced and renamed into place, inside the same write transaction
that allocates the version number. A crash at any point leaves either no version or a whole one;
what it leaves under tmp/ (or an unreferenced directory under models/) is ignored and removed by
a later register or `gc`. Each work directory in tmp/ is guarded by a lock file its process holds
with flock(2), so clean-up never removes the work of a process that is still running.

Test hook: JAXCLF_REGISTRY_TEST_COPY_DELAY_S=<seconds> sleeps that long after each chunk copied
into a new version, so a test can kill a registration half way (tests/test_registry.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import getpass
import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tarfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from jaxclf import model_dir
from jaxclf.errors import JaxclfError

DB_FILE = "registry.db"
SCHEMA_VERSION = 1
EXPORT_MANIFEST = "jaxclf-registry-export.json"
EXPORT_FORMAT = "jaxclf-registry-export"
COPY_DELAY_ENV = "JAXCLF_REGISTRY_TEST_COPY_DELAY_S"
MODEL_FILES = (*model_dir.REQUIRED_FILES, model_dir.METRICS_FILE)  # what a version holds
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another writer's transaction
_CHUNK = 1 << 20

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_VERSION = re.compile(r"v?([0-9]{1,9})")
_TAG_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-100 characters: lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
ALIAS_RULE = ("1-64 characters: lowercase letters, digits, '_' or '-', starting with a letter; not 'latest' "
              "and not shaped like a version (v3)")
TAG_KEY_RULE = "1-64 characters: letters, digits, '_', '.' or '-', starting with a letter or '_'"


class RegistryError(JaxclfError, ValueError):
    """Something the user asked of the registry cannot be done; the message says why and what is accepted."""


class InvalidNameError(RegistryError):
    """A model name, alias, tag or description breaks the naming rules."""


class NotFoundError(RegistryError):
    """No such model, version or alias."""


class ConflictError(RegistryError):
    """The operation conflicts with the registry's state (e.g. deleting a version an alias points at)."""


class TamperedVersionError(RegistryError):
    """A stored version's files no longer match the hash recorded when it was registered."""


class UnsafeArchiveError(RegistryError):
    """An export archive holds something import refuses: absolute paths, '..', links, unknown files."""


# --- names -----------------------------------------------------------------------------------------

def _has_control(text: str, allowed: str = "") -> bool:
    return any((ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
                "\u2066\u2067\u2068\u2069") and c not in allowed for c in text)


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidNameError(f"invalid model name {name!r}: use {NAME_RULE}")
    return name


def check_alias(alias: Any) -> str:
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias) or alias == "latest" or _VERSION.fullmatch(alias):
        raise InvalidNameError(f"invalid alias {alias!r}: use {ALIAS_RULE}")
    return alias


def check_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    out = {}
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not _TAG_KEY.fullmatch(key):
            raise InvalidNameError(f"invalid tag key {key!r}: use {TAG_KEY_RULE}")
        if not isinstance(value, str) or len(value) > 256 or _has_control(value):
            raise InvalidNameError(f"invalid value {value!r} for tag {key!r}: use at most 256 characters "
                                   f"and no control characters")
        out[key] = value
    return out


def parse_tag(text: str) -> tuple[str, str]:
    """'key=value' -> (key, value), checked."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidNameError(f"invalid tag {text!r}: write it as key=value")
    check_tags({key: value})
    return key, value


def check_description(text: Any) -> str:
    if not isinstance(text, str) or len(text) > 4000 or _has_control(text, allowed="\n\t"):
        raise InvalidNameError(f"invalid description {str(text)[:60]!r}: use at most 4000 characters and no "
                               f"control characters other than newline and tab")
    return text


@dataclasses.dataclass(frozen=True)
class Ref:
    """A parsed reference: NAME, NAME@vN (or NAME@N), NAME@latest or NAME@ALIAS."""

    name: str
    version: int | None = None
    alias: str | None = None  # "latest" or an alias name

    @classmethod
    def parse(cls, text: str, default_alias: str | None = "latest") -> "Ref":
        if not isinstance(text, str):
            raise InvalidNameError(f"invalid model reference {text!r}: use NAME, NAME@vN or NAME@ALIAS")
        name, sep, selector = text.partition("@")
        check_name(name)
        if not sep:
            return cls(name, alias=default_alias)
        if match := _VERSION.fullmatch(selector):
            return cls(name, version=int(match.group(1)))
        if selector == "latest":
            return cls(name, alias="latest")
        try:
            return cls(name, alias=check_alias(selector))
        except InvalidNameError:
            raise InvalidNameError(f"invalid model reference {text!r}: after '@' put a version (v3), 'latest' or "
                                   f"an alias ({ALIAS_RULE})") from None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@v{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


def version_ref(name: str, version: int) -> str:
    return f"{name}@v{version}"


# --- hashing and copying ---------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_hash(files: Mapping[str, str]) -> str:
    """The content hash of a version: sha256 over the sorted 'sha256  name' lines of its files."""
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def model_files(directory: str | os.PathLike) -> list[str]:
    """The model-directory files a version holds (the required ones, and metrics.json if present)."""
    d = model_dir.check_files(directory)
    return [f for f in MODEL_FILES if (d / f).is_file()]


def content_hash(directory: str | os.PathLike) -> str:
    """Content hash of a model directory, comparable with a registered version's `content_hash`."""
    d = Path(directory)
    return manifest_hash({f: file_sha256(d / f) for f in model_files(d)})


def _copy_delay() -> float:
    raw = os.environ.get(COPY_DELAY_ENV)
    if not raw:
        return 0.0
    try:
        return max(0.0, float(raw))
    except ValueError:
        raise RegistryError(f"{COPY_DELAY_ENV}={raw!r} is not a number of seconds") from None


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy one file, fsync it, make it read-only; returns the sha256 of the bytes written."""
    delay = _copy_delay()
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        for chunk in iter(lambda: fin.read(_CHUNK), b""):
            fout.write(chunk)
            h.update(chunk)
            if delay:
                time.sleep(delay)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, 0o444)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def current_user() -> str:
    user = os.environ.get("USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        return f"uid:{os.getuid()}"


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """`git rev-parse HEAD` in cwd, or None outside a git checkout (or without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def data_fingerprint(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """sha256 of the training/eval files named in metrics.json (null where a file is not here), or None."""
    out = {}
    for key in ("train_file", "eval_file"):
        path = metrics.get(key)
        if isinstance(path, str) and path:
            p = Path(path).expanduser()
            out[key] = {"path": path, "sha256": file_sha256(p) if p.is_file() else None}
    return out or None


# --- records ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One registered version and everything recorded about it."""

    name: str
    version: int
    path: Path  # the stored copy
    content_hash: str  # manifest_hash(files)
    files: dict[str, str]  # file name -> sha256
    created_at: str  # UTC ISO 8601
    creator: str
    description: str
    tags: dict[str, str]
    parent: str | None  # NAME@vN this one was derived from
    metadata: dict[str, Any]  # metrics, config, data_fingerprint, code_commit, source, ...

    @property
    def ref(self) -> str:
        return version_ref(self.name, self.version)

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, "name": self.name, "version": self.version, "path": str(self.path),
                "content_hash": self.content_hash, "files": dict(self.files), "created_at": self.created_at,
                "creator": self.creator, "description": self.description, "tags": dict(self.tags),
                "parent": self.parent, **self.metadata}


@dataclasses.dataclass(frozen=True)
class Event:
    """One line of the audit log."""

    id: int
    time: str
    user: str
    action: str  # register, import, alias, promote, rollback, delete
    name: str
    version: int | None
    alias: str | None
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL,          -- never reused, even after a delete
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL REFERENCES models(name),
    version INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    files TEXT NOT NULL,                    -- JSON {file: sha256}
    created_at TEXT NOT NULL,
    creator TEXT NOT NULL,
    description TEXT NOT NULL,
    tags TEXT NOT NULL,                     -- JSON {key: value}
    parent TEXT,
    metadata TEXT NOT NULL,                 -- JSON
    PRIMARY KEY (name, version));
CREATE INDEX IF NOT EXISTS versions_by_hash ON versions(content_hash);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    previous INTEGER,                       -- the target before the last move; rollback returns to it
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (name, alias));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER,
    alias TEXT,
    details TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'the registry audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'the registry audit log is append-only'); END;
"""


class Registry:
    """A registry rooted at a local directory (created on first use unless create=False).

    Safe to share between threads and processes: every call opens its own SQLite connection.
    """

    def __init__(self, root: str | os.PathLike, user: str | None = None, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry root {self.root} exists and is not a directory")
        if not create and not (self.root / DB_FILE).is_file():
            raise NotFoundError(f"no registry at {self.root} (no {DB_FILE}); check the path, or register a "
                                f"model there first")
        self.user = user or current_user()
        self.models_dir = self.root / "models"
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.models_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._verified: dict[Path, tuple] = {}  # version dir -> (hash, file stats) last seen intact
        self._init_db()

    # --- the index -------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / DB_FILE, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        db.execute("PRAGMA foreign_keys = ON")
        db.row_factory = sqlite3.Row
        return db

    def _init_db(self) -> None:
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:  # switching to WAL takes an exclusive lock that the busy handler does not always wait for
            try:
                with contextlib.closing(self._connect()) as db:
                    if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                        raise RegistryError(f"{self.root / DB_FILE}: SQLite cannot use WAL mode here; keep the "
                                            f"registry on a local filesystem")
                    db.execute("PRAGMA synchronous = FULL")
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                    if version > SCHEMA_VERSION:
                        raise RegistryError(f"{self.root / DB_FILE} has schema version {version}; this jaxclf "
                                            f"reads up to {SCHEMA_VERSION}; upgrade jaxclf")
                    if version < SCHEMA_VERSION:  # one transaction; racing initialisers queue on the lock
                        db.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\n"
                                         f"COMMIT;")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise RegistryError(f"cannot open the registry index {self.root / DB_FILE}: {e}") from e
                time.sleep(0.05)

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with contextlib.closing(self._connect()) as db:
            db.execute("BEGIN")  # one consistent snapshot for everything read in the block
            try:
                yield db
            finally:
                db.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; IMMEDIATE takes the write lock at once, so concurrent writers queue up."""
        with contextlib.closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _log(self, db: sqlite3.Connection, action: str, name: str, version: int | None = None,
             alias: str | None = None, **details: Any) -> None:
        db.execute("INSERT INTO events (time, user, action, name, version, alias, details) VALUES (?,?,?,?,?,?,?)",
                   (_now(), self.user, action, name, version, alias, json.dumps(details, sort_keys=True)))

    def _row_to_version(self, row: sqlite3.Row) -> ModelVersion:
        return ModelVersion(row["name"], row["version"], self.version_dir(row["name"], row["version"]),
                            row["content_hash"], json.loads(row["files"]), row["created_at"], row["creator"],
                            row["description"], json.loads(row["tags"]), row["parent"], json.loads(row["metadata"]))

    def version_dir(self, name: str, version: int) -> Path:
        return self.models_dir / name / f"v{version}"

    # --- looking things up -----------------------------------------------------------------------

    def _lookup(self, db: sqlite3.Connection, ref: Ref) -> ModelVersion:
        if not db.execute("SELECT 1 FROM models WHERE name = ?", (ref.name,)).fetchone():
            raise NotFoundError(f"no model named {ref.name!r} in the registry at {self.root}")
        if ref.version is not None:
            version = ref.version
        elif ref.alias in (None, "latest"):
            row = db.execute("SELECT max(version) FROM versions WHERE name = ?", (ref.name,)).fetchone()
            if row[0] is None:
                raise NotFoundError(f"model {ref.name!r} has no versions left")
            version = row[0]
        else:
            row = db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?",
                             (ref.name, ref.alias)).fetchone()
            if row is None:
                known = [r[0] for r in db.execute("SELECT alias FROM aliases WHERE name = ? ORDER BY alias",
                                                  (ref.name,))]
                raise NotFoundError(f"model {ref.name!r} has no alias {ref.alias!r}; its aliases: "
                                    f"{', '.join(known) or 'none'}")
            version = row[0]
        row = db.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (ref.name, version)).fetchone()
        if row is None:
            raise NotFoundError(f"{version_ref(ref.name, version)} does not exist (never registered, or deleted)")
        return self._row_to_version(row)

    def get(self, ref: str | Ref) -> ModelVersion:
        """The version a reference names (NAME means NAME@latest), without checking its files."""
        ref = ref if isinstance(ref, Ref) else Ref.parse(ref)
        with self._read() as db:
            return self._lookup(db, ref)

    def resolve(self, ref: str | Ref) -> Path:
        """The stored copy of the version `ref` names, after checking its files against the recorded hash."""
        return self.checked(ref).path

    def checked(self, ref: str | Ref) -> ModelVersion:
        """`get(ref)`, then `verify` it; raises TamperedVersionError if its files changed."""
        version = self.get(ref)
        self.verify(version)
        return version

    def verify(self, version: ModelVersion, use_cache: bool = True) -> None:
        """Check a version's files against its recorded hashes.

        A full re-hash is skipped when every file's size, mtime, ctime and inode are what they were at
        the last successful check in this process: a write to a file changes its ctime, which no user
        can set back. use_cache=False always re-hashes.
        """
        d = version.path
        if not d.is_dir():
            raise TamperedVersionError(f"{version.ref}: its directory {d} is missing")
        present = {p.name: p for p in d.iterdir()}
        extra = sorted(set(present) - set(version.files))
        missing = sorted(set(version.files) - set(present))
        links = sorted(n for n, p in present.items() if p.is_symlink() or not p.is_file())
        if extra or missing or links:
            problems = [f"unexpected {', '.join(extra)}" if extra else "", f"missing {', '.join(missing)}"
                        if missing else "", f"not a plain file: {', '.join(links)}" if links else ""]
            raise TamperedVersionError(f"{version.ref} in {d} was modified after registration: "
                                       f"{'; '.join(p for p in problems if p)}")
        stats = tuple((n, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)
                      for n in sorted(present) for s in [present[n].stat()])
        if use_cache and self._verified.get(d) == (version.content_hash, stats):
            return
        for name, expected in sorted(version.files.items()):
            actual = file_sha256(d / name)
            if actual != expected:
                raise TamperedVersionError(f"{version.ref}: {d / name} was modified after registration (sha256 "
                                           f"{actual[:16]}..., recorded {expected[:16]}...); refusing to use "
                                           f"it. Re-register the model from its source")
        if manifest_hash(version.files) != version.content_hash:
            raise TamperedVersionError(f"{version.ref}: the recorded file hashes do not add up to its content hash "
                                       f"{version.content_hash[:16]}...; the index was edited")
        self._verified[d] = (version.content_hash, stats)

    def names(self) -> list[str]:
        with self._read() as db:
            return [r[0] for r in db.execute("SELECT name FROM models ORDER BY name")]

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (of one model, or of all), oldest first."""
        with self._read() as db:
            if name is None:
                rows = db.execute("SELECT * FROM versions ORDER BY name, version")
            else:
                check_name(name)
                if not db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone():
                    raise NotFoundError(f"no model named {name!r} in the registry at {self.root}")
                rows = db.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,))
            return [self._row_to_version(r) for r in rows]

    def aliases(self, name: str) -> dict[str, dict[str, Any]]:
        """alias -> {"version", "previous", "updated_at", "updated_by"} of one model."""
        check_name(name)
        with self._read() as db:
            return {r["alias"]: {"version": r["version"], "previous": r["previous"], "updated_at": r["updated_at"],
                                 "updated_by": r["updated_by"]}
                    for r in db.execute("SELECT * FROM aliases WHERE name = ? ORDER BY alias", (name,))}

    def history(self, name: str) -> list[Event]:
        """The audit log of one model, oldest first."""
        check_name(name)
        with self._read() as db:
            rows = db.execute("SELECT * FROM events WHERE name = ? ORDER BY id", (name,)).fetchall()
        if not rows and name not in self.names():
            raise NotFoundError(f"no model named {name!r} in the registry at {self.root}")
        return [Event(r["id"], r["time"], r["user"], r["action"], r["name"], r["version"], r["alias"],
                      json.loads(r["details"])) for r in rows]

    def lineage(self, ref: str | Ref) -> list[str]:
        """The version and its ancestors, newest first, following `parent` (stops at a deleted one)."""
        chain, seen = [], set()
        current: str | None = str(self.get(ref).ref)
        while current and current not in seen:
            seen.add(current)
            chain.append(current)
            try:
                current = self.get(current).parent
            except NotFoundError:
                break
        return chain

    def find_by_hash(self, digest: str) -> list[ModelVersion]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM versions WHERE content_hash = ? ORDER BY created_at, name, version",
                              (digest,))
            return [self._row_to_version(r) for r in rows]

    # --- work directories and clean-up ------------------------------------------------------------

    @contextlib.contextmanager
    def _work_dir(self, kind: str) -> Iterator[Path]:
        """A fresh directory under tmp/, held with an flock so clean-up leaves it alone while we live."""
        token = f"{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        lock_path = self.tmp_dir / f"{token}.lock"
        # Lock under a temporary name, then rename: a lock file under its final name is always held
        # by a live process or by nobody, never seen unlocked between creation and flock.
        staging = self.tmp_dir / f".{token}.locking"
        fd = os.open(staging, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        work = self.tmp_dir / token
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(staging, lock_path)
            work.mkdir()
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
            for p in (lock_path, staging):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            os.close(fd)

    def _discard(self, path: Path) -> None:
        """Move a directory into tmp/ (atomically out of sight), then delete it."""
        trash = self.tmp_dir / f"trash-{uuid.uuid4().hex[:12]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def gc(self) -> list[str]:
        """Remove what crashed operations left behind; returns what was removed (paths relative to root)."""
        removed = []
        live: set[str] = set()
        stale_staging = [p for p in self.tmp_dir.glob(".*.locking")
                         if _age_s(p) > 60]  # younger ones may be between creation and flock
        for lock in list(self.tmp_dir.glob("*.lock")) + stale_staging:
            token = lock.name.removesuffix(".lock").removeprefix(".").removesuffix(".locking")
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    live.add(token)  # its process is still working
                    continue
                shutil.rmtree(self.tmp_dir / token, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                removed.append(f"tmp/{token}")
            finally:
                os.close(fd)
        for entry in self.tmp_dir.iterdir():
            if entry.is_dir() and entry.name not in live and not (self.tmp_dir / f"{entry.name}.lock").exists():
                shutil.rmtree(entry, ignore_errors=True)  # trash, or work whose lock is gone
                removed.append(f"tmp/{entry.name}")
        # Version directories whose transaction never committed: checked under the write lock, which
        # every rename into models/ holds, so none of these can be in the middle of registering.
        with self._write() as db:
            known = {(r[0], r[1]) for r in db.execute("SELECT name, version FROM versions")}
            for model in self.models_dir.iterdir() if self.models_dir.is_dir() else ():
                for d in model.iterdir() if model.is_dir() else ():
                    m = re.fullmatch(r"v([0-9]+)", d.name)
                    if m and (model.name, int(m.group(1))) not in known:
                        self._discard(d)
                        removed.append(f"models/{model.name}/{d.name}")
        return removed

    # --- registering -----------------------------------------------------------------------------

    def register(self, source_dir: str | os.PathLike, name: str, description: str = "",
                 tags: Mapping[str, str] | None = None, parent: str | None = None) -> ModelVersion:
        """Copy a model directory in as the next version of `name`; returns it.

        parent: NAME@VERSION this model was derived from; by default the registered version whose
        content matches the model directory named by metrics.json's training_config.init_from.
        """
        check_name(name)
        tags = check_tags(tags)
        description = check_description(description)
        src = Path(source_dir)
        try:
            model_dir.read_config(model_dir.check_files(src))
            metrics = self._read_metrics(src)
        except model_dir.ModelDirectoryError as e:
            raise RegistryError(f"cannot register {src}: {e}") from None
        parent_version, parent_source = self._parent_of(metrics, parent)
        config = json.loads((src / model_dir.CONFIG_FILE).read_text(encoding="utf-8"))
        metadata = {"metrics": metrics, "config": config, "data_fingerprint": data_fingerprint(metrics),
                    "code_commit": git_commit(), "source": str(src.resolve()), "parent_source": parent_source,
                    "parent_content_hash": parent_version.content_hash if parent_version else None}
        parent_ref = parent_version.ref if parent_version else None
        self._collect_garbage()
        with self._work_dir("register") as work:
            staged = work / "model"
            staged.mkdir()
            files = {f: _copy_hashed(src / f, staged / f) for f in model_files(src)}
            return self._commit(staged, name, files, description, tags, parent_ref, metadata, "register")

    def _read_metrics(self, src: Path) -> dict[str, Any]:
        path = src / model_dir.METRICS_FILE
        if not path.is_file():
            return {}
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise model_dir.ModelDirectoryError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(metrics, dict):
            raise model_dir.ModelDirectoryError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
        return metrics

    def _parent_of(self, metrics: Mapping[str, Any], explicit: str | None
                   ) -> tuple[ModelVersion | None, str | None]:
        """(parent version, how it was found: "explicit" or "init_from") or (None, None)."""
        if explicit:
            return self.get(Ref.parse(explicit)), "explicit"
        init_from = (metrics.get("training_config") or {}).get("init_from")
        if not isinstance(init_from, str) or not init_from:
            return None, None
        try:
            digest = content_hash(init_from)
        except (model_dir.ModelDirectoryError, OSError):
            return None, None  # the directory it was fine-tuned from is not here any more
        matches = self.find_by_hash(digest)
        return (matches[0], "init_from") if matches else (None, None)

    def _commit(self, staged: Path, name: str, files: dict[str, str], description: str, tags: dict[str, str],
                parent: str | None, metadata: dict[str, Any], action: str) -> ModelVersion:
        """Allocate the version number, rename the staged copy into place and record it: one transaction."""
        digest = manifest_hash(files)
        _fsync_dir(staged)
        created, target = _now(), None
        with self._write() as db:
            row = db.execute("SELECT next_version FROM models WHERE name = ?", (name,)).fetchone()
            version = row[0] if row else 1
            if row is None:
                db.execute("INSERT INTO models (name, next_version, created_at) VALUES (?, ?, ?)",
                           (name, 2, created))
            else:
                db.execute("UPDATE models SET next_version = ? WHERE name = ?", (version + 1, name))
            target = self.version_dir(name, version)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # left by a crash between rename and commit: unreferenced, we hold the lock
                self._discard(target)
            os.rename(staged, target)
            try:
                _fsync_dir(target.parent)
                db.execute("INSERT INTO versions (name, version, content_hash, files, created_at, creator, "
                           "description, tags, parent, metadata) VALUES (?,?,?,?,?,?,?,?,?,?)",
                           (name, version, digest, json.dumps(files, sort_keys=True), created, self.user,
                            description, json.dumps(tags, sort_keys=True), parent,
                            json.dumps(metadata, sort_keys=True)))
                self._log(db, action, name, version, content_hash=digest, parent=parent, tags=tags,
                          description=description)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rename(target, staged)  # leave models/ as it was; the work dir is cleaned up
                raise
        return self.get(Ref(name, version=version))

    def _collect_garbage(self) -> None:
        try:
            self.gc()
        except (OSError, sqlite3.Error, RegistryError):
            pass  # clean-up is best effort; it must never stop a registration

    # --- aliases ---------------------------------------------------------------------------------

    def set_alias(self, name: str, version: str | int, alias: str, action: str = "alias") -> ModelVersion:
        """Point `alias` at a version (v3, 3, or another alias's target); the old target is remembered."""
        check_name(name)
        check_alias(alias)
        selector = f"v{version}" if isinstance(version, int) else str(version)
        ref = Ref.parse(f"{name}@{selector}")
        with self._write() as db:
            target = self._lookup(db, ref)
            row = db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
            previous = row[0] if row else None
            if previous == target.version:
                return target  # already there: nothing to record
            db.execute("INSERT INTO aliases (name, alias, version, previous, updated_at, updated_by) "
                       "VALUES (?,?,?,?,?,?) ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, "
                       "previous = excluded.previous, updated_at = excluded.updated_at, "
                       "updated_by = excluded.updated_by",
                       (name, alias, target.version, previous, _now(), self.user))
            self._log(db, action, name, target.version, alias, previous=previous)
        return target

    def promote(self, name: str, version: str | int, to: str) -> ModelVersion:
        return self.set_alias(name, version, to, action="promote")

    def rollback(self, name: str, alias: str) -> ModelVersion:
        """Move `alias` back to its previous target (a second rollback undoes the first)."""
        check_name(name)
        check_alias(alias)
        with self._write() as db:
            row = db.execute("SELECT version, previous FROM aliases WHERE name = ? AND alias = ?",
                             (name, alias)).fetchone()
            if row is None:
                raise NotFoundError(f"model {name!r} has no alias {alias!r}")
            current, previous = row
            if previous is None:
                raise ConflictError(f"{name}@{alias} has never moved (it points at v{current}); nothing to roll "
                                    f"back to. Use 'promote' to point it somewhere else")
            target = self._lookup(db, Ref(name, version=previous))  # NotFoundError if v{previous} was deleted
            db.execute("UPDATE aliases SET version = ?, previous = ?, updated_at = ?, updated_by = ? "
                       "WHERE name = ? AND alias = ?", (previous, current, _now(), self.user, name, alias))
            self._log(db, "rollback", name, previous, alias, previous=current)
        return target

    # --- deleting --------------------------------------------------------------------------------

    def delete(self, ref: str) -> ModelVersion:
        """Delete one version (NAME@vN); refused while an alias points at it."""
        parsed = Ref.parse(ref, default_alias=None)
        if parsed.version is None:
            raise InvalidNameError(f"delete takes an exact version like {parsed.name}@v3, got {ref!r}; aliases "
                                   f"move, versions are deleted")
        with self._write() as db:
            version = self._lookup(db, parsed)
            holders = [r[0] for r in db.execute("SELECT alias FROM aliases WHERE name = ? AND version = ? "
                                                "ORDER BY alias", (parsed.name, parsed.version))]
            if holders:
                raise ConflictError(f"{version.ref} is the target of alias(es) {', '.join(holders)}; move them "
                                    f"first (promote/rollback), then delete")
            db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (parsed.name, parsed.version))
            self._log(db, "delete", parsed.name, parsed.version, content_hash=version.content_hash)
        # After the commit: were we to crash before this, gc removes the unreferenced directory.
        with contextlib.suppress(FileNotFoundError):
            self._discard(version.path)
        self._verified.pop(version.path, None)
        return version

    # --- export / import -------------------------------------------------------------------------

    def export(self, ref: str, archive: str | os.PathLike) -> Path:
        """Write one version (files + recorded metadata) to a .tar.gz, after checking its hash."""
        version = self.checked(ref)
        out = Path(archive)
        out.parent.mkdir(parents=True, exist_ok=True)
        manifest = {"format": EXPORT_FORMAT, "format_version": 1, **version.to_dict()}
        del manifest["path"]
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with tarfile.open(tmp, "w:gz") as tar:
                data = json.dumps(manifest, indent=2, sort_keys=True).encode()
                info = tarfile.TarInfo(EXPORT_MANIFEST)
                info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
                tar.addfile(info, fileobj=io.BytesIO(data))
                for name in sorted(version.files):
                    info = tar.gettarinfo(str(version.path / name), arcname=f"model/{name}")
                    info.mode, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, "", ""
                    with open(version.path / name, "rb") as f:
                        tar.addfile(info, f)
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return out

    def import_archive(self, archive: str | os.PathLike, name: str | None = None) -> ModelVersion:
        """Register the version in an export archive as the next version of its name (or `name`)."""
        path = Path(archive)
        if not path.is_file():
            raise NotFoundError(f"archive {path} does not exist")
        self._collect_garbage()
        with self._work_dir("import") as work:
            staged = work / "model"
            staged.mkdir()
            manifest, files = _extract_export(path, staged)
            target_name = check_name(name or manifest.get("name"))
            recorded = manifest.get("files")
            if not isinstance(recorded, dict) or set(recorded) != set(files):
                raise TamperedVersionError(f"{path}: the archive's files {sorted(files)} do not match its manifest "
                                           f"{sorted(recorded or {})}")
            for f, digest in sorted(files.items()):
                if recorded[f] != digest:
                    raise TamperedVersionError(f"{path}: model/{f} does not match the hash in the manifest (sha256 "
                                               f"{digest[:16]}..., recorded {str(recorded[f])[:16]}...)")
            if manifest_hash(files) != manifest.get("content_hash"):
                raise TamperedVersionError(f"{path}: the files do not add up to the content hash in the manifest")
            try:
                model_dir.read_config(staged)
            except model_dir.ModelDirectoryError as e:
                raise RegistryError(f"{path}: the archived model is not valid: {e}") from None
            parent = None
            parent_hash = manifest.get("parent_content_hash")
            if isinstance(parent_hash, str):
                matches = self.find_by_hash(parent_hash)
                parent = matches[0].ref if matches else None
            keep = ("metrics", "config", "data_fingerprint", "code_commit", "source")
            metadata = {k: manifest.get(k) for k in keep}
            metadata.update(parent_source="import" if parent else None, parent_content_hash=parent_hash,
                            imported_from={"ref": manifest.get("ref"), "created_at": manifest.get("created_at"),
                                           "creator": manifest.get("creator"), "parent": manifest.get("parent"),
                                           "archive": str(path.resolve())})
            return self._commit(staged, target_name, files, check_description(manifest.get("description") or ""),
                                check_tags(manifest.get("tags") or {}), parent, metadata, "import")


def _extract_export(archive: Path, dest: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(manifest, {file: sha256}) of an export archive, its model files written into dest.

    Member by member, never tarfile.extractall: only the manifest and model/<model file> as plain
    files are accepted; absolute paths, '..', links, devices and anything else are refused.
    """
    manifest: dict[str, Any] | None = None
    files: dict[str, str] = {}
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise UnsafeArchiveError(f"{archive} is not a readable tar archive: {e}") from None
    with tar:
        try:
            for member in tar:
                path = PurePosixPath(member.name)
                if member.name.startswith(("/", "\\")) or path.is_absolute() or re.match(r"^[A-Za-z]:", member.name):
                    raise UnsafeArchiveError(f"{archive}: member {member.name!r} has an absolute path; refused")
                if ".." in path.parts or "\\" in member.name:
                    raise UnsafeArchiveError(f"{archive}: member {member.name!r} leaves the archive's directory; "
                                             f"refused")
                if member.issym() or member.islnk():
                    raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a link (to "
                                             f"{member.linkname!r}); refused")
                parts = tuple(p for p in path.parts if p != ".")
                if member.isdir() and parts in ((), ("model",)):
                    continue
                if not member.isfile():
                    raise UnsafeArchiveError(f"{archive}: member {member.name!r} is not a plain file; refused")
                if parts == (EXPORT_MANIFEST,):
                    if member.size > 64 << 20:
                        raise UnsafeArchiveError(f"{archive}: manifest of {member.size} bytes is implausibly large")
                    try:
                        manifest = json.loads(tar.extractfile(member).read().decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise UnsafeArchiveError(f"{archive}: {EXPORT_MANIFEST} is not valid JSON: {e}") from None
                elif len(parts) == 2 and parts[0] == "model" and parts[1] in MODEL_FILES:
                    if parts[1] in files:
                        raise UnsafeArchiveError(f"{archive}: model/{parts[1]} appears twice")
                    h = hashlib.sha256()
                    source = tar.extractfile(member)
                    with open(dest / parts[1], "xb") as out:
                        for chunk in iter(lambda: source.read(_CHUNK), b""):
                            out.write(chunk)
                            h.update(chunk)
                        out.flush()
                        os.fsync(out.fileno())
                    os.chmod(dest / parts[1], 0o444)
                    files[parts[1]] = h.hexdigest()
                else:
                    raise UnsafeArchiveError(f"{archive}: unexpected member {member.name!r}; an export holds "
                                             f"{EXPORT_MANIFEST} and model/{{{','.join(MODEL_FILES)}}} only")
        except (tarfile.TarError, EOFError, OSError) as e:  # truncated or corrupt gzip/tar
            raise UnsafeArchiveError(f"{archive} is damaged: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise UnsafeArchiveError(f"{archive}: not a jaxclf registry export (no {EXPORT_MANIFEST} with "
                                 f"\"format\": \"{EXPORT_FORMAT}\")")
    return manifest, files

