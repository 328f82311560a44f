#!/usr/bin/env python
"""Evaluate a model directory on a labelled file (the same as `jaxclf evaluate`); see jaxclf/cli/evaluate.py or --help."""

import sys

from jaxclf.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
