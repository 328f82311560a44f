"""`jaxclf registry ...` (also `python -m jaxclf.registry ...`): the model registry from the shell.

    jaxclf registry --root /srv/reg register runs/default/model --name sentiment --tag data=2024-06
    jaxclf registry --root /srv/reg promote sentiment v2 --to production
    jaxclf registry --root /srv/reg rollback sentiment production
    jaxclf registry --root /srv/reg compare sentiment@v1 sentiment@v2

The root comes from --root or the JAXCLF_REGISTRY environment variable. Every command takes
--json to print data instead of text. Exit status: 0 done, 1 refused (the message says why),
2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping

from jaxclf.registry import Registry, RegistryError, parse_tag

ROOT_ENV = "JAXCLF_REGISTRY"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"eval": {"accuracy": 0.9}} -> {"eval.accuracy": 0.9}; lists are kept whole."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value} if prefix else {}


def compare(registry: Registry, ref_a: str, ref_b: str) -> dict[str, Any]:
    """Metrics side by side (scalars, with b - a) and the config keys whose values differ."""
    a, b = registry.get(ref_a), registry.get(ref_b)
    ma, mb = _flatten(a.metadata.get("metrics") or {}), _flatten(b.metadata.get("metrics") or {})
    metrics = {}
    for key in sorted(set(ma) | set(mb)):
        va, vb = ma.get(key), mb.get(key)
        if key.startswith("training_config.") or isinstance(va, (list, dict)) or isinstance(vb, (list, dict)):
            continue  # histograms and confusion matrices do not line up as columns; configs are diffed below
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        metrics[key] = {"a": va, "b": vb, "delta": (vb - va) if numeric else None}

    def diff(da: Mapping[str, Any], db: Mapping[str, Any]) -> dict[str, Any]:
        fa, fb = _flatten(da), _flatten(db)
        return {k: {"a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}

    return {"a": a.ref, "b": b.ref, "metrics": metrics,
            "config_diff": diff((a.metadata.get("config") or {}).get("model", {}),
                                (b.metadata.get("config") or {}).get("model", {})),
            "training_config_diff": diff((a.metadata.get("metrics") or {}).get("training_config") or {},
                                         (b.metadata.get("metrics") or {}).get("training_config") or {}),
            "same_content": a.content_hash == b.content_hash}


def _print_compare(result: dict[str, Any]) -> None:
    a, b = result["a"], result["b"]
    width = max([len(k) for k in result["metrics"]] + [6])
    print(f"{'metric':<{width}}  {a:>16}  {b:>16}  {'b - a':>10}")
    for key, row in result["metrics"].items():
        def fmt(v):
            return f"{v:.4f}" if isinstance(v, float) else str(v)
        delta = f"{row['delta']:+.4f}" if row["delta"] is not None else ""
        print(f"{key:<{width}}  {fmt(row['a']):>16}  {fmt(row['b']):>16}  {delta:>10}")
    for title in ("config_diff", "training_config_diff"):
        print(f"\n{title.replace('_', ' ')}:" + ("" if result[title] else " none"))
        for key, row in result[title].items():
            print(f"  {key}: {row['a']!r} -> {row['b']!r}")


def _version_line(v) -> str:
    tags = " ".join(f"{k}={val}" for k, val in sorted(v.tags.items()))
    accuracy = ((v.metadata.get("metrics") or {}).get("eval") or {}).get("accuracy")
    acc = f"acc={accuracy:.4f}" if isinstance(accuracy, (int, float)) else ""
    return "  ".join(x for x in (f"{v.ref:<24}", v.created_at, v.creator, v.content_hash[:12], acc,
                                 f"parent={v.parent}" if v.parent else "", tags) if x)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=argparse.SUPPRESS, help=f"registry directory (default: ${ROOT_ENV})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    p = argparse.ArgumentParser(prog="jaxclf registry", description=__doc__, parents=[common],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    c = cmd("register", "copy a model directory in as the next version of NAME")
    c.add_argument("model_dir")
    c.add_argument("--name", required=True)
    c.add_argument("--description", default="")
    c.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="repeat for several")
    c.add_argument("--parent", default=None, metavar="NAME@VERSION",
                   help="the version this model derives from (default: found from metrics.json's init_from)")
    c = cmd("list", "models and their versions")
    c.add_argument("name", nargs="?")
    c = cmd("show", "one version (NAME@vN, NAME@ALIAS) in full, or a model's versions and aliases (NAME)")
    c.add_argument("ref")
    c = cmd("compare", "metrics side by side and the config differences of two versions")
    c.add_argument("ref_a")
    c.add_argument("ref_b")
    c = cmd("alias", "point ALIAS at VERSION (v3, 3, or another alias)")
    c.add_argument("name")
    c.add_argument("version")
    c.add_argument("alias")
    c = cmd("promote", "point an alias (e.g. production) at VERSION; the old target is remembered")
    c.add_argument("name")
    c.add_argument("version")
    c.add_argument("--to", required=True, metavar="ALIAS")
    c = cmd("rollback", "move an alias back to its previous target")
    c.add_argument("name")
    c.add_argument("alias")
    c = cmd("export", "write a version to a .tar.gz")
    c.add_argument("ref")
    c.add_argument("file")
    c = cmd("import", "register the version in an export .tar.gz (hash checked)")
    c.add_argument("file")
    c.add_argument("--name", default=None, help="register under this name instead of the archived one")
    c = cmd("delete", "delete NAME@vN (refused while an alias points at it)")
    c.add_argument("ref")
    c = cmd("history", "the audit log of a model: who did what, when")
    c.add_argument("name")
    c = cmd("verify", "re-hash the files of one version (REF) or of every version")
    c.add_argument("ref", nargs="?")
    cmd("gc", "remove what interrupted operations left behind")
    args = p.parse_args(argv)
    args.root = getattr(args, "root", None) or os.environ.get(ROOT_ENV)
    args.json = getattr(args, "json", False)
    if not args.root:
        p.error(f"no registry: pass --root DIR or set {ROOT_ENV}")
    return args


def run(args: argparse.Namespace) -> Any:
    """Do the command; returns what to print as JSON (and prints text unless --json)."""
    reg = Registry(args.root)
    say = (lambda *a: None) if args.json else print
    c = args.command
    if c == "register":
        tags = dict(parse_tag(t) for t in args.tag)
        v = reg.register(args.model_dir, args.name, description=args.description, tags=tags, parent=args.parent)
        say(f"registered {v.ref} (sha256 {v.content_hash[:16]}...)" + (f", parent {v.parent}" if v.parent else ""))
        return v.to_dict()
    if c == "list":
        names = [args.name] if args.name else reg.names()
        out = {n: {"versions": [v.ref for v in reg.versions(n)], "aliases": {
            a: f"v{info['version']}" for a, info in reg.aliases(n).items()}} for n in names}
        for n in names:
            say(f"{n}: " + (", ".join(f"{a} -> {t}" for a, t in out[n]["aliases"].items()) or "no aliases"))
            for v in reg.versions(n):
                say("  " + _version_line(v))
        if not names:
            say(f"the registry at {reg.root} is empty")
        return out
    if c == "show":
        if "@" not in args.ref:
            out = {"name": args.ref, "versions": [v.to_dict() for v in reg.versions(args.ref)],
                   "aliases": reg.aliases(args.ref)}
        else:
            v = reg.get(args.ref)
            out = {**v.to_dict(), "aliases": sorted(a for a, info in reg.aliases(v.name).items()
                                                    if info["version"] == v.version),
                   "lineage": reg.lineage(v.ref)}
        say(json.dumps(out, indent=2, sort_keys=True))
        return out
    if c == "compare":
        out = compare(reg, args.ref_a, args.ref_b)
        if not args.json:
            _print_compare(out)
        return out
    if c in ("alias", "promote"):
        v = reg.set_alias(args.name, args.version, args.alias if c == "alias" else args.to, action=c)
        alias = args.alias if c == "alias" else args.to
        say(f"{args.name}@{alias} -> {v.ref}")
        return {"alias": f"{args.name}@{alias}", "target": v.ref}
    if c == "rollback":
        v = reg.rollback(args.name, args.alias)
        say(f"{args.name}@{args.alias} -> {v.ref} (rolled back)")
        return {"alias": f"{args.name}@{args.alias}", "target": v.ref}
    if c == "export":
        path = reg.export(args.ref, args.file)
        say(f"exported {reg.get(args.ref).ref} to {path}")
        return {"file": str(path)}
    if c == "import":
        v = reg.import_archive(args.file, name=args.name)
        say(f"imported {args.file} as {v.ref} (sha256 {v.content_hash[:16]}... verified)")
        return v.to_dict()
    if c == "delete":
        v = reg.delete(args.ref)
        say(f"deleted {v.ref}")
        return {"deleted": v.ref}
    if c == "history":
        events = reg.history(args.name)
        for e in events:
            target = f"v{e.version}" if e.version is not None else ""
            alias = f"{e.alias} -> " if e.alias else ""
            extra = f" (was v{e.details['previous']})" if e.details.get("previous") is not None else ""
            say(f"{e.time}  {e.user:<12}  {e.action:<9}  {alias}{target}{extra}")
        return [e.to_dict() for e in events]
    if c == "verify":
        versions = [reg.get(args.ref)] if args.ref else reg.versions()
        bad = []
        for v in versions:
            try:
                reg.verify(v, use_cache=False)
                say(f"ok        {v.ref}")
            except RegistryError as e:
                bad.append(str(e))
                say(f"TAMPERED  {e}")
        if bad:
            raise RegistryError(f"{len(bad)} of {len(versions)} version(s) failed verification")
        return {"verified": [v.ref for v in versions]}
    if c == "gc":
        removed = reg.gc()
        say("\n".join(f"removed {r}" for r in removed) or "nothing to clean up")
        return {"removed": removed}
    raise AssertionError(c)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
        if args.json:
            print(json.dumps(out, indent=2, sort_keys=True))
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
