"""`python -m jaxclf COMMAND ...` is the `jaxclf` console script."""

import sys

from jaxclf.cli import main

sys.exit(main())
