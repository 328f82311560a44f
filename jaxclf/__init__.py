"""jaxclf: transformer text classifiers in JAX/Flax NNX, with a PyTorch twin that loads the same weights.

    import jaxclf
    clf = jaxclf.load("runs/default/model")
    clf.predict(["a lovely little cafe"])

The package is the model contract (config, model, weights, tokenizer, model_dir, classifier, hf)
plus four subsystems: jaxclf.train, jaxclf.serve, jaxclf.registry and jaxclf.cli.

The original framework's Python API is here under its own names, so its programs run with only the
import lines changed (`from jaxclf import train_model, TrainingConfig, ModelConfig, InferenceEngine`).

Names are imported on first use, so `jaxclf.config` stays importable without JAX (torch_ref reads
configs through it) and `import jaxclf` costs nothing.
"""

__version__ = "0.1.0"

from jaxclf.lazy import lazy_exports  # noqa: E402

_LAZY = {
    # the model contract
    "load": "jaxclf.classifier",
    "create": "jaxclf.classifier",
    "TextClassifier": "jaxclf.classifier",
    "ModelConfig": "jaxclf.config",
    "TrainingConfig": "jaxclf.config",
    "TransformerClassifier": "jaxclf.model",
    "MultiHeadAttention": "jaxclf.model",
    "TransformerEncoderBlock": "jaxclf.model",
    "ModelOutput": "jaxclf.model",
    "create_model": "jaxclf.model",
    "SimpleTokenizer": "jaxclf.tokenizer",
    "JaxclfError": "jaxclf.errors",
    # training
    "train": "jaxclf.train.loop",
    "train_model": "jaxclf.train.trainer",
    "Trainer": "jaxclf.train.trainer",
    "TextClassificationDataset": "jaxclf.train.trainer",
    "EarlyStoppingCallback": "jaxclf.train.trainer",
    # serving
    "InferenceEngine": "jaxclf.serve.engine",
    "PredictionResult": "jaxclf.serve.engine",
    "BatchPredictionResult": "jaxclf.serve.engine",
    "predict_single": "jaxclf.serve.engine",
    "predict_batch": "jaxclf.serve.engine",
    "create_app": "jaxclf.serve.app",
}

__getattr__, _names = lazy_exports(__name__, _LAZY)
__all__ = ["__version__", *_names]
