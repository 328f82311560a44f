"""Export archives: one version as a .tar.gz (its files and everything recorded about it), and back.

    jaxclf-registry-export.json     {"format": "jaxclf-registry-export", "format_version": 1, ref, files, ...}
    model/config.json, model/model.safetensors, model/tokenizer.json[, model/metrics.json]

Reading is member by member, never tarfile.extractall: only the manifest and model/<model file>
as plain files are accepted; absolute paths, '..', links, devices and anything else are refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from jaxclf.registry.errors import TamperedVersionError, UnsafeArchiveError
from jaxclf.registry.index import ModelVersion
from jaxclf.registry.store import MODEL_FILES, manifest_hash, write_hashed

EXPORT_MANIFEST = "jaxclf-registry-export.json"
EXPORT_FORMAT = "jaxclf-registry-export"
MAX_MANIFEST_BYTES = 64 << 20
# what an import keeps of the exporter's record, besides files, description and tags
IMPORTED_METADATA = ("metrics", "config", "data_fingerprint", "code_commit", "source")


def write_archive(version: ModelVersion, archive: str | os.PathLike) -> Path:
    """Write one version's files and record to a .tar.gz; the file appears complete or not at all."""
    out = Path(archive)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"format": EXPORT_FORMAT, "format_version": 1, **version.to_dict()}
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
    return parts


def _read_manifest(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo) -> Any:
    if member.size > MAX_MANIFEST_BYTES:
        raise UnsafeArchiveError(f"{archive}: manifest of {member.size} bytes is implausibly large")
    try:
        return json.loads(tar.extractfile(member).read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsafeArchiveError(f"{archive}: {EXPORT_MANIFEST} is not valid JSON: {e}") from None


def read_archive(archive: Path, dest: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(manifest, {file: sha256}) of an export archive, its model files written (read-only) into dest."""
    manifest: Any = None
    files: dict[str, str] = {}
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise UnsafeArchiveError(f"{archive} is not a readable tar archive: {e}") from None
    with tar:
        try:
            for member in tar:
                parts = _member_parts(archive, member)
                if member.isdir():
                    continue
                if parts == (EXPORT_MANIFEST,):
                    manifest = _read_manifest(archive, tar, member)
                    continue
                if parts[1] in files:
                    raise UnsafeArchiveError(f"{archive}: model/{parts[1]} appears twice")
                files[parts[1]] = write_hashed(tar.extractfile(member), dest / parts[1])
        except (tarfile.TarError, EOFError, OSError) as e:  # truncated or corrupt gzip/tar
            raise UnsafeArchiveError(f"{archive} is damaged: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise UnsafeArchiveError(f"{archive}: not a jaxclf registry export (no {EXPORT_MANIFEST} with "
                                 f"\"format\": \"{EXPORT_FORMAT}\")")
    return manifest, files


def check_contents(archive: Path, manifest: dict[str, Any], files: dict[str, str]) -> None:
    """The files read from an archive must be exactly those its manifest lists, with the same hashes."""
    recorded = manifest.get("files")
    if not isinstance(recorded, dict) or set(recorded) != set(files):
        raise TamperedVersionError(f"{archive}: the archive's files {sorted(files)} do not match its manifest "
                                   f"{sorted(recorded or {}) if isinstance(recorded, dict) else recorded!r}")
    for f, digest in sorted(files.items()):
        if recorded[f] != digest:
            raise TamperedVersionError(f"{archive}: model/{f} does not match the hash in the manifest (sha256 "
                                       f"{digest[:16]}..., recorded {str(recorded[f])[:16]}...)")
    if manifest_hash(files) != manifest.get("content_hash"):
        raise TamperedVersionError(f"{archive}: the files do not add up to the content hash in the manifest")


def imported_metadata(archive: Path, manifest: dict[str, Any], parent: str | None) -> dict[str, Any]:
    """What the importing registry records: the exporter's metadata, and where the version came from."""
    metadata = {k: manifest.get(k) for k in IMPORTED_METADATA}
    metadata.update(parent_source="import" if parent else None, parent_content_hash=manifest.get("parent_content_hash"),
                    imported_from={"ref": manifest.get("ref"), "created_at": manifest.get("created_at"),
                                   "creator": manifest.get("creator"), "parent": manifest.get("parent"),
                                   "archive": str(archive.resolve())})
    return metadata
