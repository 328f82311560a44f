"""`jaxclf export-onnx --model DIR --output FILE [--opset N]`: a model directory as one ONNX graph.

The export goes through torch_ref (torch.onnx.export), so it needs torch, onnx and onnxscript
(`pip install torch==2.13.0 'jaxclf[onnx]'`); torch is imported only when this command runs, never by
training or serving. The graph, its inputs and its metadata are described in torch_ref/onnx_export.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from jaxclf.cli import run_command

PROG = "jaxclf export-onnx"
# What the export imports (torch_ref.onnx_export); onnxruntime is optional: it only checks the result.
REQUIRED_PACKAGES = ("torch", "onnx", "onnxscript")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (config.json, model.safetensors, "
                                                                 "tokenizer.json)")
    p.add_argument("--output", required=True, metavar="FILE", help="the .onnx file to write (replaced atomically)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, 17..23 (default: torch_ref.onnx_export.DEFAULT_OPSET, 18)")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the graph in ONNX Runtime against torch_ref after export")
    return p.parse_args(argv)


def _export(argv: list[str]) -> int:
    args = parse_args(argv)
    missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"{PROG}: error: {', '.join(missing)} not installed; the export runs through torch_ref: "
              f"pip install torch==2.13.0 'jaxclf[onnx]'", file=sys.stderr)
        return 2
    from torch_ref import onnx_export  # imports torch

    result = onnx_export.export_onnx(args.model, args.output, opset=args.opset, check=not args.no_check)
    meta, diff = result["metadata"], result["max_abs_diff_vs_torch_ref"]
    checked = ("not checked (onnxruntime not installed)" if diff is None and not args.no_check
               else "not checked" if diff is None else f"ONNX Runtime vs torch_ref max |logit diff| {diff:.2g}")
    print(f"wrote {result['path']} (opset {result['opset']}; labels {', '.join(meta['labels'])}; "
          f"{long_text_rule(meta)}; {checked})")
    return 0


def long_text_rule(meta: dict) -> str:
    """How a consumer of the graph must cut a text, from its metadata, in one phrase."""
    length, head, chunking = meta["max_length"], meta["truncation_head"], meta.get("chunking")
    if chunking:
        past = "refused" if chunking["overflow"] == "refuse" else "not read"
        return (f"long texts: windows of {length} tokens every {chunking['stride']} text tokens, at most "
                f"{chunking['max_windows']} (the rest {past}), one graph row each: pool each text's window "
                f"logits by {chunking['pooling']} (jaxclf.long_text.pool_windows)")
    if head is None:
        return f"truncation: first {length} tokens"
    return f"truncation: first {head} + last {length - head} of {length} tokens"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 with one line on stderr for a user error (bad directory, missing package)."""
    return run_command(_export, list(sys.argv[1:] if argv is None else argv), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
