"""Export a jaxclf model directory to ONNX, through its PyTorch twin (torch_ref).

    from torch_ref.onnx_export import export_onnx, read_metadata
    export_onnx("runs/default/model", "model.onnx")      # = jaxclf export-onnx --model DIR --output FILE
    read_metadata("model.onnx")["labels"]                # ["negative", "neutral", "positive"]

The graph:
    inputs   input_ids, attention_mask   int64 (batch, sequence); both axes dynamic, sequence up to
                                         max_position_embeddings; attention_mask 1 = token, 0 = padding
    output   logits                      float32 (batch, num_classes)
Token types are zeros, as in jaxclf's own forward. The graph does not tokenize: feed it what the model
directory's tokenizer.json gives under the recorded long-text rule (`jaxclf.tokenizer.TextEncoder` does
exactly that), right-padded to any length; padding never changes a logit. The graph scores rows: under
long_text=chunks a long text is several rows (windows), and its logits are the rows' logits pooled as
the metadata says (`jaxclf.long_text.pool_windows`), outside the graph.

metadata_props, every value JSON text (`read_metadata` decodes them):
    jaxclf.format, jaxclf.format_version   the model-directory format the graph was exported from
    jaxclf.version                         the jaxclf that exported it
    jaxclf.content_hash                    the directory's content hash (`jaxclf.registry.content_hash`,
                                           the same as a registered version's), to trace the graph back
    jaxclf.labels                          label names, in logit order
    jaxclf.max_length                      truncation length, special tokens included
    jaxclf.long_text                       "truncate", "head_tail" or "chunks" (jaxclf.long_text)
    jaxclf.truncation_head                 null: keep the first max_length tokens; N: the first N and the
                                           last max_length - N ("head+tail")
    jaxclf.chunking                        null, or under chunks {"stride", "max_windows", "overflow",
                                           "pooling"} (jaxclf.long_text.Chunking(**value)): windows of
                                           max_length tokens every `stride` text tokens, at most
                                           max_windows, whose logits are pooled by `pooling`
    jaxclf.pad_token_id                    the id that fills padded positions

The exporter is torch.onnx.export's torch.export-based one (dynamo=True, the default; it needs
onnxscript, and runs offline). The legacy TorchScript exporter (dynamo=False) also matches jaxclf to
~3e-7 but is deprecated in torch 2.13 and writes 190 nodes where this one writes 80.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

import torch_ref
from jaxclf import __version__ as jaxclf_version
from jaxclf import model_dir
from jaxclf.errors import JaxclfError

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
# LayerNormalization is an ONNX op from opset 17; 18 is the exporter's own first opset (17 goes through
# a version converter) and runs on ONNX Runtime >= 1.14, OpenVINO and TensorRT >= 8.6.
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 23
METADATA_PREFIX = "jaxclf."
VERIFY_TOL = 1e-4  # ONNX Runtime vs torch_ref after export; the parity suite holds the graph to 1e-5


class OnnxExportError(JaxclfError, ValueError):
    """An export refused or failed for a reason the user can fix: the message names it."""


def load_twin(directory: str | os.PathLike) -> torch_ref.TorchClassifier:
    """torch_ref's classifier for a model directory; a bad directory is a ModelDirectoryError naming the file."""
    d = model_dir.check_files(directory)
    model_dir.read_config(d)  # format, version and every field, with jaxclf's messages
    try:
        return torch_ref.load(d)
    except (OSError, ValueError) as e:  # torch_ref's own file errors (e.g. misshapen tensors), one message each
        raise model_dir.ModelDirectoryError(str(e).replace("\n", "; ")) from e


def metadata(directory: str | os.PathLike, twin: torch_ref.TorchClassifier) -> dict[str, str]:
    """The metadata_props of the exported graph (values are JSON text)."""
    from jaxclf.registry import content_hash  # JAX-free; the registry's hash, so a graph can be traced back

    config = twin.config
    values = {
        "format": model_dir.FORMAT,
        "format_version": model_dir.FORMAT_VERSION,
        "version": jaxclf_version,
        "content_hash": content_hash(directory),
        "labels": list(config.id2label),
        "max_length": twin.encoder.max_length,
        "long_text": config.long_text,
        "truncation_head": config.truncation_head,
        "chunking": None if twin.encoder.chunking is None else dataclasses.asdict(twin.encoder.chunking),
        "pad_token_id": config.pad_token_id,
    }
    return {METADATA_PREFIX + k: json.dumps(v) for k, v in values.items()}


