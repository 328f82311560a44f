#!/usr/bin/env python
"""Write a public data set as train/test JSONL (the same as `jaxclf prepare-data`); see jaxclf/cli/prepare_data.py."""

import sys

from jaxclf.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
