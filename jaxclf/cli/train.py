"""`jaxclf train` (= python scripts/train.py): train a classifier, the same command on a laptop CPU and a TPU VM.

    jaxclf train                                   # small preset on data/sample_texts.csv
    jaxclf train --config tiny train.max_steps=50  # dotted overrides
    jaxclf train --train train.jsonl --eval eval.jsonl --output runs/mine
    jaxclf train --config tiny --distill-from runs/big/model --unlabeled more_texts.txt   # a student
    jaxclf train --coordinator 127.0.0.1:9876 --num-processes 2 --process-id 0   # one per host

Re-running the same command with the same output directory resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jaxclf.errors import JaxclfError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small",
                   help="preset name (small, tiny, medium, base) or a JSON file {\"base\", \"model\", \"train\"} (default: small)")
    p.add_argument("--train", help="training data: CSV (text,label), JSONL or ArrayRecord (default: the preset's)")
    p.add_argument("--eval", help="evaluation data; without it a stratified eval_split of --train is held out")
    p.add_argument("--output", help="output directory (checkpoints, logs, OUTPUT/model); default: the preset's")
    p.add_argument("--init-from", help="model directory to fine-tune from (keeps its tokenizer and labels)")
    p.add_argument("--distill-from", help="teacher model directory: train on its soft labels (distillation; "
                                          "train.distill_temperature, train.distill_alpha)")
    p.add_argument("--unlabeled", help="extra texts without labels for distillation (a text a line, or CSV/JSONL "
                                       "with a text column); needs --distill-from")
    p.add_argument("--labels", help="comma-separated label names in id order (default: sorted labels of the data)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 for multi-host training (jax.distributed)")
    p.add_argument("--num-processes", type=int, help="number of processes in a multi-host run")
    p.add_argument("--process-id", type=int, help="this process's index in a multi-host run")
    p.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. model.d_model=128 train.num_train_epochs=2")
    return p.parse_intermixed_args(argv)


def configs(args: argparse.Namespace):
    """(ModelConfig, TrainingConfig): the preset, then the flags, then the dotted overrides."""
    from jaxclf.train.presets import apply_overrides, get_preset

    model_cfg, train_cfg = get_preset(args.config)
    flags = {"train_file": args.train, "eval_file": args.eval, "output_dir": args.output,
             "init_from": args.init_from, "distill_from": args.distill_from, "unlabeled_file": args.unlabeled,
             "labels": tuple(x.strip() for x in args.labels.split(",")) if args.labels is not None else None}
    return apply_overrides(model_cfg, train_cfg, args.overrides, {k: v for k, v in flags.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        model_cfg, train_cfg = configs(args)  # a bad preset or override fails before JAX starts
        from jaxclf.train import sharding
        sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        from jaxclf.train.loop import train
        result = train(model_cfg, train_cfg)
    except (JaxclfError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.preempted:
        return 0
    import jax
    from jaxclf.train.summary import summary_lines
    if jax.process_index() == 0:  # the process that exported the model and wrote its metrics.json
        print("\n".join(summary_lines(result, train_cfg)))
    # The last line stays one JSON object, for scripts (benchmarks/accuracy.py reads it).
    summary = {"model_dir": str(result.model_dir), "steps": result.steps}
    if result.eval_metrics:
        summary.update({k: result.eval_metrics[k] for k in ("accuracy", "macro_f1", "loss")})
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
