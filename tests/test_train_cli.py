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
    assert report["num_examples"] == 240 and report["skipped_rows"] == 0
    for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss", "confusion_matrix",
                "confidence_histogram", "predicted_label_counts"):
        assert key in report, key
    assert sum(report["confidence_histogram"]) == sum(report["predicted_label_counts"]) == 240


def test_hf_commands_report_a_missing_directory_in_one_line(tmp_path, capsys):
    assert hf_cli.import_main(["--hf-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "nowhere" in one_error_line(capsys)
    assert hf_cli.export_main(["--model", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in one_error_line(capsys)
