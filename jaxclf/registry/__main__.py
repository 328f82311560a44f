"""`python -m jaxclf.registry ...` is `jaxclf registry ...`."""

import sys

from jaxclf.cli.registry import main

sys.exit(main())
