"""The Registry: immutable, hashed copies of model directories, aliases, lineage and an audit log.

    reg = Registry("/srv/jaxclf-registry")
    v = reg.register("runs/default/model", name="sentiment", tags={"data": "2024-06"})  # sentiment@v1
    reg.set_alias("sentiment", "v1", "production")
    reg.resolve("sentiment@production")        # Path of the copy, after checking its hash

Layout of the root (a local directory; SQLite's locking is not reliable on network filesystems):

    registry.db           the index (SQLite): models, versions, aliases, the audit log        (index.py)
    models/NAME/vN/       one immutable copy per version; its files are read-only             (store.py)
    tmp/                  work in progress (registrations being copied, deletions); never read (store.py)

A version is visible exactly when its row is committed, and the row is committed only after its
directory is complete, hashed, fsynced and renamed into place, inside the same write transaction
that allocates the version number. A crash at any point leaves either no version or a whole one;
what it leaves under tmp/ (or an unreferenced directory under models/) is ignored and removed by
a later register or `gc`. Before that commit the staged copy is parsed (contents.py): its config,
its safetensors header, its tokenizer; an import is also bounded in size (archive.ImportLimits).

Read-only: `Registry(root, read_only=True)`, or any root this process cannot write (a replica's
read-only mount), reads without creating or writing anything, and sees what writers commit
meanwhile: a server's reload follows a moved alias. Changes raise ReadOnlyRegistryError.

The copy is staged in a work directory under tmp/ rather than written with
model_dir.atomic_directory beside its target: the target's version number is only known inside
the write transaction, and the (long) copy must not hold the write lock.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Mapping

from jaxclf import model_dir
from jaxclf.registry import archive as archives
from jaxclf.registry.contents import check_version_files
from jaxclf.registry.errors import (ConflictError, InvalidNameError, NotFoundError, ReadOnlyRegistryError,
                                    RegistryError)
from jaxclf.registry.index import DB_FILE, Event, Index, ModelVersion
from jaxclf.registry.names import Ref, check_alias, check_description, check_name, check_tags
from jaxclf.registry.provenance import current_user, data_fingerprint, git_commit, utc_now
from jaxclf.registry.store import Store, content_hash, manifest_hash, model_files, write_hashed


def _cannot_write(root: Path) -> bool:
    """Whether this process cannot write the registry at `root` (a read-only mount, or permissions)."""
    db = root / DB_FILE
    return root.is_dir() and (not os.access(root, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)))


class Registry:
    """A registry rooted at a local directory (created on first use unless create=False).

    read_only: True opens it without ever writing (see the module docstring); None (the default)
    does so when the root cannot be written. Safe to share between threads and processes: every
    call opens its own SQLite connection.
    """

    def __init__(self, root: str | os.PathLike, user: str | None = None, create: bool = True,
                 read_only: bool | None = None):
        self.root = Path(root).expanduser().resolve()
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry root {self.root} exists and is not a directory")
        self.read_only = _cannot_write(self.root) if read_only is None else bool(read_only)
        if (self.read_only or not create) and not (self.root / DB_FILE).is_file():
            raise NotFoundError(f"no registry at {self.root} (no {DB_FILE}); check the path, or register a "
                                f"model there first")
        self.user = user or current_user()
        if not self.read_only:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RegistryError(f"cannot create the registry at {self.root}: {e.strerror}") from None
        self.store = Store(self.root, create=not self.read_only)
        self.index = Index(self.root / DB_FILE, read_only=self.read_only)
        self.models_dir, self.tmp_dir = self.store.models_dir, self.store.tmp_dir

    def _check_writable(self, action: str) -> None:
        if self.read_only:
            raise ReadOnlyRegistryError(f"cannot {action}: the registry at {self.root} is open read-only")

    def version_dir(self, name: str, version: int) -> Path:
        return self.store.version_dir(name, version)

    def _version(self, row: sqlite3.Row) -> ModelVersion:
        return ModelVersion.from_row(row, self.version_dir(row["name"], row["version"]))

    def _check_model(self, db: sqlite3.Connection, name: str) -> None:
        check_name(name)
        if not self.index.has_model(db, name):
            raise NotFoundError(f"no model named {name!r} in the registry at {self.root}")

    # --- looking things up -----------------------------------------------------------------------

    def get(self, ref: str | Ref) -> ModelVersion:
        """The version a reference names (NAME means NAME@latest), without checking its files."""
        ref = ref if isinstance(ref, Ref) else Ref.parse(ref)
        with self.index.read() as db:
            return self._version(self.index.lookup(db, ref))

    def resolve(self, ref: str | Ref) -> Path:
        """The stored copy of the version `ref` names, after checking its files against the recorded hash."""
        return self.checked(ref).path

    def checked(self, ref: str | Ref) -> ModelVersion:
        """`get(ref)`, then `verify` it; raises TamperedVersionError if its files changed."""
        version = self.get(ref)
        self.verify(version)
        return version

    def verify(self, version: ModelVersion, use_cache: bool = True) -> None:
        """Check a version's files against its recorded hashes (use_cache=False: always re-hash)."""
        self.store.verify(version.ref, version.path, version.files, version.content_hash, use_cache=use_cache)

    def names(self) -> list[str]:
        with self.index.read() as db:
            return self.index.names(db)

    def versions(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (of one model, or of all), oldest first."""
        with self.index.read() as db:
            if name is not None:
                self._check_model(db, name)
            return [self._version(r) for r in self.index.version_rows(db, name)]

    def aliases(self, name: str) -> dict[str, dict[str, Any]]:
        """alias -> {"version", "previous", "updated_at", "updated_by"} of one model."""
        check_name(name)
        with self.index.read() as db:
            return {alias: {k: row[k] for k in ("version", "previous", "updated_at", "updated_by")}
                    for alias, row in self.index.aliases(db, name).items()}

    def history(self, name: str) -> list[Event]:
        """The audit log of one model, oldest first."""
        with self.index.read() as db:
            self._check_model(db, name)
            return [Event.from_row(r) for r in self.index.event_rows(db, name)]

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
        with self.index.read() as db:
            return [self._version(r) for r in self.index.rows_with_hash(db, digest)]

    # --- clean-up --------------------------------------------------------------------------------

    def gc(self) -> list[str]:
        """Remove what crashed operations left behind; returns what was removed (paths relative to root)."""
        self._check_writable("clean up")
        removed = self.store.collect_work_dirs()
        # Version directories whose transaction never committed: checked under the write lock, which
        # every rename into models/ holds, so none of these can be in the middle of registering.
        with self.index.write() as db:
            known = {(r["name"], r["version"]) for r in self.index.version_rows(db)}
            for name, version, directory in list(self.store.version_dirs()):
                if (name, version) not in known:
                    self.store.discard(directory)
                    removed.append(f"models/{name}/{directory.name}")
        return removed

    def _collect_garbage(self) -> None:
        try:
            self.gc()
        except (OSError, sqlite3.Error, RegistryError):
            pass  # clean-up is best effort; it must never stop a registration

    # --- registering -----------------------------------------------------------------------------

    def register(self, source_dir: str | os.PathLike, name: str, description: str = "",
                 tags: Mapping[str, str] | None = None, parent: str | None = None,
                 allow_regex_tokenizer: bool = False) -> ModelVersion:
        """Copy a model directory in as the next version of `name`; returns it.

        parent: NAME@VERSION this model was derived from; by default the registered version whose
        content matches the model directory named by metrics.json's training_config.init_from.
        allow_regex_tokenizer: accept a tokenizer with regex steps (see model_dir.check_tokenizer_regex).
        """
        self._check_writable(f"register {source_dir}")
        check_name(name)
        tags = check_tags(tags)
        description = check_description(description)
        src = Path(source_dir)
        try:  # a quick look before a long copy; the copy itself is checked below
            model_dir.read_config(model_dir.check_files(src))
        except model_dir.ModelDirectoryError as e:
            raise RegistryError(f"cannot register {src}: {e}") from None
        explicit_parent = self.get(Ref.parse(parent)) if parent else None
        self._collect_garbage()
        with self.store.work_dir("register") as work:
            staged = work / "model"
            staged.mkdir()
            files = {}
            for f in model_files(src):
                with open(src / f, "rb") as source:
                    files[f] = write_hashed(source, staged / f)
            # checked as copied, so what is committed is what was checked, whatever happens to src meanwhile
            config, metrics = check_version_files(staged, f"cannot register {src}", allow_regex_tokenizer)
            parent_version, parent_source = ((explicit_parent, "explicit") if explicit_parent
                                             else self._parent_from_init(metrics))
            metadata = {"metrics": metrics, "config": config, "data_fingerprint": data_fingerprint(metrics),
                        "code_commit": git_commit(), "source": str(src.resolve()), "parent_source": parent_source,
                        "parent_content_hash": parent_version.content_hash if parent_version else None}
            parent_ref = parent_version.ref if parent_version else None
            return self._commit(staged, name, files, description, tags, parent_ref, metadata, "register")

    def _parent_from_init(self, metrics: Mapping[str, Any]) -> tuple[ModelVersion | None, str | None]:
        """(the version whose content matches metrics.json's training_config.init_from, "init_from"), or
        (None, None)."""
        training = metrics.get("training_config")
        init_from = training.get("init_from") if isinstance(training, Mapping) else None
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
        model_dir.fsync_directory(staged)
        created = utc_now()
        with self.index.write() as db:
            version = self.index.allocate_version(db, name, created)
            target = self.version_dir(name, version)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # left by a crash between rename and commit: unreferenced, we hold the lock
                self.store.discard(target)
            os.rename(staged, target)
            try:
                model_dir.fsync_directory(target.parent)
                self.index.insert_version(db, name, version, files, digest, created, self.user, description, tags,
                                          parent, metadata)
                self.index.log(db, self.user, action, name, version, content_hash=digest, parent=parent, tags=tags,
                               description=description)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rename(target, staged)  # leave models/ as it was; the work dir is cleaned up
                raise
        return self.get(Ref(name, version=version))

    # --- aliases ---------------------------------------------------------------------------------

    def set_alias(self, name: str, version: str | int, alias: str, action: str = "alias") -> ModelVersion:
        """Point `alias` at a version (v3, 3, or another alias's target); the old target is remembered."""
        self._check_writable(f"{action} {name}@{alias}")
        check_name(name)
        check_alias(alias)
        selector = f"v{version}" if isinstance(version, int) else str(version)
        ref = Ref.parse(f"{name}@{selector}")
        with self.index.write() as db:
            target = self._version(self.index.lookup(db, ref))
            current = self.index.alias_target(db, name, alias)
            previous = current[0] if current else None
            if previous == target.version:
                return target  # already there: nothing to record
            self.index.point_alias(db, name, alias, target.version, previous, self.user)
            self.index.log(db, self.user, action, name, target.version, alias, previous=previous)
        return target

    def promote(self, name: str, version: str | int, to: str) -> ModelVersion:
        return self.set_alias(name, version, to, action="promote")

    def rollback(self, name: str, alias: str) -> ModelVersion:
        """Move `alias` back to its previous target (a second rollback undoes the first)."""
        self._check_writable(f"roll back {name}@{alias}")
        check_name(name)
        check_alias(alias)
        with self.index.write() as db:
            found = self.index.alias_target(db, name, alias)
            if found is None:
                raise NotFoundError(f"model {name!r} has no alias {alias!r}")
            current, previous = found
            if previous is None:
                raise ConflictError(f"{name}@{alias} has never moved (it points at v{current}); nothing to roll "
                                    f"back to. Use 'promote' to point it somewhere else")
            # NotFoundError if v{previous} was deleted
            target = self._version(self.index.lookup(db, Ref(name, version=previous)))
            self.index.point_alias(db, name, alias, previous, current, self.user)
            self.index.log(db, self.user, "rollback", name, previous, alias, previous=current)
        return target

    # --- deleting --------------------------------------------------------------------------------

    def delete(self, ref: str) -> ModelVersion:
        """Delete one version (NAME@vN); refused while an alias points at it."""
        self._check_writable(f"delete {ref}")
        parsed = Ref.parse(ref, default_alias=None)
        if parsed.version is None:
            raise InvalidNameError(f"delete takes an exact version like {parsed.name}@v3, got {ref!r}; aliases "
                                   f"move, versions are deleted")
        with self.index.write() as db:
            version = self._version(self.index.lookup(db, parsed))
            holders = [alias for alias, row in self.index.aliases(db, parsed.name).items()
                       if row["version"] == parsed.version]
            if holders:
                raise ConflictError(f"{version.ref} is the target of alias(es) {', '.join(holders)}; move them "
                                    f"first (promote/rollback), then delete")
            self.index.delete_version(db, parsed.name, parsed.version)
            self.index.log(db, self.user, "delete", parsed.name, parsed.version, content_hash=version.content_hash)
        # After the commit: were we to crash before this, gc removes the unreferenced directory.
        with contextlib.suppress(FileNotFoundError):
            self.store.discard(version.path)
        return version

    # --- export / import -------------------------------------------------------------------------

    def export(self, ref: str, archive: str | os.PathLike) -> Path:
        """Write one version (files + recorded metadata) to a .tar.gz, after checking its hash."""
        return archives.write_archive(self.checked(ref), archive)

    def import_archive(self, archive: str | os.PathLike, name: str | None = None,
                       limits: archives.ImportLimits | None = None,
                       allow_regex_tokenizer: bool = False) -> ModelVersion:
        """Register the version in an export archive as the next version of its name (or `name`).

        limits: the sizes the archive may unpack to (archive.ImportLimits; its defaults when None).
        allow_regex_tokenizer: accept a tokenizer with regex steps (see model_dir.check_tokenizer_regex).
        """
        self._check_writable(f"import {archive}")
        path = Path(archive)
        if not path.is_file():
            raise NotFoundError(f"archive {path} does not exist")
        self._collect_garbage()
        with self.store.work_dir("import") as work:
            staged = work / "model"
            staged.mkdir()
            manifest, files = archives.read_archive(path, staged, limits)
            target_name = check_name(name or manifest.get("name"))
            archives.check_contents(path, manifest, files)
            config, metrics = check_version_files(staged, str(path), allow_regex_tokenizer)
            parent = None
            parent_hash = manifest.get("parent_content_hash")
            if isinstance(parent_hash, str):
                matches = self.find_by_hash(parent_hash)
                parent = matches[0].ref if matches else None
            return self._commit(staged, target_name, files, check_description(manifest.get("description") or ""),
                                check_tags(manifest.get("tags")), parent,
                                archives.imported_metadata(path, manifest, parent, config, metrics), "import")
