"""Training checkpoints with Orbax: train state, data iterator and run metadata, saved together.

Retention keeps the latest N checkpoints (so the newest is never deleted) plus the best N by
the evaluation metric. Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save resumes from the last complete step. Restoring takes an
abstract target whose shardings may come from another mesh (8 devices -> 1, 1 -> 4, ...).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


class Checkpointer:
    """Orbax CheckpointManager over `directory` with items `state`, `data` (grain iterator) and `meta` (JSON)."""

    def __init__(self, directory: str | os.PathLike, *, keep_latest: int = 2, keep_best: int = 1,
                 metric: str = "macro_f1", greater_is_better: bool = True, async_save: bool = True):
        self.metric = metric
        preservation = [policies.LatestN(n=max(keep_latest, 1))]
        if keep_best > 0:
            preservation.append(policies.BestN(
                get_metric_fn=lambda m: m[metric], reverse=not greater_is_better, n=keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(preservation),
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, iterator: Any, meta: dict, metrics: dict | None = None) -> None:
        """Save (asynchronously where enabled); `metrics` ranks this step for best-N retention."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=iterator_checkpoint_args(iterator),
                                  meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any, iterator: Any) -> tuple[Any, dict]:
        """(state placed by abstract_state's shardings, meta); the iterator is restored in place."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=iterator_restore_args(iterator),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the train state of a step (for exporting the best checkpoint)."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing a tree of arrays, for restore targets."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def iterator_checkpoint_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
    """Orbax save args for a grain iterator (jaxclf.train.batches.train_batches), an item of `ocp.args.Composite`.

        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=iterator_checkpoint_args(batches)))

    Each process writes its own small JSON state file (process_<i>-of-<n>.json).
    """
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
    """Orbax restore args that set a freshly built grain iterator (same data and settings) to the saved state.

        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 data=iterator_restore_args(batches)))
    """
    return grain.checkpoint.CheckpointRestore(iterator)
