"""The model directory: the one contract between training, the registry, serving and torch_ref.

    config.json        {"format": "jaxclf-model", "format_version": 1, "jaxclf_version", "model": ModelConfig}
    model.safetensors  float32 weights under the PyTorch (torch_ref) names
    tokenizer.json     a Hugging Face `tokenizers` file
    metrics.json       evaluation metrics at export time (a JSON object)

Writing is atomic (`atomic_directory`, also used by the Hugging Face export): files go to a
temporary sibling directory that replaces the target only once complete and fsynced, so an
interrupted save never leaves a half-written model behind.
Reading never executes code: JSON and safetensors only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import safetensors.numpy
from tokenizers import Tokenizer

from jaxclf.config import ConfigError, ModelConfig
from jaxclf.errors import JaxclfError

FORMAT = "jaxclf-model"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, METRICS_FILE = (
    "config.json", "model.safetensors", "tokenizer.json", "metrics.json")
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)


class ModelDirectoryError(JaxclfError, ValueError):
    """A model directory is missing, incomplete or inconsistent; the message names the file and problem."""


def _version() -> str:
    from jaxclf import __version__
    return __version__


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    path = Path(model_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelDirectoryError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or "model" not in data:
        raise ModelDirectoryError(
            f"{path}: not a jaxclf model config (expected an object with \"format\": \"{FORMAT}\" "
            f"and a \"model\" section)")
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelDirectoryError(f"{path}: format_version {data.get('format_version')!r} is not "
                                  f"supported (this jaxclf reads version {FORMAT_VERSION})")
    try:
        return ModelConfig.from_dict(data["model"])
    except (ConfigError, TypeError) as e:
        raise ModelDirectoryError(f"{path}: {e}") from e


def check_files(model_dir: str | os.PathLike) -> Path:
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirectoryError(f"model directory {d} does not exist or is not a directory")
    missing = [f for f in REQUIRED_FILES if not (d / f).is_file()]
    if missing:
        raise ModelDirectoryError(f"model directory {d} is missing {', '.join(missing)}")
    return d


def max_text_length(model_dir: str | os.PathLike) -> int:
    """The most tokens the model reads per row: max_position_embeddings, or the shorter truncation its
    tokenizer.json carries (an imported MiniLM: 512 positions, 256-token texts; see tokenizer.configure)."""
    d = Path(model_dir)
    limit = read_config(d).max_position_embeddings
    try:
        truncation = json.loads((d / TOKENIZER_FILE).read_text(encoding="utf-8")).get("truncation")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelDirectoryError(f"{d / TOKENIZER_FILE}: not a readable tokenizer ({type(e).__name__})") from None
    if isinstance(truncation, dict) and isinstance(truncation.get("max_length"), int):
        limit = min(limit, truncation["max_length"])
    return limit


# Steps of a tokenizer.json whose pattern may be a regular expression (Oniguruma, backtracking): Split
# pre-tokenizers and Replace normalizers. {"String": ...} patterns are literal and safe.
REGEX_STEP_SECTIONS = ("normalizer", "pre_tokenizer")
ALLOW_REGEX_HINT = ("allow_regex_tokenizer=True (serve: --allow-regex-tokenizer) if every text it will see "
                    "is trusted")


def regex_tokenizer_steps(tokenizer: Tokenizer | str | os.PathLike) -> list[str]:
    """The regex steps of a tokenizer (a Tokenizer, or the path of a tokenizer.json), as "section Type /regex/".

    Found anywhere inside its normalizer and pre-tokenizer, Sequence steps included; ModelDirectoryError
    if a tokenizer.json cannot be parsed.
    """
    if isinstance(tokenizer, Tokenizer):
        text, source = tokenizer.to_str(), "tokenizer"
    else:
        source = str(tokenizer)
        text = Path(tokenizer).read_text(encoding="utf-8", errors="replace")
    try:
        state = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelDirectoryError(f"{source}: not valid JSON ({type(e).__name__})") from None
    steps = []
    stack = [(section, state.get(section)) for section in REGEX_STEP_SECTIONS] if isinstance(state, dict) else []
    while stack:  # iterative: a file nested deeper than Python's recursion limit is just walked
        section, item = stack.pop()
        if isinstance(item, list):
            stack.extend((section, child) for child in item)
        elif isinstance(item, dict):
            pattern = item.get("pattern")
            if isinstance(pattern, dict) and "Regex" in pattern:
                steps.append(f"{section} {item.get('type', '?')} /{str(pattern['Regex'])[:80]}/")
            stack.extend((section, child) for key, child in item.items() if key != "pattern")
    return sorted(steps)


def check_tokenizer_regex(tokenizer: Tokenizer | str | os.PathLike, allow_regex_tokenizer: bool = False,
                          source: str | None = None) -> None:
    """Refuse (ModelDirectoryError) a tokenizer with regex Split/Replace steps unless explicitly allowed.

    Such a regex runs on every text a server is sent, and a backtracking pattern can take minutes on
    one crafted text or end in a Rust panic (e.g. "(a|aa)+$" on "a" * 40 + "b"). jaxclf's own and the
    BERT-family tokenizers have none. Called where models come in: serving, registry register/import,
    Hugging Face import.
    """
    if allow_regex_tokenizer:
        return
    steps = regex_tokenizer_steps(tokenizer)
    if steps:
        name = source or (str(tokenizer) if not isinstance(tokenizer, Tokenizer) else TOKENIZER_FILE)
        raise ModelDirectoryError(
            f"{name} has regular-expression step(s) ({'; '.join(steps[:4])}{'; ...' if len(steps) > 4 else ''}), "
            f"which can run for minutes or crash on one crafted text; refused. Pass {ALLOW_REGEX_HINT}")


def read(model_dir: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray], Tokenizer, dict]:
    """(config, PyTorch-named float32 tensors, raw tokenizer, metrics) of a model directory."""
    d = check_files(model_dir)
    config = read_config(d)
    try:
        tensors = safetensors.numpy.load_file(str(d / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise ModelDirectoryError(f"{d / WEIGHTS_FILE}: cannot be read as safetensors ({e})") from e
    try:
        tokenizer = Tokenizer.from_file(str(d / TOKENIZER_FILE))
    except Exception as e:
        raise ModelDirectoryError(f"{d / TOKENIZER_FILE}: not a valid tokenizers file ({e})") from e
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ModelDirectoryError(
            f"{d / TOKENIZER_FILE}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model's "
            f"vocab_size is {config.vocab_size}")
    metrics: dict = {}
    if (d / METRICS_FILE).is_file():
        try:
            metrics = json.loads((d / METRICS_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelDirectoryError(f"{d / METRICS_FILE}: not valid JSON ({e})") from e
    return config, tensors, tokenizer, metrics


def write(model_dir: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, np.ndarray],
          tokenizer: Tokenizer, metrics: Mapping[str, Any] | None = None) -> Path:
    """Write a complete model directory atomically, replacing any previous one at that path."""
    with atomic_directory(model_dir) as tmp:
        cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "jaxclf_version": _version(),
               "model": config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
        safetensors.numpy.save_file(arrays, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        (tmp / METRICS_FILE).write_text(json.dumps(dict(metrics or {}), indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
    return Path(model_dir)


def fsync_directory(path: str | os.PathLike) -> None:
    """fsync a directory, so that names created or renamed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty directory beside `target`; when the block ends without error it replaces `target`.

    Everything written into it is fsynced before the rename and the parent after it, so a crash
    leaves the old directory or the complete new one, never a half-written one (at worst a hidden
    `.NAME.tmp-*` or `.NAME.old-*` sibling). On an error the temporary directory is removed and
    `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for path in sorted(tmp.rglob("*"), reverse=True):  # files before the directories holding them
            if path.is_dir():
                fsync_directory(path)
            else:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        fsync_directory(tmp)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem cannot."""
    import ctypes

    rename_at2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename_at2 is None:
        return False
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE from <fcntl.h> / <linux/fs.h>
    if rename_at2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename `new` to `target`. A previous `target` directory is exchanged with `new` in one step, so a
    reader finds the old directory or the new one, never none; where the filesystem cannot exchange, it
    is moved aside first (a moment without `target`), removed after, restored on failure."""
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
        return
    if target.is_dir() and not target.is_symlink() and _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the previous directory
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, holder / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(holder / target.name, target)
        holder.rmdir()
        raise
    shutil.rmtree(holder, ignore_errors=True)
