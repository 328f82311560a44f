"""`jaxclf evaluate` (= python scripts/evaluate.py): metrics of a model directory on a labelled file, as JSON.

    jaxclf evaluate --model runs/default/model --data data/sample_texts.csv

The report is the one training records in OUTPUT/model/metrics.json ("eval"): accuracy, macro
F1/precision/recall, per-class scores, the confusion matrix, the loss, the expected calibration
error ("ece") and Brier score ("brier") of the model's confidences (for a calibrated model also
"uncalibrated": the same at temperature 1), and the confidence and predicted-label distributions; plus skipped_rows with --skip-bad-rows. The JSON goes to stdout,
a one-line summary (accuracy, macro-F1, ECE, Brier) to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxclf.errors import JaxclfError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--data", required=True, help="labelled data: CSV (text,label), JSONL or ArrayRecord")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) malformed rows instead of failing")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from jaxclf import model_dir
        model_dir.read_config(model_dir.check_files(args.model))  # a wrong directory fails before JAX starts
        from jaxclf.train import data
        texts, labels, read = data.read_examples(args.data, skip_bad=args.skip_bad_rows)
        import jaxclf
        from jaxclf.train.evaluate import evaluate_classifier
        report = evaluate_classifier(jaxclf.load(args.model), texts, labels, source=args.data, lines=read.lines,
                                     batch_size=args.batch_size)
    except (JaxclfError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["skipped_rows"] = len(read.skipped)
    print(json.dumps(report, indent=2))
    print(f"{report['num_examples']} examples: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, "
          f"ECE {report['ece']:.4f}, Brier {report['brier']:.4f}"
          + (f" (at temperature 1: ECE {report['uncalibrated']['ece']:.4f}, Brier {report['uncalibrated']['brier']:.4f})"
             if "uncalibrated" in report else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
