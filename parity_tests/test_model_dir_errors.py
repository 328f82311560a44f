"""A broken model directory fails on BOTH sides (jaxclf.load, torch_ref.load) with a message naming the problem."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import jaxclf
import torch_ref
from jaxclf import model_dir

LOADERS = {"jaxclf.load": jaxclf.load, "torch_ref.load": torch_ref.load}


def shape_pattern(shape) -> str:
    """(3, 16) written as a tuple or a list."""
    inner = r",\s*".join(str(n) for n in shape)
    return rf"[\(\[]{inner}[\)\]]"


def _edit_tensors(d: Path, edit) -> None:
    path = d / model_dir.WEIGHTS_FILE
    tensors = safetensors.numpy.load_file(str(path))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(d: Path, **changes) -> None:
    path = d / model_dir.CONFIG_FILE
    data = json.loads(path.read_text())
    data["model"].update(changes)
    path.write_text(json.dumps(data))


def _truncate(d: Path) -> None:
    path = d / model_dir.WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_shape(tensors):
    c, dm = tensors["classifier.weight"].shape
    tensors["classifier.weight"] = np.zeros((c + 1, dm), np.float32)


# case -> (corrupt the copied directory, regexes every message must match)
CASES = {
    "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("encoder.layer.1.output.dense.bias")),
                       [r"missing", r"encoder\.layer\.1\.output\.dense\.bias"]),
    "wrong shape": (lambda d: _edit_tensors(d, _wrong_shape),
                    [r"classifier\.weight", shape_pattern((3, 16)), shape_pattern((4, 16))]),
    "extra tensor": (lambda d: _edit_tensors(d, lambda t: t.update({"encoder.layer.7.extra.weight": np.ones(2, np.float32)})),
                     [r"unexpected", r"encoder\.layer\.7\.extra\.weight"]),
    "nhead does not divide d_model": (lambda d: _edit_config(d, nhead=5),
                                      [r"config\.json", r"nhead=5", r"d_model=16"]),
    "unknown activation": (lambda d: _edit_config(d, activation="swish"),
                           [r"config\.json", r"activation", r"swish", r"gelu"]),
    "unknown config field": (lambda d: _edit_config(d, hidden_sizee=3), [r"config\.json", r"hidden_sizee"]),
    "missing weights file": (lambda d: (d / model_dir.WEIGHTS_FILE).unlink(), [r"model\.safetensors"]),
    "missing config file": (lambda d: (d / model_dir.CONFIG_FILE).unlink(), [r"config\.json"]),
    "missing tokenizer file": (lambda d: (d / model_dir.TOKENIZER_FILE).unlink(), [r"tokenizer\.json"]),
    "missing directory": (lambda d: shutil.rmtree(d), [r"does not exist"]),
    "truncated model.safetensors": (_truncate, [r"model\.safetensors", r"safetensors"]),
    "config.json not JSON": (lambda d: (d / model_dir.CONFIG_FILE).write_text('{"format": "jaxclf-model", '),
                             [r"config\.json", r"JSON"]),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("case", CASES)
def test_broken_model_directory_is_named(case, loader, saved_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(saved_model_dir, d)
    corrupt, patterns = CASES[case]
    corrupt(d)
    with pytest.raises(Exception) as info:
        LOADERS[loader](d)
    message = str(info.value)
    # A user-facing error type, not a KeyError/TypeError/library-internal error leaking out.
    assert isinstance(info.value, (ValueError, OSError)), (
        f"{loader} on '{case}' raised {type(info.value).__name__}: {message}")
    for pattern in patterns:
        assert re.search(pattern, message), f"{loader} on '{case}': {pattern!r} not in message:\n{message}"


def test_saved_directory_loads_on_both_sides(saved_model_dir):
    """The uncorrupted original loads (so every failure above is due to its corruption)."""
    for load in LOADERS.values():
        assert load(saved_model_dir).logits(["fine"]).shape == (1, 3)
