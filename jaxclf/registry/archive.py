"""Export archives: one version as a .tar.gz (its files and everything recorded about it), and back.

    jaxclf-registry-export.json     {"format": "jaxclf-registry-export", "format_version": 1, ref, files, ...}
    model/config.json, model/model.safetensors, model/tokenizer.json[, model/metrics.json]

Reading is member by member, never tarfile.extractall: only the manifest and model/<model file>
as plain files are accepted; absolute paths, '..', links, devices and sparse files are refused.
An archive's author also writes its manifest, so its hashes prove nothing against a hostile
author: what bounds an import is `ImportLimits`. Every member's size is checked at its header,
before any of its bytes are written: per file, in all, and against the archive's size on disk
(a 0.5 MB gzip of zeros would otherwise become a 512 MiB version). The decompressed stream
itself is capped too, since tarfile reads some headers (pax, GNU long names) into memory whole.
The manifest's fields are type-checked and its nesting bounded before anything is read from it.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import io
import json
import lzma
import os
import re
import tarfile
import time
import uuid
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator

from jaxclf.registry.contents import JSON_FILES, parse_json
from jaxclf.registry.errors import TamperedVersionError, UnsafeArchiveError
from jaxclf.registry.index import ModelVersion
from jaxclf.registry.names import check_tags
from jaxclf.registry.store import MODEL_FILES, manifest_hash, write_hashed

EXPORT_MANIFEST = "jaxclf-registry-export.json"
EXPORT_FORMAT = "jaxclf-registry-export"
EXPORT_FORMAT_VERSION = 1
EXPANSION_FLOOR_BYTES = 16 << 20  # any archive may expand this far, whatever its ratio (small models, JSON)
TAR_SLACK_BYTES = 1 << 20  # tar headers, pax records and padding, on top of the members' own sizes
# what an import keeps of the exporter's record, besides files, description and tags (metrics and
# config are read from the version's own files instead: the manifest could say anything)
IMPORTED_METADATA = ("data_fingerprint", "code_commit", "source")
# The manifest fields import reads: field -> (JSON type, required). An optional field may also be null.
MANIFEST_FIELDS: dict[str, tuple[type, bool]] = {
    "format": (str, True), "format_version": (int, True), "files": (dict, True), "content_hash": (str, True),
    "name": (str, False), "ref": (str, False), "version": (int, False), "created_at": (str, False),
    "creator": (str, False), "description": (str, False), "tags": (dict, False), "parent": (str, False),
    "parent_content_hash": (str, False), "metrics": (dict, False), "config": (dict, False),
    "data_fingerprint": (dict, False), "code_commit": (str, False), "source": (str, False),
}
_JSON_TYPE_NAMES = {dict: "a JSON object", list: "an array", str: "a string", int: "an integer",
                    float: "a number", bool: "a boolean", type(None): "null"}


@dataclasses.dataclass(frozen=True)
class ImportLimits:
    """What an import accepts; anything over a limit refuses the archive before its bytes are written.

    The defaults take a float32 BERT-large (1.3 GB) with room to spare; lower them where archives come
    from people you do not trust, raise them for bigger models (`jaxclf registry import --max-...`).
    """

    max_member_bytes: int = 4 << 30  # one file of the version (model.safetensors is the big one)
    max_total_bytes: int = 5 << 30  # all the version's files together
    max_json_bytes: int = 64 << 20  # the manifest, config.json, tokenizer.json, metrics.json: parsed in memory
    max_expansion: int = 20  # bytes the archive may expand to per byte on disk (float32 weights gzip ~1.1x)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UnsafeArchiveError(f"import limit {field.name} must be a positive integer, got {value!r}")


def write_archive(version: ModelVersion, archive: str | os.PathLike) -> Path:
    """Write one version's files and record to a .tar.gz; the file appears complete or not at all."""
    out = Path(archive)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, **version.to_dict()}
    del manifest["path"]  # meaningless in another registry
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


def _member_parts(archive: Path, member: tarfile.TarInfo) -> tuple[str, ...]:
    """The path parts of a member an export may hold; UnsafeArchiveError for anything else."""
    path = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or path.is_absolute() or re.match(r"^[A-Za-z]:", member.name):
        raise UnsafeArchiveError(f"{archive}: member {member.name!r} has an absolute path; refused")
    if ".." in path.parts or "\\" in member.name:
        raise UnsafeArchiveError(f"{archive}: member {member.name!r} leaves the archive's directory; refused")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a link (to {member.linkname!r}); refused")
    parts = tuple(p for p in path.parts if p != ".")
    if member.isdir() and parts in ((), ("model",)):
        return parts
    if not member.isfile():
        raise UnsafeArchiveError(f"{archive}: member {member.name!r} is not a plain file; refused")
    if parts != (EXPORT_MANIFEST,) and not (len(parts) == 2 and parts[0] == "model" and parts[1] in MODEL_FILES):
        raise UnsafeArchiveError(f"{archive}: unexpected member {member.name!r}; an export holds "
                                 f"{EXPORT_MANIFEST} and model/{{{','.join(MODEL_FILES)}}} only")
    if member.issparse():  # its size on disk is not its size: a hole of any length costs nothing to ship
        raise UnsafeArchiveError(f"{archive}: {'/'.join(parts)} is a sparse file; an export holds plain files "
                                 f"only; refused")
    return parts


