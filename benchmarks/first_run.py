#!/usr/bin/env python
"""The first run a person makes: `python scripts/train.py` on the shipped sample, against TF-IDF + LinearSVC.

    python benchmarks/first_run.py              # 3 timed default runs (~2 min on 2 idle cores)
    python benchmarks/first_run.py --runs 1

Each run is the README's command exactly: `python scripts/train.py`, no arguments, in a fresh
directory holding data/sample_texts.csv, timed as a whole process (interpreter start, JAX import,
tokenizer, compiles, training, calibration, export, plot). The load average before each run is
recorded, since the machine may be shared. The run's held-out rows are the ones the preset's
eval_split holds out (jaxclf.train.prepare.load_splits); TF-IDF + LinearSVC (the accuracy.py
baseline: word 1-2-grams, sublinear tf, scikit-learn defaults) trains on the same training rows and
is scored on the same held-out rows; its 5-fold cross-validation over all rows is reported too.
Writes benchmarks/results/first_run.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample_texts.csv"
TFIDF = "TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True) + LinearSVC()"


def timed_default_run(workdir: Path) -> dict:
    """`python scripts/train.py` in `workdir` (holding data/sample_texts.csv): wall and CPU seconds, output."""
    (workdir / "data").mkdir(parents=True)
    shutil.copy(SAMPLE, workdir / "data" / "sample_texts.csv")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    load = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py")], cwd=workdir, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "load_average_before": [round(x, 2) for x in load],
            "stdout": proc.stdout}


def eval_curve(run_dir: Path) -> list[dict]:
    """The run's evaluation records (step, loss, accuracy, macro_f1) from OUTPUT/metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "accuracy", "macro_f1")} for r in records if r["kind"] == "eval"]


def tfidf_baselines(seed_split) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    from jaxclf.train import data

    (train_texts, train_labels, _), (held_texts, held_labels, _) = seed_split
    pipe = lambda: make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LinearSVC())
    predicted = pipe().fit(train_texts, train_labels).predict(held_texts)
    texts, labels, _ = data.read_examples(SAMPLE)
    folds = cross_validate(pipe(), texts, labels, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                           scoring=("accuracy", "f1_macro"))
    return {"same_split": {"accuracy": accuracy_score(held_labels, predicted),
                           "macro_f1": f1_score(held_labels, predicted, average="macro"),
                           "train_rows": len(train_texts), "held_out_rows": len(held_texts)},
            "five_fold_all_rows": {"accuracy": folds["test_accuracy"].tolist(),
                                   "macro_f1": folds["test_f1_macro"].tolist(),
                                   "accuracy_mean": float(folds["test_accuracy"].mean()),
                                   "macro_f1_mean": float(folds["test_f1_macro"].mean()), "rows": len(texts)}}


def summarise(runs: list[dict], metrics: dict, curve: list[dict], tfidf: dict, preset: dict) -> tuple[dict, str]:
    from jaxclf.train.summary import majority_baseline

    report, calib = metrics["eval"], metrics.get("calibration") or {}
    walls = [r["wall_s"] for r in runs]
    label, base_acc, base_f1 = majority_baseline(report["per_class"])
    best = min(curve, key=lambda r: r["loss"])
    payload = {
        "command": "python scripts/train.py", "preset": preset, "runs": runs,
        "wall_s_median": statistics.median(walls),
        "jaxclf": {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "held_out_rows": report["num_examples"],
                   "per_class_f1": {k: v["f1"] for k, v in report["per_class"].items()},
                   "exported_step": metrics["step"], "exported_epoch": metrics["epoch"],
                   "eval_loss_at_export": report["loss"], "ece": report.get("ece"), "calibration": calib or None,
                   "eval_curve": curve},
        "majority_class": {"label": label, "accuracy": base_acc, "macro_f1": base_f1},
        "tfidf_linear_svc": tfidf, "tfidf_settings": TFIDF,
    }
    same, folds = tfidf["same_split"], tfidf["five_fold_all_rows"]
    rows = [["jaxclf default run (exported checkpoint)", f"{report['accuracy']:.3f}", f"{report['macro_f1']:.3f}",
             report["num_examples"]],
            ["TF-IDF + LinearSVC, same split", f"{same['accuracy']:.3f}", f"{same['macro_f1']:.3f}",
             same["held_out_rows"]],
            ["majority class (" + label + ")", f"{base_acc:.3f}", f"{base_f1:.3f}", report["num_examples"]],
            ["TF-IDF + LinearSVC, 5-fold over all rows (mean)", f"{folds['accuracy_mean']:.3f}",
             f"{folds['macro_f1_mean']:.3f}", folds["rows"]]]
    table = markdown_table(["model", "accuracy", "macro-F1", "rows scored"], rows)
    timing = markdown_table(["run", "wall s", "CPU s (user + sys)",
                             "load average before (1, 5, 15 min; includes the previous run's own)"],
                            [[k + 1, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                              ", ".join(map(str, r["load_average_before"]))]
                             for k, r in enumerate(runs)])
    curve_table = markdown_table(["step", "eval loss", "accuracy", "macro-F1"],
                                 [[r["step"], f"{r['loss']:.3f}", f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}"]
                                  for r in curve])
    calib_line = (f"Calibration (fitted at export on the held-out rows): temperature {calib['temperature']:.2f}, "
                  f"ECE {calib['ece_before']:.3f} -> {calib['ece_after']:.3f}.\n\n" if "ece_after" in calib else "")
    text = (f"`python scripts/train.py` (preset small, data/sample_texts.csv, {folds['rows']} rows, "
            f"{report['num_examples']} held out): median wall {statistics.median(walls):.1f} s over "
            f"{len(runs)} runs.\n\n{table}\n\n{timing}\n\n"
            f"Evaluation curve (lowest eval loss {best['loss']:.3f} at step {best['step']}; exported step "
            f"{metrics['step']}, epoch {metrics['epoch']:.1f}):\n\n{curve_table}\n\n{calib_line}"
            f"End-of-run summary as printed:\n\n```\n{runs[0]['stdout'].rstrip()}\n```\n")
    return payload, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="timed default runs (median reported)")
    args = p.parse_args(argv)

    from jaxclf.train.prepare import load_splits
    from jaxclf.train.presets import get_preset

    model_cfg, train_cfg = get_preset("small")
    train_cfg = train_cfg.replace(train_file=str(SAMPLE))
    tfidf = tfidf_baselines(load_splits(train_cfg))
    runs, metrics, curve = [], None, None
    with tempfile.TemporaryDirectory(prefix="first_run_") as tmp:
        for k in range(args.runs):
            work = Path(tmp) / f"run{k}"
            runs.append(timed_default_run(work))
            print(f"run {k + 1}: {runs[-1]['wall_s']:.1f} s (load {runs[-1]['load_average_before']})", flush=True)
            model = work / train_cfg.output_dir / "model"
            this = json.loads((model / "metrics.json").read_text())
            if metrics is None:
                metrics, curve = this, eval_curve(work / train_cfg.output_dir)
            elif this["eval"]["accuracy"] != metrics["eval"]["accuracy"]:
                print(f"note: run {k + 1} scored {this['eval']['accuracy']:.4f}, run 1 "
                      f"{metrics['eval']['accuracy']:.4f}", flush=True)
    preset = {"model": model_cfg.to_dict(), "train": train_cfg.to_dict()}
    payload, text = summarise(runs, metrics, curve, tfidf, preset)
    print(text)
    print(f"wrote {write_results('first_run', payload, text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
