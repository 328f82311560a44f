#!/usr/bin/env python
"""Inference: jaxclf's compiled forward vs ONNX Runtime, OpenVINO, torch_ref eager and torch.compile; engine
start-up; server memory.

One random-init model (4 layers, d_model 256, 4 heads, ff 1024, vocab 8000), the same weights in JAX,
PyTorch and the ONNX graph. For every (batch size x sequence length):

- jaxclf: the classifier's own jitted forward (`TextClassifier._compiled_forward`: model in eval
  mode, `jax.jit` over the `nnx.split` state), compiled ahead of time per bucket with
  `.lower(...).compile()`, as InferenceEngine does at start-up (a batch of more than 2,048 tokens runs
  as a loop over row chunks, jaxclf.model.in_row_chunks); "compile s" is that lower+compile time.
- jaxclf bf16: the same for `jaxclf.load(dir, dtype="bfloat16")`, what `jaxclf serve --dtype bfloat16`
  runs: weights held in bf16, matmuls on bf16 inputs accumulating in float32. Its logit difference to
  jaxclf is bf16 rounding; its fair anchor is "openvino default" where that resolves to bf16.
- onnxruntime, openvino f32, openvino default: the model directory exported once by
  `torch_ref.onnx_export` (what `jaxclf export-onnx` writes: dynamic batch and sequence axes), run by
  an ONNX Runtime CPU session and by OpenVINO's CPU plugin, each loaded once for every shape as a user
  would load the file. "openvino f32" pins INFERENCE_PRECISION_HINT=f32; "openvino default" is
  OpenVINO's own default precision (bf16 where the CPU has AVX512-BF16/AMX, else f32: the table says
  which it resolved to). "compile s" is their first call on that shape.
- onnxruntime int8: the same graph after ONNX Runtime's dynamic quantization
  (`onnxruntime.quantization.quantize_dynamic`, int8 weights, activations quantized per call): what a
  CPU deployment tries next for speed. Its logit difference to jaxclf is quantization error, not a bug.
- torch eager: `torch_ref.model.TransformerClassifier` under `torch.inference_mode()`.
- torch.compile: the same module through `torch.compile` (default mode, default dynamic-shape
  policy); "compile s" is its first call on that shape (0-ish when a dynamic graph is reused).

Variants run interleaved (A, B, C, A, B, C, ...) for --rounds rounds; each turn makes enough calls to
last about --target-s. Throughput is the median over rounds; p50/p99 are over every call. Every row
carries its max |logit difference| to jaxclf on that row's inputs.

Then, in fresh subprocesses that never import torch: InferenceEngine start-up twice with one
persistent compilation cache (cold, then cached), and `scripts/serve.py` until /ready, for its
resident memory. The script checks that neither process imported torch and says so in its output
(exit code 1 if one did).

    pip install -e ".[bench]"                            # onnx, onnxscript, onnxruntime, openvino
    python benchmarks/inference.py                       # batch 1,8,32,64 x seq 32,128 (~6 min on 2 cores)
    python benchmarks/inference.py --quick               # ~1.5 min: batch 1,8 x seq 32, 2 rounds, no torch.compile
    python benchmarks/inference.py --batch-sizes 1,64 --lengths 128 --rounds 3 --no-compile --no-onnx
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

# Before torch loads libgomp. Its default spin-waiting collapses when the cores are shared with other work:
# a descheduled OpenMP worker stalls every barrier (on this 2-core machine under load, a batch-8 x 32-token
# eager call took a median 271 ms with the default policy and 20 ms with PASSIVE). Passive waiting is the
# faster torch setting on a busy machine; an OMP_WAIT_POLICY already set in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import (RESULTS, add_model_args, int_list as _ints, interleaved, markdown_table, median,  # noqa: E402
                    save_figure, subplots, write_results)
from server_process import (ServerProcess, create_random_model_dir, http_json, proc_status,  # noqa: E402
                            sample_texts)

VARIANTS = ("jaxclf", "jaxclf bf16", "onnxruntime", "onnxruntime int8", "openvino f32", "openvino default",
            "torch eager", "torch.compile")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime", "openvino")  # the `bench` extra: export and run the graph


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32, 64])
    p.add_argument("--lengths", type=_ints, default=[32, 128],
                   help="sequence lengths; the largest is the model's max_position_embeddings")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per (batch, length)")
    p.add_argument("--target-s", type=float, default=0.4, help="about how long each variant's turn in a round lasts")
    p.add_argument("--max-calls", type=int, default=200, help="most calls in one turn")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-onnx", action="store_true",
                   help="skip the ONNX export and its ONNX Runtime and OpenVINO variants")
    p.add_argument("--threads", "--torch-threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads, ONNX Runtime's intra-op and OpenVINO's inference threads "
                        "(default: every core, as JAX uses)")
    p.add_argument("--serve-requests", type=int, default=64,
                   help="/predict requests sent to the serve.py process before its memory is read again")
    p.add_argument("--quick", action="store_true",
                   help="about 1.5 minutes: batch 1,8 x seq 32, 2 rounds, short turns, no torch.compile")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--name", default="inference", help="result file name under benchmarks/results/")
    # Internal: run one InferenceEngine start-up in this (torch-free) process and print JSON.
    p.add_argument("--engine-probe", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    p.add_argument("--probe-cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--probe-launched-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.lengths, args.rounds, args.target_s = [1, 8], [32], 2, 0.15
        args.no_compile, args.serve_requests = True, 16
    return args


# --- the engine probe (a subprocess: no torch, fresh JAX) ----------------------------------------------

def engine_probe(args) -> int:
    """Start an InferenceEngine on the benchmark's buckets; print one JSON line about it."""
    import importlib.util

    started = time.perf_counter()
    from jaxclf.serve.engine import InferenceEngine
    importlib.import_module("jaxclf.serve.app")  # what scripts/serve.py runs, so its imports count too
    spec = importlib.util.spec_from_file_location("serve_script", Path(__file__).resolve().parent.parent
                                                  / "scripts" / "serve.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    import_s = time.perf_counter() - started
    engine = InferenceEngine(args.engine_probe, max_batch_size=max(args.batch_sizes),
                             batch_buckets=args.batch_sizes, length_buckets=args.lengths,
                             compilation_cache_dir=args.probe_cache_dir)
    since_launch_s = time.monotonic() - args.probe_launched_at
    engine.predict_single("a lovely little cafe")
    stats = engine.stats()
    out = {"import_s": import_s, "engine_startup_s": engine.startup_seconds, "since_launch_s": since_launch_s,
           "executables": stats.aot_compilations, "stray_compilations": stats.stray_compilations,
           "torch_imported": "torch" in sys.modules, "memory_mib": proc_status(os.getpid())}
    engine.close()
    print(json.dumps(out), flush=True)
    return 0


def run_engine_probe(args, model_dir: Path, cache_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine-probe", str(model_dir),
           "--probe-cache-dir", str(cache_dir), "--batch-sizes", ",".join(map(str, args.batch_sizes)),
           "--lengths", ",".join(map(str, args.lengths)), "--probe-launched-at", repr(time.monotonic())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"engine probe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- in-process comparison -------------------------------------------------------------------------------

def make_inputs(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 (B, T) ids and mask; real lengths uniform in [T/2, T], the rest padding (id 0)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, length // 2), length + 1, batch)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)  # (B, T)
    ids = (rng.integers(5, vocab, (batch, length)) * mask).astype(np.int32)  # (B, T)
    return ids, mask


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies), q)) * 1e3


