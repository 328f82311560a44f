"""Serve a jaxclf model over HTTP with waitress: one process, many threads, one batcher.

    python -m jaxclf.serve --model runs/default/model --port 8000      # also: jaxclf serve, scripts/serve.py
    curl -s localhost:8000/ready
    curl -s -H 'Content-Type: application/json' -d '{"text": "a lovely little cafe"}' localhost:8000/predict

From a model registry (jaxclf registry ...), with a reload endpoint and an A/B split:

    JAXCLF_ADMIN_TOKEN=$(cat token) python -m jaxclf.serve --registry /srv/reg --model sentiment@production
    curl -s -X POST -H "Authorization: Bearer $(cat token)" localhost:8000/admin/reload   # after a promote
    python -m jaxclf.serve --registry /srv/reg --ab sentiment@production=0.9,sentiment@staging=0.1

The model loads after the socket listens; /ready turns 200 once every bucket is compiled.
SIGTERM (or Ctrl-C): /ready turns 503 and requests are still served for --pre-drain-s seconds (match
a Kubernetes preStop delay), then it stops accepting, finishes requests in flight and exits 0, all
within --shutdown-timeout-s. Behind a load balancer, --trusted-proxies lets the rate limit see clients.
Scale out with more processes or replicas, each with its own model; never fork this one.
The inference and HTTP flags are the fields of EngineConfig and ServeConfig (jaxclf.serve.config).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from jaxclf.cli.flags import add_config_arguments, given_fields
from jaxclf.errors import JaxclfError
from jaxclf.serve.config import ADMIN_TOKEN_ENV, EngineConfig, ServeConfig

PROG = "jaxclf serve"  # = python -m jaxclf.serve = python scripts/serve.py


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model directory (config.json, model.safetensors, ...); with --registry, NAME@ALIAS or "
                        "NAME@vN")
    p.add_argument("--registry", default=None, metavar="ROOT", help="serve from this model registry")
    p.add_argument("--ab", default=None, metavar="REF=W,REF=W",
                   help="with --registry: serve several versions with a traffic split, e.g. "
                        "sentiment@production=0.9,sentiment@staging=0.1 (sticky per request key)")
    p.add_argument("--model-version", default=None,
                   help="version string reported and used in cache keys (default: hash of weights + config)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_config_arguments(p, ServeConfig, "HTTP server")
    add_config_arguments(p, EngineConfig, "inference")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.model is None) == (args.ab is None):
        parser.error("give the model to serve: --model, or --ab with --registry (not both)")
    if args.ab is not None and args.registry is None:
        parser.error("--ab names registry versions; add --registry ROOT")
    if args.registry is not None and args.model_version is not None:
        parser.error("--model-version does not apply to --registry: versions are reported as NAME@vN")
    return args


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the flags give; --batch-buckets alone also sets max_batch_size to its largest."""
    given = given_fields(EngineConfig, args)
    if given.get("batch_buckets") and "max_batch_size" not in given:
        given["max_batch_size"] = max(given["batch_buckets"])
    return EngineConfig(**given)


def model_source(args: argparse.Namespace, engine: EngineConfig):
    """What to serve: a model directory, or registry references, checked here before listening (no JAX needed)."""
    from jaxclf import model_dir
    from jaxclf.serve.planning import model_length_buckets
    from jaxclf.serve.slot import DirectorySource, RegistrySource, parse_split

    if args.registry is None:
        try:  # fail before listening on a wrong path: cheap, and no JAX needed
            paths = [model_dir.check_files(args.model)]
        except model_dir.ModelDirectoryError as e:
            hint = "; to serve a registry version add --registry ROOT" if "@" in args.model else ""
            raise model_dir.ModelDirectoryError(f"{e}{hint}") from None
        source = DirectorySource(args.model, version=args.model_version)
    else:
        source = RegistrySource(args.registry, parse_split(args.ab) if args.ab else [(args.model, 1.0)])
        paths = [target.path for target in source.resolve()]
    for path in paths:  # a length bucket past a model's maximum, or a regex tokenizer, would fail only after listening
        model_length_buckets(engine.length_buckets, model_dir.max_text_length(path))
        model_dir.check_tokenizer_regex(Path(path) / model_dir.TOKENIZER_FILE, engine.allow_regex_tokenizer)
    return source


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, check the model source, create the app and serve it; a user error exits 2."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = engine_config(args)
        serve = ServeConfig(**{"admin_token": os.environ.get(ADMIN_TOKEN_ENV), **given_fields(ServeConfig, args)})
        source = model_source(args, engine)
        from jaxclf.serve.app import create_app  # JAX loads here, once the flags are known to be good
        from jaxclf.serve.server import serve as run_server
        app = create_app(source, engine, serve, load_now=False)
    except JaxclfError as e:  # a bad path, --ab, bucket list or setting: one line, no traceback
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return run_server(app)


if __name__ == "__main__":
    sys.exit(main())
