"""The training loop: Grain batches -> one jitted, sharded, donated train step -> Orbax checkpoints -> model directory.

    from jaxclf.train.presets import get_preset
    model_config, train_config = get_preset("small")
    result = train(model_config, train_config)   # -> TrainResult (exported model dir, metrics)

A run has four phases: prepare_data (jaxclf.train.prepare: read, label, tokenize; everything is
validated before anything is written), build_train_state (model, optimiser, shardings), the step
loop (_Run.loop: steps, logging, evaluation, checkpoints, early stopping, preemption) and the
export of the best checkpoint (_Run.export).

The loop is resumable: re-running with the same output_dir continues from the latest complete
checkpoint and, on CPU, ends with bitwise the same weights as an uninterrupted run. SIGTERM
(preemption) saves a checkpoint and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer

from jaxclf import calibration, classifier, weights
from jaxclf.config import MIXED_PRECISION, ConfigError, ModelConfig, TrainingConfig
from jaxclf.model import create_model
from jaxclf.train import batches, flops, optim, sharding
from jaxclf.train.checkpoint import Checkpointer, abstract_like
from jaxclf.train.evaluate import evaluation_report, sharded_logits
from jaxclf.train.prepare import TOKENIZER_FILE, PreparedData, prepare_data
from jaxclf.train.runlog import ProgressBar, RunLog, StepWindow
from jaxclf.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    model_dir: Path | None  # OUTPUT/model, or None when preempted before the end
    steps: int
    eval_metrics: dict | None  # evaluation report of the exported (best) checkpoint
    preempted: bool = False
    epoch: float = 0.0  # passes over the training examples, fractional


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Batch sizes and step counts of a run."""

    global_batch: int
    eval_batch: int
    steps_per_epoch: int
    total_steps: int


def plan_steps(cfg: TrainingConfig, num_examples: int) -> StepPlan:
    n_dev = jax.device_count()
    global_batch = cfg.per_device_train_batch_size * n_dev
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"global batch {global_batch} ({cfg.per_device_train_batch_size} per device x "
                          f"{n_dev} devices) is larger than the {num_examples} training examples")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    return StepPlan(global_batch, cfg.per_device_eval_batch_size * n_dev, steps_per_epoch, total_steps)


# ----------------------------------------------------------------------------- phase 2: the train state


@dataclasses.dataclass
class TrainSetup:
    """The pieces of a run that depend only on the configs and the mesh."""

    graphdef: Any
    rest: Any  # the model's non-parameter state (RNG streams)
    tx: optax.GradientTransformation
    schedule: Any
    state: dict | None  # {"params", "opt_state", "step", "rng", "loss_scale", "good_steps"}
    state_shardings: dict
    param_shardings: Any


def build_train_state(config: ModelConfig, cfg: TrainingConfig, mesh, total_steps: int,
                      init_tensors: dict | None = None, abstract: bool = False) -> TrainSetup:
    """Model, optimiser and train state placed on `mesh` (only shapes and shardings when `abstract`)."""
    abstract_model = nnx.eval_shape(lambda: create_model(config, cfg.seed))
    graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    param_shardings = sharding.state_shardings(abstract_params, mesh)
    tx, schedule = optim.make_optimizer(
        learning_rate=cfg.learning_rate, warmup_steps=min(cfg.warmup_steps, total_steps),
        total_steps=total_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon, decay=cfg.lr_schedule,
        layerwise_lr_decay=cfg.layerwise_lr_decay, freeze_embeddings=cfg.freeze_embeddings,
        num_layers=config.num_encoder_layers)

    def init_state(params):
        return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
                "rng": jax.random.key_data(jax.random.key(cfg.seed + 2)),
                "loss_scale": jnp.float32(cfg.loss_scale_init if cfg.mixed_precision == "fp16" else 1.0),
                "good_steps": jnp.int32(0)}

    state_shardings = {
        "params": param_shardings,
        "opt_state": sharding.like_params_shardings(jax.eval_shape(tx.init, abstract_params),
                                                    abstract_params, param_shardings, mesh),
        **{k: sharding.replicated(mesh) for k in ("step", "rng", "loss_scale", "good_steps")}}
    make = jax.jit(init_state, out_shardings=state_shardings)
    if abstract:
        rest = None
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(init_state, abstract_params), state_shardings)
    elif init_tensors is not None:
        model = create_model(config, cfg.seed, init_params=False)
        weights.load_torch_state(model, init_tensors, source=cfg.init_from or "initial weights")
        _, params, rest = nnx.split(model, nnx.Param, ...)
        state = make(jax.device_put(params, param_shardings))
    else:
        def fresh():  # initialised directly in place: no host copy of the weights
            _, params, rest = nnx.split(create_model(config, cfg.seed), nnx.Param, ...)
            return params, rest
        params, rest = jax.jit(fresh, out_shardings=(param_shardings, sharding.replicated(mesh)))()
        state = make(params)
    return TrainSetup(graphdef, rest, tx, schedule, state, state_shardings, param_shardings)


