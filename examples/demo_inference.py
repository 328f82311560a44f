#!/usr/bin/env python
"""The inference engine in one page: single and batch predictions, the cache, health and statistics.

    python examples/demo_inference.py --model runs/default/model     # after `python scripts/train.py`
    python examples/demo_inference.py                                 # trains a tiny model first (~10 s)

The original framework's demo of the same name, on jaxclf's API (only the imports differ).
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from jaxclf import InferenceEngine, ModelConfig, TrainingConfig, train_model

DATA = Path(__file__).resolve().parent.parent / "data" / "sample_texts.csv"


def tiny_model(output: Path) -> Path:
    """Trains a small model on the sample data (when no --model is given)."""
    model_config = ModelConfig(d_model=32, nhead=2, num_encoder_layers=1, dim_feedforward=64,
                               max_position_embeddings=64, num_classes=3)
    training_config = TrainingConfig(output_dir=str(output / "run"), train_file=str(DATA), max_steps=6,
                                     eval_steps=3, tokenizer_vocab_size=500, progress_bar=False)
    model, _ = train_model(model_config=model_config, training_config=training_config)
    return model.save_pretrained(output / "final-model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory (default: train a tiny one)")
    parser.add_argument("--device", default="auto", help="cpu, gpu, tpu or auto (default)")
    args = parser.parse_args()
    model_path = Path(args.model) if args.model else tiny_model(Path(tempfile.mkdtemp(prefix="jaxclf-demo-")))

    engine = InferenceEngine(model_path=str(model_path), device=args.device, max_batch_size=32, cache_size=1000)
    try:
        # Single prediction.
        result = engine.predict_single("This is an excellent product!")
        print(f"Prediction: {result.predicted_class}")
        print(f"Confidence: {result.confidence:.4f}")
        print(f"Time: {result.processing_time_ms:.2f} ms")

        # Batch prediction: any number of texts, split into the compiled batch sizes.
        texts = ["This is a positive review", "This product is terrible", "Neutral opinion about this item"]
        batch_result = engine.predict_batch(texts)
        for i, pred in enumerate(batch_result.results):
            print(f"Text {i + 1}: {pred.predicted_class} ({pred.confidence:.4f})")

        # The same text again is served from the LRU cache.
        start = time.perf_counter()
        again = engine.predict_single("This is an excellent product!")
        print(f"cached: {again.cached} in {(time.perf_counter() - start) * 1000:.3f} ms")

        print(json.dumps(engine.health_check(), indent=2, default=str))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
