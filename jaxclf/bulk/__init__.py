"""Bulk prediction: stream a whole corpus through a model on every device and host, into resumable shards.

    from jaxclf.bulk import BulkConfig, run, read_predictions
    summary = run("runs/default/model", ["tickets/*.jsonl"], "preds/", BulkConfig(id_field="id"))
    for row in read_predictions("preds/"): ...        # every row once, in input order

    jaxclf predict --model runs/default/model --input 'tickets/*.jsonl' --output preds/ --id-field id

    spec.py     BulkConfig: every knob and its default (JAX-free)
    reader.py   CSV / JSON Lines / plain text / ArrayRecord rows streamed through Grain, tokenized ahead
    forward.py  the model compiled once per (batch, length) bucket, batches sharded over local devices
    writer.py   numbered shards committed atomically, per-process manifests, job.json, read_predictions
    summary.py  per-shard statistics and summary.json
    runner.py   the job: sharding over processes, the pipelined loop, resume, progress bar

Imported lazily, so `jaxclf predict --help` answers without loading JAX.
"""

from jaxclf.lazy import lazy_exports

_LAZY = {
    "BulkConfig": "jaxclf.bulk.spec",
    "run": "jaxclf.bulk.runner",
    "resolve_model": "jaxclf.bulk.runner",
    "read_predictions": "jaxclf.bulk.writer",
}

__getattr__, __all__ = lazy_exports(__name__, _LAZY)