class _Budget:
    """The sizes an archive may unpack to (ImportLimits), charged member by member at each header."""

    def __init__(self, archive: Path, limits: ImportLimits):
        self.archive, self.limits = archive, limits
        self.archive_bytes = archive.stat().st_size
        self.expandable = max(EXPANSION_FLOOR_BYTES, limits.max_expansion * self.archive_bytes)
        # the decompressed tar stream, headers included: bounds tarfile's own reads too
        self.stream_bytes = min(self.expandable, limits.max_total_bytes + limits.max_json_bytes) + TAR_SLACK_BYTES
        self.files_bytes = self.expanded = 0

    def charge(self, name: str, size: int) -> None:
        limits, where = self.limits, f"{self.archive}: {name} is {size} bytes"
        if name.rsplit("/", 1)[-1] in (EXPORT_MANIFEST, *JSON_FILES) and size > limits.max_json_bytes:
            raise UnsafeArchiveError(f"{where}, over the limit of {limits.max_json_bytes} bytes for a JSON file "
                                     f"(max_json_bytes); refused")
        if name != EXPORT_MANIFEST:
            if size > limits.max_member_bytes:
                raise UnsafeArchiveError(f"{where}, over the limit of {limits.max_member_bytes} bytes per file "
                                         f"(max_member_bytes, --max-member-bytes); refused")
            self.files_bytes += size
            if self.files_bytes > limits.max_total_bytes:
                raise UnsafeArchiveError(f"{where}: the version's files would hold more than "
                                         f"{limits.max_total_bytes} bytes in all (max_total_bytes, "
                                         f"--max-total-bytes); refused")
        self.expanded += size
        if self.expanded > self.expandable:
            raise UnsafeArchiveError(f"{where}, which would expand this {self.archive_bytes}-byte archive past "
                                     f"{self.expandable} bytes ({limits.max_expansion}x its size, max_expansion): "
                                     f"a compression bomb, or a model too big for these limits; refused")


class _BoundedStream(io.RawIOBase):
    """A decompressed archive stream that refuses to be read or sought past `limit` bytes."""

    def __init__(self, stream: BinaryIO, limit: int, archive: Path):
        self.stream, self.limit, self.archive = stream, limit, archive

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _refuse_past(self, end: int) -> None:
        if end > self.limit:
            raise UnsafeArchiveError(f"{self.archive} unpacks to more than {self.limit} bytes, past its import "
                                     f"limits (ImportLimits); refused")

    def readinto(self, buffer) -> int:
        self._refuse_past(self.stream.tell() + len(buffer))
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:  # all that is left, which must end by the limit
            data = self.stream.read(max(0, self.limit - self.stream.tell()))
            if self.stream.read(1):
                self._refuse_past(self.limit + 1)
            return data
        self._refuse_past(self.stream.tell() + size)
        return self.stream.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence not in (io.SEEK_SET, io.SEEK_CUR):
            raise io.UnsupportedOperation("a decompressed archive is sought from its start or its position only")
        target = offset if whence == io.SEEK_SET else self.stream.tell() + offset
        self._refuse_past(target)
        return self.stream.seek(target)

    def tell(self) -> int:
        return self.stream.tell()


# magic bytes -> the reader that decompresses such an archive (what tarfile's "r:*" accepts)
_DECOMPRESSORS: tuple[tuple[bytes, Callable[[BinaryIO], BinaryIO]], ...] = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", lambda f: bz2.BZ2File(f)),
    (b"\xfd7zXZ\x00", lambda f: lzma.LZMAFile(f)),
)
_DAMAGED = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)  # what a corrupt archive raises


