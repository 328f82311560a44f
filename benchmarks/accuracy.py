#!/usr/bin/env python
"""Accuracy on public data sets: TF-IDF baselines vs jaxclf from scratch vs jaxclf fine-tuned from MiniLM.

Every method sees the same split of each data set (scripts/prepare_data.py: duplicates removed, 80/20
stratified, seed 0; prepared here if data/NAME/ is missing) and is scored on the whole test split.

    tfidf_svc       TF-IDF (word 1-2-grams, sublinear tf) + LinearSVC            scikit-learn defaults
    tfidf_logreg    the same features + LogisticRegression(max_iter=1000)         scikit-learn defaults
    jaxclf_scratch  scripts/train.py --config medium (tokenizer trained on the train split)
    minilm          scripts/import_hf.py --hf-dir all-MiniLM-L6-v2 (mean pooling, fresh head), then
                    scripts/train.py --init-from it (default preset), train.learning_rate=5e-5, 6% warmup
    distilled       scripts/train.py --config medium --distill-from WORK/DATASET/TEACHER/run/model: the
                    scratch model trained on a teacher's soft labels (--teacher, default the minilm run)

The jaxclf methods hold out --calibration-split of their training rows (stratified, seed 0) as
`--eval`: the one evaluation, at the end (eval_steps/save_steps past the last step, so the exported
model is the last one), and the temperature fitted at export are on those rows, never on the test
split. Their metrics come from `scripts/evaluate.py --model OUT/model --data test.jsonl`: "ECE" is
the calibrated model's, "ECE T=1" the same logits before temperature scaling; the baselines'
come from sklearn.metrics. "train s" is the wall time of fitting (for jaxclf: the whole train.py
process: start-up, tokenization, teacher logits, compilation, training, the one evaluation and the
export; "eval s" is the separate evaluate.py process).

Settings per data set and/or method take `VALUE` (all) or `KEY=VALUE,...` with KEY a data set, a
method, or DATASET:METHOD (DATASET:METHOD wins over METHOD, METHOD over DATASET):

    python benchmarks/accuracy.py                                   # the defaults below, ~1 h on 2 CPU cores
    python benchmarks/accuracy.py --datasets bbcnews --methods minilm --max-length 128 --epochs 3 --variant len128
    python benchmarks/accuracy.py --datasets tweets --methods minilm --max-train all --epochs 1 --variant full-train
    python benchmarks/accuracy.py --datasets bbcnews --methods minilm --truncation-head 128 --variant head-tail
    python benchmarks/accuracy.py --datasets bbcnews --methods minilm --long-text chunks --variant chunks
    python benchmarks/accuracy.py --datasets tweets --methods distilled --teacher minilm@full-train
    python benchmarks/accuracy.py --set minilm:train.per_device_train_batch_size=32
    python benchmarks/accuracy.py --max-steps 3 --max-test 40 --max-train 200 --name accuracy_smoke --fresh  # smoke

Results: benchmarks/results/NAME.json (every run's settings, commands and full metrics) and NAME.md;
rows of an earlier NAME.json for (data set, method, variant) triples not rerun are kept unless --fresh.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, write_results  # noqa: E402

log = logging.getLogger("accuracy")

DATASETS = ("bbcnews", "tweets")
METHODS = ("tfidf_svc", "tfidf_logreg", "jaxclf_scratch", "minilm", "distilled")
JAXCLF_METHODS = ("jaxclf_scratch", "minilm", "distilled")
# Defaults sized for a 2-core CPU (see benchmarks/README.md): each BBC fine-tune ~20 min at most.
DEFAULT_EPOCHS = "jaxclf_scratch=8,minilm=2,distilled=8,tweets:jaxclf_scratch=3,tweets:distilled=3"
# Tweets: 99.5% fit in 64 wordpieces; a cap of 64 keeps a rare long (mojibake) tweet from padding its batch to 128.
DEFAULT_MAX_LENGTH = "jaxclf_scratch=128,minilm=256,distilled=128,tweets:jaxclf_scratch=64,tweets:minilm=64," \
                     "tweets:distilled=64"
DEFAULT_CALIBRATION_SPLIT = 0.1
DEFAULT_MAX_TRAIN = "tweets:minilm=8000"
# Short texts: a batch of 32 amortises the per-step optimiser update over the 22M (MiniLM) parameters.
# BBC: 16 (the batch of the earlier truncate/head_tail rows), so a 2-epoch fine-tune still makes ~500 steps.
DEFAULT_SETS = ("tweets:train.per_device_train_batch_size=32", "bbcnews:train.per_device_train_batch_size=16")
# The preset each jaxclf method starts from: `medium` is the 4-layer d256 model trained from scratch;
# MiniLM brings its own model, and takes the default preset's training settings.
PRESET = {"jaxclf_scratch": "medium", "distilled": "medium", "minilm": "small"}
NEVER = 10 ** 9  # eval_steps / save_steps past the last step: evaluate and save once, at the end
SUBSAMPLE_SEED = 0


# ----------------------------------------------------------------------------- settings

def parse_setting(text: str | None, what: str) -> dict[str, str]:
    """'V' -> {'': 'V'}; 'k=V,k2=W' -> {'k': 'V', 'k2': 'W'}; keys: DATASET, METHOD or DATASET:METHOD."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, sep, value = item.strip().rpartition("=")
        parts = key.split(":") if key else []
        ok = (len(parts) <= 2 and all(p in DATASETS + METHODS for p in parts)
              and (len(parts) < 2 or (parts[0] in DATASETS and parts[1] in METHODS)))
        if not value or not ok:
            raise SystemExit(f"--{what} {text!r}: {item!r} must be VALUE or KEY=VALUE with KEY a data set "
                             f"({', '.join(DATASETS)}), a method ({', '.join(METHODS)}) or DATASET:METHOD")
        out[key] = value
    return out


