"""Lazy package exports: a name is imported from its module on first use.

    __getattr__, __all__ = lazy_exports(__name__, {"InferenceEngine": "jaxclf.serve.engine", ...})

The packages use it so that importing one (for `--help`, for the JAX-free config) loads no JAX.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """(module __getattr__, __all__) for `table`: exported name -> the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, list(table)