def restore_checkpoint(output_dir: str | os.PathLike, mesh=None, step: int | None = None) -> tuple[dict, dict]:
    """(train state, meta) of a run's checkpoint (latest by default), placed on `mesh` (default: all devices).

    The mesh may differ from the one that wrote it: 8 devices -> 1, 1 -> 4, ...
    """
    ckpt = Checkpointer(Path(output_dir) / "checkpoints", async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {Path(output_dir) / 'checkpoints'}")
    meta = ckpt.restore_meta(step)
    config = ModelConfig.from_dict(meta["model_config"])
    cfg = TrainingConfig(**meta["training_config"])
    mesh = mesh if mesh is not None else sharding.make_mesh()
    setup = build_train_state(config, cfg, mesh, meta["total_steps"], abstract=True)
    state = ckpt.restore_state(step, setup.state)
    ckpt.close()
    return state, meta


# ----------------------------------------------------------------------------- phases 3 and 4: steps, export


def train(model_cfg: ModelConfig, cfg: TrainingConfig, tokenizer: Tokenizer | None = None) -> TrainResult:
    """Train (or resume) a classifier and export the best checkpoint to OUTPUT/model.

    `tokenizer`: use this one instead of training a BPE tokenizer on the training texts (from scratch only).
    """
    prepared = prepare_data(model_cfg, cfg, tokenizer)
    mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
    plan = plan_steps(cfg, len(prepared.train_ds))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)  # everything above is validated: the run may now write
    if prepared.new_tokenizer and jax.process_index() == 0:
        tmp = (out / TOKENIZER_FILE).with_suffix(".tmp")
        prepared.tokenizer.save(str(tmp))
        os.replace(tmp, out / TOKENIZER_FILE)
    if prepared.distillation is not None:  # every process: hosts may not share OUTPUT
        prepared.distillation.save_cache()
    setup = build_train_state(prepared.config, cfg, mesh, plan.total_steps, prepared.init_tensors)
    run = _Run(prepared, cfg, mesh, plan, setup)
    state, step, preempted = run.loop()
    if preempted:
        log.warning("preempted at step %d; checkpoint saved. Re-run the same command to resume.", step)
        run.close(plot=False)
        return TrainResult(model_dir=None, steps=step, eval_metrics=None, preempted=True,
                           epoch=run.epoch(step))
    return run.export(state, step)


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (checkpoint, then return)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Run:
    """One run's compiled steps, batches, checkpoints and logs; `loop()` then `export()`."""

    def __init__(self, prepared: PreparedData, cfg: TrainingConfig, mesh, plan: StepPlan, setup: TrainSetup):
        self.prepared, self.cfg, self.mesh, self.plan, self.setup = prepared, cfg, mesh, plan, setup
        self.is_main = jax.process_index() == 0
        batch_sharding = sharding.batch_sharding(mesh)
        self.train_step = jax.jit(make_train_step(setup.graphdef, setup.rest, setup.tx, setup.schedule, cfg),
                                  donate_argnums=0, in_shardings=(setup.state_shardings, batch_sharding),
                                  out_shardings=(setup.state_shardings, sharding.replicated(mesh)))
        self.eval_step = jax.jit(make_eval_step(setup.graphdef, setup.rest),
                                 in_shardings=(setup.param_shardings, batch_sharding),
                                 out_shardings=sharding.replicated(mesh))
        self.iterator = batches.train_batches(
            prepared.train_ds, global_batch_size=plan.global_batch, seed=cfg.seed, buckets=prepared.buckets,
            pad_id=prepared.config.pad_token_id, process_index=jax.process_index(),
            process_count=jax.process_count())
        self.ckpt = Checkpointer(Path(cfg.output_dir) / "checkpoints", keep_latest=cfg.save_total_limit,
                                 keep_best=cfg.save_best_total if prepared.eval_ds is not None else 0,
                                 metric=cfg.metric_for_best_model, greater_is_better=cfg.greater_is_better,
                                 async_save=cfg.async_checkpointing)
        self.meta = {"step": 0, "total_steps": plan.total_steps, "evals": [], "best": None,
                     "evals_without_improvement": 0, "model_config": prepared.config.to_dict(),
                     "training_config": cfg.to_dict()}
        self.run_log: RunLog | None = None

    def epoch(self, step: int) -> float:
        return step * self.plan.global_batch / len(self.prepared.train_ds)

    def eval_logits(self, params) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, C), label ids (N,)) of the evaluation texts; collective (every process calls it)."""
        return sharded_logits(self.eval_step, params, self.prepared.eval_ds, mesh=self.mesh,
                              global_batch_size=self.plan.eval_batch, buckets=self.prepared.buckets,
                              pad_id=self.prepared.config.pad_token_id,
                              pooling=self.prepared.config.chunk_pooling)

    def evaluate(self, params) -> dict:
        return evaluation_report(*self.eval_logits(params), self.prepared.label_names)

    def _resume(self, state: dict) -> dict:
        start = self.ckpt.latest_step()
        if start is not None:
            state, self.meta = self.ckpt.restore(start, abstract_like(state), self.iterator)
            log.info("resumed from the checkpoint at step %d of %d", start, self.plan.total_steps)
        return state

    def _log_start(self, state: dict) -> None:
        log.info("model: %d parameters; %d steps (%d per epoch), global batch %d on %d device(s), mesh %s",
                 sum(x.size for x in jax.tree.leaves(state["params"])), self.plan.total_steps,
                 self.plan.steps_per_epoch, self.plan.global_batch, jax.device_count(), dict(self.mesh.shape))

    def loop(self) -> tuple[dict, int, bool]:
        """Run the steps from the latest checkpoint (or the start): (state, last step, preempted)."""
        cfg, total = self.cfg, self.plan.total_steps
        state = self._resume(self.setup.state)
        step = start_step = int(self.meta["step"])
        self.run_log = RunLog(Path(cfg.output_dir), self.is_main, resume_step=step)
        self._log_start(state)
        peak = flops.measure_matmul_peak(MIXED_PRECISION[cfg.mixed_precision]) * jax.device_count()
        window = StepWindow(self.prepared.config, self.plan.global_batch, peak)
        progress = ProgressBar(total, step, enabled=cfg.progress_bar and self.is_main)
        preempted = False
        with _Preemption() as preemption:
            while step < total and not _early_stop(self.meta, cfg):
                local = next(self.iterator)
                state, metrics = self.train_step(state, sharding.global_batch(local, self.mesh))
                step += 1
                if step == start_step + 1:  # the first step compiles: keep it out of the rates
                    jax.block_until_ready(metrics)
                    window.restart()
                else:
                    window.add(metrics, local["input_ids"].shape[1])
                progress.update(1)
                if window and (step % cfg.logging_steps == 0 or step == total):
                    window.flush(step, self.run_log, progress)
                eval_metrics = self._maybe_evaluate(state, step)
                if eval_metrics is not None:
                    window.restart()
                self.meta["step"] = step
                # The shared signal decides for every process together (a multi-host save is collective).
                stop_now = sharding.any_process(preemption.requested)
                if eval_metrics is not None or step % cfg.save_steps == 0 or step == total or stop_now:
                    self.ckpt.save(step, state, self.iterator, self.meta, eval_metrics)
                if stop_now and step < total:
                    preempted = True
                    break
        progress.close()
        self.ckpt.wait()
        return state, step, preempted

    def _maybe_evaluate(self, state: dict, step: int) -> dict | None:
        """Evaluate when due; returns the metrics that rank this step's checkpoint, or None."""
        if self.prepared.eval_ds is None or (step % self.cfg.eval_steps and step != self.plan.total_steps):
            return None
        report = self.evaluate(state["params"])
        _record_eval(self.meta, step, report, self.cfg)
        self.run_log.write("eval", step, {k: v for k, v in report.items() if not isinstance(v, (dict, list))})
        log.info("step %d eval: loss %.4f accuracy %.4f macro_f1 %.4f", step, report["loss"],
                 report["accuracy"], report["macro_f1"])
        return {k: report[k] for k in ("loss", "accuracy", "macro_f1")}

    def close(self, plot: bool) -> None:
        self.ckpt.close()
        if self.run_log is not None:
            self.run_log.close(Path(self.cfg.output_dir) / "training_curves.png" if plot else None)

    def export(self, state: dict, step: int) -> TrainResult:
        """Export the best checkpoint (by the eval metric), or the last one without evaluation, to OUTPUT/model."""
        out, best = Path(self.cfg.output_dir), self.meta.get("best")
        if best is not None and best["step"] != step:
            state = self.ckpt.restore_state(best["step"], abstract_like(state))
        eval_metrics = best["report"] if best is not None else None
        host_params = sharding.gather_to_host(state["params"])
        exported_step = best["step"] if best else step
        export_config, calibrated = self.prepared.export_config, None
        if self.cfg.calibrate and self.prepared.eval_ds is not None:
            # The exported params' logits (collective), so the eval report and the drift monitor's
            # reference in metrics.json describe the calibrated confidences the model will serve.
            logits, label_ids = self.eval_logits(state["params"])
            temperature, eval_metrics, calibrated = _calibrate(
                logits, label_ids, self.prepared.label_names, export_config.temperature,
                self.cfg.eval_file or "eval split", out / "reliability.png" if self.is_main else None)
            export_config = export_config.replace(temperature=temperature)
        elif self.cfg.calibrate:
            log.info("no evaluation data (eval_split=0, no eval_file): confidences are not calibrated, "
                     "temperature stays %g", export_config.temperature)
        if self.is_main:
            model = create_model(export_config, self.cfg.seed, init_params=False)
            nnx.update(model, jax.tree.map(np.asarray, host_params))
            export_metrics = {"eval": eval_metrics, "step": exported_step, "epoch": self.epoch(exported_step),
                              "train_file": self.cfg.train_file, "eval_file": self.cfg.eval_file,
                              "training_config": self.cfg.to_dict()}
            if calibrated is not None:
                export_metrics["calibration"] = calibrated
            if self.prepared.distillation is not None:
                export_metrics["distillation"] = self.prepared.distillation.summary()
            classifier.TextClassifier(model, self.prepared.tokenizer).save(out / "model", metrics=export_metrics)
            log.info("exported %s (step %d)", out / "model", exported_step)
        self.close(plot=self.is_main)
        return TrainResult(model_dir=out / "model", steps=step, eval_metrics=eval_metrics, epoch=self.epoch(step))