def lookup(setting: dict[str, str], dataset: str, method: str, default: str | None = None) -> str | None:
    for key in (f"{dataset}:{method}", method, dataset, ""):
        if key in setting:
            return setting[key]
    return default


def parse_overrides(items: list[str]) -> list[tuple[str | None, str | None, str]]:
    """--set [DATASET:][METHOD:]section.key=value -> (dataset, method, 'section.key=value')."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        *scope, name = key.split(":")
        dataset = next((s for s in scope if s in DATASETS), None)
        method = next((s for s in scope if s in METHODS), None)
        if not sep or "." not in name or len(scope) > 2 or any(s not in DATASETS + METHODS for s in scope) \
                or (method is not None and method not in JAXCLF_METHODS):
            raise SystemExit(f"--set {item!r} must look like [DATASET:][METHOD:]train.key=value with METHOD one "
                             f"of {', '.join(JAXCLF_METHODS)}")
        out.append((dataset, method, f"{name}={value}"))
    return out


# ----------------------------------------------------------------------------- data

def read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    # split at "\n" only: str.splitlines() would also break at U+0085 / U+2028 inside a JSON string
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def write_jsonl(path: Path, texts, labels) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t, y in zip(texts, labels):
            f.write(json.dumps({"text": t, "label": y}) + "\n")  # ASCII: no raw U+0085 in a line
    return path


def ensure_split(name: str, data_root: Path) -> Path:
    directory = data_root / name
    if not ((directory / "train.jsonl").is_file() and (directory / "test.jsonl").is_file()):
        from jaxclf.train.datasets import prepare
        log.info("%s: no split in %s yet; preparing it (scripts/prepare_data.py %s)", name, directory, name)
        prepare(name, directory)
    return directory


def calibration_split(folder: Path, train, keep: list[int], fraction: float, tag: str) -> tuple[Path, Path, int]:
    """(train file, calibration file, training rows): `keep`'s rows less a stratified `fraction` (seed 0)."""
    from jaxclf.train.data import stratified_split
    labels = [train[1][i] for i in keep]
    fit, held = stratified_split(labels, fraction, seed=SUBSAMPLE_SEED)
    rows = lambda idx: ([train[0][keep[i]] for i in idx], [train[1][keep[i]] for i in idx])
    name = f"train_{tag}_cal{fraction:g}"
    return (write_jsonl(folder / f"{name}_fit.jsonl", *rows(fit)),
            write_jsonl(folder / f"{name}_held.jsonl", *rows(held)), len(fit))


def stratified_subset(labels: list[str], n: int, seed: int) -> list[int]:
    """About n indices (every label in proportion), chosen by seed; all of them when n >= len(labels)."""
    if n >= len(labels):
        return list(range(len(labels)))
    from jaxclf.train.data import stratified_split
    _, picked = stratified_split(labels, n / len(labels), seed=seed)
    return picked.tolist()


