#!/usr/bin/env python
"""Export a jaxclf model directory as a Hugging Face BertForSequenceClassification directory.

    python scripts/export_hf.py --model runs/default/model --output exported/bert-clf
    python -c "from transformers import BertForSequenceClassification as B; B.from_pretrained('exported/bert-clf')"

Only BERT-shaped models are exported: post-LN, learned positions, pooling="pooler".
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="jaxclf model directory")
    p.add_argument("--output", required=True, help="directory to write (must not exist, or be an earlier export)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from jaxclf.hf import HFCheckpointError, export_hf
    from jaxclf.model_dir import ModelDirectoryError
    from jaxclf.weights import WeightsError

    try:
        out = export_hf(args.model, args.output)
    except (HFCheckpointError, WeightsError, ModelDirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"hf_dir": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