def compile_jax_buckets(args, forward, state) -> tuple[dict, dict]:
    """{(length, batch): AOT executable} of the classifier's jitted forward, and each one's compile time."""
    import jax
    import jax.numpy as jnp

    executables, compile_times = {}, {}
    for t, b in [(t, b) for t in args.lengths for b in args.batch_sizes]:
        spec = jax.ShapeDtypeStruct((b, t), jnp.int32)
        t0 = time.perf_counter()
        lowered = forward.lower(state, spec, spec)
        t1 = time.perf_counter()
        executables[(t, b)] = lowered.compile()
        t2 = time.perf_counter()
        compile_times[f"{b}x{t}"] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}
        print(f"jaxclf bucket batch {b} x seq {t}: lower {t1 - t0:.2f}s + compile {t2 - t1:.2f}s", flush=True)
    return executables, compile_times


def export_graph(model_dir: Path, path: Path) -> dict:
    """The model directory as `jaxclf export-onnx` writes it; the export is checked against torch_ref."""
    from torch_ref.onnx_export import export_onnx

    t0 = time.perf_counter()
    result = export_onnx(model_dir, path)
    info = {"export_s": time.perf_counter() - t0, "opset": result["opset"],
            "max_abs_diff_vs_torch_ref": result["max_abs_diff_vs_torch_ref"]}
    print(f"exported {path.name} (opset {info['opset']}) in {info['export_s']:.1f}s", flush=True)
    return info


