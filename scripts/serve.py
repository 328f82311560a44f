"""Serve a jaxclf model over HTTP: the same as `python -m jaxclf.serve` and `jaxclf serve` (see --help)."""

import sys

from jaxclf.serve.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
