"""The `jaxclf` console script (and `python -m jaxclf`): one sub-command per job.

    jaxclf train --config tiny train.max_steps=50          # = python scripts/train.py ...
    jaxclf serve --model runs/default/model --port 8000     # = python -m jaxclf.serve ...
    jaxclf registry --root /srv/reg list

Each command lives in its own module with a `main(argv) -> int`, imported only when it runs, so
`jaxclf --help` and `jaxclf registry ...` never load JAX. A user error (any JaxclfError: bad data,
a wrong model directory, a refused override) is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from jaxclf.errors import JaxclfError

# command -> (module:function, one-line help), in the order `jaxclf --help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("jaxclf.cli.train:main", "train or fine-tune a classifier (resumable); writes OUTPUT/model"),
    "evaluate": ("jaxclf.cli.evaluate:main", "metrics of a model directory on a labelled file, as JSON"),
    "predict": ("jaxclf.cli.predict:main", "predict texts, or stream a whole corpus to output shards"),
    "serve": ("jaxclf.serve.__main__:main", "HTTP service: AOT-compiled buckets, batching, metrics"),
    "import-hf": ("jaxclf.cli.hf:import_main", "import a Hugging Face BERT-family checkpoint"),
    "export-hf": ("jaxclf.cli.hf:export_main", "export a model directory as a Hugging Face BERT checkpoint"),
    "export-onnx": ("jaxclf.cli.export_onnx:main", "export a model directory to ONNX (needs torch)"),
    "prepare-data": ("jaxclf.cli.prepare_data:main", "write the benchmark data sets' train/test files"),
    "registry": ("jaxclf.cli.registry:main", "versioned model registry: register, promote, export/import, history"),
}


def _usage() -> str:
    lines = ["usage: jaxclf COMMAND [ARGS...]   (jaxclf COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def command(name: str) -> Callable[[list[str]], int]:
    """The `main(argv)` of a sub-command, imported now."""
    module, _, function = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), function)


def run_command(main: Callable[[list[str]], int], argv: list[str], prog: str = "jaxclf") -> int:
    """Runs a command's main; a JaxclfError that escapes it becomes one line on stderr and exit 2."""
    try:
        return main(argv)
    except JaxclfError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from jaxclf import __version__
        print(f"jaxclf {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"jaxclf: error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(command(name), rest, prog=f"jaxclf {name}")


if __name__ == "__main__":
    sys.exit(main())
