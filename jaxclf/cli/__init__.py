"""The `jaxclf` console script: `jaxclf COMMAND ...`, one sub-command per library area.

    jaxclf registry --root /srv/reg list
"""

from __future__ import annotations

import sys

COMMANDS = {"registry": "versioned model registry: register, alias/promote/rollback, export/import, history"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: jaxclf COMMAND [ARGS...]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv else 2
    if argv[0] == "--version":
        from jaxclf import __version__
        print(f"jaxclf {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "registry":
        from jaxclf.cli.registry import main as registry_main
        return registry_main(rest)
    print(f"jaxclf: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
