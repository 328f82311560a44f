"""`jaxclf predict`: classify a few texts, or stream a whole corpus into resumable output shards.

Quick: texts on the command line (or '-': one a line on stdin), one JSON line each on stdout.

    jaxclf predict --model runs/default/model "great food" "slow service"
    cat texts.txt | jaxclf predict --model runs/default/model -

Bulk: files or globs (CSV, JSON Lines, plain text, ArrayRecord) to numbered shards under --output,
with job.json, per-process manifests and summary.json; memory stays flat, every local device works,
and the same command resumes after an interruption (committed shards are kept).

    jaxclf predict --model runs/default/model --input 'tickets/*.jsonl' --output preds/ --id-field id
    jaxclf predict --registry /srv/reg --model sentiment@production --input crawl.csv --output preds/ \\
        --format parquet --skip-bad
    # one process per host (or two on one machine); merged, the shards equal a 1-process run's:
    jaxclf predict ... --coordinator 127.0.0.1:9876 --num-processes 2 --process-id 0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jaxclf.bulk.spec import BulkConfig
from jaxclf.cli import run_command
from jaxclf.cli.flags import add_config_arguments, config_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jaxclf predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="model directory, or with --registry (or $JAXCLF_REGISTRY) NAME@ALIAS / NAME@vN")
    p.add_argument("--registry", metavar="ROOT", help="model registry to resolve --model in")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="quick form: texts to classify; '-' reads one text per line from stdin")
    bulk = p.add_argument_group("bulk prediction")
    bulk.add_argument("--input", action="append", metavar="FILE_OR_GLOB",
                      help="input file or glob (quote it); repeat for more; .csv .jsonl .txt .array_record")
    bulk.add_argument("--output", metavar="DIR", help="output directory for shards, manifests and summary.json")
    add_config_arguments(p, BulkConfig, "bulk prediction settings")
    dist = p.add_argument_group("multi-process (jax.distributed; default: the scheduler's environment)")
    dist.add_argument("--coordinator", help="HOST:PORT of process 0")
    dist.add_argument("--num-processes", type=int, help="number of processes")
    dist.add_argument("--process-id", type=int, help="this process's index")
    p.add_argument("--log-level", help="logging level (default: INFO in bulk, WARNING for quick texts)")
    args = p.parse_args(argv)
    if args.input and args.texts:
        p.error("give texts (quick form) or --input/--output (bulk form), not both")
    if args.input and not args.output:
        p.error("--input needs --output DIR")
    if args.output and not args.input:
        p.error("--output needs --input FILE_OR_GLOB")
    if not args.input and not args.texts:
        p.error("give texts to classify ('-' for stdin), or --input FILE_OR_GLOB --output DIR")
    if args.texts and (getattr(args, "backend", "jax") != "jax" or getattr(args, "onnx_file", None)):
        p.error("--backend and --onnx-file are for the bulk form (--input/--output); the quick form runs JAX")
    return args


def predict_texts(args: argparse.Namespace) -> int:
    """The quick form: one JSON line {"text", "label", "confidence", "probabilities"} per text."""
    import jaxclf
    from jaxclf.bulk.runner import resolve_model

    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts
    clf = jaxclf.load(resolve_model(args.model, args.registry).path, dtype=getattr(args, "dtype", None))
    for text, pred in zip(texts, clf.predict(texts)):
        print(json.dumps({"text": text, **pred}, ensure_ascii=False))
    return 0


def predict_files(args: argparse.Namespace) -> int:
    """The bulk form: prints summary.json (process 0) once every shard is committed."""
    config = config_from_args(BulkConfig, args)
    from jaxclf.train import sharding
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax
    from jaxclf.bulk.runner import run

    result = run(args.model, args.input, args.output, config, registry=args.registry)
    if jax.process_index() == 0:
        print(json.dumps(result, ensure_ascii=False))  # summary.json's content, on one line
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = args.log_level or ("INFO" if args.input else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return predict_files(args) if args.input else predict_texts(args)


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], prog="jaxclf predict"))
