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
    head = meta["truncation_head"]
    rule = (f"first {meta['max_length']} tokens" if head is None
            else f"first {head} + last {meta['max_length'] - head} of {meta['max_length']} tokens")
    print(f"wrote {result['path']} (opset {result['opset']}; labels {', '.join(meta['labels'])}; "
          f"truncation: {rule}; {checked})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 with one line on stderr for a user error (bad directory, missing package)."""
    return run_command(_export, list(sys.argv[1:] if argv is None else argv), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
