"""Shared by the benchmark scripts: machine description, interleaved timing, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


CPU_MATMUL_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def machine() -> dict:
    """What ran the benchmark: CPU model, cores, memory, library versions, accelerator if any."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")))
        # What the matmul kernels can use: bf16 speed hangs on the last two (README, "Reduced precision").
        info["cpu_matmul_features"] = [name for flag, name in CPU_MATMUL_FLAGS.items() if flag in flags]
        mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines()
                          if l.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(mem_kb / 2 ** 20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import jax
        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except ImportError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, in turn (A, B, A, B, ...); each call returns seconds per unit."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            samples[name].append(run())
    return samples


def timed(fn: Callable[[], None], repeats: int) -> float:
    """Seconds per call of fn (which must block until its work is done)."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The benchmarked model's shape: by default the 4-layer, d_model 256, 4-head, ff 1024 model of the targets."""
    p.add_argument("--layers", type=int, default=4, help="encoder layers")
    p.add_argument("--d-model", type=int, default=256, help="hidden width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--ff", type=int, default=1024, help="feed-forward width")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size")


def int_list(text: str) -> list[int]:
    """argparse type: "1,8,32" -> [1, 8, 32] (sorted, distinct, positive)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8,32; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(values))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_results(name: str, payload: dict, table: str) -> Path:
    """benchmarks/results/NAME.json and NAME.md (the table, with the machine described)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    features = f" ({', '.join(m['cpu_matmul_features'])})" if m.get("cpu_matmul_features") else ""
    header = (f"Machine: {m.get('cpu', '?')}{features}, {m.get('cpu_count')} cores, {m.get('memory_gib', '?')} GiB; "
              f"GPU: {m.get('gpu') or 'none'}; jax {m.get('jax', '-')}, torch {m.get('torch', '-')}; "
              f"{payload['time_utc']}\n\n")
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    return RESULTS / f"{name}.md"


def subplots(*args, **kwargs):
    """matplotlib's (fig, axes) on the non-interactive Agg backend (benchmarks run headless)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path, title: str) -> None:
    """Title, lay out, write as PNG and release the figure."""
    import matplotlib.pyplot as plt
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:,.3g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