def _calibrate(logits: np.ndarray, label_ids: np.ndarray, label_names: tuple[str, ...], temperature: float,
               fitted_on: str, png: Path | None) -> tuple[float, dict, dict]:
    """Temperature scaling at export: (the model's new temperature, the eval report of the calibrated
    logits, metrics.json's "calibration"); draws the reliability diagram to `png` when given.

    `logits` are the model's at its current `temperature`; the fitted factor scales them further.
    """
    fitted = calibration.fit_temperature(logits, label_ids)
    if calibration.at_lower_bound(fitted):
        log.warning("calibration skipped: all %d evaluation examples are right with a wide margin, so the NLL "
                    "keeps falling as the temperature goes to 0 (every confidence 1.0); temperature stays %g",
                    len(label_ids), temperature)
        fitted = 1.0
    elif fitted >= calibration.TEMPERATURE_RANGE[1] * (1.0 - 1e-3):
        log.warning("calibration: the temperature ran into its upper bound %g: the logits say almost nothing "
                    "about the evaluation labels (accuracy near chance?), so confidences become near-uniform",
                    fitted)
    scaled = (logits / np.float32(fitted)).astype(np.float32)
    summary = {**calibration.calibration_summary(logits, label_ids, fitted), "temperature": temperature * fitted,
               "fitted_on": str(fitted_on)}
    if png is not None:
        calibration.reliability_diagram(
            png, label_ids, calibration.softmax(logits), calibration.softmax(scaled),
            title=f"{len(label_ids)} evaluation examples ({Path(fitted_on).name}); "
                  f"temperature {summary['temperature']:.3f}")
    log.info("calibration on %s (%d examples): temperature %.3f, ECE %.4f -> %.4f, Brier %.4f -> %.4f, "
             "NLL %.4f -> %.4f", fitted_on, len(label_ids), summary["temperature"], summary["ece_before"],
             summary["ece_after"], summary["brier_before"], summary["brier_after"], summary["nll_before"],
             summary["nll_after"])
    return summary["temperature"], evaluation_report(scaled, label_ids, label_names), summary


