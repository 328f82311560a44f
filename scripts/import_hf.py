#!/usr/bin/env python
"""Import a Hugging Face BERT-family checkpoint (the same as `jaxclf import-hf`); see jaxclf/cli/hf.py or --help."""

import sys

from jaxclf.cli.hf import import_main as main

if __name__ == "__main__":
    sys.exit(main())
