"""The training loop: Grain batches -> one jitted, sharded, donated train step -> Orbax checkpoints -> model directory.

    from jaxclf.train.presets import get_preset
    model_config, train_config = get_preset("small")
    result = train(model_config, train_config)   # -> TrainResult (exported model dir, metrics)

The loop is resumable: re-running with the same output_dir continues from the latest complete
checkpoint and, on CPU, ends with bitwise the same weights as an uninterrupted run. SIGTERM
(preemption) saves a checkpoint and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxclf import classifier, model_dir, tokenizer as tokenization, weights
from jaxclf.train import data
from jaxclf.train import flops
from jaxclf.train import optim
from jaxclf.train import sharding
from jaxclf.train.checkpoint import Checkpointer, abstract_like
from jaxclf.config import MIXED_PRECISION, ConfigError, ModelConfig, TrainingConfig
from jaxclf.metrics import classification_report
from jaxclf.model import TransformerClassifier, create_model

log = logging.getLogger(__name__)

@dataclasses.dataclass
class TrainResult:
    model_dir: Path | None  # OUTPUT/model, or None when preempted before the end
    steps: int
    eval_metrics: dict | None  # metrics of the exported (best) checkpoint
    preempted: bool = False


# ----------------------------------------------------------------------------- data

def _load_splits(cfg: TrainingConfig):
    """((texts, labels, file lines), (eval texts, labels, lines)); eval held out of train when no eval_file."""
    texts, labels, report = data.read_examples(cfg.train_file, skip_bad=cfg.skip_bad_rows)
    train = (texts, labels, report.lines)
    if cfg.eval_file:
        eval_texts, eval_labels, eval_report = data.read_examples(cfg.eval_file, skip_bad=cfg.skip_bad_rows)
        held = (eval_texts, eval_labels, eval_report.lines)
    elif cfg.eval_split > 0:
        train_idx, eval_idx = data.stratified_split(labels, cfg.eval_split, cfg.seed)
        pick = lambda idx: tuple([column[i] for i in idx] for column in train)
        train, held = pick(train_idx), pick(eval_idx)
    else:
        held = ([], [], [])
    log.info("training examples: %d (%s), evaluation examples: %d", len(train[0]), cfg.train_file, len(held[0]))
    return train, held


# ----------------------------------------------------------------------------- the step

def _cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(weighted mean loss, per-example loss); float32 whatever the compute dtype."""
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1.0), per_example


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, schedule, cfg: TrainingConfig):
    """The pure train step: (state, batch) -> (state, metrics). `rest` holds the model's RNG streams."""
    fp16 = cfg.mixed_precision == "fp16"

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        params = state["params"]
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        total_weight = jnp.maximum(batch["weights"].sum(), 1.0)

        def loss_fn(p, part, key):
            # A fresh dropout stream per step, derived from (seed, step): a resumed run replays it exactly.
            step_rest = jax.tree.map(
                lambda x: key if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, rest)
            model = nnx.merge(graphdef, p, step_rest, copy=True)  # copy: dropout advances its RNG count
            model.train()
            logits = model(part["input_ids"], part["attention_mask"])
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                                          part["labels"])
            loss = (per_example * part["weights"]).sum() / total_weight  # this part's share of the mean
            return loss * state["loss_scale"], loss

        grad_fn = jax.grad(loss_fn, has_aux=True)
        m = cfg.micro_batches
        if m == 1:
            grads, loss = grad_fn(params, batch, dropout_key)
        else:
            rows = batch["labels"].shape[0]
            if rows % m:
                raise ValueError(f"a batch of {rows} rows does not split into micro_batches={m}")

            # Micro-batch k takes rows k, k+m, k+2m, ...: with the batch sharded over devices in
            # contiguous blocks, every micro-batch stays spread evenly over them (no data movement).
            def split(x):
                return jnp.moveaxis(x.reshape(rows // m, m, *x.shape[1:]), 1, 0)

            def accumulate(carry, xs):
                micro, k = xs
                g, l = grad_fn(params, micro, jax.random.fold_in(dropout_key, k))
                return jax.tree.map(jnp.add, carry, (g, l)), None

            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
            (grads, loss), _ = jax.lax.scan(accumulate, zeros, (jax.tree.map(split, batch), jnp.arange(m)))
        grads = jax.tree.map(lambda g: g / state["loss_scale"], grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1)
        lr = schedule(state["step"])  # the rate of this update (off by the skipped steps under fp16)
        if fp16:
            # Dynamic loss scaling: a step whose gradients overflowed is skipped (params and
            # optimiser state kept) and the scale halves; a long run of finite steps doubles it.
            finite = jnp.isfinite(grad_norm)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
            good = jnp.where(finite, state["good_steps"] + 1, 0)
            grow = good >= cfg.loss_scale_period
            scale = jnp.where(finite, jnp.where(grow, state["loss_scale"] * 2, state["loss_scale"]),
                              jnp.maximum(state["loss_scale"] / 2, 1.0))
            new_state.update(good_steps=jnp.where(grow, 0, good), loss_scale=scale)
            skipped = 1 - finite.astype(jnp.int32)
        else:
            skipped = jnp.int32(0)
        new_state.update(params=new_params, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr,
                   "param_norm": optax.global_norm(new_params), "update_norm": optax.global_norm(updates),
                   "skipped": skipped, "loss_scale": state["loss_scale"],
                   "tokens": batch["attention_mask"].sum(), "examples": batch["weights"].sum()}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, rest):
    def eval_step(params, batch):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        logits = model(batch["input_ids"], batch["attention_mask"])
        _, per_example = _cross_entropy(logits, batch["labels"], batch["weights"])
        return logits, per_example

    return eval_step


# ----------------------------------------------------------------------------- the run

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


class _Logger:
    """Process 0 writes metrics as JSON lines, TensorBoard events, and a PNG of the curves at the end."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int):
        self.enabled, self.path = enabled, output_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop lines of steps that will be replayed
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{kind}/{k}", v, step)
        self.writer.flush()

    def close(self, plot_path: Path | None) -> None:
        if not self.enabled:
            return
        self.writer.close()
        if plot_path is not None and self.path.exists():
            plot_curves(self.path, plot_path)


def plot_curves(jsonl: Path, png: Path) -> None:
    """Training loss, learning rate and evaluation metrics against steps, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["learning_rate"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    for key in ("accuracy", "macro_f1"):
        axes[2].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=key)
    axes[2].set(title="evaluation", xlabel="step", ylim=(0, 1))
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _prepare_tokenizer_and_config(model_cfg: ModelConfig, cfg: TrainingConfig, texts, label_names, out: Path):
    """(tokenizer, model config, initial weights or None). Fine-tuning keeps the tokenizer and labels."""
    if cfg.init_from:
        init_cfg, tensors, tok, _ = model_dir.read(cfg.init_from)
        if tuple(label_names) != init_cfg.id2label:
            raise ConfigError(f"labels of the data {list(label_names)} differ from those of "
                              f"{cfg.init_from} {list(init_cfg.id2label)}; pass --labels to match")
        # The model directory defines the whole architecture, dropout included; the preset's model
        # section does not apply when fine-tuning.
        log.info("fine-tuning %s: its model config is used as is (model.* settings are ignored)", cfg.init_from)
        return tok, init_cfg, tensors
    tok_path = out / "tokenizer.json"
    if tok_path.exists():  # resuming: the vocabulary must be the one the checkpoints were trained with
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = tokenization.train_tokenizer(texts, vocab_size=cfg.tokenizer_vocab_size)
        if jax.process_index() == 0:
            tmp = tok_path.with_suffix(".tmp")
            tok.save(str(tmp))
            os.replace(tmp, tok_path)
    config = model_cfg.replace(vocab_size=tok.get_vocab_size(), num_classes=len(label_names),
                               id2label=tuple(label_names))
    return tok, config, None


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
        model = create_model(config, cfg.seed)
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


def train(model_cfg: ModelConfig, cfg: TrainingConfig) -> TrainResult:
    """Train (or resume) a classifier and export the best checkpoint to OUTPUT/model."""
    out = Path(cfg.output_dir)
    is_main = jax.process_index() == 0

    # Data: read and validate everything before anything is written.
    (texts, labels, lines), (eval_texts, eval_labels, eval_lines) = _load_splits(cfg)
    if cfg.init_from and not cfg.labels:
        label_names = model_dir.read_config(cfg.init_from).id2label
    else:
        label_names = data.label_vocabulary(labels, cfg.labels or None)
    train_ids = data.label_ids(labels, label_names, cfg.train_file, lines=lines)
    eval_ids = data.label_ids(eval_labels, label_names, cfg.eval_file or cfg.train_file, lines=eval_lines)

    out.mkdir(parents=True, exist_ok=True)
    tok, config, init_tensors = _prepare_tokenizer_and_config(model_cfg, cfg, texts, label_names, out)
    tok = tokenization.configure(tok, config.max_position_embeddings, config.pad_token_id)
    export_config = config  # what the model directory records (fp32 compute unless asked otherwise)
    config = config.replace(gradient_checkpointing=cfg.gradient_checkpointing or config.gradient_checkpointing)
    if cfg.mixed_precision != "no":
        config = config.replace(dtype=MIXED_PRECISION[cfg.mixed_precision])
    buckets = cfg.length_buckets or classifier.length_buckets(config.max_position_embeddings)
    if max(buckets) > config.max_position_embeddings:
        raise ConfigError(f"length_buckets {list(buckets)} exceed max_position_embeddings="
                          f"{config.max_position_embeddings}")

    # Mesh and batch sizes.
    mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
    n_dev = jax.device_count()
    global_batch = cfg.per_device_train_batch_size * n_dev
    eval_batch = cfg.per_device_eval_batch_size * n_dev
    train_ds = data.tokenize_dataset(tok, texts, train_ids, truncation_head=config.truncation_head)
    steps_per_epoch = len(train_ds) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"global batch {global_batch} ({cfg.per_device_train_batch_size} per device x "
                          f"{n_dev} devices) is larger than the {len(train_ds)} training examples")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    setup = build_train_state(config, cfg, mesh, total_steps, init_tensors)
    graphdef, rest, tx, schedule = setup.graphdef, setup.rest, setup.tx, setup.schedule
    state, state_shardings, param_shardings = setup.state, setup.state_shardings, setup.param_shardings

    train_step = jax.jit(make_train_step(graphdef, rest, tx, schedule, cfg), donate_argnums=0,
                         in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(state_shardings, sharding.replicated(mesh)))
    eval_step = jax.jit(make_eval_step(graphdef, rest),
                        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                        out_shardings=sharding.replicated(mesh))

    pad_id = config.pad_token_id
    iterator = data.train_batches(train_ds, global_batch_size=global_batch, seed=cfg.seed, buckets=buckets,
                                  pad_id=pad_id, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    eval_ds = (data.tokenize_dataset(tok, eval_texts, eval_ids, truncation_head=config.truncation_head)
               if eval_texts else None)

    def evaluate(params) -> dict:
        all_logits, all_loss, all_w, all_y = [], [], [], []
        for batch in data.eval_batches(eval_ds, global_batch_size=eval_batch, buckets=buckets, pad_id=pad_id,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
            logits, per_example = eval_step(params, sharding.global_batch(batch, mesh))
            w = _gather(batch["weights"])
            all_logits.append(np.asarray(logits)), all_loss.append(np.asarray(per_example))
            all_w.append(w), all_y.append(_gather(batch["labels"]))
        w = np.concatenate(all_w) > 0
        logits, y = np.concatenate(all_logits)[w], np.concatenate(all_y)[w]
        report = classification_report(y, logits.argmax(-1), label_names,
                                       loss=float(np.concatenate(all_loss)[w].mean()))
        probs = classifier.softmax(logits.astype(np.float64))
        report["confidence_histogram"] = np.histogram(probs.max(-1), bins=10, range=(0, 1))[0].tolist()
        report["predicted_label_counts"] = np.bincount(probs.argmax(-1), minlength=len(label_names)).tolist()
        return report

    ckpt = Checkpointer(out / "checkpoints", keep_latest=cfg.save_total_limit,
                        keep_best=cfg.save_best_total if eval_ds is not None else 0,
                        metric=cfg.metric_for_best_model, greater_is_better=cfg.greater_is_better,
                        async_save=cfg.async_checkpointing)
    meta = {"step": 0, "total_steps": total_steps, "evals": [], "best": None, "evals_without_improvement": 0,
            "model_config": config.to_dict(), "training_config": cfg.to_dict()}
    start = ckpt.latest_step()
    if start is not None:
        state, meta = ckpt.restore(start, abstract_like(state), iterator)
        log.info("resumed from the checkpoint at step %d of %d", start, total_steps)
    step = start_step = int(meta["step"])
    logger = _Logger(out, is_main, resume_step=step)

    peak = flops.measure_matmul_peak(MIXED_PRECISION[cfg.mixed_precision]) * n_dev
    log.info("model: %d parameters; %d steps (%d per epoch), global batch %d on %d device(s), mesh %s",
             sum(x.size for x in jax.tree.leaves(state["params"])), total_steps, steps_per_epoch,
             global_batch, n_dev, dict(mesh.shape))
    progress = _progress(total_steps, step, enabled=cfg.progress_bar and is_main)
    preempted, window, window_start = False, [], time.perf_counter()
    with _Preemption() as preemption:
        while step < total_steps and not _early_stop(meta, cfg):
            local = next(iterator)
            state, metrics = train_step(state, sharding.global_batch(local, mesh))
            step += 1
            if step == start_step + 1:  # the first step compiles: keep it out of the rates
                jax.block_until_ready(metrics)
                window_start = time.perf_counter()
            else:
                window.append((metrics, local["input_ids"].shape[1]))
            progress.update(1)
            if window and (step % cfg.logging_steps == 0 or step == total_steps):
                jax.block_until_ready(window[-1][0])  # dispatch is asynchronous: time the finished work
                _log_window(logger, step, window, time.perf_counter() - window_start, config,
                            global_batch, peak, progress)
                window, window_start = [], time.perf_counter()
            eval_now = eval_ds is not None and (step % cfg.eval_steps == 0 or step == total_steps)
            metrics_for_ckpt = None
            if eval_now:
                report = evaluate(state["params"])
                _record_eval(meta, step, report, cfg)
                logger.write("eval", step, {k: v for k, v in report.items() if not isinstance(v, (dict, list))})
                log.info("step %d eval: loss %.4f accuracy %.4f macro_f1 %.4f", step, report["loss"],
                         report["accuracy"], report["macro_f1"])
                metrics_for_ckpt = {k: report[k] for k in ("loss", "accuracy", "macro_f1")}
                window_start = time.perf_counter()
            meta["step"] = step
            # The shared signal decides for every process together (a multi-host save is collective).
            stop_now = _any_process(preemption.requested)
            if eval_now or step % cfg.save_steps == 0 or step == total_steps or stop_now:
                ckpt.save(step, state, iterator, meta, metrics_for_ckpt)
            if stop_now and step < total_steps:
                preempted = True
                break
    progress.close()
    ckpt.wait()
    if preempted:
        log.warning("preempted at step %d; checkpoint saved. Re-run the same command to resume.", step)
        ckpt.close()
        logger.close(None)
        return TrainResult(model_dir=None, steps=step, eval_metrics=None, preempted=True)

    # Export the best checkpoint (by the eval metric), or the last one without evaluation.
    best = meta.get("best")
    if best is not None and best["step"] != step:
        state = ckpt.restore_state(best["step"], abstract_like(state))
    eval_metrics = best["report"] if best is not None else None
    host_params = _gather(state["params"])
    ckpt.close()
    export_dir = None
    if is_main:
        model = create_model(export_config, cfg.seed)
        nnx.update(model, jax.tree.map(np.asarray, host_params))
        clf = classifier.TextClassifier(model, tok)
        export_metrics = {"eval": eval_metrics, "step": best["step"] if best else step,
                          "train_file": cfg.train_file, "eval_file": cfg.eval_file,
                          "training_config": cfg.to_dict()}
        export_dir = clf.save(out / "model", metrics=export_metrics)
        logger.close(out / "training_curves.png")
        log.info("exported %s (step %d)", export_dir, export_metrics["step"])
    return TrainResult(model_dir=export_dir or out / "model", steps=step, eval_metrics=eval_metrics)


# ----------------------------------------------------------------------------- helpers of the loop

def _gather(tree):
    """Host numpy copy of (possibly multi-process sharded) arrays."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.asarray([flag])).any())


def _record_eval(meta: dict, step: int, report: dict, cfg: TrainingConfig) -> None:
    value = report[cfg.metric_for_best_model]
    meta["evals"].append({"step": step, cfg.metric_for_best_model: value})
    best = meta.get("best")
    sign = 1 if cfg.greater_is_better else -1
    # A tie moves "best" to the later step, as Orbax's best-N retention ranks ties; only a strict
    # improvement resets the early-stopping patience.
    if best is None or sign * value >= sign * best["value"]:
        improved = best is None or sign * value > sign * best["value"]
        meta["best"] = {"step": step, "value": value, "report": report}
    else:
        improved = False
    meta["evals_without_improvement"] = 0 if improved else meta["evals_without_improvement"] + 1


def _early_stop(meta: dict, cfg: TrainingConfig) -> bool:
    stop = cfg.early_stopping_patience > 0 and meta["evals_without_improvement"] >= cfg.early_stopping_patience
    if stop:
        log.info("early stopping: %s has not improved for %d evaluations (best %.4f at step %d)",
                 cfg.metric_for_best_model, meta["evals_without_improvement"], meta["best"]["value"],
                 meta["best"]["step"])
    return stop


def _log_window(logger: _Logger, step: int, window: list, seconds: float, config: ModelConfig,
                global_batch: int, peak: float, progress) -> None:
    host = jax.device_get([m for m, _ in window])
    lengths = [t for _, t in window]
    examples = global_batch * len(window)
    tokens = float(sum(m["tokens"] for m in host))
    model_flops = sum(flops.train_flops_per_example(config, t) * global_batch for t in lengths)
    last = host[-1]
    values = {
        "loss": float(np.mean([m["loss"] for m in host])),
        "learning_rate": float(last["learning_rate"]),
        "grad_norm": float(last["grad_norm"]),
        "param_norm": float(last["param_norm"]),
        "update_norm": float(last["update_norm"]),
        "examples_per_s": examples / seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": model_flops / seconds / peak,
        "skipped_steps": int(sum(m["skipped"] for m in host)),
    }
    if values["skipped_steps"]:
        values["loss_scale"] = float(last["loss_scale"])
        log.warning("fp16: %d step(s) skipped in the last %d because gradients overflowed; loss scale now %g",
                    values["skipped_steps"], len(window), values["loss_scale"])
    logger.write("train", step, values)
    msg = (f"step {step}: loss {values['loss']:.4f} lr {values['learning_rate']:.2e} "
           f"grad_norm {values['grad_norm']:.3f} {values['examples_per_s']:.1f} ex/s "
           f"{values['tokens_per_s']:.0f} tok/s MFU {100 * values['mfu']:.1f}%")
    if progress.is_bar:
        progress.set_postfix_str(msg.split(": ", 1)[1])
    else:
        log.info(msg)


class _progress:
    """A tqdm bar on a terminal (process 0 only), otherwise nothing."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    @property
    def is_bar(self) -> bool:
        return self.bar is not None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix_str(self, s: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
