"""`jaxclf registry ...` (also `python -m jaxclf.registry ...`): the model registry from the shell.

    jaxclf registry --root /srv/reg register runs/default/model --name sentiment --tag data=2024-06
    jaxclf registry --root /srv/reg promote sentiment v2 --to production
    jaxclf registry --root /srv/reg rollback sentiment production
    jaxclf registry --root /srv/reg compare sentiment@v1 sentiment@v2

The root comes from --root or the JAXCLF_REGISTRY environment variable; a root this process
cannot write is opened read-only (the reading commands work, the others are refused). Every
command takes --json to print data instead of text. Text output escapes control characters in
recorded values (metric keys, creators: an imported archive's author chose them). Exit status:
0 done; 2 refused (one line on stderr says why: a bad name, an unknown version, a tampered copy)
or bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from jaxclf.cli import run_command
from jaxclf.registry import ImportLimits, ModelVersion, Registry, RegistryError, compare, parse_tag, printable

ROOT_ENV = "JAXCLF_REGISTRY"
PROG = "jaxclf registry"
# The commands that may create a registry at --root; the others refuse a root that holds none (a typo).
CREATING_COMMANDS = frozenset({"register", "import"})

Say = Callable[[str], None]  # prints a line of text output; a no-op under --json
# A command does its work and returns what --json prints; the text it says goes through `say`.
Command = Callable[[Registry, argparse.Namespace, Say], Any]
# name -> (function, one-line help, its arguments as (flags, argparse options)), in --help order
COMMANDS: dict[str, tuple[Command, str, tuple[tuple[tuple[str, ...], dict[str, Any]], ...]]] = {}


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, options


def command(name: str, summary: str, *arguments: tuple[tuple[str, ...], dict[str, Any]]):
    """Adds the decorated function to COMMANDS as sub-command `name`."""
    def add(func: Command) -> Command:
        COMMANDS[name] = (func, summary, arguments)
        return func
    return add


def _version_line(v: ModelVersion) -> str:
    tags = " ".join(f"{k}={printable(val)}" for k, val in sorted(v.tags.items()))
    eval_metrics = (v.metadata.get("metrics") or {}).get("eval")
    accuracy = eval_metrics.get("accuracy") if isinstance(eval_metrics, dict) else None
    acc = f"acc={accuracy:.4f}" if isinstance(accuracy, (int, float)) else ""
    return "  ".join(x for x in (f"{v.ref:<24}", v.created_at, printable(v.creator), v.content_hash[:12], acc,
                                 f"parent={v.parent}" if v.parent else "", tags) if x)


def _compare_text(result: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else printable(v)

    a, b = result["a"], result["b"]
    keys = {key: printable(key) for key in result["metrics"]}
    width = max([len(k) for k in keys.values()] + [6])
    lines = [f"{'metric':<{width}}  {a:>16}  {b:>16}  {'b - a':>10}"]
    for key, row in result["metrics"].items():
        delta = f"{row['delta']:+.4f}" if row["delta"] is not None else ""
        lines.append(f"{keys[key]:<{width}}  {fmt(row['a']):>16}  {fmt(row['b']):>16}  {delta:>10}")
    for title in ("config_diff", "training_config_diff"):
        lines.append(f"\n{title.replace('_', ' ')}:" + ("" if result[title] else " none"))
        lines += [f"  {printable(key)}: {row['a']!r} -> {row['b']!r}" for key, row in result[title].items()]
    return "\n".join(lines)


@command("register", "copy a model directory in as the next version of NAME",
         arg("model_dir"), arg("--name", required=True), arg("--description", default=""),
         arg("--tag", action="append", default=[], metavar="KEY=VALUE", help="repeat for several"),
         arg("--parent", default=None, metavar="NAME@VERSION",
             help="the version this model derives from (default: found from metrics.json's init_from)"))
def register(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    tags = dict(parse_tag(t) for t in args.tag)
    v = reg.register(args.model_dir, args.name, description=args.description, tags=tags, parent=args.parent)
    say(f"registered {v.ref} (sha256 {v.content_hash[:16]}...)" + (f", parent {v.parent}" if v.parent else ""))
    return v.to_dict()


@command("list", "models and their versions", arg("name", nargs="?"))
def list_models(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    names = [args.name] if args.name else reg.names()
    out = {}
    for n in names:
        versions, aliases = reg.versions(n), reg.aliases(n)
        out[n] = {"versions": [v.ref for v in versions],
                  "aliases": {a: f"v{info['version']}" for a, info in aliases.items()}}
        say(f"{n}: " + (", ".join(f"{a} -> {t}" for a, t in out[n]["aliases"].items()) or "no aliases"))
        for v in versions:
            say("  " + _version_line(v))
    if not names:
        say(f"the registry at {reg.root} is empty")
    return out


@command("show", "one version (NAME@vN, NAME@ALIAS) in full, or a model's versions and aliases (NAME)",
         arg("ref"))
def show(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    if "@" not in args.ref:
        out = {"name": args.ref, "versions": [v.to_dict() for v in reg.versions(args.ref)],
               "aliases": reg.aliases(args.ref)}
    else:
        v = reg.get(args.ref)
        out = {**v.to_dict(), "lineage": reg.lineage(v.ref),
               "aliases": sorted(a for a, info in reg.aliases(v.name).items() if info["version"] == v.version)}
    say(json.dumps(out, indent=2, sort_keys=True))
    return out


@command("compare", "metrics side by side and the config differences of two versions",
         arg("ref_a"), arg("ref_b"))
def compare_versions(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    out = compare(reg, args.ref_a, args.ref_b)
    say(_compare_text(out))
    return out


def _point(reg: Registry, name: str, version: str, alias: str, action: str, say: Say) -> Any:
    v = reg.set_alias(name, version, alias, action=action)
    say(f"{name}@{alias} -> {v.ref}")
    return {"alias": f"{name}@{alias}", "target": v.ref}


@command("alias", "point ALIAS at VERSION (v3, 3, or another alias)", arg("name"), arg("version"), arg("alias"))
def alias(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    return _point(reg, args.name, args.version, args.alias, "alias", say)


@command("promote", "point an alias (e.g. production) at VERSION; the old target is remembered",
         arg("name"), arg("version"), arg("--to", required=True, metavar="ALIAS"))
def promote(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    return _point(reg, args.name, args.version, args.to, "promote", say)


@command("rollback", "move an alias back to its previous target", arg("name"), arg("alias"))
def rollback(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    v = reg.rollback(args.name, args.alias)
    say(f"{args.name}@{args.alias} -> {v.ref} (rolled back)")
    return {"alias": f"{args.name}@{args.alias}", "target": v.ref}


@command("export", "write a version to a .tar.gz", arg("ref"), arg("file"))
def export(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    path = reg.export(args.ref, args.file)
    say(f"exported {reg.get(args.ref).ref} to {path}")
    return {"file": str(path)}


@command("import", "register the version in an export .tar.gz (hash checked)", arg("file"),
         arg("--name", default=None, help="register under this name instead of the archived one"),
         arg("--max-member-bytes", type=int, default=ImportLimits.max_member_bytes, metavar="N",
             help="refuse an archive holding a file larger than this (default: %(default)s)"),
         arg("--max-total-bytes", type=int, default=ImportLimits.max_total_bytes, metavar="N",
             help="refuse an archive whose files hold more than this in all (default: %(default)s)"))
def import_archive(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    limits = ImportLimits(max_member_bytes=args.max_member_bytes, max_total_bytes=args.max_total_bytes)
    v = reg.import_archive(args.file, name=args.name, limits=limits)
    say(f"imported {args.file} as {v.ref} (sha256 {v.content_hash[:16]}... verified)")
    return v.to_dict()


@command("delete", "delete NAME@vN (refused while an alias points at it)", arg("ref"))
def delete(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    v = reg.delete(args.ref)
    say(f"deleted {v.ref}")
    return {"deleted": v.ref}


@command("history", "the audit log of a model: who did what, when", arg("name"))
def history(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    events = reg.history(args.name)
    for e in events:
        target = f"v{e.version}" if e.version is not None else ""
        alias = f"{e.alias} -> " if e.alias else ""
        extra = f" (was v{e.details['previous']})" if e.details.get("previous") is not None else ""
        say(f"{e.time}  {printable(e.user):<12}  {e.action:<9}  {alias}{target}{extra}")
    return [e.to_dict() for e in events]


@command("verify", "re-hash the files of one version (REF) or of every version", arg("ref", nargs="?"))
def verify(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    versions = [reg.get(args.ref)] if args.ref else reg.versions()
    bad = 0
    for v in versions:
        try:
            reg.verify(v, use_cache=False)
            say(f"ok        {v.ref}")
        except RegistryError as e:
            bad += 1
            say(f"TAMPERED  {e}")
    if bad:
        raise RegistryError(f"{bad} of {len(versions)} version(s) failed verification")
    return {"verified": [v.ref for v in versions]}


@command("gc", "remove what interrupted operations left behind")
def gc(reg: Registry, args: argparse.Namespace, say: Say) -> Any:
    removed = reg.gc()
    say("\n".join(f"removed {r}" for r in removed) or "nothing to clean up")
    return {"removed": removed}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help=f"registry directory (default: ${ROOT_ENV})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, summary, arguments) in COMMANDS.items():
        c = sub.add_parser(name, help=summary, description=summary, parents=[common])
        for flags, options in arguments:
            c.add_argument(*flags, **options)
        c.set_defaults(func=func)
    args = p.parse_args(argv)
    args.root = getattr(args, "root", None) or os.environ.get(ROOT_ENV)
    args.json = getattr(args, "json", False)
    if not args.root:
        p.error(f"no registry: pass --root DIR or set {ROOT_ENV}")
    return args


def run(args: argparse.Namespace) -> int:
    """Runs the parsed command; any RegistryError (a JaxclfError) is left to run_command."""
    # Fields are escaped where they are formatted (a newline in a key must not start a line); this
    # catches any control character that still reaches the terminal.
    say: Say = (lambda text: None) if args.json else (lambda text: print(printable(text, keep="\n")))
    try:
        out = args.func(Registry(args.root, create=args.command in CREATING_COMMANDS), args, say)
        if args.json:
            print(json.dumps(out, indent=2, sort_keys=True))
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`jaxclf registry` with these arguments; a refusal is one line on stderr and exit status 2."""
    return run_command(lambda a: run(parse_args(a)), sys.argv[1:] if argv is None else list(argv), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
