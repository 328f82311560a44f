#!/usr/bin/env python
"""Train a jaxclf classifier (the same as `jaxclf train`); see jaxclf/cli/train.py or --help."""

import sys

from jaxclf.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
