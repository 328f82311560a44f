"""What a run reports: metrics.jsonl, TensorBoard events, training_curves.png, a progress bar and log lines.

    run_log = RunLog(output_dir, enabled=is_main, resume_step=step)
    window = StepWindow(model_config, global_batch, peak_flops)
    ...each step: window.add(metrics, padded_length)
    values = window.flush(step, run_log, progress)   # every logging_steps: one "train" record and one log line
    run_log.write("eval", step, report_scalars)
    run_log.close(output_dir / "training_curves.png")
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxclf.config import ModelConfig
from jaxclf.train import flops

log = logging.getLogger(__name__)


def summary_writer(logdir: Path):
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch whenever it is installed (to accept torch tensors), which would put
    torch on the training path (it never is) and cost 2.3 s of every run (4.2 s cold). Blocked for
    the import, `import torch` fails and tensorboardX takes numpy arrays and Python scalars only.
    """
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # the import system's "not importable" marker
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir))


class RunLog:
    """Process 0 writes metrics as JSON lines and TensorBoard events, and a PNG of the curves at the end."""

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
        self.writer = summary_writer(output_dir / "tensorboard")

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One record {"kind", "step", **values}; numeric values also go to TensorBoard as kind/name."""
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


class ProgressBar:
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


class StepWindow:
    """The steps since the last log line: their on-device metrics, padded lengths and wall time.

    Dispatch is asynchronous, so the window is timed up to the moment its last step has finished;
    `restart()` after work that is not training (compilation, evaluation) keeps it out of the rates.
    """

    def __init__(self, config: ModelConfig, global_batch: int, peak_flops: float):
        self.config, self.global_batch, self.peak_flops = config, global_batch, peak_flops
        self.steps: list[tuple[dict, int]] = []
        self.start = time.perf_counter()

    def restart(self) -> None:
        self.start = time.perf_counter()

    def add(self, metrics: dict, padded_length: int) -> None:
        self.steps.append((metrics, padded_length))

    def __bool__(self) -> bool:
        return bool(self.steps)

    def flush(self, step: int, run_log: RunLog, progress: ProgressBar) -> dict[str, float]:
        """Write the window's "train" record and log line (or progress bar text); start a new window."""
        jax.block_until_ready(self.steps[-1][0])
        values = self._summary(time.perf_counter() - self.start)
        if values["skipped_steps"]:
            log.warning("fp16: %d step(s) skipped in the last %d because gradients overflowed; loss scale now %g",
                        values["skipped_steps"], len(self.steps), values["loss_scale"])
        run_log.write("train", step, values)
        line = (f"loss {values['loss']:.4f} lr {values['learning_rate']:.2e} grad_norm {values['grad_norm']:.3f} "
                f"{values['examples_per_s']:.1f} ex/s {values['tokens_per_s']:.0f} tok/s "
                f"MFU {100 * values['mfu']:.1f}%")
        if progress.is_bar:
            progress.set_postfix_str(line)
        else:
            log.info("step %d: %s", step, line)
        self.steps = []
        self.restart()
        return values

    def _summary(self, seconds: float) -> dict[str, float]:
        host = jax.device_get([m for m, _ in self.steps])
        model_flops = sum(flops.train_flops_per_example(self.config, t) * self.global_batch for _, t in self.steps)
        last = host[-1]
        values = {
            "loss": float(np.mean([m["loss"] for m in host])),
            "learning_rate": float(last["learning_rate"]),
            "grad_norm": float(last["grad_norm"]),
            "param_norm": float(last["param_norm"]),
            "update_norm": float(last["update_norm"]),
            "examples_per_s": self.global_batch * len(self.steps) / seconds,
            "tokens_per_s": float(sum(m["tokens"] for m in host)) / seconds,
            "mfu": model_flops / seconds / self.peak_flops,
            "skipped_steps": int(sum(m["skipped"] for m in host)),
        }
        if values["skipped_steps"]:
            values["loss_scale"] = float(last["loss_scale"])
        return values
