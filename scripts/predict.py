#!/usr/bin/env python
"""Classify texts, or stream a corpus to output shards (the same as `jaxclf predict`); see jaxclf/cli/predict.py or --help."""

import sys

from jaxclf.cli import run_command
from jaxclf.cli.predict import main

if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], prog="predict.py"))
