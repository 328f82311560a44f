"""The registry's files: hashed read-only copies under models/NAME/vN/, work directories under tmp/.

A copy is written by one function, `write_hashed`, whether its bytes come from a model directory
(register) or from an export archive (import): it hashes what it writes, fsyncs it and makes it
read-only. Each work directory in tmp/ is guarded by a lock file its process holds with flock(2),
so clean-up never removes the work of a process that is still running.

Test hook: JAXCLF_REGISTRY_TEST_COPY_DELAY_S=<seconds> sleeps that long after each chunk written
into a new version, so a test can kill a registration half way (tests/test_registry.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping

from jaxclf import model_dir
from jaxclf.registry.errors import RegistryError, TamperedVersionError

MODEL_FILES = (*model_dir.REQUIRED_FILES, model_dir.METRICS_FILE)  # what a version holds
COPY_DELAY_ENV = "JAXCLF_REGISTRY_TEST_COPY_DELAY_S"
CHUNK_BYTES = 1 << 20
STALE_LOCKING_S = 60.0  # a lock file younger than this may be between its creation and its flock


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
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


def write_hashed(source: BinaryIO, destination: Path) -> str:
    """Copy a stream into a new file, fsync it, make it read-only; returns the sha256 of the bytes written."""
    delay = _copy_delay()
    h = hashlib.sha256()
    with open(destination, "xb") as out:
        for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
            out.write(chunk)
            h.update(chunk)
            if delay:
                time.sleep(delay)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(destination, 0o444)
    return h.hexdigest()


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class Store:
    """models/ and tmp/ under a registry root, and the hashes of the copies this process found intact."""

    def __init__(self, root: Path, create: bool = True):
        self.models_dir = root / "models"
        self.tmp_dir = root / "tmp"
        for d in (self.models_dir, self.tmp_dir) if create else ():  # a read-only registry creates nothing
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RegistryError(f"cannot create {d}: {e.strerror}; open a registry you cannot write with "
                                    f"read_only=True") from None
        self._verified: dict[Path, tuple] = {}  # version dir -> (hash, file stats) last seen intact

    def version_dir(self, name: str, version: int) -> Path:
        return self.models_dir / name / f"v{version}"

    def version_dirs(self) -> Iterator[tuple[str, int, Path]]:
        """(name, version, directory) of every models/NAME/vN directory, registered or not."""
        for model in self.models_dir.iterdir() if self.models_dir.is_dir() else ():
            for d in model.iterdir() if model.is_dir() else ():
                if m := re.fullmatch(r"v([0-9]+)", d.name):
                    yield model.name, int(m.group(1)), d

    def verify(self, ref: str, directory: Path, files: Mapping[str, str], digest: str,
               use_cache: bool = True) -> None:
        """Check a stored copy against its recorded file hashes and content hash.

        A full re-hash is skipped when every file's size, mtime, ctime and inode are what they were at
        the last successful check in this process: a write to a file changes its ctime, which no user
        can set back. use_cache=False always re-hashes.
        """
        if not directory.is_dir():
            raise TamperedVersionError(f"{ref}: its directory {directory} is missing")
        present = {p.name: p for p in directory.iterdir()}
        extra = sorted(set(present) - set(files))
        missing = sorted(set(files) - set(present))
        links = sorted(n for n, p in present.items() if p.is_symlink() or not p.is_file())
        if extra or missing or links:
            problems = [f"unexpected {', '.join(extra)}" if extra else "", f"missing {', '.join(missing)}"
                        if missing else "", f"not a plain file: {', '.join(links)}" if links else ""]
            raise TamperedVersionError(f"{ref} in {directory} was modified after registration: "
                                       f"{'; '.join(p for p in problems if p)}")
        stats = tuple((n, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)
                      for n in sorted(present) for s in [present[n].stat()])
        if use_cache and self._verified.get(directory) == (digest, stats):
            return
        for name, expected in sorted(files.items()):
            actual = file_sha256(directory / name)
            if actual != expected:
                raise TamperedVersionError(f"{ref}: {directory / name} was modified after registration (sha256 "
                                           f"{actual[:16]}..., recorded {expected[:16]}...); refusing to use "
                                           f"it. Re-register the model from its source")
        if manifest_hash(files) != digest:
            raise TamperedVersionError(f"{ref}: the recorded file hashes do not add up to its content hash "
                                       f"{digest[:16]}...; the index was edited")
        self._verified[directory] = (digest, stats)

    @contextlib.contextmanager
    def work_dir(self, kind: str) -> Iterator[Path]:
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

    def discard(self, path: Path) -> None:
        """Move a directory into tmp/ (atomically out of sight), then delete it."""
        trash = self.tmp_dir / f"trash-{uuid.uuid4().hex[:12]}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        self._verified.pop(path, None)

    def collect_work_dirs(self) -> list[str]:
        """Remove the work directories of dead processes and the trash; returns them, relative to the root."""
        removed = []
        live: set[str] = set()
        stale_staging = [p for p in self.tmp_dir.glob(".*.locking") if _age_s(p) > STALE_LOCKING_S]
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
        return removed