def onnx_runners(args, onnx_path: Path) -> tuple[dict, dict]:
    """{variant: make_call(ids, mask) -> call} for the exported graph's runtimes, and what each loaded as.

    One ONNX Runtime session and one OpenVINO compiled model per variant serve every shape (dynamic
    axes), as a user loads the file; each call returns the logits as a numpy array it owns.
    """
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from jaxclf.serve.onnx_backend import import_openvino  # without its converter's telemetry fork

    openvino = import_openvino()

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    t0 = time.perf_counter()
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    info = {"onnxruntime": {"version": onnxruntime.__version__, "load_s": time.perf_counter() - t0}}

    int8_path = onnx_path.with_name(onnx_path.stem + "_int8.onnx")
    t0 = time.perf_counter()
    quantize_dynamic(str(onnx_path), str(int8_path), weight_type=QuantType.QInt8)
    int8_session = onnxruntime.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    info["onnxruntime int8"] = {"version": onnxruntime.__version__, "load_s": time.perf_counter() - t0,
                                "quantization": "quantize_dynamic, QInt8 weights"}

    def ort_maker(session):
        def ort_call(ids, mask):
            feed = {"input_ids": ids, "attention_mask": mask}
            return lambda: session.run(["logits"], feed)[0]
        return ort_call

    core = openvino.Core()
    graph = core.read_model(str(onnx_path))
    capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    makers = {"onnxruntime": ort_maker(session), "onnxruntime int8": ort_maker(int8_session)}
    for name, precision in (("openvino f32", {"INFERENCE_PRECISION_HINT": "f32"}), ("openvino default", {})):
        t0 = time.perf_counter()
        compiled = core.compile_model(graph, "CPU", {**precision, "INFERENCE_NUM_THREADS": args.threads})
        info[name] = {"version": openvino.__version__, "load_s": time.perf_counter() - t0,
                      "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                      "cpu_capabilities": capabilities}

        def ov_call(ids, mask, compiled=compiled):
            request, feed = compiled.create_infer_request(), {"input_ids": ids, "attention_mask": mask}
            return lambda: np.array(request.infer(feed)[0])  # a copy: the request reuses its output buffer
        makers[name] = ov_call
    print(f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}: default precision "
          f"{info['openvino default']['inference_precision']} (CPU capabilities {', '.join(capabilities)})",
          flush=True)
    return makers, info


