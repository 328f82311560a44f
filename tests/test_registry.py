"""The model registry: versions, aliases, lineage, export/import, the audit log, and its safety under
bad names, tampering, concurrent writers (8 processes) and a registration killed half way."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

import jaxclf
from jaxclf.cli import registry as registry_cli
from jaxclf.registry import (ConflictError, InvalidNameError, NotFoundError, Ref, Registry, RegistryError,
                             TamperedVersionError, UnsafeArchiveError, compare, content_hash,
                             git_commit)

REPO = Path(__file__).resolve().parents[1]


def copy_model(src: Path, dst: Path, metrics: dict | None = None) -> Path:
    """A writable copy of a model directory, optionally with its metrics.json replaced."""
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    if metrics is not None:
        (dst / "metrics.json").write_text(json.dumps(metrics))
    return dst


def cli(root: Path, *args: str, capsys=None) -> tuple[int, str, str]:
    code = registry_cli.main(["--root", str(root), *args])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


def test_register_records_metadata_and_lineage(reg, tiny_model_dir, tiny_model_dir_seed1, tmp_path, monkeypatch):
    data = tmp_path / "train.csv"
    data.write_text("text,label\nhi,positive\n")
    base_dir = copy_model(tiny_model_dir, tmp_path / "base", {
        "eval": {"accuracy": 0.5, "macro_f1": 0.4}, "train_file": str(data), "eval_file": str(tmp_path / "gone.csv"),
        "training_config": {"learning_rate": 1e-3}})
    monkeypatch.setenv("USER", "alice")
    reg = Registry(reg.root)  # the user is read when the registry is opened
    base = reg.register(base_dir, "base", description="first try", tags={"team": "nlp", "data.date": "2024-06"})
    assert base.ref == "base@v1" and base.version == 1 and base.creator == "alice"
    assert base.content_hash == content_hash(base_dir) and set(base.files) == {
        "config.json", "model.safetensors", "tokenizer.json", "metrics.json"}
    assert base.metadata["metrics"]["eval"]["accuracy"] == 0.5
    assert base.metadata["config"]["model"]["d_model"] == 32
    assert base.metadata["data_fingerprint"]["train_file"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert base.metadata["data_fingerprint"]["eval_file"] == {"path": str(tmp_path / "gone.csv"), "sha256": None}
    commit = base.metadata["code_commit"]  # jaxclf's own checkout: a commit, unless git is absent
    assert commit is None or len(commit) == 40
    assert base.created_at.endswith("Z") and base.parent is None and base.tags["team"] == "nlp"
    assert (base.path / "model.safetensors").stat().st_mode & 0o222 == 0  # read-only copy

    # Fine-tuned from the base's directory: the parent is found by content hash, across model names.
    tuned_dir = copy_model(tiny_model_dir_seed1, tmp_path / "tuned", {
        "eval": {"accuracy": 0.7, "macro_f1": 0.6}, "training_config": {"init_from": str(base_dir),
                                                                        "learning_rate": 5e-4}})
    monkeypatch.chdir(tmp_path)  # the commit is jaxclf's, wherever the command runs
    tuned = reg.register(tuned_dir, "sentiment")
    assert tuned.ref == "sentiment@v1" and tuned.parent == "base@v1"
    assert tuned.metadata["parent_source"] == "init_from" and tuned.metadata["code_commit"] == commit
    assert tuned.metadata["data_fingerprint"] is None
    explicit = reg.register(tiny_model_dir, "sentiment", parent="sentiment@v1")
    assert explicit.ref == "sentiment@v2" and explicit.parent == "sentiment@v1"
    assert reg.lineage("sentiment@v2") == ["sentiment@v2", "sentiment@v1", "base@v1"]
    with pytest.raises(NotFoundError, match="sentiment@v9"):
        reg.register(tiny_model_dir, "sentiment", parent="sentiment@v9")

    result = compare(reg, "base@v1", "sentiment@v1")
    assert result["metrics"]["eval.accuracy"] == {"a": 0.5, "b": 0.7, "delta": pytest.approx(0.2)}
    assert result["training_config_diff"]["learning_rate"] == {"a": 1e-3, "b": 5e-4}
    assert result["config_diff"] == {} and result["same_content"] is False


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # e.g. GIT_DIR from a hook
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_code_commit_is_jaxclfs_checkout_not_the_working_directory(reg, tiny_model_dir, tmp_path, monkeypatch):
    package = Path(jaxclf.__file__).parent
    tracked = _git(package, "ls-files", "--error-unmatch", "__init__.py").returncode == 0
    expected = _git(package, "rev-parse", "HEAD").stdout.strip() if tracked else None  # None: installed, no checkout
    other = tmp_path / "other-project"  # the user's own project, where they happen to run the command
    other.mkdir()
    assert _git(other, "init", "-q").returncode == 0
    assert _git(other, "commit", "-q", "--allow-empty", "-m", "theirs").returncode == 0
    theirs = _git(other, "rev-parse", "HEAD").stdout.strip()
    monkeypatch.chdir(other)
    v = reg.register(tiny_model_dir, "m")
    assert v.metadata["code_commit"] == expected and v.metadata["code_commit"] != theirs
    # A copy of the package lying untracked inside another checkout (a virtualenv in a project) has no commit.
    vendored = other / ".venv" / "jaxclf"
    vendored.mkdir(parents=True)
    (vendored / "__init__.py").write_text("")
    assert git_commit(vendored) is None
    assert git_commit(tmp_path / "reg") is None  # not a checkout at all


def test_aliases_promote_rollback_delete_and_history(reg, tiny_model_dir, tiny_model_dir_seed1):
    v1 = reg.register(tiny_model_dir, "m")
    v2 = reg.register(tiny_model_dir_seed1, "m")
    assert reg.set_alias("m", "v1", "production").ref == "m@v1"
    assert reg.resolve("m@production") == v1.path
    assert reg.promote("m", 2, to="production").ref == "m@v2"
    assert reg.aliases("m")["production"]["previous"] == 1
    reg.promote("m", "production", to="staging")  # another alias's target
    assert reg.get("m@staging").version == 2 and reg.get("m").version == 2 and reg.get("m@latest").version == 2
    assert reg.rollback("m", "production").ref == "m@v1"
    assert reg.rollback("m", "production").ref == "m@v2"  # a second rollback undoes the first
    with pytest.raises(ConflictError, match="never moved"):
        reg.rollback("m", "staging")
    with pytest.raises(NotFoundError, match="no alias 'canary'.*production, staging"):
        reg.get("m@canary")

    with pytest.raises(ConflictError, match="m@v2 is the target of alias.*production, staging"):
        reg.delete("m@v2")
    with pytest.raises(InvalidNameError, match="exact version"):
        reg.delete("m@production")
    reg.rollback("m", "production")
    reg.set_alias("m", "v1", "staging")
    assert reg.delete("m@v2").ref == "m@v2" and not v2.path.exists()
    with pytest.raises(NotFoundError, match="m@v2 does not exist"):
        reg.resolve("m@v2")
    assert reg.register(tiny_model_dir, "m").version == 3  # numbers are never reused
    with pytest.raises(NotFoundError, match="m@v2 does not exist"):  # production's previous target is gone
        reg.rollback("m", "production")

    actions = [(e.action, e.version, e.alias) for e in reg.history("m")]
    assert actions[:8] == [("register", 1, None), ("register", 2, None), ("alias", 1, "production"),
                           ("promote", 2, "production"), ("promote", 2, "staging"), ("rollback", 1, "production"),
                           ("rollback", 2, "production"), ("rollback", 1, "production")]
    assert ("delete", 2, None) in actions and all(e.user for e in reg.history("m"))
    with sqlite3.connect(reg.root / "registry.db") as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE events SET user = 'mallory'")
    with sqlite3.connect(reg.root / "registry.db") as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM events")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".", "", ".hidden", "Caps", "a b", "x" * 101, "bad\nname",
                                  "nul\x00", "ok\u202e", "/abs", "m@v1"])
def test_bad_model_names_are_refused_with_the_value(reg, tiny_model_dir, name):
    with pytest.raises(InvalidNameError) as e:
        reg.register(tiny_model_dir, name)
    assert repr(name) in str(e.value) and "lowercase letters" in str(e.value)
    assert not any(reg.models_dir.iterdir()) and not (reg.root.parent / "evil").exists()


def test_bad_aliases_tags_and_references_are_refused(reg, tiny_model_dir):
    reg.register(tiny_model_dir, "m")
    for alias in ("../prod", "v3", "latest", "Prod", "pro duction", "x\ty"):
        with pytest.raises(InvalidNameError, match="alias"):
            reg.set_alias("m", "v1", alias)
    for tags, match in [({"../k": "v"}, "tag key '../k'"), ({"a/b": "v"}, "tag key 'a/b'"),
                        ({"k": "red\x1b[31m"}, "value 'red\\\\x1b\\[31m'"), ({"k": "a\nb"}, "control characters"),
                        ({"k": "x" * 300}, "256 characters")]:
        with pytest.raises(InvalidNameError, match=match):
            reg.register(tiny_model_dir, "m", tags=tags)
    with pytest.raises(InvalidNameError, match="description"):
        reg.register(tiny_model_dir, "m", description="bell\x07")
    for ref in ("m@../x", "m@", "../m@v1", "m@v1@v2"):
        with pytest.raises(InvalidNameError):
            Ref.parse(ref)
    assert [v.version for v in reg.versions("m")] == [1]


def test_tampered_versions_are_refused(reg, tiny_model_dir):
    v = reg.register(tiny_model_dir, "m")
    assert reg.resolve("m@v1") == v.path  # verified, and now cached
    weights = v.path / "model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TamperedVersionError, match="model.safetensors was modified after registration"):
        reg.resolve("m@v1")  # the cached check notices the write
    with pytest.raises(TamperedVersionError):
        Registry(reg.root).resolve("m@v1")  # and so does a fresh process
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert reg.resolve("m@v1") == v.path  # restored byte for byte: intact again
    (v.path / "extra.py").write_text("print('hi')")
    with pytest.raises(TamperedVersionError, match="unexpected extra.py"):
        reg.resolve("m@v1")
    (v.path / "extra.py").unlink()
    (v.path / "tokenizer.json").unlink()
    with pytest.raises(TamperedVersionError, match="missing tokenizer.json"):
        reg.resolve("m@v1")
    code = registry_cli.main(["--root", str(reg.root), "verify"])
    assert code == 2


def test_export_import_round_trip(reg, tiny_model_dir, tmp_path):
    base = reg.register(tiny_model_dir, "base")
    tuned = reg.register(copy_model(tiny_model_dir, tmp_path / "t", {"eval": {"accuracy": 0.9}}), "m",
                         parent="base@v1", tags={"k": "v"})
    archive = reg.export("m@v1", tmp_path / "out" / "m-v1.tar.gz")
    other = Registry(tmp_path / "other")
    other.register(tiny_model_dir, "base")  # same content as the parent: relinked by hash
    imported = other.import_archive(archive)
    assert imported.ref == "m@v1" and imported.content_hash == tuned.content_hash
    assert imported.parent == "base@v1" and imported.tags == {"k": "v"}
    assert imported.metadata["imported_from"]["ref"] == "m@v1"
    assert imported.metadata["metrics"]["eval"]["accuracy"] == 0.9
    assert other.resolve("m@v1") == imported.path and other.history("m")[0].action == "import"
    assert other.import_archive(archive, name="copy").ref == "copy@v1"
    assert base.content_hash == other.get("base@v1").content_hash


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


@pytest.mark.parametrize("member, data, message", [
    (_member("/tmp/jaxclf-evil"), b"x", "absolute path"),
    (_member("../jaxclf-evil"), b"x", "leaves the archive"),
    (_member("model/../../jaxclf-evil"), b"x", "leaves the archive"),
    (_member("model/config.json", tarfile.SYMTYPE, "/etc/passwd"), None, "is a link"),
    (_member("model/config.json", tarfile.LNKTYPE, "jaxclf-registry-export.json"), None, "is a link"),
    (_member("model/evil.py"), b"import os", "unexpected member"),
    (_member("model/dev", tarfile.CHRTYPE), None, "not a plain file"),
])
def test_import_refuses_unsafe_archives(reg, tiny_model_dir, tmp_path, member, data, message):
    reg.register(tiny_model_dir, "m")
    good = reg.export("m@v1", tmp_path / "good.tar.gz")
    with tarfile.open(good) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    bad = _tar(tmp_path / "bad.tar.gz", [(member, data)] + members)
    with pytest.raises(UnsafeArchiveError, match=message):
        reg.import_archive(bad)
    assert not Path("/tmp/jaxclf-evil").exists() and not (tmp_path / "jaxclf-evil").exists()
    assert [v.ref for v in reg.versions()] == ["m@v1"] and not any(reg.tmp_dir.iterdir())


def test_import_refuses_an_archive_whose_files_do_not_match_its_hashes(reg, tiny_model_dir, tmp_path):
    reg.register(tiny_model_dir, "m")
    good = reg.export("m@v1", tmp_path / "good.tar.gz")
    with tarfile.open(good) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    members = [(m, d[:-1] + bytes([d[-1] ^ 1]) if m.name == "model/model.safetensors" else d) for m, d in members]
    with pytest.raises(TamperedVersionError, match="model.safetensors does not match"):
        reg.import_archive(_tar(tmp_path / "bad.tar.gz", members))
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UnsafeArchiveError):
        reg.import_archive(tmp_path / "junk.tar.gz")


def test_cli(tmp_path, tiny_model_dir, tiny_model_dir_seed1, capsys):
    root = tmp_path / "reg"
    assert cli(root, "register", str(tiny_model_dir), "--name", "m", "--tag", "team=nlp", capsys=capsys)[1] \
        .startswith("registered m@v1")
    assert cli(root, "register", str(tiny_model_dir_seed1), "--name", "m", "--parent", "m@v1")[0] == 0
    assert cli(root, "promote", "m", "v1", "--to", "production")[0] == 0
    capsys.readouterr()
    assert cli(root, "promote", "m", "v2", "--to", "production", capsys=capsys)[1].strip() == "m@production -> m@v2"
    code, out, _ = cli(root, "show", "m@production", "--json", capsys=capsys)
    shown = json.loads(out)
    assert code == 0 and shown["ref"] == "m@v2" and shown["aliases"] == ["production"]
    assert shown["lineage"] == ["m@v2", "m@v1"]
    code, out, _ = cli(root, "list", capsys=capsys)
    assert "m: production -> v2" in out and "team=nlp" in out
    code, out, _ = cli(root, "compare", "m@v1", "m@v2", capsys=capsys)
    assert code == 0 and "config diff: none" in out
    code, out, err = cli(root, "register", str(tiny_model_dir), "--name", "../x", capsys=capsys)
    assert code == 2 and err.strip() == "jaxclf registry: error: invalid model name '../x': use 1-100 " \
        "characters: lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
    code, out, err = cli(root, "delete", "m@v2", capsys=capsys)
    assert code == 2 and "production" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli(tmp_path / "typo", "list", capsys=capsys)  # only register/import create a registry
    assert code == 2 and "no registry at" in err and not (tmp_path / "typo").exists()
    code, out, _ = cli(root, "history", "m", "--json", capsys=capsys)
    assert [e["action"] for e in json.loads(out)] == ["register", "register", "promote", "promote"]
    # The console script and `python -m` both reach the same CLI.
    for command in (["jaxclf", "registry"], [sys.executable, "-m", "jaxclf.registry"]):
        if command[0] == "jaxclf" and shutil.which("jaxclf") is None:
            continue  # not installed as a package here
        out = subprocess.run([*command, "--root", str(root), "rollback", "m", "production"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    assert Registry(root).get("m@production").version == 2  # rolled back twice: toggled back


def test_the_registry_package_loads_neither_the_cli_nor_jax():
    probe = ("import sys, jaxclf.registry; "
             "print(sorted(m for m in sys.modules if m.startswith(('jaxclf.cli', 'jax.', 'flax')) or m == 'jax'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# --- concurrency and crashes -------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from jaxclf.registry import Registry
    root, model, i, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    while not go.exists():
        time.sleep(0.005)
    reg = Registry(root, user=f"worker{i}")
    v = reg.register(model, "m", tags={"worker": str(i)})
    reg.set_alias("m", v.version, f"proc-{i}")
    reg.promote("m", v.version, to="production")
    print(v.version)
""")


