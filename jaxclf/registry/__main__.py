"""`python -m jaxclf.registry ...` is `jaxclf registry ...`.

The one place in this package that reaches the command line, and only when run as a program:
importing jaxclf.registry never loads jaxclf.cli.
"""

import sys

from jaxclf.cli import main

sys.exit(main(["registry", *sys.argv[1:]]))
