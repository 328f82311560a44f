"""jaxclf: transformer text classifiers in JAX/Flax NNX, with a PyTorch twin that loads the same weights.

    import jaxclf
    clf = jaxclf.load("runs/default/model")
    clf.predict(["a lovely little cafe"])

Heavy modules (JAX, Flax) are imported on first use, so `jaxclf.config` stays importable
without them (torch_ref reads configs through it).
"""

__version__ = "0.1.0"

_LAZY = {
    "load": "jaxclf.classifier",
    "create": "jaxclf.classifier",
    "TextClassifier": "jaxclf.classifier",
    "ModelConfig": "jaxclf.config",
    "InferenceEngine": "jaxclf.serve.engine",
    "create_app": "jaxclf.serve.app",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxclf' has no attribute {name!r}")
