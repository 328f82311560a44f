#!/usr/bin/env python
"""Accuracy on public data sets: TF-IDF baselines vs jaxclf from scratch vs jaxclf fine-tuned from MiniLM.

Every method sees the same split of each data set (scripts/prepare_data.py: duplicates removed, 80/20
stratified, seed 0; prepared here if data/NAME/ is missing) and is scored on the whole test split.

    tfidf_svc       TF-IDF (word 1-2-grams, sublinear tf) + LinearSVC            scikit-learn defaults
    tfidf_logreg    the same features + LogisticRegression(max_iter=1000)         scikit-learn defaults
    jaxclf_scratch  scripts/train.py --config medium (tokenizer trained on the train split)
    minilm          scripts/import_hf.py --hf-dir all-MiniLM-L6-v2 (mean pooling, fresh head), then
                    scripts/train.py --init-from it, train.learning_rate=5e-5

The jaxclf methods train with `--train train.jsonl --eval test.jsonl`, evaluating only once, at the
end (eval_steps/save_steps past the last step), so the exported model is the last one: the test
split never selects a checkpoint. Their metrics come from `scripts/evaluate.py --model OUT/model
--data test.jsonl`; the baselines' from sklearn.metrics. "train s" is the wall time of fitting
(for jaxclf: the whole train.py process: start-up, tokenization, compilation, training, the one
test evaluation and the export; "eval s" is the separate evaluate.py process).

Settings per data set and/or method take `VALUE` (all) or `KEY=VALUE,...` with KEY a data set, a
method, or DATASET:METHOD (DATASET:METHOD wins over METHOD, METHOD over DATASET):

    python benchmarks/accuracy.py                                   # the defaults below, ~1 h on 2 CPU cores
    python benchmarks/accuracy.py --datasets bbcnews --methods minilm --max-length 128 --epochs 3 --variant len128
    python benchmarks/accuracy.py --datasets tweets --methods minilm --max-train all --epochs 1 --variant full-train
    python benchmarks/accuracy.py --datasets bbcnews --methods minilm --truncation-head 128 --variant head-tail
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
METHODS = ("tfidf_svc", "tfidf_logreg", "jaxclf_scratch", "minilm")
JAXCLF_METHODS = ("jaxclf_scratch", "minilm")
# Defaults sized for a 2-core CPU (see benchmarks/README.md): each BBC fine-tune ~20 min at most.
DEFAULT_EPOCHS = "jaxclf_scratch=8,minilm=2,tweets:jaxclf_scratch=3"
# Tweets: 99.5% fit in 64 wordpieces; a cap of 64 keeps a rare long (mojibake) tweet from padding its batch to 128.
DEFAULT_MAX_LENGTH = "jaxclf_scratch=128,minilm=256,tweets:jaxclf_scratch=64,tweets:minilm=64"
DEFAULT_MAX_TRAIN = "tweets:minilm=8000"
# Short texts: a batch of 32 amortises the per-step optimiser update over the 22M (MiniLM) parameters.
DEFAULT_SETS = ("tweets:train.per_device_train_batch_size=32",)
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
    """(fraction of texts longer than the model's truncation, that length), counted with its tokenizer."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    limit = tok.truncation["max_length"] if tok.truncation else None
    tok.no_truncation()
    tok.no_padding()
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    return (sum(n > limit for n in lengths) / len(lengths) if limit else 0.0), limit


def run_jaxclf(method: str, dataset: str, train_file: Path, test_file: Path, n_train: int, out: Path,
               epochs: float, max_length: int, labels: list[str], overrides: list[str], max_steps: int | None,
               test_texts: list[str], truncation_head: str | None = None) -> dict:
    if out.exists():  # train.py resumes from checkpoints in its output directory: start clean
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log_path = out / "log.txt"
    commands, import_s = [], 0.0
    batch = 16  # both presets' per_device_train_batch_size unless overridden below
    for o in overrides:
        if o.startswith("train.per_device_train_batch_size="):
            batch = int(o.split("=", 1)[1])
    import jax
    total_steps = max_steps or math.ceil(epochs * (n_train // (batch * jax.device_count())))
    train_cmd = ["scripts/train.py", "--train", str(train_file), "--eval", str(test_file),
                 "--output", str(out / "run"), "--log-level", "INFO"]
    common = [f"train.eval_steps={NEVER}", f"train.save_steps={NEVER}", "train.progress_bar=false",
              f"train.num_train_epochs={epochs}"] + ([f"train.max_steps={max_steps}"] if max_steps else [])
    if method == "jaxclf_scratch":
        train_cmd += ["--config", "medium", *common, f"model.max_position_embeddings={max_length}",
                      "train.tokenizer_vocab_size=8000"]
        if truncation_head:
            train_cmd.append(f"model.truncation_head={truncation_head}")
    else:
        base = out / "minilm_init"
        import_cmd = ["scripts/import_hf.py", "--hf-dir", "all-MiniLM-L6-v2", "--output", str(base),
                      "--labels", ",".join(labels), "--max-length", str(max_length)]
        if truncation_head:
            import_cmd += ["--truncation-head", truncation_head]
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
    if abs(summary.get("accuracy", metrics["accuracy"]) - metrics["accuracy"]) > 1e-6:
        log.warning("%s %s: train.py's final test accuracy %.4f differs from evaluate.py's %.4f", dataset, method,
                    summary["accuracy"], metrics["accuracy"])
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "train_s": train_s,
            "eval_s": eval_s, "import_s": import_s or None, "steps": summary["steps"],
            "train_py_summary": summary, "evaluate": metrics,
            "test_truncated_fraction": truncated, "max_length": limit,
            "truncation_head": int(truncation_head) if truncation_head else None,
            "commands": [" ".join(["python", *c]) for c in commands]}


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
                train_file = directory / "train.jsonl"
                if n not in (None, "all") and int(n) < len(train[0]):
                    keep = stratified_subset(train[1], int(n), SUBSAMPLE_SEED)
                    train_file = write_jsonl(work / dataset / f"train_subset_{n}.jsonl",
                                             [train[0][i] for i in keep], [train[1][i] for i in keep])
                    run["train_rows"] = len(keep)
                    run["train_subsample"] = {"requested": int(n), "seed": SUBSAMPLE_SEED, "stratified": True}
                run["epochs"] = float(lookup(epochs, dataset, method, "1"))
                extra = [o for d, m, o in overrides if d in (None, dataset) and m in (None, method)]
                run.update(run_jaxclf(method, dataset, train_file, test_file, run["train_rows"],
                                      work / dataset / (method + (f"@{args.variant}" if args.variant else "")),
                                      run["epochs"],
                                      int(lookup(max_length, dataset, method, "128")), labels, extra,
                                      args.max_steps, test[0], lookup(truncation_head, dataset, method)))
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
                     f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{r['train_s']:.1f}", f"{r['eval_s']:.1f}",
                     f"{100 * r['test_truncated_fraction']:.1f}" if "test_truncated_fraction" in r else "-"])
    table = markdown_table(["data set", "method", "train rows", "test rows", "max len", "epochs", "steps",
                            "accuracy", "macro-F1", "train s", "eval s", "test truncated %"], rows)
    note = ("Split: scripts/prepare_data.py (duplicates removed, 80/20 stratified, seed 0). jaxclf rows: "
            "metrics from scripts/evaluate.py on the test split; train s is the whole scripts/train.py process "
            "(start-up, compilation, training, one test evaluation, export). Commands: NAME.json.\n\n")
    return write_results(args.name, {"runs": every}, note + table)


if __name__ == "__main__":
    sys.exit(main())
