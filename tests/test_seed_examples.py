"""The original framework's documented Python examples run on jaxclf with only the imports changed.

The snippets below are the seed README's "Training Custom Models" and "Inference Service" sections
(../shared/seed/), copied line for line except: `from src.x import ...` became `from jaxclf import ...`,
the sizes and step counts shrank to fit a test, and the paths point into tmp_path. The examples/
programs run here too, so they cannot rot.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TRAINING_CUSTOM_MODELS = '''
from jaxclf import train_model, TrainingConfig
from jaxclf import ModelConfig

# Configure model architecture
model_config = ModelConfig(
    vocab_size=1000,             # seed: 10000
    d_model=32,                  # seed: 256
    nhead=2,                     # seed: 8
    num_encoder_layers=1,        # seed: 6
    dim_feedforward=64,          # seed: 1024
    max_position_embeddings=64,  # seed: 512
    num_classes=3,
    dropout=0.1
)

# Configure training parameters
training_config = TrainingConfig(
    output_dir=OUTPUT + "/model-output",
    num_train_epochs=1,          # seed: 10
    per_device_train_batch_size=16,
    per_device_eval_batch_size=16,
    learning_rate=2e-5,
    warmup_steps=5,              # seed: 500
    save_steps=10,               # seed: 1000
    logging_steps=5,             # seed: 100
    eval_steps=5,                # seed: 500
    gradient_checkpointing=True,
    fp16=True
)

# Execute training
model, trainer = train_model(
    model_config=model_config,
    training_config=training_config
)

# Save the trained model
model.save_pretrained(OUTPUT + "/final-model")
'''

INFERENCE_SERVICE = '''
import torch
from jaxclf import InferenceEngine
from jaxclf import TransformerClassifier, ModelConfig

# Initialize inference engine
engine = InferenceEngine(
    model_path=OUTPUT + "/final-model/model.pt",
    device="cuda" if torch.cuda.is_available() else "cpu",
    max_batch_size=32,
    cache_size=1000
)

# Single prediction
result = engine.predict_single("This is an excellent product!")
print(f"Prediction: {result.predicted_class}")
print(f"Confidence: {result.confidence:.4f}")

# Batch prediction
texts = [
    "This is a positive review",
    "This product is terrible",
    "Neutral opinion about this item"
]
batch_result = engine.predict_batch(texts)
for i, pred in enumerate(batch_result.results):
    print(f"Text {i+1}: {pred.predicted_class} ({pred.confidence:.4f})")
'''


@pytest.mark.slow
def test_seed_training_and_inference_snippets_run(tmp_path, monkeypatch, capsys):
    import jaxclf

    monkeypatch.chdir(REPO)  # TrainingConfig's default train_file is the shipped sample data
    scope = {"OUTPUT": str(tmp_path)}
    exec(compile(TRAINING_CUSTOM_MODELS, "seed: Training Custom Models", "exec"), scope)
    model, trainer = scope["model"], scope["trainer"]
    assert isinstance(model, jaxclf.TextClassifier)
    assert isinstance(trainer, jaxclf.Trainer)
    assert model.config.vocab_size == 1000  # the config's size is honoured, not replaced
    assert scope["training_config"].mixed_precision == "fp16"  # fp16=True is the mixed-precision setting
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_accuracy", "eval_f1"):
        assert isinstance(metrics[key], float), key
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    final = tmp_path / "final-model"
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()

    exec(compile(INFERENCE_SERVICE, "seed: Inference Service", "exec"), scope)
    engine = scope["engine"]
    try:
        result, batch = scope["result"], scope["batch_result"]
        assert isinstance(result, jaxclf.PredictionResult)
        assert result.predicted_class in model.labels
        assert 0.0 < result.confidence <= 1.0
        assert set(result.probabilities) == set(model.labels)
        assert result.processing_time_ms >= 0
        assert isinstance(batch, jaxclf.BatchPredictionResult) and len(batch.results) == 3
        expected = jaxclf.load(final).predict(scope["texts"])
        assert [r.predicted_class for r in batch.results] == [e["label"] for e in expected]
        out = capsys.readouterr().out
        assert "Prediction: " in out and "Text 3: " in out
    finally:
        engine.close()


def test_inference_engine_refuses_a_device_jax_does_not_have(tiny_model_dir):
    import jaxclf
    with pytest.raises(jaxclf.JaxclfError, match="tpu"):
        jaxclf.InferenceEngine(model_path=str(tiny_model_dir), device="tpu")


@pytest.mark.slow
@pytest.mark.parametrize("program, args", [("sentiment_analysis.py", ["--quick"]), ("demo_inference.py", [])])
def test_examples_run(program, args, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    extra = ["--output", str(tmp_path)] if program == "sentiment_analysis.py" else []
    proc = subprocess.run([sys.executable, str(REPO / "examples" / program), *args, *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if program == "sentiment_analysis.py":
        assert "eval_accuracy" in proc.stdout and "saved to" in proc.stdout
    else:
        assert "Prediction:" in proc.stdout and "Text 3:" in proc.stdout and "cached: True" in proc.stdout
