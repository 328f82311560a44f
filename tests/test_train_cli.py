"""The training-side commands (train, evaluate, prepare-data, import-hf, export-hf): a user error is one line
on stderr and exit status 2, never a traceback, and a failed training run writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxclf.cli import evaluate as evaluate_cli
from jaxclf.cli import hf as hf_cli
from jaxclf.cli import train as train_cli

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample_texts.csv"
SAMPLE_ROWS = 1092  # data/sample_texts.csv: 364 negative, 364 neutral, 364 positive


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


@pytest.mark.parametrize("args, named", [
    (["--labels", "a,a"], "label names must be distinct; repeated: 'a'"),
    (["model.nonexistent=3"], "model has no field 'nonexistent'"),
    (["train.learning_rate=abc"], "override train.learning_rate='abc': expected float"),
    (["train.eval_steps=0"], "eval_steps must be an integer >= 1, got 0"),
    (["--train", "no/such/file.csv"], "no/such/file.csv: file not found"),
    (["--config", "no-such-preset"], "neither a preset"),
    (["train.mesh_data=3"], "mesh data=3"),
])
def test_train_user_errors_are_one_line_and_exit_2(tmp_path, capsys, args, named):
    out = tmp_path / "run"
    argv = ["--config", "tiny", "--train", str(SAMPLE), "--output", str(out), *args]
    assert train_cli.main(argv) == 2
    assert named in one_error_line(capsys)
    assert not out.exists(), "a failed run must not create its output directory"


def test_train_script_reports_a_bad_override_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "tiny",
                           "--output", str(tmp_path / "r"), "model.nonexistent=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "model has no field 'nonexistent'" in proc.stderr


def test_evaluate_reports_metrics_and_refuses_a_wrong_model_directory(tmp_path, capsys, tiny_model_dir):
    assert evaluate_cli.main(["--model", str(tmp_path / "nowhere"), "--data", str(SAMPLE)]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert evaluate_cli.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv: file not found" in one_error_line(capsys)
    bad_label = tmp_path / "eval.csv"
    bad_label.write_text("text,label\nfine food,positive\ncold soup,furious\n", encoding="utf-8")
    assert evaluate_cli.main(["--model", str(tiny_model_dir), "--data", str(bad_label)]) == 2
    assert "'furious' (first at line 3" in one_error_line(capsys)

    assert evaluate_cli.main(["--model", str(tiny_model_dir), "--data", str(SAMPLE)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_examples"] == SAMPLE_ROWS and report["skipped_rows"] == 0
    for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss", "confusion_matrix",
                "confidence_histogram", "predicted_label_counts"):
        assert key in report, key
    assert sum(report["confidence_histogram"]) == sum(report["predicted_label_counts"]) == SAMPLE_ROWS


def test_hf_commands_report_a_missing_directory_in_one_line(tmp_path, capsys):
    assert hf_cli.import_main(["--hf-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "nowhere" in one_error_line(capsys)
    assert hf_cli.export_main(["--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in one_error_line(capsys)


# ----------------------------------------------------------------------------- the end-of-run summary


def fake_run(tmp_path: Path, metrics: dict, steps: int, epoch: float):
    from jaxclf.train.loop import TrainResult

    model = tmp_path / "my run" / "model"
    model.mkdir(parents=True)
    (model / "metrics.json").write_text(json.dumps(metrics))
    return TrainResult(model_dir=model, steps=steps, eval_metrics=metrics.get("eval"), epoch=epoch)


def per_class(f1s: dict[str, float], supports: dict[str, int]) -> dict:
    return {k: {"precision": f1s[k], "recall": f1s[k], "f1": f1s[k], "support": supports[k]} for k in f1s}


def test_summary_reports_baseline_stopping_calibration_and_usage(tmp_path):
    from jaxclf.config import TrainingConfig
    from jaxclf.train.summary import majority_baseline, summary_lines

    classes = per_class({"neg": 0.8, "neu": 0.5, "pos": 0.7}, {"neg": 20, "neu": 50, "pos": 30})
    # always "neu": accuracy .5; its F1 = 2 * .5 / 1.5 = 2/3, the others 0: macro-F1 2/9
    assert majority_baseline(classes) == ("neu", 0.5, pytest.approx(2 / 9))
    metrics = {"eval": {"accuracy": 0.71, "macro_f1": 0.6667, "num_examples": 100, "per_class": classes,
                        "ece": 0.2},
               "calibration": {"temperature": 2.5, "ece_before": 0.2, "ece_after": 0.031},
               "step": 60, "epoch": 3.0}
    cfg = TrainingConfig(num_train_epochs=10, early_stopping_patience=2, metric_for_best_model="accuracy")
    # 100 steps done = 5 epochs (20 steps an epoch) of a planned 10: stopped early
    lines = summary_lines(fake_run(tmp_path, metrics, steps=100, epoch=5.0), cfg)
    text = "\n".join(lines)
    assert "held-out accuracy 0.710, macro-F1 0.667 on 100 rows (always answering 'neu': 0.500 / 0.222)" in text
    assert "F1 per class: neg 0.80, neu 0.50, pos 0.70" in text
    assert "stopped early at step 100 of 200 (epoch 5.0): no gain in 2 evaluations" in text
    assert "best accuracy at step 60 (epoch 3.0), the checkpoint exported" in text
    assert "temperature 2.50" in text and "ECE 0.200 -> 0.031" in text
    model = tmp_path / "my run" / "model"
    assert f"model: {model}" in lines
    assert f"jaxclf predict --model '{model}' 'The soup was cold and the waiter rude.'" in text
    assert f"jaxclf serve --model '{model}' --port 8000" in text
    assert "curl -s -H 'Content-Type: application/json' -d '{\"text\": " in text and "localhost:8000/predict" in text

    # the whole planned run, no calibration section: says so, and gives the uncalibrated ECE
    del metrics["calibration"]
    text = "\n".join(summary_lines(fake_run(tmp_path / "b", metrics, steps=200, epoch=10.0), cfg))
    assert "ran all 200 steps (10.0 epochs)" in text and "stopped early" not in text
    assert "confidence: not calibrated (held-out ECE 0.200)" in text


def test_train_prints_the_summary_of_what_it_exported(tmp_path, capsys):
    """A tiny run that early stopping ends at step 4 of 20: the summary's figures are metrics.json's."""
    out = tmp_path / "run"
    argv = ["--config", "tiny", "--train", str(SAMPLE), "--output", str(out), "train.progress_bar=false",
            # a learning rate too small to change a prediction: the second evaluation is no gain
            "train.learning_rate=1e-12", "train.eval_steps=2", "train.early_stopping_patience=1"]
    assert train_cli.main(argv) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert json.loads(stdout[-1])["steps"] == 4  # the last line stays JSON for scripts
    text = "\n".join(stdout[:-1])
    assert "Traceback" not in text and len(stdout) <= 12
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    report = metrics["eval"]
    assert f"held-out accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} on 219 rows" in text
    assert "(always answering 'negative': 0.333 / 0.167)" in text  # 73 of each class held out
    assert "stopped early at step 4 of 20 (epoch 0.0): no gain in 1 evaluations" in text
    assert f"best macro_f1 at step {metrics['step']} " in text
    if "calibration" in metrics:
        assert f"temperature {metrics['calibration']['temperature']:.2f}" in text
    else:
        assert f"not calibrated (held-out ECE {report['ece']:.3f})" in text
    assert f"model: {out / 'model'}" in text and f"jaxclf serve --model {out / 'model'}" in text
