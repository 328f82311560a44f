#!/usr/bin/env python
"""Evaluate a model directory on a labelled data file and print the metrics as JSON.

    python scripts/evaluate.py --model runs/default/model --data data/sample_texts.csv
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--data", required=True, help="labelled data: CSV (text,label), JSONL or ArrayRecord")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) malformed rows instead of failing")
    args = p.parse_args(argv)

    import jaxclf
    from jaxclf.train import data
    from jaxclf.metrics import classification_report

    try:
        clf = jaxclf.load(args.model)
        texts, labels, report = data.read_examples(args.data, skip_bad=args.skip_bad_rows)
        y = data.label_ids(labels, clf.labels, args.data)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logits = clf.logits(texts, batch_size=args.batch_size)
    import numpy as np
    from jaxclf.classifier import softmax
    probs = softmax(logits.astype(np.float64))
    loss = float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())
    metrics = classification_report(y, logits.argmax(-1), clf.labels, loss=loss)
    metrics["skipped_rows"] = len(report.skipped)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
