"""Training: Grain batches -> one jitted, sharded, donated train step -> Orbax checkpoints -> a model directory.

    from jaxclf.train import train
    from jaxclf.train.presets import get_preset
    model_config, train_config = get_preset("small")
    result = train(model_config, train_config)   # -> TrainResult (exported model dir, metrics)

The original framework's API (jaxclf.train.trainer): `from jaxclf.train import train_model, TrainingConfig`,
and Trainer, TextClassificationDataset, EarlyStoppingCallback.

Modules: prepare (a run's first phase: read, label, tokenize), loop (the run's steps and export),
step (the jitted train/eval steps), evaluate (the one evaluation report), runlog
(JSONL/TensorBoard/PNG/progress), trainer (the original framework's API), data (example files:
read, write, split), batches (tokenized datasets, Grain batches), distill (a teacher's soft
labels), datasets (public data sets for benchmarks), optim (clip -> AdamW, schedules), sharding
(mesh, logical axes, jax.distributed), checkpoint (Orbax), flops (MFU), presets (named
configurations). The configs themselves live in jaxclf.config.

Imported lazily: `jaxclf.train.data` or `jaxclf.train.presets` must not pull in Flax, the model or the loop.
"""

from jaxclf.lazy import lazy_exports

_LAZY = {
    "train": "jaxclf.train.loop",
    "TrainResult": "jaxclf.train.loop",
    "build_train_state": "jaxclf.train.loop",
    "restore_checkpoint": "jaxclf.train.loop",
    "make_train_step": "jaxclf.train.step",
    "make_eval_step": "jaxclf.train.step",
    "evaluation_report": "jaxclf.train.evaluate",
    "evaluate_classifier": "jaxclf.train.evaluate",
    "train_model": "jaxclf.train.trainer",
    "Trainer": "jaxclf.train.trainer",
    "TextClassificationDataset": "jaxclf.train.trainer",
    "EarlyStoppingCallback": "jaxclf.train.trainer",
    "TrainingConfig": "jaxclf.config",
}

__getattr__, __all__ = lazy_exports(__name__, _LAZY)