# ----------------------------------------------------------------------------- methods

def run_tfidf(method: str, train, test) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    head = LinearSVC() if method == "tfidf_svc" else LogisticRegression(max_iter=1000)
    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), head)
    start = time.perf_counter()
    pipe.fit(train[0], train[1])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    predicted = pipe.predict(test[0])
    eval_s = time.perf_counter() - start
    return {"accuracy": float(accuracy_score(test[1], predicted)),
            "macro_f1": float(f1_score(test[1], predicted, average="macro")),
            "train_s": train_s, "eval_s": eval_s,
            "settings": {"features": "TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)",
                         "classifier": repr(head)}}


def run_command(cmd: list[str], log_path: Path) -> tuple[str, float]:
    """Run a script with the same interpreter; stdout returned, stderr to log_path; (stdout, seconds)."""
    log.info("$ %s", " ".join(cmd))
    start = time.perf_counter()
    with open(log_path, "a") as err:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; last lines of {log_path}:\n" + "\n".join(tail))
    return proc.stdout, seconds


def truncated_fraction(model_dir: Path, texts: list[str]) -> tuple[float, int]:
    """(fraction of texts the model does not read whole, its max length), counted with its tokenizer and rule.

    Under long_text=chunks a text is cut only past its max_chunks windows.
    """
    from tokenizers import Tokenizer
    from jaxclf.model_dir import read_config
    from jaxclf.tokenizer import TextEncoder
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    encoder = TextEncoder.for_config(tok, read_config(model_dir))
    limit = encoder.max_length
    if encoder.chunking is not None:
        special = len(tok.encode("a").ids) - len(tok.encode("a", add_special_tokens=False).ids)
        chunks = encoder.chunking
        limit_text = limit - special + (chunks.max_windows - 1) * chunks.stride
        tok.no_truncation()
        tok.no_padding()
        lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
        return sum(n > limit_text for n in lengths) / len(lengths), limit
    tok.no_truncation()
    tok.no_padding()
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    return sum(n > limit for n in lengths) / len(lengths), limit


def clean_run_dir(out: Path) -> None:
    """An empty `out` (train.py resumes from checkpoints in its output directory), except for the teacher
    logits a distilled run caches there: keyed by the teacher's files and the texts, so a stale one is
    never read, and the teacher's pass over the training texts is most of a rerun's time."""
    cache = out / "run" / "teacher_logits"
    kept = out.parent / f".{out.name}.teacher_logits"
    if cache.is_dir():
        shutil.rmtree(kept, ignore_errors=True)
        cache.rename(kept)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if kept.is_dir():
        cache.parent.mkdir()
        kept.rename(cache)


