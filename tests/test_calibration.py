"""Calibrated confidences: the temperature fit, ECE and Brier by hand, and calibration at the end of training.

The training test fine-tunes an over-confident model (temperature 0.01 in its config.json: logits x100,
random predictions at ~100% confidence) for two steps at a negligible learning rate, so the export's
fit has a large, known-direction miscalibration to correct, in seconds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import jaxclf
from jaxclf import calibration, model_dir
from jaxclf.calibration import CalibrationError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample_texts.csv"


# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_fit_recovers_a_known_temperature(true_temperature):
    """Labels drawn from softmax(z / T): the NLL fit on z finds T within a few percent."""
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 3.0, size=(20_000, 4))
    p = calibration.softmax(z / true_temperature)
    labels = (rng.random((len(z), 1)) > p.cumsum(-1)).sum(-1)  # one categorical draw per row
    fitted = calibration.fit_temperature(z, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.03)
    nll = calibration.negative_log_likelihood
    neighbours = (1.0, fitted * 1.05, fitted / 1.05)
    assert nll(z, labels, fitted) < min(nll(z, labels, t) for t in neighbours)


def test_separable_data_runs_into_the_lower_bound():
    z = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
    fitted = calibration.fit_temperature(z, [0, 1, 0])
    assert calibration.at_lower_bound(fitted) and not calibration.at_lower_bound(1.0)


# Four 2-class examples (confidence, right?): (.9, yes) (.8, no) (.7, yes) (.6, no).
PROBS = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
LABELS = [0, 1, 1, 0]


def test_ece_by_hand():
    # 5 bins of width .2, each (lo, hi]: .6 -> (.4, .6] acc 0 gap .6; .7 and .8 -> (.6, .8] acc .5,
    # mean confidence .75, gap .25; .9 -> (.8, 1] acc 1 gap .1.  ECE = (1 x .6 + 2 x .25 + 1 x .1) / 4.
    assert calibration.expected_calibration_error(PROBS, LABELS, bins=5) == pytest.approx(0.3)
    bins = calibration.reliability_bins(PROBS, LABELS, bins=5)
    assert bins["count"].tolist() == [0, 0, 1, 2, 1]
    assert calibration.expected_calibration_error(PROBS, [0, 0, 1, 1], bins=5) == pytest.approx(
        (0.4 + 2 * 0.25 + 0.1) / 4)  # the .6 example right, the .8 one wrong: gaps .4, .25, .1
    perfect = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert calibration.expected_calibration_error(perfect, [0, 1]) == pytest.approx(0.0)  # 50% sure, 50% right


def test_brier_by_hand():
    # Sum over classes of (p - one-hot)^2: .02, 1.28, .18, .72; mean .55.
    assert calibration.brier_score(PROBS, LABELS) == pytest.approx(0.55)
    assert calibration.brier_score(np.eye(3), [0, 1, 2]) == 0.0


@pytest.mark.parametrize("probs,labels,message", [
    (np.ones(4), [0, 1, 0, 1], r"2-D array"),
    (PROBS, [0, 1, 1], r"4 rows but labels have shape \(3,\)"),
    (PROBS, [0, 1, 2, 0], r"class ids in \[0, 2\)"),
    (np.full((2, 2), np.nan), [0, 1], "NaN"),
    (np.zeros((0, 2)), [], "no examples"),
])
def test_bad_input_is_named(probs, labels, message):
    with pytest.raises(CalibrationError, match=message):
        calibration.brier_score(probs, labels)


def test_folding_keeps_the_logits():
    rng = np.random.default_rng(1)
    tensors = {"classifier.weight": rng.normal(size=(3, 8)).astype(np.float32),
               "classifier.bias": rng.normal(size=3).astype(np.float32), "other": np.ones(2, np.float32)}
    x = rng.normal(size=(5, 8)).astype(np.float32)
    folded = calibration.fold_temperature(tensors, 0.4)
    logits = lambda t: x @ t["classifier.weight"].T + t["classifier.bias"]
    np.testing.assert_allclose(logits(folded), logits(tensors) / 0.4, rtol=1e-5, atol=1e-6)
    assert folded["other"] is tensors["other"] and calibration.fold_temperature(tensors, 1.0) == tensors


# ----------------------------------------------------------------------------- training


def _split_sample(folder: Path) -> tuple[Path, Path, list[str], list[str]]:
    with open(SAMPLE, newline="", encoding="utf-8") as f:
        rows = [(r["text"], r["label"]) for r in csv.DictReader(f)]
    paths = folder / "train.csv", folder / "eval.csv"
    train_rows, eval_rows = rows[:180], rows[180:240]  # fixed sizes, whatever the sample grows to
    for path, part in zip(paths, (train_rows, eval_rows)):
        with open(path, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("text", "label"), *part])
    return *paths, [t for t, _ in eval_rows], [y for _, y in eval_rows]


@pytest.fixture(scope="module")
def overconfident_model(tiny_model_dir, tmp_path_factory) -> Path:
    """tiny_model_dir with temperature 0.01: random predictions at ~100% confidence."""
    config, tensors, tok, _ = model_dir.read(tiny_model_dir)
    return model_dir.write(tmp_path_factory.mktemp("overconfident") / "model", config.replace(temperature=0.01),
                           tensors, tok)


def _fine_tune(overconfident_model: Path, out: Path, **changes):
    from jaxclf.train.presets import get_preset
    from jaxclf.train.loop import train

    train_file, eval_file, eval_texts, eval_labels = _split_sample(out.parent)
    model_cfg, cfg = get_preset("tiny")
    cfg = cfg.replace(output_dir=str(out), train_file=str(train_file), eval_file=str(eval_file),
                      init_from=str(overconfident_model), max_steps=2, eval_steps=2, save_steps=2,
                      learning_rate=1e-9, async_checkpointing=False, progress_bar=False, **changes)
    return train(model_cfg, cfg), eval_texts, eval_labels


@pytest.fixture(scope="module")
def calibrated_run(overconfident_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "run"
    return (out, *_fine_tune(overconfident_model, out))


def test_fine_tuning_a_calibrated_model_folds_its_temperature_into_the_head(overconfident_model):
    """init_from: the training model has temperature 1 and computes the calibrated model's logits."""
    from jaxclf.model import create_model
    from jaxclf.train.prepare import _tokenizer_and_config
    from jaxclf.train.presets import get_preset
    from jaxclf import weights

    model_cfg, cfg = get_preset("tiny")
    source = jaxclf.load(overconfident_model)
    _, _, config, tensors = _tokenizer_and_config(model_cfg, cfg.replace(init_from=str(overconfident_model)),
                                                  [], tuple(source.labels), None)
    assert config.temperature == 1.0
    model = create_model(config)
    weights.load_torch_state(model, tensors, source="folded")
    texts = ["cold soup and a rude waiter", "it opens at nine", "loved every minute"]
    folded = jaxclf.TextClassifier(model, source.tokenizer).logits(texts)
    np.testing.assert_allclose(folded, source.logits(texts), rtol=1e-5, atol=1e-4)
    assert np.abs(folded).max() > 1.0, "the source must be over-confident for this test to mean anything"


