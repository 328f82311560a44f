#!/usr/bin/env python
"""Export a model directory as a Hugging Face BERT checkpoint (the same as `jaxclf export-hf`); see jaxclf/cli/hf.py."""

import sys

from jaxclf.cli.hf import export_main as main

if __name__ == "__main__":
    sys.exit(main())