@contextlib.contextmanager
def _open_tar(archive: Path, limit: int) -> Iterator[tarfile.TarFile]:
    """The archive as a TarFile over its (bounded) decompressed stream."""
    try:
        raw = open(archive, "rb")
    except OSError as e:
        raise UnsafeArchiveError(f"{archive} cannot be read: {e.strerror}") from None
    with raw:
        magic = raw.read(6)
        raw.seek(0)
        opener = next((open_ for prefix, open_ in _DECOMPRESSORS if magic.startswith(prefix)), None)
        stream = opener(raw) if opener else raw
        try:
            tar = tarfile.open(fileobj=_BoundedStream(stream, limit, archive), mode="r:")
        except _DAMAGED as e:
            raise UnsafeArchiveError(f"{archive} is not a readable tar archive: {e}") from None
        with tar:
            yield tar


def read_archive(archive: Path, dest: Path, limits: ImportLimits | None = None
                 ) -> tuple[dict[str, Any], dict[str, str]]:
    """(manifest, {file: sha256}) of an export archive, its model files written (read-only) into dest.

    Every member is checked against `limits` at its header, before any of its bytes are written.
    """
    budget = _Budget(archive, limits or ImportLimits())
    manifest: Any = None
    files: dict[str, str] = {}
    with _open_tar(archive, budget.stream_bytes) as tar:
        try:
            for member in tar:
                parts = _member_parts(archive, member)
                if member.isdir():
                    continue
                name = "/".join(parts)
                if (parts == (EXPORT_MANIFEST,) and manifest is not None) or parts[-1] in files:
                    raise UnsafeArchiveError(f"{archive}: {name} appears twice")
                budget.charge(name, member.size)
                if parts == (EXPORT_MANIFEST,):
                    manifest = parse_json(tar.extractfile(member).read(), f"{archive}: {EXPORT_MANIFEST}",
                                          UnsafeArchiveError)
                    continue
                files[parts[1]] = write_hashed(tar.extractfile(member), dest / parts[1])
        except _DAMAGED as e:  # truncated or corrupt gzip/tar
            raise UnsafeArchiveError(f"{archive} is damaged: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise UnsafeArchiveError(f"{archive}: not a jaxclf registry export (no {EXPORT_MANIFEST} with "
                                 f"\"format\": \"{EXPORT_FORMAT}\")")
    check_manifest(archive, manifest)
    return manifest, files


def _json_type(value: Any) -> str:
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def check_manifest(archive: Path, manifest: dict[str, Any]) -> None:
    """The types of the fields import reads (MANIFEST_FIELDS); UnsafeArchiveError naming the first wrong one."""
    where = f"{archive}: {EXPORT_MANIFEST}"
    for field, (kind, required) in MANIFEST_FIELDS.items():
        value = manifest.get(field)
        if value is None and not required:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UnsafeArchiveError(f"{where}: \"{field}\" must be {_JSON_TYPE_NAMES[kind]}, got "
                                     f"{_json_type(value)}")
    if manifest["format_version"] != EXPORT_FORMAT_VERSION:
        raise UnsafeArchiveError(f"{where}: format_version {manifest['format_version']} is not supported (this "
                                 f"jaxclf reads version {EXPORT_FORMAT_VERSION})")
    for name, digest in manifest["files"].items():
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise UnsafeArchiveError(f"{where}: \"files\" must map each file name to its sha256 (64 hex "
                                     f"digits); {str(name)[:80]!r} maps to {str(digest)[:80]!r}")
    check_tags(manifest.get("tags"))


def check_contents(archive: Path, manifest: dict[str, Any], files: dict[str, str]) -> None:
    """The files read from an archive must be exactly those its manifest lists, with the same hashes."""
    recorded = manifest["files"]
    if set(recorded) != set(files):
        raise TamperedVersionError(f"{archive}: the archive's files {sorted(files)} do not match its manifest "
                                   f"{sorted(recorded)}")
    for f, digest in sorted(files.items()):
        if recorded[f] != digest:
            raise TamperedVersionError(f"{archive}: model/{f} does not match the hash in the manifest (sha256 "
                                       f"{digest[:16]}..., recorded {recorded[f][:16]}...)")
    if manifest_hash(files) != manifest["content_hash"]:
        raise TamperedVersionError(f"{archive}: the files do not add up to the content hash in the manifest")


def imported_metadata(archive: Path, manifest: dict[str, Any], parent: str | None, config: dict[str, Any],
                      metrics: dict[str, Any]) -> dict[str, Any]:
    """What the importing registry records: the exporter's record, the version's own config and metrics
    (read from its files, as register does), and where the version came from."""
    metadata = {"metrics": metrics, "config": config, **{k: manifest.get(k) for k in IMPORTED_METADATA}}
    metadata.update(parent_source="import" if parent else None, parent_content_hash=manifest.get("parent_content_hash"),
                    imported_from={"ref": manifest.get("ref"), "created_at": manifest.get("created_at"),
                                   "creator": manifest.get("creator"), "parent": manifest.get("parent"),
                                   "archive": str(archive.resolve())})
    return metadata