def test_export_fits_a_temperature_and_records_calibration(calibrated_run):
    out, result, eval_texts, eval_labels = calibrated_run
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["fitted_on"].endswith("eval.csv") and cal["examples"] == len(eval_texts) and cal["bins"] == 15
    assert cal["ece_before"] > 0.3, "the over-confident model should start far from calibrated"
    assert cal["ece_after"] <= cal["ece_before"] / 3 and cal["nll_after"] < cal["nll_before"]
    assert cal["brier_after"] < cal["brier_before"]
    clf = jaxclf.load(out / "model")
    assert clf.config.temperature == pytest.approx(cal["temperature"]) and cal["temperature"] > 1
    assert metrics["eval"]["ece"] == pytest.approx(cal["ece_after"])  # the eval report is the calibrated one
    assert metrics["eval"]["loss"] == pytest.approx(cal["nll_after"], abs=1e-5)
    assert result.eval_metrics["ece"] == metrics["eval"]["ece"]
    png = (out / "reliability.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_drift_monitor_reference_is_the_calibrated_distribution(calibrated_run):
    """metrics.json's confidence histogram is what the exported (calibrated) model gives on the eval texts."""
    from jaxclf.serve.monitoring import DriftMonitor
    from jaxclf.train.evaluate import CONFIDENCE_BINS

    out, _, eval_texts, _ = calibrated_run
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    clf = jaxclf.load(out / "model")
    served = np.histogram([p["confidence"] for p in clf.predict(eval_texts)], bins=CONFIDENCE_BINS,
                          range=(0, 1))[0].tolist()
    uncalibrated = np.histogram(calibration.softmax(clf.logits(eval_texts) * clf.config.temperature).max(-1),
                                bins=CONFIDENCE_BINS, range=(0, 1))[0].tolist()
    assert metrics["eval"]["confidence_histogram"] == served != uncalibrated
    monitor = DriftMonitor.from_metrics("v1", clf.labels, metrics)
    assert monitor.reference["confidence"] == served


def test_evaluate_command_reports_the_calibrated_ece(calibrated_run, capsys):
    from jaxclf.cli.evaluate import main

    out, _, _, _ = calibrated_run
    assert main(["--model", str(out / "model"), "--data", str(out.parent / "eval.csv")]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    recorded = json.loads((out / "model" / "metrics.json").read_text())["eval"]
    assert report["ece"] == pytest.approx(recorded["ece"], abs=1e-5)
    assert report["brier"] == pytest.approx(recorded["brier"], abs=1e-5)
    assert f"ECE {report['ece']:.4f}" in captured.err
    # ...and the ECE before scaling (at temperature 1), as the export measured it on the same rows
    calibrated = json.loads((out / "model" / "metrics.json").read_text())["calibration"]
    assert report["uncalibrated"]["temperature"] == pytest.approx(calibrated["temperature"])
    assert report["uncalibrated"]["ece"] == pytest.approx(calibrated["ece_before"], abs=1e-4)
    assert report["uncalibrated"]["brier"] == pytest.approx(calibrated["brier_before"], abs=1e-4)
    assert f"at temperature 1: ECE {report['uncalibrated']['ece']:.4f}" in captured.err


def test_calibrate_false_exports_the_temperature_unchanged(overconfident_model, tmp_path):
    out = tmp_path / "run"
    _fine_tune(overconfident_model, out, calibrate=False)
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert "calibration" not in metrics and not (out / "reliability.png").exists()
    assert jaxclf.load(out / "model").config.temperature == 1.0  # folded into the head when fine-tuning