def time_row(args, calls: dict, batch: int, length: int) -> dict:
    """Interleaved timing of one (batch, length) row: {variant: throughput, latency, first call, logit diff}."""
    first_call_s, outputs, per_call_s = {}, {}, {}
    for name, call in calls.items():
        t0 = time.perf_counter()
        outputs[name] = call()  # jaxclf: already compiled; torch.compile: compiles (or reuses) here
        first_call_s[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        call()
        per_call_s[name] = time.perf_counter() - t0
    turn_calls = {name: int(min(args.max_calls, max(1, math.ceil(args.target_s / max(s, 1e-6)))))
                  for name, s in per_call_s.items()}
    latencies: dict[str, list[float]] = {name: [] for name in calls}

    def turn(name):
        call, n = calls[name], turn_calls[name]

        def run() -> float:
            start = time.perf_counter()
            for _ in range(n):
                t_call = time.perf_counter()
                call()
                latencies[name].append(time.perf_counter() - t_call)
            return (time.perf_counter() - start) / (n * batch)  # seconds per example
        return run

    samples = interleaved({name: turn(name) for name in calls}, args.rounds)
    entry = {}
    for name in calls:
        sec = median(samples[name])
        entry[name] = {"examples_per_s": 1.0 / sec, "tokens_per_s": length / sec,
                       "p50_ms": percentile_ms(latencies[name], 50),
                       "p99_ms": percentile_ms(latencies[name], 99),
                       "calls": len(latencies[name]), "calls_per_turn": turn_calls[name],
                       "examples_per_s_by_round": [1.0 / s for s in samples[name]],
                       "first_call_s": first_call_s[name],
                       "max_abs_logit_diff_vs_jaxclf": float(np.abs(outputs[name] - outputs["jaxclf"]).max())}
    return entry


def compare(args, clf, model_dir: Path, onnx_path: Path | None) -> tuple[dict, dict, dict]:
    """Per (length, batch): throughput, latency and logit difference of every variant; compile and load times."""
    import torch

    from jaxclf.classifier import load
    from torch_ref.model import TransformerClassifier

    torch.set_num_threads(args.threads)
    import torch._dynamo.config as dynamo_config
    # Default policy (static first, then dynamic shapes), but never give up and fall back to eager.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)

    config = clf.config
    forward = clf._compiled_forward()  # the classifier's jitted forward over the nnx.split state
    state = clf._state
    executables, compile_times = compile_jax_buckets(args, forward, state)
    bf16 = load(model_dir, dtype="bfloat16")
    bf16_executables, bf16_compile_times = compile_jax_buckets(args, bf16._compiled_forward(), bf16._state)
    onnx_makers, runtimes = onnx_runners(args, onnx_path) if onnx_path is not None else ({}, {})

    model = TransformerClassifier.from_config(config, seed=0)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in clf.torch_state().items()})
    model.eval()
    compiled_model = None if args.no_compile else torch.compile(model)

    def torch_call(module, ids, mask):
        def run():
            with torch.inference_mode():
                return module(ids, mask).numpy()
        return run

    results = {}
    for t, b in [(t, b) for t in args.lengths for b in args.batch_sizes]:
        ids, mask = make_inputs(b, t, config.vocab_size, seed=1000 * t + b)
        ids64, mask64 = ids.astype(np.int64), mask.astype(np.int64)  # the ONNX graph's and torch's input dtype
        executable = executables[(t, b)]
        calls = {"jaxclf": lambda: np.asarray(executable(state, ids, mask)),
                 "jaxclf bf16": lambda: np.asarray(bf16_executables[(t, b)](bf16._state, ids, mask))}
        calls.update({name: make(ids64, mask64) for name, make in onnx_makers.items()})
        calls["torch eager"] = torch_call(model, torch.from_numpy(ids64), torch.from_numpy(mask64))
        if compiled_model is not None:
            calls["torch.compile"] = torch_call(compiled_model, torch.from_numpy(ids64), torch.from_numpy(mask64))
        entry = time_row(args, calls, b, t)
        entry["jaxclf"]["compile_s"] = compile_times[f"{b}x{t}"]["total_s"]
        entry["jaxclf bf16"]["compile_s"] = bf16_compile_times[f"{b}x{t}"]["total_s"]
        results[f"{b}x{t}"] = {"batch": b, "length": t, "variants": entry}
        print(f"seq {t:4d} batch {b:4d}: " + ", ".join(
            f"{name} {entry[name]['examples_per_s']:.1f} ex/s p50 {entry[name]['p50_ms']:.2f} ms"
            for name in calls), flush=True)
    return results, compile_times, runtimes


