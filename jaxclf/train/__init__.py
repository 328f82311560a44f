"""Training: Grain batches -> one jitted, sharded, donated train step -> Orbax checkpoints -> a model directory.

    from jaxclf.train import train
    from jaxclf.train.presets import get_preset
    model_config, train_config = get_preset("small")
    result = train(model_config, train_config)   # -> TrainResult (exported model dir, metrics)

Modules: loop (the run), step (the jitted train/eval steps), runlog (JSONL/TensorBoard/PNG/progress),
data (readers, tokenized datasets, Grain batches), datasets (public data sets for benchmarks),
optim (clip -> AdamW, schedules), sharding (mesh, logical axes, jax.distributed), checkpoint
(Orbax), flops (MFU), presets (named configurations). The configs themselves live in jaxclf.config.

Imported lazily: `jaxclf.train.data` or `jaxclf.train.presets` must not pull in JAX's model or loop.
"""

import importlib

_LAZY = {
    "train": "jaxclf.train.loop",
    "TrainResult": "jaxclf.train.loop",
    "build_train_state": "jaxclf.train.loop",
    "restore_checkpoint": "jaxclf.train.loop",
    "make_train_step": "jaxclf.train.loop",
    "make_eval_step": "jaxclf.train.loop",
    "TrainingConfig": "jaxclf.config",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxclf.train' has no attribute {name!r}")