def test_eight_processes_register_and_alias_concurrently(tmp_path, tiny_model_dir):
    root, go = tmp_path / "reg", tmp_path / "go"
    sources = [copy_model(tiny_model_dir, tmp_path / f"src{i}", {"worker": i}) for i in range(8)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(sources[i]), str(i), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    time.sleep(0.5)  # let them all import, then start together on a registry that does not exist yet
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    reg = Registry(root)
    versions = reg.versions("m")
    assert sorted(int(out) for out, _ in results) == [v.version for v in versions] == list(range(1, 9))
    hashes = {content_hash(s): i for i, s in enumerate(sources)}
    for v in versions:
        reg.verify(v, use_cache=False)
        worker = int(v.tags["worker"])
        assert hashes[v.content_hash] == worker and v.creator == f"worker{worker}"
        assert json.loads((v.path / "metrics.json").read_text()) == {"worker": worker} == v.metadata["metrics"]
        assert reg.get(f"m@proc-{worker}").version == v.version
    events = reg.history("m")
    assert sorted((e.action, e.version) for e in events if e.action != "promote") == sorted(
        [("register", v) for v in range(1, 9)] + [("alias", v) for v in range(1, 9)])
    promotes = [e for e in events if e.action == "promote"]
    assert sorted(e.version for e in promotes) == list(range(1, 9))
    # Each promotion saw the one before it: the alias moved through a single chain of targets.
    assert [e.details["previous"] for e in promotes] == [None] + [e.version for e in promotes[:-1]]
    assert reg.get("m@production").version == promotes[-1].version
    assert not list(reg.tmp_dir.iterdir())


def test_a_registration_killed_mid_copy_leaves_no_version(tmp_path, tiny_model_dir):
    root = tmp_path / "reg"
    Registry(root)
    env = {**os.environ, "JAXCLF_REGISTRY_TEST_COPY_DELAY_S": "5"}  # per chunk: the copy takes 20 s
    log = tmp_path / "register.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jaxclf.registry", "--root", str(root), "register",
                                 str(tiny_model_dir), "--name", "m"], env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while not list((root / "tmp").glob("register-*/model/config.json")):  # half way: one file copied
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    reg = Registry(root)
    assert reg.names() == [] and reg.versions() == [] and not list(reg.models_dir.iterdir())
    assert list(reg.tmp_dir.glob("register-*"))  # the partial copy is there, but nothing reads it
    with pytest.raises(NotFoundError):
        reg.resolve("m")
    # A crash between the rename into models/ and the commit leaves an unreferenced directory.
    orphan = reg.models_dir / "m" / "v1"
    orphan.mkdir(parents=True)
    (orphan / "config.json").write_text("half")
    v = reg.register(tiny_model_dir, "m")  # cleans up the dead process's work, replaces the orphan
    assert v.ref == "m@v1" and reg.resolve("m@v1") == orphan and (orphan / "tokenizer.json").exists()
    assert not list(reg.tmp_dir.iterdir())
    assert [e.action for e in reg.history("m")] == ["register"]


def test_gc_keeps_the_work_of_live_processes(reg, tiny_model_dir):
    with reg.store.work_dir("register") as work:
        (work / "partial").write_text("in progress")
        assert reg.gc() == [] and (work / "partial").exists()
    (reg.models_dir / "m" / "v7").mkdir(parents=True)  # unreferenced
    (reg.tmp_dir / "trash-123").mkdir()
    assert sorted(reg.gc()) == ["models/m/v7", "tmp/trash-123"]


def test_registry_errors_are_value_errors_with_the_root(tmp_path):
    with pytest.raises(RegistryError, match="no registry at"):
        Registry(tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()