# --- start-up and memory (subprocesses, no torch) ------------------------------------------------------

def startup_and_memory(args, model_dir: Path, work: Path) -> dict:
    cache = work / "xla-cache"
    cold = run_engine_probe(args, model_dir, cache)
    print(f"engine start-up, cold: {cold['engine_startup_s']:.2f}s (since launch {cold['since_launch_s']:.2f}s)",
          flush=True)
    cached = run_engine_probe(args, model_dir, cache)
    print(f"engine start-up, cached: {cached['engine_startup_s']:.2f}s (since launch "
          f"{cached['since_launch_s']:.2f}s)", flush=True)

    texts = sample_texts()
    with ServerProcess(model_dir, cache_dir=work / "serve-cache", log_dir=work, name="serve") as server:
        ready_s = server.wait_ready()
        rss_ready = server.rss()
        for i in range(args.serve_requests):  # unique texts: every one is a cache miss
            status, body = http_json(server.port, "POST", "/predict", {"text": f"{texts[i % len(texts)]} r{i}"})
            if status != 200:
                raise RuntimeError(f"/predict answered {status}: {body}")
        rss_after = server.rss()
        torch_libs = server.torch_libraries()
        ready_info = server.ready_info
        exit_code = server.stop()
    serve = {"time_to_ready_s": ready_s, "engine_startup_s": ready_info.get("startup_seconds"),
             "executables": ready_info.get("compilations"), "memory_after_ready_mib": rss_ready,
             "memory_after_requests_mib": rss_after, "requests": args.serve_requests,
             "torch_libraries_mapped": torch_libs, "exit_code": exit_code}
    print(f"serve.py: ready in {ready_s:.2f}s, RSS {rss_ready['VmRSS']:.0f} MiB after /ready, "
          f"{rss_after['VmRSS']:.0f} MiB after {args.serve_requests} requests", flush=True)
    return {"engine_cold": cold, "engine_cached": cached, "serve": serve}


# --- report -----------------------------------------------------------------------------------------------

def variant_rows(results: dict) -> list[list]:
    rows = []
    for r in results.values():
        for name, e in r["variants"].items():
            compile_s = e.get("compile_s", e["first_call_s"]) if name != "torch eager" else ""
            diff = e["max_abs_logit_diff_vs_jaxclf"] if name != "jaxclf" else ""
            rows.append([r["length"], r["batch"], name, e["examples_per_s"], e["p50_ms"], e["p99_ms"], e["calls"],
                         compile_s, diff])
    return rows


def ratio_table(results: dict, base: str, others: tuple[str, ...]) -> str:
    """`base`'s examples/s over each of `others`' (those measured), per row: > 1 means `base` is faster."""
    others = [n for n in others if any(n in r["variants"] for r in results.values())]
    rows = []
    for r in results.values():
        v = r["variants"]
        rows.append([r["length"], r["batch"]] + [v[base]["examples_per_s"] / v[n]["examples_per_s"]
                                                 if n in v else "" for n in others])
    return markdown_table(["seq", "batch"] + [f"{base} / {n}" for n in others], rows)


