#!/usr/bin/env python
"""A complete sentiment-analysis pipeline: data -> train -> evaluate -> save -> load -> predict.

    python examples/sentiment_analysis.py                       # the shipped sample data, ~30 s on 2 cores
    python examples/sentiment_analysis.py --quick               # a few steps, to check the pipeline works

The original framework's example of the same name, on jaxclf's API (only the imports differ).
"""

import argparse
import csv
import tempfile
from pathlib import Path

from jaxclf import InferenceEngine, ModelConfig, TrainingConfig, load, train_model

DATA = Path(__file__).resolve().parent.parent / "data" / "sample_texts.csv"


def read_csv(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few steps")
    parser.add_argument("--output", default=None, help="where to write the run (default: a temporary directory)")
    args = parser.parse_args()
    output = Path(args.output or tempfile.mkdtemp(prefix="jaxclf-sentiment-"))

    # 1. Data: the shipped sample, held out 20% for evaluation.
    texts, labels = read_csv(DATA)
    cut = int(len(texts) * 0.8)

    # 2. Configure and train.
    if args.quick:
        model_config = ModelConfig(d_model=32, nhead=2, num_encoder_layers=1, dim_feedforward=64,
                                   max_position_embeddings=64, num_classes=3)
        training_config = TrainingConfig(output_dir=str(output / "run"), max_steps=4, eval_steps=2,
                                         per_device_train_batch_size=16, tokenizer_vocab_size=500,
                                         progress_bar=False)
    else:
        model_config = ModelConfig(num_classes=3)
        training_config = TrainingConfig(output_dir=str(output / "run"), num_train_epochs=10,
                                         per_device_train_batch_size=16, learning_rate=5e-4)
    model, trainer = train_model(model_config=model_config, training_config=training_config,
                                 train_texts=texts[:cut], train_labels=labels[:cut],
                                 eval_texts=texts[cut:], eval_labels=labels[cut:])

    # 3. Evaluate.
    metrics = trainer.evaluate()
    print("Evaluation Metrics:")
    for key in ("eval_loss", "eval_accuracy", "eval_f1"):
        print(f"  {key}: {metrics[key]:.4f}")

    # 4. Save, then load it back as a user of the model directory would.
    final = output / "final-model"
    model.save_pretrained(final)
    classifier = load(final)
    print(f"saved to {final} ({', '.join(classifier.labels)})")

    # 5. Predict, with the serving engine (compiled buckets, batching, cache).
    with InferenceEngine(model_path=str(final), device="cpu", max_batch_size=8, cache_size=100) as engine:
        for text in ("The food was wonderful and the staff were kind.", "Cold soup and a rude waiter.",
                     "The restaurant opens at nine."):
            result = engine.predict_single(text)
            print(f"{result.predicted_class:>9} ({result.confidence:.3f})  {text}")


if __name__ == "__main__":
    main()
