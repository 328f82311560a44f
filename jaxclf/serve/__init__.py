"""Serving: AOT-compiled inference engine, dynamic batcher, result cache, and the Flask service under waitress.

    from jaxclf.serve import InferenceEngine, create_app
    engine = InferenceEngine(model_path="runs/default/model")
    engine.predict_single("a lovely little cafe").predicted_class

    python -m jaxclf.serve --model runs/default/model --port 8000     # or: jaxclf serve ...

Imported lazily, so `python -m jaxclf.serve --help` answers without loading JAX.
"""

from jaxclf.lazy import lazy_exports

_LAZY = {
    "InferenceEngine": "jaxclf.serve.engine",
    "PredictionResult": "jaxclf.serve.results",
    "BatchPredictionResult": "jaxclf.serve.results",
    "predict_single": "jaxclf.serve.engine",
    "predict_batch": "jaxclf.serve.engine",
    "EngineConfig": "jaxclf.serve.config",
    "ServeConfig": "jaxclf.serve.config",
    "create_app": "jaxclf.serve.app",
    "serve": "jaxclf.serve.server",
    "main": "jaxclf.serve.__main__",
}

__getattr__, __all__ = lazy_exports(__name__, _LAZY)
