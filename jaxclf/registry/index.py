"""The registry's index: one SQLite database of models, versions, aliases and the audit log.

Every call opens its own connection, so one Index is safe to share between threads, and any
number of processes may share the database file. Reads run in one snapshot (`read`); writes take
the write lock at once (`write`, BEGIN IMMEDIATE), so concurrent writers queue up rather than fail.
The audit log is append-only: triggers refuse any UPDATE or DELETE on it.

Journal mode DELETE (a rollback journal), not WAL, so that the database can be read from a
read-only directory (a replica's read-only mount of the registry): a reader opens it with
`mode=ro` and needs no file beside it, and sees every commit at its next transaction, so a
server's reload follows an alias that a writer moved. A WAL database cannot be opened there
unless its -wal and -shm files happen to exist (SQLite removes them when the last writer closes),
and `immutable=1` would never see a change. The price: a writer's commit waits for readers'
snapshots to end (milliseconds here; busy_timeout covers it). Writers convert a WAL database
made by an older jaxclf on open. A read-only Index never writes: no schema, no pragma that
persists, no journal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

from jaxclf.registry.errors import NotFoundError, RegistryError
from jaxclf.registry.names import Ref, version_ref
from jaxclf.registry.provenance import utc_now

DB_FILE = "registry.db"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another writer's transaction
JOURNAL_MODE = "delete"  # readable from a read-only directory; see the module docstring
_WAL_HEADER_OFFSET = 18  # bytes 18-19 of a SQLite file: 1 = rollback journal, 2 = WAL

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

    @classmethod
    def from_row(cls, row: sqlite3.Row, path: Path) -> "ModelVersion":
        return cls(row["name"], row["version"], path, row["content_hash"], json.loads(row["files"]),
                   row["created_at"], row["creator"], row["description"], json.loads(row["tags"]), row["parent"],
                   json.loads(row["metadata"]))


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

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Event":
        return cls(row["id"], row["time"], row["user"], row["action"], row["name"], row["version"], row["alias"],
                   json.loads(row["details"]))


class Index:
    """The database file at `path`, created (or checked) on construction; read_only: opened `mode=ro`."""

    def __init__(self, path: Path, read_only: bool = False):
        self.path = path
        self.read_only = read_only
        if read_only:
            self._check_readable()
        else:
            self._init_db()

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            db = sqlite3.connect(f"file:{urllib.parse.quote(str(self.path))}?mode=ro", uri=True,
                                 timeout=BUSY_TIMEOUT_S, isolation_level=None)
        else:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.execute("PRAGMA synchronous = FULL")  # per connection: every commit is on disk when it returns
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        db.execute("PRAGMA foreign_keys = ON")
        db.row_factory = sqlite3.Row
        return db

    def _check_schema(self, db: sqlite3.Connection) -> int:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(f"{self.path} has schema version {version}; this jaxclf reads up to "
                                f"{SCHEMA_VERSION}; upgrade jaxclf")
        return version

    def _check_readable(self) -> None:
        try:
            with contextlib.closing(self._connect()) as db:
                if self._check_schema(db) < SCHEMA_VERSION:
                    raise RegistryError(f"{self.path} holds no registry schema yet; open it writable once "
                                        f"(e.g. register a model) before reading it read-only")
        except sqlite3.Error as e:
            hint = ""
            if self._is_wal():
                hint = ("; it is in WAL mode (made by an older jaxclf), which SQLite cannot read from a read-only "
                        "directory: run any `jaxclf registry` command on it once with write access to convert it")
            raise RegistryError(f"cannot open the registry index {self.path} read-only: {e}{hint}") from None

    def _is_wal(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(_WAL_HEADER_OFFSET)
                return f.read(1) == b"\x02"
        except OSError:
            return False

    def _init_db(self) -> None:
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:  # a journal-mode change takes an exclusive lock the busy handler does not always wait for
            try:
                with contextlib.closing(self._connect()) as db:
                    mode = db.execute(f"PRAGMA journal_mode = {JOURNAL_MODE}").fetchone()[0].lower()
                    if mode != JOURNAL_MODE:
                        raise RegistryError(f"{self.path}: SQLite cannot use journal mode {JOURNAL_MODE} here "
                                            f"(got {mode}); keep the registry on a local filesystem")
                    if self._check_schema(db) < SCHEMA_VERSION:  # one transaction; racing initialisers queue
                        db.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\n"
                                         f"COMMIT;")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise RegistryError(f"cannot open the registry index {self.path}: {e}") from e
                time.sleep(0.05)

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        try:
            with contextlib.closing(self._connect()) as db:
                db.execute(begin)
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
        except sqlite3.OperationalError as e:  # locked past the timeout, a vanished file, a hot journal
            hint = ""
            if self.read_only and "readonly" in str(e):
                hint = ("; a writer was interrupted mid-transaction and its journal needs rolling back: open the "
                        "registry once with write access")
            raise RegistryError(f"registry index {self.path}: {e}{hint}") from None

    def read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for everything read in the block."""
        return self._transaction("BEGIN")

    def write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction; IMMEDIATE takes the write lock at once, so concurrent writers queue up."""
        return self._transaction("BEGIN IMMEDIATE")

    # --- rows: each takes the connection of the transaction it belongs to -------------------------

    @staticmethod
    def log(db: sqlite3.Connection, user: str, action: str, name: str, version: int | None = None,
            alias: str | None = None, **details: Any) -> None:
        db.execute("INSERT INTO events (time, user, action, name, version, alias, details) VALUES (?,?,?,?,?,?,?)",
                   (utc_now(), user, action, name, version, alias, json.dumps(details, sort_keys=True)))

    @staticmethod
    def has_model(db: sqlite3.Connection, name: str) -> bool:
        return db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone() is not None

    def lookup(self, db: sqlite3.Connection, ref: Ref) -> sqlite3.Row:
        """The versions row `ref` names: an exact version, the latest one, or an alias's target."""
        if not self.has_model(db, ref.name):
            raise NotFoundError(f"no model named {ref.name!r} in the registry at {self.path.parent}")
        if ref.version is not None:
            version = ref.version
        elif ref.alias in (None, "latest"):
            version = db.execute("SELECT max(version) FROM versions WHERE name = ?", (ref.name,)).fetchone()[0]
            if version is None:
                raise NotFoundError(f"model {ref.name!r} has no versions left")
        else:
            target = self.alias_target(db, ref.name, ref.alias)
            if target is None:
                known = list(self.aliases(db, ref.name))
                raise NotFoundError(f"model {ref.name!r} has no alias {ref.alias!r}; its aliases: "
                                    f"{', '.join(known) or 'none'}")
            version = target[0]
        row = db.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (ref.name, version)).fetchone()
        if row is None:
            raise NotFoundError(f"{version_ref(ref.name, version)} does not exist (never registered, or deleted)")
        return row

    @staticmethod
    def version_rows(db: sqlite3.Connection, name: str | None = None) -> list[sqlite3.Row]:
        """Every version row (of one model, or of all), oldest first."""
        if name is None:
            return db.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
        return db.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()

    @staticmethod
    def rows_with_hash(db: sqlite3.Connection, digest: str) -> list[sqlite3.Row]:
        return db.execute("SELECT * FROM versions WHERE content_hash = ? ORDER BY created_at, name, version",
                          (digest,)).fetchall()

    @staticmethod
    def names(db: sqlite3.Connection) -> list[str]:
        return [r[0] for r in db.execute("SELECT name FROM models ORDER BY name")]

    @staticmethod
    def event_rows(db: sqlite3.Connection, name: str) -> list[sqlite3.Row]:
        return db.execute("SELECT * FROM events WHERE name = ? ORDER BY id", (name,)).fetchall()

    @staticmethod
    def allocate_version(db: sqlite3.Connection, name: str, created_at: str) -> int:
        """The next version number of `name` (creating the model), never handed out again."""
        row = db.execute("SELECT next_version FROM models WHERE name = ?", (name,)).fetchone()
        version = row[0] if row else 1
        if row is None:
            db.execute("INSERT INTO models (name, next_version, created_at) VALUES (?, ?, ?)", (name, 2, created_at))
        else:
            db.execute("UPDATE models SET next_version = ? WHERE name = ?", (version + 1, name))
        return version

    @staticmethod
    def insert_version(db: sqlite3.Connection, name: str, version: int, files: dict[str, str], digest: str,
                       created_at: str, creator: str, description: str, tags: dict[str, str],
                       parent: str | None, metadata: dict[str, Any]) -> None:
        db.execute("INSERT INTO versions (name, version, content_hash, files, created_at, creator, description, "
                   "tags, parent, metadata) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (name, version, digest, json.dumps(files, sort_keys=True), created_at, creator, description,
                    json.dumps(tags, sort_keys=True), parent, json.dumps(metadata, sort_keys=True)))

    @staticmethod
    def delete_version(db: sqlite3.Connection, name: str, version: int) -> None:
        db.execute("DELETE FROM versions WHERE name = ? AND version = ?", (name, version))

    @staticmethod
    def aliases(db: sqlite3.Connection, name: str) -> dict[str, sqlite3.Row]:
        """alias -> its row (version, previous, updated_at, updated_by), sorted by alias."""
        return {r["alias"]: r for r in db.execute("SELECT * FROM aliases WHERE name = ? ORDER BY alias", (name,))}

    @staticmethod
    def alias_target(db: sqlite3.Connection, name: str, alias: str) -> tuple[int, int | None] | None:
        """(version, previous version) an alias points at, or None when there is no such alias."""
        row = db.execute("SELECT version, previous FROM aliases WHERE name = ? AND alias = ?",
                         (name, alias)).fetchone()
        return (row[0], row[1]) if row else None

    @staticmethod
    def point_alias(db: sqlite3.Connection, name: str, alias: str, version: int, previous: int | None,
                    user: str) -> None:
        """Create or move an alias, remembering `previous` for a rollback."""
        db.execute("INSERT INTO aliases (name, alias, version, previous, updated_at, updated_by) "
                   "VALUES (?,?,?,?,?,?) ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, "
                   "previous = excluded.previous, updated_at = excluded.updated_at, "
                   "updated_by = excluded.updated_by",
                   (name, alias, version, previous, utc_now(), user))