def tables(args, results: dict, runtimes: dict, startup: dict | None) -> str:
    inductor_cache = ("an empty inductor cache" if args.inductor_cache is None
                      else f"inductor cache {args.inductor_cache}")
    anchors = ""
    if runtimes:
        ov = runtimes["openvino default"]
        anchors = (f"onnxruntime {runtimes['onnxruntime']['version']} and openvino {ov['version']} run the graph "
                   f"`torch_ref.onnx_export` wrote (opset {runtimes['export']['opset']}, dynamic batch and sequence "
                   f"axes; exported in {runtimes['export']['export_s']:.1f}s), one session / compiled model for "
                   f"every shape, {args.threads} threads, each runtime's default thread pool (spin-waiting "
                   f"workers); openvino default = OpenVINO's default precision (bf16 where the CPU has "
                   f"AVX512-BF16/AMX), which on this CPU resolved to {ov['inference_precision']} "
                   f"(CPU capabilities: {', '.join(ov['cpu_capabilities'])}); their compile s is the first call "
                   f"on that shape. ")
    model = (f"Model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, ff {args.ff}, vocab "
             f"{args.vocab}, float32, random init (same weights in JAX, PyTorch and the ONNX graph); torch threads "
             f"{args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}. {anchors}{args.rounds} "
             f"interleaved rounds per row, each variant's turn ~{args.target_s:g}s of back-to-back calls; examples/s "
             f"is the median over rounds, p50/p99 over every call (`calls`). compile s: jaxclf = AOT lower+compile "
             f"of that bucket; torch.compile = its first call on that shape (dynamo + inductor, "
             f"{inductor_cache}, or a reused dynamic-shape graph). max |Δlogit|: the largest absolute difference "
             f"between the variant's logits and jaxclf's on the row's inputs.\n\n")
    main = markdown_table(["seq", "batch", "variant", "examples/s", "p50 ms", "p99 ms", "calls", "compile s",
                           "max abs logit diff vs jaxclf"], variant_rows(results))
    ratios = ("\n\njaxclf's examples/s over each variant's (> 1: jaxclf is faster):\n\n"
              + ratio_table(results, "jaxclf", tuple(n for n in VARIANTS if not n.startswith("jaxclf")))
              + "\n\njaxclf bf16's examples/s over the runtimes' (> 1: jaxclf bf16 is faster; compare like with "
                "like: openvino default where it resolved to bf16):\n\n"
              + ratio_table(results, "jaxclf bf16", ("jaxclf", "onnxruntime", "onnxruntime int8", "openvino f32",
                                                     "openvino default")))
    if startup is None:
        return model + main + ratios + "\n\n(start-up and memory: not measured yet)"
    cold, cached, serve = startup["engine_cold"], startup["engine_cached"], startup["serve"]
    start_rows = [
        ["InferenceEngine, cold cache", cold["engine_startup_s"], cold["since_launch_s"], cold["executables"],
         cold["memory_mib"]["VmRSS"], "yes" if cold["torch_imported"] else "no"],
        ["InferenceEngine, persistent cache", cached["engine_startup_s"], cached["since_launch_s"],
         cached["executables"], cached["memory_mib"]["VmRSS"], "yes" if cached["torch_imported"] else "no"],
        ["scripts/serve.py (default buckets), cold cache", serve["engine_startup_s"], serve["time_to_ready_s"],
         serve["executables"], serve["memory_after_ready_mib"]["VmRSS"],
         "yes" if serve["torch_libraries_mapped"] else "no"],
    ]
    start = markdown_table(["process", "engine load + compile s", "launch to ready s", "executables",
                            "RSS MiB", "torch imported"], start_rows)
    notes = (f"\n\nStart-up: the engine on this benchmark's {len(args.batch_sizes) * len(args.lengths)} buckets, "
             f"started twice in fresh subprocesses with one compilation cache directory; the serve.py row is "
             f"the HTTP server with its default buckets, RSS read from /proc/PID/status after /ready "
             f"(after {serve['requests']} /predict requests: {serve['memory_after_requests_mib']['VmRSS']:.0f} "
             f"MiB, peak {serve['memory_after_requests_mib']['VmHWM']:.0f} MiB). torch imported: "
             f"`'torch' in sys.modules` in the engine processes, libtorch mapped in /proc/PID/maps for serve.py.")
    return model + main + ratios + "\n\n" + start + notes