def run_jaxclf(method: str, dataset: str, train_file: Path, eval_file: Path, test_file: Path, n_train: int,
               out: Path, epochs: float, max_length: int, labels: list[str], overrides: list[str],
               max_steps: int | None, test_texts: list[str], truncation_head: str | None = None,
               long_text: dict[str, str] | None = None, teacher: Path | None = None) -> dict:
    clean_run_dir(out)
    log_path = out / "log.txt"
    commands, import_s = [], 0.0
    from jaxclf.train.presets import get_preset
    batch = get_preset(PRESET[method])[1].per_device_train_batch_size
    for o in overrides:
        if o.startswith("train.per_device_train_batch_size="):
            batch = int(o.split("=", 1)[1])
    import jax
    total_steps = max_steps or math.ceil(epochs * (n_train // (batch * jax.device_count())))
    train_cmd = ["scripts/train.py", "--train", str(train_file), "--eval", str(eval_file),
                 "--output", str(out / "run"), "--log-level", "INFO"]
    common = [f"train.eval_steps={NEVER}", f"train.save_steps={NEVER}", "train.progress_bar=false",
              f"train.num_train_epochs={epochs}"] + ([f"train.max_steps={max_steps}"] if max_steps else [])
    long_text = long_text or {}
    if method in ("jaxclf_scratch", "distilled"):
        train_cmd += ["--config", PRESET[method], *common, f"model.max_position_embeddings={max_length}",
                      "train.tokenizer_vocab_size=8000"]
        if truncation_head:
            train_cmd.append(f"model.truncation_head={truncation_head}")
        train_cmd += [f"model.{key}={value}" for key, value in long_text.items()]
        if method == "distilled":
            if not (teacher / "config.json").is_file():
                raise RuntimeError(f"distilled: no teacher model at {teacher}; run its method first (--teacher)")
            train_cmd += ["--distill-from", str(teacher)]
    else:
        base = out / "minilm_init"
        import_cmd = ["scripts/import_hf.py", "--hf-dir", "all-MiniLM-L6-v2", "--output", str(base),
                      "--labels", ",".join(labels), "--max-length", str(max_length)]
        if truncation_head:
            import_cmd += ["--truncation-head", truncation_head]
        import_cmd += [f"--{key.replace('_', '-')}={value}" for key, value in long_text.items()]
        _, import_s = run_command(import_cmd, log_path)
        commands.append(import_cmd)
        warmup = max(1, round(0.06 * total_steps))  # 6% warmup, then linear decay
        train_cmd += ["--init-from", str(base), *common, "train.learning_rate=5e-5",
                      f"train.warmup_steps={warmup}"]
    train_cmd += overrides
    stdout, train_s = run_command(train_cmd, log_path)
    commands.append(train_cmd)
    summary = json.loads(stdout.strip().splitlines()[-1])
    eval_cmd = ["scripts/evaluate.py", "--model", str(out / "run" / "model"), "--data", str(test_file)]
    stdout, eval_s = run_command(eval_cmd, log_path)
    commands.append(eval_cmd)
    metrics = json.loads(stdout)
    truncated, limit = truncated_fraction(out / "run" / "model", test_texts)
    from jaxclf.model_dir import read_config
    config = read_config(out / "run" / "model")
    pooling = (other_poolings(out / "run" / "model", test_file, log_path, commands)
               if config.long_text == "chunks" else {})
    exported = json.loads((out / "run" / "model" / "metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "train_s": train_s,
            "eval_s": eval_s, "import_s": import_s or None, "steps": summary["steps"],
            "ece": metrics["ece"], "ece_t1": metrics.get("uncalibrated", {"ece": metrics["ece"]})["ece"],
            "temperature": config.temperature, "calibration": exported.get("calibration"),
            "train_py_summary": summary, "evaluate": metrics,
            "test_truncated_fraction": truncated, "max_length": limit,
            "truncation_head": int(truncation_head) if truncation_head else None,
            "long_text": {k: getattr(config, k) for k in ("long_text", "chunk_stride", "max_chunks", "chunk_pooling")},
            "teacher": str(teacher) if teacher else None, "other_poolings": pooling,
            "commands": [" ".join(["python", *c]) for c in commands]}


def other_poolings(model: Path, test_file: Path, log_path: Path, commands: list) -> dict:
    """Under chunks: the test metrics of the same trained model with each other pooling rule (a config.json
    change: the windows' logits are the same, only how a document's are combined differs)."""
    from jaxclf.long_text import CHUNK_POOLINGS
    config = json.loads((model / "config.json").read_text())
    out = {}
    for rule in CHUNK_POOLINGS:
        if rule == config["model"]["chunk_pooling"]:
            continue
        copy = model.parent / f"model_pooling_{rule}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(model, copy)
        changed = {**config, "model": {**config["model"], "chunk_pooling": rule}}
        (copy / "config.json").write_text(json.dumps(changed, indent=2))
        eval_cmd = ["scripts/evaluate.py", "--model", str(copy), "--data", str(test_file)]
        stdout, _ = run_command(eval_cmd, log_path)
        commands.append(eval_cmd)
        metrics = json.loads(stdout)
        out[rule] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "ece": metrics["ece"]}
    return out


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--epochs", default=DEFAULT_EPOCHS, help=f"jaxclf training epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--max-length", default=DEFAULT_MAX_LENGTH,
                   help="jaxclf truncation in wordpieces, special tokens included: the scratch model's "
                        "model.max_position_embeddings, MiniLM's import --max-length "
                        f"(default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--truncation-head", default=None,
                   help="head+tail truncation for the jaxclf methods: a longer text keeps its first N tokens and "
                        "its last (max length - N) (model.truncation_head / import --truncation-head); "
                        "default: keep the first max length tokens")
    p.add_argument("--long-text", default=None,
                   help="long-text rule of the jaxclf methods (truncate, head_tail, chunks; default truncate)")
    p.add_argument("--chunk-pooling", default=None, help="chunks: mean, max or weighted (default mean)")
    p.add_argument("--chunk-stride", default=None, help="chunks: text tokens between windows (default 3/4 window)")
    p.add_argument("--max-chunks", default=None, help="chunks: windows read per text (default 8)")
    p.add_argument("--teacher", default="minilm",
                   help="distilled: the teacher, METHOD or METHOD@VARIANT of an earlier run of this benchmark on "
                        "the same data set (its model in WORK/DATASET/METHOD[@VARIANT]/run/model; default minilm)")
    p.add_argument("--calibration-split", type=float, default=DEFAULT_CALIBRATION_SPLIT,
                   help="fraction of the jaxclf methods' training rows held out for the end-of-run evaluation and "
                        f"the temperature fit (default {DEFAULT_CALIBRATION_SPLIT})")
    p.add_argument("--max-train", default=DEFAULT_MAX_TRAIN,
                   help="train the jaxclf methods on a stratified subsample of about N training rows (seed 0), "
                        "or on all of them (all); "
                        f"the TF-IDF baselines always use the whole train split (default {DEFAULT_MAX_TRAIN})")
    p.add_argument("--set", action="append", default=[], metavar="[DATASET:][METHOD:]section.key=value",
                   help="extra scripts/train.py override for the jaxclf methods (repeatable), applied after "
                        f"the defaults {' '.join(DEFAULT_SETS)}")
    p.add_argument("--max-steps", type=int, help="smoke test: stop every jaxclf training after N steps")
    p.add_argument("--max-test", type=int, help="smoke test: score on a stratified subsample of N test rows")
    p.add_argument("--data-root", default=str(ROOT / "data"), help="where DATASET/train.jsonl live (default data/)")
    p.add_argument("--work", default=str(ROOT / "runs" / "accuracy"), help="jaxclf runs go to WORK/DATASET/METHOD")
    p.add_argument("--name", default="accuracy", help="result file name under benchmarks/results/")
    p.add_argument("--variant", default="", help="a tag for rows of a non-default setting (e.g. len128): kept "
                                                  "apart from the default rows of the same data set and method")
    p.add_argument("--fresh", action="store_true", help="do not keep rows of an earlier NAME.json")
    args = p.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [d for d in args.datasets if d not in DATASETS] + [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown data set(s) or method(s) {bad}; data sets: {', '.join(DATASETS)}; "
                f"methods: {', '.join(METHODS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    epochs = parse_setting(args.epochs, "epochs")
    max_length = parse_setting(args.max_length, "max-length")
    truncation_head = parse_setting(args.truncation_head, "truncation-head")
    max_train = parse_setting(args.max_train, "max-train")
    long_text_settings = {key: parse_setting(getattr(args, key), key.replace("_", "-"))
                          for key in ("long_text", "chunk_pooling", "chunk_stride", "max_chunks")}
    overrides = parse_overrides([*DEFAULT_SETS, *args.set])
    work = Path(args.work)
    runs = []
    for dataset in args.datasets:
        directory = ensure_split(dataset, Path(args.data_root))
        train, test = read_jsonl(directory / "train.jsonl"), read_jsonl(directory / "test.jsonl")
        test_file = directory / "test.jsonl"
        if args.max_test:
            keep = stratified_subset(test[1], args.max_test, SUBSAMPLE_SEED)
            test = ([test[0][i] for i in keep], [test[1][i] for i in keep])
            test_file = write_jsonl(work / dataset / "test_subset.jsonl", *test)
        labels = sorted(set(train[1]))
        for method in args.methods:
            log.info("=== %s / %s", dataset, method)
            run = {"dataset": dataset, "method": method, "variant": args.variant, "test_rows": len(test[0]), "train_rows": len(train[0]),
                   "full_test": not args.max_test, "load_avg_1min_before": os.getloadavg()[0]}
            if method in JAXCLF_METHODS:
                n = lookup(max_train, dataset, method)
                keep = list(range(len(train[0])))
                if n not in (None, "all") and int(n) < len(train[0]):
                    keep = stratified_subset(train[1], int(n), SUBSAMPLE_SEED)
                    run["train_subsample"] = {"requested": int(n), "seed": SUBSAMPLE_SEED, "stratified": True}
                train_file, eval_file, n_fit = calibration_split(work / dataset, train, keep, args.calibration_split,
                                                                 f"{n}" if run.get("train_subsample") else "all")
                run["train_rows"], run["calibration_rows"] = n_fit, len(keep) - n_fit
                run["epochs"] = float(lookup(epochs, dataset, method, "1"))
                extra = [o for d, m, o in overrides if d in (None, dataset) and m in (None, method)]
                long_text = {key: value for key, setting in long_text_settings.items()
                             if (value := lookup(setting, dataset, method)) is not None}
                teacher = work / dataset / args.teacher / "run" / "model" if method == "distilled" else None
                run.update(run_jaxclf(method, dataset, train_file, eval_file, test_file, n_fit,
                                      work / dataset / (method + (f"@{args.variant}" if args.variant else "")),
                                      run["epochs"],
                                      int(lookup(max_length, dataset, method, "128")), labels, extra,
                                      args.max_steps, test[0], lookup(truncation_head, dataset, method),
                                      long_text, teacher))
                run["overrides"] = extra
            else:
                run.update(run_tfidf(method, train, test))
            run["load_avg_1min_after"] = os.getloadavg()[0]  # the host may be shared: timings are indicative
            log.info("%s / %s: accuracy %.4f macro-F1 %.4f, train %.0f s", dataset, method, run["accuracy"],
                     run["macro_f1"], run["train_s"])
            runs.append(run)
            write(args, runs)  # after every run: a long benchmark keeps what it has finished
    print(write(args, runs))
    return 0


def max_len_cell(run: dict) -> str:
    """'256', or '256 (head 64 + tail 192)' for head+tail truncation."""
    length, head = run.get("max_length"), run.get("truncation_head")
    if not length:
        return "-"
    chunks = (run.get("long_text") or {}).get("long_text") == "chunks"
    if chunks:
        rule = run["long_text"]
        return f"{length} × ≤{rule['max_chunks']} windows ({rule['chunk_pooling']})"
    return f"{length} (head {head} + tail {length - head})" if head else str(length)


def write(args, runs: list[dict]) -> Path:
    previous = []
    old = RESULTS / f"{args.name}.json"
    if old.exists() and not args.fresh:
        key = lambda r: (r["dataset"], r["method"], r.get("variant", ""))
        done = {key(r) for r in runs}
        previous = [r for r in json.loads(old.read_text()).get("runs", []) if key(r) not in done]
    order = {(d, m): (DATASETS.index(d), METHODS.index(m)) for d in DATASETS for m in METHODS}
    every = sorted(previous + runs, key=lambda r: (order[(r["dataset"], r["method"])], r.get("variant", "")))
    rows = []
    for r in every:
        train_rows = f"{r['train_rows']:,}" + (" (subsample)" if r.get("train_subsample") else "")
        method = r["method"] + (f" ({r['variant']})" if r.get("variant") else "")
        rows.append([r["dataset"], method, train_rows, f"{r['test_rows']:,}" + ("" if r["full_test"] else " (subset)"),
                     max_len_cell(r), r.get("epochs") or "-", r.get("steps") or "-",
                     f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
                     f"{r['ece_t1']:.4f}" if "ece_t1" in r else "-", f"{r['ece']:.4f}" if "ece" in r else "-",
                     f"{r['temperature']:.2f}" if "ece" in r else "-",
                     f"{r['train_s']:.1f}", f"{r['eval_s']:.1f}",
                     f"{100 * r['test_truncated_fraction']:.1f}" if "test_truncated_fraction" in r else "-"])
    table = markdown_table(["data set", "method", "train rows", "test rows", "max len", "epochs", "steps",
                            "accuracy", "macro-F1", "ECE T=1", "ECE", "T", "train s", "eval s",
                            "test not read whole %"], rows)
    note = ("Split: scripts/prepare_data.py (duplicates removed, 80/20 stratified, seed 0). TF-IDF rows: the "
            "whole train split. jaxclf rows: trained on the train split less a stratified calibration part "
            "(train rows + calibration_rows in NAME.json; rows without ECE are from before it existed and "
            "evaluated on test once at the end), metrics from scripts/evaluate.py on the test split; ECE T=1 is "
            "before temperature scaling, ECE after (15 bins), T fitted on the calibration part; train s is "
            "the whole scripts/train.py process (start-up, teacher logits, compilation, training, one "
            "evaluation, export). Commands: NAME.json.\n\n")
    return write_results(args.name, {"runs": every}, note + table)


if __name__ == "__main__":
    sys.exit(main())