def read_metadata(path: str | os.PathLike) -> dict:
    """The jaxclf.* metadata_props of an exported graph, decoded, without the prefix (weights are not read)."""
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key[len(METADATA_PREFIX):]: json.loads(p.value) for p in proto.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def example_inputs(config) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """((input_ids, attention_mask), dynamic_shapes) for torch.export.

    The example's batch and sequence sizes differ from each other and from 1: torch.export would
    otherwise fix a size of 1, or tie two equal sizes together.
    """
    max_length = config.max_position_embeddings
    length = min(max_length, 7)
    batch = 3 if length == 2 else 2
    ids = torch.full((batch, length), config.pad_token_id, dtype=torch.int64)
    mask = torch.ones((batch, length), dtype=torch.int64)
    batch_dim = torch.export.Dim("batch")
    axes = {0: batch_dim}
    if length > 1:  # a model of 1 position has nothing to make dynamic
        axes[1] = torch.export.Dim("sequence", max=max_length)
    return (ids, mask), {name: axes for name in INPUT_NAMES}


@contextlib.contextmanager
def quiet_exporter():
    """Silence what torch.onnx.export says on every healthy export, and nothing else.

    It narrates each stage on stdout, logs that torchvision's ops are not registered, warns that the
    shared batch/sequence axis names are not "used" (the graph is named batch/sequence all the same)
    and that torch's own pytree code uses a deprecated check.
    """
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used")
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        registration.setLevel(level)


def verify(path: Path, twin: torch_ref.TorchClassifier, seed: int = 0) -> float | None:
    """Max |logit difference| of the graph in ONNX Runtime vs torch_ref on padded random batches.

    None when onnxruntime is not installed (it is not needed to export).
    """
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    config, rng, worst = twin.config, np.random.default_rng(seed), 0.0
    for batch, length in ((1, 1), (3, min(5, twin.encoder.max_length)), (4, twin.encoder.max_length)):
        lengths = rng.integers(1, length + 1, batch)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)  # (B, T), right padding
        ids = np.where(mask == 1, rng.integers(0, config.vocab_size, (batch, length)), config.pad_token_id)
        got = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})[0]
        with torch.no_grad():
            want = twin.model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def export_onnx(directory: str | os.PathLike, output: str | os.PathLike, opset: int | None = None,
                check: bool = True) -> dict:
    """Write the model directory's classifier to `output` as one ONNX file (atomically).

    Returns {"path", "opset", "metadata", "max_abs_diff_vs_torch_ref"} (the last None when check is
    False or onnxruntime is absent). Raises ModelDirectoryError for a bad directory, OnnxExportError for
    an opset out of range, an unwritable output or a graph that does not reproduce torch_ref.
    """
    opset = DEFAULT_OPSET if opset is None else opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxExportError(f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} "
                              f"(default {DEFAULT_OPSET})")
    twin = load_twin(directory)
    props = metadata(directory, twin)
    output = Path(output)
    args, dynamic_shapes = example_inputs(twin.config)
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(twin.model.eval(), args, dynamo=True, opset_version=opset,
                                    input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    program.model.metadata_props.update(props)
    program.model.doc_string = (f"jaxclf text classifier ({', '.join(twin.config.id2label)}); tokenize with the "
                                f"model directory's tokenizer.json and the long-text rule in metadata_props"
                                + ("; pool the windows' logits" if twin.config.chunking else ""))
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        program.save(tmp, external_data=False)
        diff = verify(tmp, twin) if check else None
        if diff is not None and not diff <= VERIFY_TOL:
            raise OnnxExportError(f"the exported graph's logits differ from torch_ref's by {diff:.3g} "
                                  f"(> {VERIFY_TOL:g}) in ONNX Runtime; not written")
        os.replace(tmp, output)
    except OSError as e:
        raise OnnxExportError(f"cannot write {output}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": output, "opset": opset, "metadata": {k[len(METADATA_PREFIX):]: json.loads(v)
                                                         for k, v in props.items()},
            "max_abs_diff_vs_torch_ref": diff}
