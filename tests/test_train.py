"""Training: configs, the default command and its export, long texts, mixed precision, micro-batches, retention.

Preemption and resumption are in test_train_preemption.py, device layouts and multi-process runs in
test_train_sharding.py; training_runs.py runs scripts/train.py in a subprocess for all three.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxclf
from jaxclf.config import ConfigError, ModelConfig, TrainingConfig
from jaxclf.train.data import DataError
from jaxclf.metrics import classification_report
from jaxclf.train.presets import apply_overrides, get_preset
from jaxclf.train.loop import train

from training_runs import ROOT, SAMPLE, SCRIPT, TINY, run_train, subprocess_env, train_losses, weights_of


# ----------------------------------------------------------------------------- configs


def test_training_config_rejects_bad_values_by_name():
    with pytest.raises(ConfigError, match="mixed_precision.*'fp8'"):
        TrainingConfig(mixed_precision="fp8")
    with pytest.raises(ConfigError, match="eval_split"):
        TrainingConfig(eval_split=1.5)
    with pytest.raises(ConfigError, match="d_model % nhead"):
        ModelConfig(d_model=10, nhead=3)


@pytest.mark.parametrize("field", ["logging_steps", "eval_steps", "save_steps"])
def test_each_step_interval_check_names_its_own_field_and_value(field):
    with pytest.raises(ConfigError) as info:
        TrainingConfig(**{field: 0})
    assert str(info.value) == f"{field} must be an integer >= 1, got 0"


def test_fp16_and_bf16_flags_are_mixed_precision():
    assert TrainingConfig(fp16=True).mixed_precision == "fp16"
    assert TrainingConfig(bf16=True).mixed_precision == "bf16"
    assert TrainingConfig(mixed_precision="bf16").bf16 and not TrainingConfig(mixed_precision="bf16").fp16
    assert TrainingConfig(fp16=True, mixed_precision="fp16").fp16  # agreeing settings are fine
    with pytest.raises(ConfigError, match="fp16=True and bf16=True"):
        TrainingConfig(fp16=True, bf16=True)
    with pytest.raises(ConfigError, match=r"fp16=True conflicts with mixed_precision='bf16'"):
        TrainingConfig(fp16=True, mixed_precision="bf16")
    # Changing one of the three re-derives the others: a bf16 preset overridden to fp16 is fp16.
    model, cfg = get_preset("base")
    assert apply_overrides(model, cfg, ["train.mixed_precision=fp16"])[1].fp16
    assert apply_overrides(model, cfg, ["train.fp16=true"])[1].mixed_precision == "fp16"
    assert cfg.replace(mixed_precision="no").bf16 is False


def test_early_stopping_threshold_counts_small_gains_as_no_improvement():
    from jaxclf.train.loop import _record_eval
    cfg = TrainingConfig(early_stopping_threshold=0.05)
    meta = {"evals": [], "best": None, "evals_without_improvement": 0}
    for step, f1, without in [(1, 0.50, 0), (2, 0.53, 1), (3, 0.60, 0), (4, 0.60, 1), (5, 0.40, 2)]:
        _record_eval(meta, step, {"macro_f1": f1}, cfg)
        assert meta["evals_without_improvement"] == without, step
    assert meta["best"]["step"] == 4  # the best checkpoint still moves with any gain (a tie: the later one)


def test_vocab_size_set_in_the_model_config_is_honoured(caplog):
    from jaxclf.train.prepare import prepare_data
    cfg = TrainingConfig(train_file=str(SAMPLE), output_dir="/nonexistent/never-written")
    model = ModelConfig(vocab_size=10000, d_model=32, nhead=2, num_encoder_layers=1, dim_feedforward=64,
                        max_position_embeddings=32)
    with caplog.at_level("INFO", logger="jaxclf.train.prepare"):
        prepared = prepare_data(model, cfg)
    learned = prepared.tokenizer.get_vocab_size()
    assert prepared.config.vocab_size == prepared.export_config.vocab_size == 10000 and learned < 10000
    assert f"has {learned} tokens; model vocab_size = 10000 as configured" in caplog.text
    # train.tokenizer_vocab_size sizes the model to what the tokenizer learned, and says so.
    caplog.clear()
    with caplog.at_level("INFO", logger="jaxclf.train.prepare"):
        sized = prepare_data(model, cfg.replace(tokenizer_vocab_size=300))
    assert sized.config.vocab_size == sized.tokenizer.get_vocab_size() == 300
    assert "model.vocab_size=10000 is not used when train.tokenizer_vocab_size is set" in caplog.text
    with pytest.raises(ConfigError, match=r"has \d+ tokens but model.vocab_size=20"):
        prepare_data(model.replace(vocab_size=20), cfg)


def test_fine_tuning_a_longer_model_than_the_preset_buckets_adds_its_max_length(tmp_path, tiny_model_dir):
    """The small preset's buckets stop at 64 tokens; a model fine-tuned from init_from reads up to its own
    max length (an imported MiniLM: 256), which becomes the last bucket instead of a refused example."""
    from jaxclf.train.prepare import prepare_data
    from jaxclf.train.presets import get_preset
    model, cfg = get_preset("small")
    long_rows = tmp_path / "long.csv"
    long_rows.write_text("text,label\n" + "".join(f'"{" ".join(["good tasty food"] * 12)} {i}",positive\n'
                                                    f'"bad",negative\n"fine",neutral\n' for i in range(4)))
    prepared = prepare_data(model, cfg.replace(train_file=str(long_rows), init_from=str(tiny_model_dir),
                                               length_buckets=(16,), eval_split=0.0))
    assert prepared.buckets == (16, 32) and int(prepared.train_ds.lengths.max()) == 32


def test_dotted_overrides_parse_by_field_type():
    model, train_cfg = get_preset("tiny")
    model, train_cfg = apply_overrides(model, train_cfg, [
        "model.d_model=48", "model.norm_first=true", "train.learning_rate=3e-4",
        "train.length_buckets=16,32", "train.eval_file=none", "train.labels=a,b"])
    assert (model.d_model, model.norm_first) == (48, True)
    assert train_cfg.learning_rate == 3e-4 and train_cfg.length_buckets == (16, 32)
    assert train_cfg.eval_file is None and train_cfg.labels == ("a", "b")
    with pytest.raises(ConfigError, match="no field 'd_modle'"):
        apply_overrides(model, train_cfg, ["model.d_modle=3"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(model, train_cfg, ["model.nhead=four"])
    with pytest.raises(ConfigError, match="neither a preset"):
        get_preset("no-such-preset")


def test_classification_report_by_hand():
    # true: a a b b c ; pred: a b b b a
    report = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"], loss=0.5)
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    pc = report["per_class"]
    assert pc["a"]["precision"] == pytest.approx(0.5) and pc["a"]["recall"] == pytest.approx(0.5)
    assert pc["b"]["precision"] == pytest.approx(2 / 3) and pc["b"]["recall"] == pytest.approx(1.0)
    assert pc["c"]["f1"] == 0.0 and pc["c"]["support"] == 1
    assert report["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


# ----------------------------------------------------------------------------- bad input


def test_bad_training_data_fails_with_named_error_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"fine text",positive\n"another",negative,extra\n', encoding="utf-8")
    out = tmp_path / "run"
    model, cfg = get_preset("tiny")
    cfg = apply_overrides(model, cfg, [])[1]
    import dataclasses
    cfg = dataclasses.replace(cfg, train_file=str(bad), output_dir=str(out))
    with pytest.raises(DataError, match=r"bad\.csv:3:.*field"):
        train(model, cfg)
    assert not out.exists(), "a failed run must not create its output directory"


def test_unknown_eval_label_is_named(tmp_path):
    ev = tmp_path / "eval.csv"
    ev.write_text("text,label\nsome words here,positive\nmore words,furious\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--eval", str(ev), "--output", str(tmp_path / "r")],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "furious" in proc.stderr and "eval.csv" in proc.stderr and "line 3" in proc.stderr
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- the main job


# Runs a script (argv[1]) as __main__ and prints the torch modules it imported when it exits.
REPORT_TORCH_AT_EXIT = """
import atexit, runpy, sys
atexit.register(lambda: print("torch modules:", sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                              file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_default_command_trains_on_sample_data_and_both_frameworks_load_the_export(tmp_path):
    """`python scripts/train.py` with no arguments, from a directory holding data/sample_texts.csv."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sample_texts.csv").write_bytes(SAMPLE.read_bytes())
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", REPORT_TORCH_AT_EXIT, str(SCRIPT)], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "torch modules: []" in proc.stderr, "training imported torch: " + proc.stderr[-300:]
    out = tmp_path / "runs" / "default"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"default run: {wall:.1f} s wall, eval accuracy {summary['accuracy']:.3f}")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json"):
        assert (out / "model" / name).is_file()
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert list((out / "tensorboard").iterdir()), "no TensorBoard event file"
    kinds = {json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"train", "eval"}
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert set(metrics["eval"]["per_class"]) == {"negative", "neutral", "positive"}

    import jaxclf
    import torch_ref
    texts = ["The food was cold and the waiter ignored us.", "Absolutely loved it!", "It opens at nine.", ""]
    with jax.default_matmul_precision("highest"):
        jax_logits = jaxclf.load(out / "model").logits(texts)
    torch_logits = torch_ref.load(out / "model").logits(texts)
    err = float(np.abs(jax_logits - torch_logits).max())
    assert err < 1e-5, f"JAX vs torch_ref logits differ by {err:g}"


# ----------------------------------------------------------------------------- mixed precision


def keyword_dataset(path: Path, n: int = 192) -> Path:
    """Three classes, each text holding one class keyword among filler words: learnable in a few dozen steps."""
    import csv
    rng = random.Random(0)
    filler = "the a of and to in is it that was for on with as this at by from".split()
    keys = {"negative": ["awful", "terrible", "broken"], "neutral": ["tuesday", "meters", "schedule"],
            "positive": ["wonderful", "delightful", "superb"]}
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = list(keys)[i % 3]
            words = [rng.choice(filler) for _ in range(rng.randint(4, 12))]
            words.insert(rng.randint(0, len(words)), rng.choice(keys[label]))
            writer.writerow([" ".join(words), label])
    return path


@pytest.mark.slow
def test_head_tail_truncation_learns_what_only_a_long_text_s_ending_says(tmp_path):
    """Keyword in the last words of a 40-60 word text, max length 32: visible only with truncation_head."""
    import csv
    rng = random.Random(1)
    filler = "the a of and to in is it that was for on with as this at by from".split()
    keys = {"negative": "awful", "neutral": "tuesday", "positive": "wonderful"}
    rows = []
    for i in range(150):
        label = list(keys)[i % 3]
        rows.append((" ".join(rng.choice(filler) for _ in range(rng.randint(40, 60))) + f" {keys[label]} .", label))
    data_file = tmp_path / "endings.csv"
    with open(data_file, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    accuracy = {}
    for name, extra in (("head+tail", ["model.truncation_head=8"]), ("head only", [])):
        out = tmp_path / name.replace("+", "_").replace(" ", "_")
        run_train(out, "--train", str(data_file), "train.max_steps=60", "train.learning_rate=3e-3",
                  "train.lr_schedule=constant", "train.eval_split=0", "train.save_steps=1000", *extra)
        clf = jaxclf.load(out / "model")
        assert clf.config.truncation_head == (8 if extra else None)  # recorded in config.json
        predictions = clf.predict([text for text, _ in rows])
        accuracy[name] = np.mean([p["label"] == label for p, (_, label) in zip(predictions, rows)])
    assert accuracy["head+tail"] >= 0.95, accuracy
    assert accuracy["head only"] <= 0.5, accuracy  # the keyword was cut off: chance level


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train(tmp_path, precision):
    out = tmp_path / precision
    data_file = keyword_dataset(tmp_path / "keywords.csv")
    proc = run_train(out, "--train", str(data_file), f"train.mixed_precision={precision}", "train.max_steps=100",
                     "train.learning_rate=3e-3", "train.lr_schedule=constant", "train.eval_split=0",
                     "train.save_steps=1000")
    losses = list(train_losses(out).values())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, f"{precision}: loss did not fall ({first:.3f} -> {last:.3f})"
    config = json.loads((out / "model" / "config.json").read_text())["model"]
    assert config["dtype"] == "float32", "the export should record fp32 compute for serving"
    assert "Traceback" not in proc.stderr


def test_fp16_overflow_step_is_skipped_not_applied():
    """A loss scale so large the scaled gradients overflow: params and optimiser state stay, the scale halves."""
    import jax.numpy as jnp
    from jaxclf.train import sharding
    from jaxclf.train.loop import build_train_state
    from jaxclf.train.step import make_train_step

    config = ModelConfig(vocab_size=50, d_model=16, nhead=2, num_encoder_layers=1, dim_feedforward=32,
                         max_position_embeddings=16, dtype="float16")
    cfg = TrainingConfig(mixed_precision="fp16", loss_scale_init=3e38, warmup_steps=0)
    mesh = sharding.make_mesh()
    setup = build_train_state(config, cfg, mesh, total_steps=10)
    step = jax.jit(make_train_step(setup.graphdef, setup.rest, setup.tx, setup.schedule, cfg))
    rng = np.random.default_rng(0)
    batch = {"input_ids": jnp.asarray(rng.integers(5, 50, (4, 8)), jnp.int32),
             "attention_mask": jnp.ones((4, 8), jnp.int32), "labels": jnp.asarray([0, 1, 2, 0], jnp.int32),
             "weights": jnp.ones((4,), jnp.float32)}
    before = jax.tree.map(np.asarray, setup.state)
    after, metrics = step(setup.state, batch)
    assert int(metrics["skipped"]) == 1
    assert float(after["loss_scale"]) == pytest.approx(1.5e38)
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"])):
        assert np.array_equal(a, np.asarray(b)), "an overflowed step changed the parameters"
    for a, b in zip(jax.tree.leaves(before["opt_state"]), jax.tree.leaves(after["opt_state"])):
        assert np.array_equal(a, np.asarray(b)), "an overflowed step changed the optimiser state"
    # With a sane scale the same batch is applied.
    sane = dict(after, loss_scale=jnp.float32(1024.0))
    applied, metrics = step(sane, batch)
    assert int(metrics["skipped"]) == 0
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(applied["params"])))


def test_micro_batches_give_the_whole_batch_update():
    """micro_batches=4 (lax.scan gradient accumulation) = one pass over the batch, padding rows included."""
    import jax.numpy as jnp
    from jaxclf.train import sharding
    from jaxclf.train.loop import build_train_state
    from jaxclf.train.step import make_train_step

    config = ModelConfig(vocab_size=50, d_model=16, nhead=2, num_encoder_layers=2, dim_feedforward=32,
                         max_position_embeddings=16, dropout=0.0, attention_dropout=0.0)
    rng = np.random.default_rng(0)
    mask = (np.arange(12)[None] < rng.integers(3, 13, 8)[:, None]).astype(np.int32)
    batch = {"input_ids": jnp.asarray(rng.integers(5, 50, (8, 12)) * mask, jnp.int32),
             "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(rng.integers(0, 3, 8), jnp.int32),
             "weights": jnp.asarray([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)}  # two padding rows
    mesh = sharding.make_mesh()
    results = {}
    for m in (1, 4):
        cfg = TrainingConfig(per_device_train_batch_size=8, micro_batches=m, warmup_steps=0)
        setup = build_train_state(config, cfg, mesh, total_steps=10)
        step = jax.jit(make_train_step(setup.graphdef, setup.rest, setup.tx, setup.schedule, cfg))
        state, metrics = step(setup.state, batch)
        state, metrics = step(state, batch)
        results[m] = (jax.tree.map(np.asarray, state["params"]), {k: float(v) for k, v in metrics.items()})
    for a, b in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[4][0])):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
    for key in ("loss", "grad_norm", "update_norm"):
        assert results[4][1][key] == pytest.approx(results[1][1][key], rel=1e-5), key
    with pytest.raises(ConfigError, match="micro_batches must be a divisor of per_device_train_batch_size=16"):
        TrainingConfig(micro_batches=3)


# ----------------------------------------------------------------------------- retention and early stopping


def test_retention_keeps_latest_and_best_and_early_stopping_stops(tmp_path):
    out = tmp_path / "run"
    # A learning rate too small to change any prediction: the metric never improves after the first eval.
    run_train(out, "train.learning_rate=1e-9", "train.max_steps=60", "train.eval_steps=5", "train.save_steps=5",
              "train.early_stopping_patience=2", "train.save_total_limit=2", "train.save_best_total=1")
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [5, 10, 15], "expected a stop after 2 evaluations without improvement"
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 15 and len(steps) <= 3, steps
    summary = json.loads((out / "model" / "metrics.json").read_text())
    assert summary["step"] in steps, "the exported (best) checkpoint must have been kept"


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.slow
def test_fine_tune_from_model_dir_keeps_architecture_and_freezes_embeddings(tmp_path, tiny_model_dir):
    """--init-from a model directory, with frozen embeddings, layer-wise LR decay and remat."""
    out = tmp_path / "ft"
    run_train(out, "--init-from", str(tiny_model_dir), "train.max_steps=6", "train.eval_steps=6",
              "train.freeze_embeddings=true", "train.layerwise_lr_decay=0.8", "train.gradient_checkpointing=true",
              "train.learning_rate=1e-3")
    before, after = weights_of(Path(tiny_model_dir)), weights_of(out / "model")
    assert before.keys() == after.keys()
    embeddings = [k for k in before if k.startswith("embeddings.")]
    assert embeddings and all(np.array_equal(before[k], after[k]) for k in embeddings), "embeddings moved"
    moved = [k for k in before if not k.startswith("embeddings.") and not np.array_equal(before[k], after[k])]
    assert moved, "nothing was trained"
    src = json.loads((Path(tiny_model_dir) / "config.json").read_text())["model"]
    dst = json.loads((out / "model" / "config.json").read_text())["model"]
    # The architecture is kept; the temperature is refitted at export (calibration).
    assert {k: v for k, v in dst.items() if k not in ("gradient_checkpointing", "temperature")} == \
        {k: v for k, v in src.items() if k not in ("gradient_checkpointing", "temperature")}
    assert (out / "model" / "tokenizer.json").read_text() == (Path(tiny_model_dir) / "tokenizer.json").read_text()