def plot(results: dict, lengths: list[int], path: Path) -> None:
    fig, axes = subplots(2, len(lengths), figsize=(5.5 * len(lengths), 7.5), squeeze=False)
    for col, t in enumerate(lengths):
        rows = sorted((r for r in results.values() if r["length"] == t), key=lambda r: r["batch"])
        for name in VARIANTS:
            pts = [(r["batch"], r["variants"][name]) for r in rows if name in r["variants"]]
            if not pts:
                continue
            xs = [b for b, _ in pts]
            axes[0][col].plot(xs, [e["examples_per_s"] for _, e in pts], marker="o", label=name)
            axes[1][col].plot(xs, [e["p50_ms"] for _, e in pts], marker="o", label=name)  # p99: in the table
        for row, ylabel in ((0, "examples/s"), (1, "p50 latency per call, ms")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.set_title(f"seq {t}: {ylabel}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    save_figure(fig, path, "Inference on CPU: jaxclf vs ONNX Runtime, OpenVINO and torch_ref "
                           "(higher examples/s, lower latency is better)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine_probe:
        return engine_probe(args)
    missing = [] if args.no_onnx else [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        print(f"error: {', '.join(missing)} not installed: pip install -e '.[bench]' for the ONNX Runtime and "
              f"OpenVINO variants, or pass --no-onnx", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: the serve.py subprocess is stopped and the temporary files removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxclf-bench-inference-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        # A fresh inductor cache, so torch.compile's times are cold like jaxclf's in-process compiles (a
        # TORCHINDUCTOR_CACHE_DIR set in the environment wins, e.g. to measure a warm cache).
        args.inductor_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))
        clf = create_random_model_dir(model_dir, layers=args.layers, d_model=args.d_model, heads=args.heads,
                                      ff=args.ff, vocab=args.vocab, max_length=max(args.lengths))
        onnx_path = None if args.no_onnx else work / "model.onnx"
        export = {} if onnx_path is None else export_graph(model_dir, onnx_path)
        results, compile_times, runtimes = compare(args, clf, model_dir, onnx_path)
        if export:
            runtimes["export"] = export
        payload = {"args": {k: v for k, v in vars(args).items() if not k.startswith("probe") and k != "engine_probe"},
                   "results": results, "compile_times": compile_times, "onnx_runtimes": runtimes}
        # The throughput table first: a failure in the start-up section below does not lose it.
        write_results(args.name, payload, tables(args, results, runtimes, None))
        startup = startup_and_memory(args, model_dir, work)

    torch_in_server = (startup["engine_cold"]["torch_imported"] or startup["engine_cached"]["torch_imported"]
                       or bool(startup["serve"]["torch_libraries_mapped"]))
    table = tables(args, results, runtimes, startup)
    payload.update(startup=startup, torch_imported_by_serving_process=torch_in_server,
                   wall_s=time.perf_counter() - began)
    path = write_results(args.name, payload, table)
    if not args.no_plot:
        png = RESULTS / f"{args.name}.png"
        plot(results, args.lengths, png)
        print(f"wrote {png}")
    print(path.read_text())
    print(f"torch imported by the serving process: {'YES' if torch_in_server else 'no'} "
          f"(engine subprocesses: 'torch' in sys.modules = {startup['engine_cold']['torch_imported']}, "
          f"{startup['engine_cached']['torch_imported']}; serve.py libtorch mappings: "
          f"{startup['serve']['torch_libraries_mapped'] or 'none'})")
    print(f"total {time.perf_counter() - began:.0f}s")
    if torch_in_server:
        print("ERROR: the serving process must not import torch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
