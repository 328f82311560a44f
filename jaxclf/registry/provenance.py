"""Where a version came from: who registered it and when, which jaxclf code, which data files."""

from __future__ import annotations

import datetime
import getpass
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Mapping

import jaxclf
from jaxclf.registry.store import file_sha256

PACKAGE_DIR = Path(jaxclf.__file__).resolve().parent


def utc_now() -> str:
    """The time as UTC ISO 8601 to the second, e.g. 2024-06-01T12:00:00Z."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def current_user() -> str:
    user = os.environ.get("USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (some containers)
        return f"uid:{os.getuid()}"


def _git(directory: Path, *args: str) -> subprocess.CompletedProcess | None:
    # GIT_DIR, GIT_WORK_TREE and the like (set inside git hooks) would point git at another repository.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        return subprocess.run(["git", *args], cwd=directory, env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or no such directory
        return None


def git_commit(package_dir: str | os.PathLike | None = None) -> str | None:
    """The commit checked out where the jaxclf package lives, or None when it is not a git checkout.

    Read from the package's own directory, not the working directory: a command run from inside
    another project must not record that project's commit. The package's __init__.py has to be
    tracked there, so an installed copy that lies inside someone else's checkout (a virtualenv in
    a project) records None rather than the project's commit.
    """
    directory = Path(package_dir) if package_dir is not None else PACKAGE_DIR
    tracked = _git(directory, "ls-files", "--error-unmatch", "--", "__init__.py")
    if tracked is None or tracked.returncode != 0:
        return None
    out = _git(directory, "rev-parse", "HEAD")
    commit = out.stdout.strip() if out is not None and out.returncode == 0 else ""
    return commit if re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def data_fingerprint(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """sha256 of the training/eval files named in metrics.json (null where a file is not here), or None."""
    out = {}
    for key in ("train_file", "eval_file"):
        path = metrics.get(key)
        if isinstance(path, str) and path:
            p = Path(path).expanduser()
            out[key] = {"path": path, "sha256": file_sha256(p) if p.is_file() else None}
    return out or None
