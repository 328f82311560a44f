#!/usr/bin/env python
"""Classify texts with a model directory; one JSON line per text.

    python scripts/predict.py --model runs/default/model "great food" "slow service"
    cat texts.txt | python scripts/predict.py --model runs/default/model -
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify; '-' reads one text per line from stdin")
    args = p.parse_args(argv)
    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts

    import jaxclf
    try:
        clf = jaxclf.load(args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for text, pred in zip(texts, clf.predict(texts)):
        print(json.dumps({"text": text, **pred}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
