"""Serve a jaxclf model over HTTP with waitress: one process, many threads, one batcher.

    python scripts/serve.py --model runs/default/model --port 8000
    curl -s localhost:8000/ready
    curl -s -H 'Content-Type: application/json' -d '{"text": "a lovely little cafe"}' localhost:8000/predict

From a model registry (jaxclf registry ...), with a reload endpoint and an A/B split:

    JAXCLF_ADMIN_TOKEN=$(cat token) python scripts/serve.py --registry /srv/reg --model sentiment@production
    curl -s -X POST -H "Authorization: Bearer $(cat token)" localhost:8000/admin/reload   # after a promote
    python scripts/serve.py --registry /srv/reg --ab sentiment@production=0.9,sentiment@staging=0.1

The model loads after the socket listens; /ready turns 200 once every bucket is compiled.
SIGTERM (or Ctrl-C) stops accepting, finishes requests in flight and exits 0.
Scale out with more processes or replicas, each with its own model; never fork this one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,16; got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxclf" / "xla"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model directory (config.json, model.safetensors, ...); with --registry, NAME@ALIAS or "
                        "NAME@vN")
    p.add_argument("--registry", default=None, metavar="ROOT", help="serve from this model registry")
    p.add_argument("--ab", default=None, metavar="REF=W,REF=W",
                   help="with --registry: serve several versions with a traffic split, e.g. "
                        "sentiment@production=0.9,sentiment@staging=0.1 (sticky per request key)")
    p.add_argument("--admin-token", default=os.environ.get("JAXCLF_ADMIN_TOKEN"),
                   help="turns on POST /admin/reload for 'Authorization: Bearer <token>' (default: "
                        "$JAXCLF_ADMIN_TOKEN; prefer the variable: arguments show in ps)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    p.add_argument("--threads", type=int, default=16, help="waitress worker threads (concurrent requests)")
    g = p.add_argument_group("inference")
    g.add_argument("--max-batch-size", type=int, default=None,
                   help="most requests in one compiled call (default: the largest --batch-buckets, else 32)")
    g.add_argument("--max-wait-ms", type=float, default=0,
                   help="longest wait for a batch to fill; 0 batches whatever queued during the previous call")
    g.add_argument("--batch-workers", type=int, default=2, help="batcher threads running compiled calls")
    g.add_argument("--max-queue-size", type=int, default=256, help="queued requests before 503 queue_full")
    g.add_argument("--cache-size", type=int, default=1000, help="LRU result cache entries (0 disables)")
    g.add_argument("--batch-buckets", type=_ints, default=None,
                   help="batch sizes to compile, e.g. 1,4,16,32 (default: powers of two to --max-batch-size)")
    g.add_argument("--length-buckets", type=_ints, default=None,
                   help="sequence lengths to compile (default: powers of two from 16 to the model's maximum)")
    g.add_argument("--request-timeout-s", type=float, default=10.0, help="drop requests queued longer")
    g.add_argument("--no-batching", action="store_true", help="run every request alone (for comparison)")
    g.add_argument("--model-version", default=None,
                   help="version string reported and used in cache keys (default: hash of weights + config)")
    g.add_argument("--compilation-cache-dir", default=str(default_cache),
                   help="persistent XLA compilation cache; makes restarts fast (default: %(default)s)")
    g.add_argument("--no-compilation-cache", action="store_true", help="compile from scratch at every start")
    h = p.add_argument_group("HTTP limits")
    h.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    h.add_argument("--max-texts", type=int, default=64, help="most texts per /predict/batch request")
    h.add_argument("--max-chars", type=int, default=10_000, help="most characters per text")
    h.add_argument("--rate-limit", type=float, default=None, help="requests/s per client IP (default: off)")
    h.add_argument("--rate-burst", type=int, default=None, help="burst size of the rate limit")
    h.add_argument("--cors-origin", action="append", default=None,
                   help="origin allowed to call from a browser; repeat for several, '*' for any (default: none)")
    h.add_argument("--shutdown-timeout-s", type=float, default=30.0, help="longest wait for requests on SIGTERM")
    d = p.add_argument_group("drift monitoring (needs eval distributions in the model's metrics.json)")
    d.add_argument("--drift-window", type=int, default=1000, help="live predictions compared with the reference")
    d.add_argument("--drift-threshold", type=float, default=0.2, help="PSI past which a warning is logged")
    d.add_argument("--drift-min-samples", type=int, default=100, help="predictions before a PSI is reported")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if (args.model is None) == (args.ab is None):
        p.error("give the model to serve: --model, or --ab with --registry (not both)")
    if args.ab is not None and args.registry is None:
        p.error("--ab names registry versions; add --registry ROOT")
    if args.registry is not None and args.model_version is not None:
        p.error("--model-version does not apply to --registry: versions are reported as NAME@vN")
    return args


def model_source(args: argparse.Namespace):
    """What to serve: a model directory, or registry references (checked by hash here, before listening)."""
    from jaxclf import model_dir
    from jaxclf.serve.slot import RegistrySource, parse_split
    if args.registry is None:
        try:  # fail before listening on a wrong path: cheap, and no JAX needed
            model_dir.check_files(args.model)
            model_dir.read_config(args.model)
        except model_dir.ModelDirectoryError as e:
            hint = "; to serve a registry version add --registry ROOT" if "@" in args.model else ""
            raise model_dir.ModelDirectoryError(f"{e}{hint}") from None
        return args.model
    refs = parse_split(args.ab) if args.ab else [(args.model, 1.0)]
    source = RegistrySource(args.registry, refs)
    for target in source.resolve():
        model_dir.read_config(target.path)
    return source


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from jaxclf.serve import app as service

    try:
        source = model_source(args)
    except ValueError as e:  # ModelDirectoryError, RegistryError, a malformed --ab
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_batch_size = args.max_batch_size or (max(args.batch_buckets) if args.batch_buckets else 32)
    engine_options = dict(
        max_batch_size=max_batch_size, max_wait_ms=args.max_wait_ms, max_queue_size=args.max_queue_size,
        cache_size=args.cache_size, batch_buckets=args.batch_buckets, length_buckets=args.length_buckets,
        request_timeout_s=args.request_timeout_s, batching=not args.no_batching, version=args.model_version,
        num_workers=args.batch_workers,
        compilation_cache_dir=None if args.no_compilation_cache else args.compilation_cache_dir)
    try:
        app = service.create_app(
            source, engine_options=engine_options, load_now=False, cors_origins=args.cors_origin,
            max_body_bytes=args.max_body_bytes, max_texts=args.max_texts, max_chars=args.max_chars,
            rate_limit=args.rate_limit, rate_burst=args.rate_burst, admin_token=args.admin_token,
            drift_window=args.drift_window, drift_threshold=args.drift_threshold,
            drift_min_samples=args.drift_min_samples)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return service.serve(app, host=args.host, port=args.port, threads=args.threads,
                         shutdown_timeout_s=args.shutdown_timeout_s)


if __name__ == "__main__":
    sys.exit(main())
