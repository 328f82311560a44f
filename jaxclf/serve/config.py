"""Every serving knob, with its default and a one-line comment, once: EngineConfig and ServeConfig.

    InferenceEngine(path, EngineConfig(max_batch_size=16))       # or InferenceEngine(path, max_batch_size=16)
    create_app(path, engine=EngineConfig(cache_size=0), serve=ServeConfig(max_texts=8))
    python -m jaxclf.serve --model DIR --max-batch-size 16 --max-texts 8     # flags made from these fields

EngineConfig is how one InferenceEngine runs a model (device, compiled buckets, batching, queue,
cache, deadlines); ServeConfig is the HTTP server around it (address, threads, limits, CORS, rate
limit, drift monitoring, shutdown, admin token). Both are frozen and checked on construction: a
bad value is a ConfigError naming the field, the value and what is accepted.

JAX-free, so the command line can build and check them before JAX loads.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

from jaxclf.config import DTYPES, ConfigError, check_dtype_override
from jaxclf.serve.limits import proxy_networks
from jaxclf.serve.planning import check_buckets

DEVICES = ("auto", "cpu", "gpu", "cuda", "tpu")  # "cuda" is JAX's name for NVIDIA GPUs
BACKENDS = ("jax", "onnxruntime", "openvino")  # what runs the compiled buckets (jaxclf.serve.onnx_backend)
GRAPH_BACKENDS = ("onnxruntime", "openvino")  # the ones that run the exported ONNX graph, on the CPU
ADMIN_TOKEN_ENV = "JAXCLF_ADMIN_TOKEN"  # where `python -m jaxclf.serve` reads the admin token when no flag gives it

Config = TypeVar("Config")


def default_compilation_cache_dir() -> str:
    """$XDG_CACHE_HOME/jaxclf/xla, else ~/.cache/jaxclf/xla."""
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxclf" / "xla")


def _positive(config: Any, *names: str, allow_zero: bool = False, integer: bool = True) -> None:
    for name in names:
        value = getattr(config, name)
        kinds = int if integer else (int, float)
        if (not isinstance(value, kinds) or isinstance(value, bool) or value != value
                or value < 0 or (value == 0 and not allow_zero)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")


def override(config: Config, **changes: Any) -> Config:
    """A copy of dataclass `config` with `changes`; an unknown name is a ConfigError listing the accepted ones."""
    names = [f.name for f in dataclasses.fields(config) if f.init]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise ConfigError(f"unknown {type(config).__name__} setting(s) {', '.join(unknown)}; "
                          f"accepted: {', '.join(names)}")
    return dataclasses.replace(config, **changes)


def check_backend(backend: str, onnx_file: str | None, dtype: str | None, device: str = "auto") -> None:
    """The backend settings a serving engine (EngineConfig) and a bulk job (BulkConfig) share."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if onnx_file is not None and backend not in GRAPH_BACKENDS:
        raise ConfigError(f"onnx_file={onnx_file!r} is read only by backend='onnxruntime' or 'openvino' "
                          f"(backend is {backend!r})")
    check_dtype_override(dtype)
    if backend == "onnxruntime" and dtype not in (None, "float32"):
        raise ConfigError(f"dtype={dtype!r} is for backend='jax' or 'openvino'; the ONNX Runtime "
                          f"backend runs the exported float32 graph")
    if backend in GRAPH_BACKENDS and device not in ("auto", "cpu"):
        raise ConfigError(f"backend={backend!r} runs on the CPU; device={device!r} needs backend='jax'")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How an InferenceEngine runs one model: device, compiled shapes, batcher, result cache, deadlines."""

    device: str = dataclasses.field(default="auto", metadata={
        "help": "where the model runs: cpu, gpu (or cuda), tpu, or auto (JAX's default backend)", "choices": DEVICES})
    backend: str = dataclasses.field(default="jax", metadata={
        "help": "what runs the buckets: jax (XLA executables), or onnxruntime or openvino (the graph "
                "`jaxclf export-onnx` wrote, --onnx-file; CPU hosts, needs jaxclf[onnx] or jaxclf[openvino])",
        "choices": BACKENDS})
    onnx_file: str | None = None  # the graph the onnxruntime and openvino backends run; none: MODEL_DIR/model.onnx
    dtype: str | None = dataclasses.field(default=None, metadata={
        "help": "compute dtype: none keeps the model's (config.json, float32 unless trained otherwise); "
                "bfloat16 holds the weights in bf16 and multiplies in bf16, accumulating in float32: on a "
                "CPU with AMX or AVX512-BF16 1.3-2.5x the float32 throughput, logits within ~1e-2 "
                "(README, 'Reduced precision'); with backend=openvino, OpenVINO's bf16 precision",
        "choices": DTYPES})
    max_batch_size: int = 32  # most texts in one compiled call; the largest batch bucket must equal it
    batch_buckets: tuple[int, ...] | None = None  # batch sizes to compile; none: 1, 4, 32, ..., max_batch_size
    length_buckets: tuple[int, ...] | None = None  # sequence lengths to compile; none: 32, 48, 64, powers of 2 to max
    max_wait_ms: float = 0.0  # longest wait for a batch to fill; 0 runs what queued during the previous call
    max_queue_size: int = 256  # texts waiting before a submission is refused (HTTP 503 queue_full)
    cache_size: int = 1000  # entries of the (model version, text hash) LRU result cache; 0 turns it off
    cache_max_bytes: int = 16 << 20  # memory the result cache may hold, in bytes (whichever bound comes first)
    request_timeout_s: float = 10.0  # a text not started by then is dropped unrun (HTTP 503)
    batching: bool = True  # false runs every call alone in the caller's thread (for comparisons)
    batch_workers: int = 2  # batcher threads: one gathers the next batch while another runs
    compilation_cache_dir: str | None = dataclasses.field(default_factory=default_compilation_cache_dir, metadata={
        "help": "persistent XLA cache (a process-wide JAX setting): restarts load instead of compiling",
        "off_flag": "--no-compilation-cache"})
    # A regex Split/Replace step in tokenizer.json can backtrack for minutes, or panic, on one crafted text.
    allow_regex_tokenizer: bool = False  # serve a model whose tokenizer.json has regex steps (trusted text only)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        check_backend(self.backend, self.onnx_file, self.dtype, self.device)
        _positive(self, "max_batch_size", "max_queue_size", "batch_workers")
        _positive(self, "cache_size", "cache_max_bytes", allow_zero=True)
        _positive(self, "max_wait_ms", allow_zero=True, integer=False)
        _positive(self, "request_timeout_s", integer=False)
        if self.batch_buckets is not None:
            object.__setattr__(self, "batch_buckets", check_buckets(
                "batch_buckets", self.batch_buckets, self.max_batch_size, "max_batch_size"))
        if self.length_buckets is not None:  # the largest is checked against the model when it loads
            object.__setattr__(self, "length_buckets", check_buckets("length_buckets", self.length_buckets))
        if self.compilation_cache_dir is not None:
            object.__setattr__(self, "compilation_cache_dir", str(self.compilation_cache_dir))


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The HTTP service around the engines: where it listens, what it accepts, how it stops."""

    host: str = "127.0.0.1"  # address to listen on (0.0.0.0 for every interface)
    port: int = 8000  # port to listen on; 0 picks a free one
    threads: int = 16  # waitress worker threads: requests handled at once
    max_body_bytes: int = 1 << 20  # largest request body, in bytes (refused by waitress before it is buffered)
    max_header_bytes: int = 32 << 10  # largest request line plus headers, in bytes (waitress answers 431 past it)
    connection_limit: int = 100  # open client connections; waitress stops accepting past it
    channel_timeout_s: float = 60.0  # an idle or stalled connection is closed after this long
    max_texts: int = 64  # most texts in one /predict/batch request
    max_chars: int = 10_000  # most characters per text (the tokenizer cuts at the model's limit anyway)
    rate_limit: float | None = None  # requests/s per client IP (IPv6: per /64); none: no limit
    rate_burst: int | None = None  # burst size of the rate limit; none: one second's worth
    trusted_proxies: tuple[str, ...] = ()  # proxy addresses or networks whose X-Forwarded-For names the client
    cors_origins: tuple[str, ...] = ()  # origins a browser may call from ('*': any); none by default
    drift_window: int = 1000  # live predictions compared with the eval distributions in metrics.json
    drift_threshold: float = 0.2  # population stability index past which a drift warning is logged
    drift_min_samples: int = 100  # predictions before a PSI is reported (small samples are noisy)
    # Kubernetes sends SIGTERM when it starts removing a pod from its Service; the load balancers hear of
    # it later. Until then requests keep coming: serve them, with /ready already 503.
    pre_drain_s: float = 0.0  # after SIGTERM: keep listening and serving this long (/ready 503), then drain
    shutdown_timeout_s: float = 25.0  # most seconds from SIGTERM to exit, pre-drain included (< k8s' 30 s)
    admin_token: str | None = dataclasses.field(default=None, repr=False, metadata={
        "help": "turns on POST /admin/reload for 'Authorization: Bearer <token>' (prefer $JAXCLF_ADMIN_TOKEN: "
                "arguments show in ps)"})

    def __post_init__(self) -> None:
        _positive(self, "threads", "max_body_bytes", "max_header_bytes", "connection_limit", "max_texts",
                  "max_chars", "drift_window", "drift_min_samples")
        _positive(self, "channel_timeout_s", integer=False)
        _positive(self, "port", allow_zero=True)
        if self.port > 65535:
            raise ConfigError(f"port must be at most 65535, got {self.port}")
        _positive(self, "drift_threshold", integer=False)
        _positive(self, "shutdown_timeout_s", "pre_drain_s", allow_zero=True, integer=False)
        if self.pre_drain_s and self.pre_drain_s >= self.shutdown_timeout_s:
            raise ConfigError(f"pre_drain_s={self.pre_drain_s:g} must be shorter than shutdown_timeout_s="
                              f"{self.shutdown_timeout_s:g}, the whole shutdown, which includes it")
        if self.rate_limit is not None:
            _positive(self, "rate_limit", integer=False)
        if self.rate_burst is not None:
            _positive(self, "rate_burst")
        if isinstance(self.cors_origins, str):
            raise ConfigError(f"cors_origins must be a list of origins, got the string {self.cors_origins!r}")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if isinstance(self.trusted_proxies, str):
            raise ConfigError(f"trusted_proxies must be a list of addresses, got the string {self.trusted_proxies!r}")
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        proxy_networks(self.trusted_proxies)  # a typo fails here, with the entry named
        if self.admin_token is not None and not self.admin_token.strip():
            raise ConfigError("admin_token must not be empty; leave it unset to turn /admin endpoints off")