def _record_eval(meta: dict, step: int, report: dict, cfg: TrainingConfig) -> None:
    """Track the best evaluation and the count of evaluations without (enough) improvement."""
    value = report[cfg.metric_for_best_model]
    meta["evals"].append({"step": step, cfg.metric_for_best_model: value})
    best = meta.get("best")
    sign = 1 if cfg.greater_is_better else -1
    # A tie moves "best" to the later step, as Orbax's best-N retention ranks ties; only an
    # improvement by more than early_stopping_threshold resets the early-stopping patience.
    improved = best is None or sign * (value - best["value"]) > cfg.early_stopping_threshold
    if best is None or sign * value >= sign * best["value"]:
        meta["best"] = {"step": step, "value": value, "report": report}
    meta["evals_without_improvement"] = 0 if improved else meta["evals_without_improvement"] + 1


def _early_stop(meta: dict, cfg: TrainingConfig) -> bool:
    stop = cfg.early_stopping_patience > 0 and meta["evals_without_improvement"] >= cfg.early_stopping_patience
    if stop:
        log.info("early stopping: %s has not improved for %d evaluations (best %.4f at step %d)",
                 cfg.metric_for_best_model, meta["evals_without_improvement"], meta["best"]["value"],
                 meta["best"]["step"])
    return stop
