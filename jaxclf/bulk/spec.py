"""BulkConfig: every knob of a bulk prediction job, with its one default (JAX-free, so `--help` is instant)."""

from __future__ import annotations

import dataclasses

from jaxclf.config import DTYPES, ConfigError
from jaxclf.serve.config import BACKENDS, check_backend

INPUT_FORMATS = ("csv", "jsonl", "text", "array_record")
OUTPUT_FORMATS = ("jsonl", "parquet")


@dataclasses.dataclass(frozen=True)
class BulkConfig:
    """How `jaxclf predict --input ... --output ...` reads, batches and writes."""

    text_field: str = "text"  # CSV column / JSON key holding each document's text
    id_field: str | None = None  # CSV column / JSON key of each row's id; none: the row's 0-based input position
    input_format: str | None = None  # csv, jsonl, text (one document a line) or array_record; none: by extension
    format: str = "jsonl"  # output shards: jsonl or parquet (parquet needs pyarrow: pip install jaxclf[parquet])
    logits: bool = False  # also write every row's raw logits
    skip_bad: bool = False  # count bad rows and list them in summary.json instead of failing on the first
    batch_size: int = 256  # rows per compiled call, split evenly over this process's devices
    sort_window: int = 4096  # consecutive rows sorted by length together, so each call pads little
    shard_rows: int = 10000  # input rows per output shard: the unit of commit, resume and process sharding
    dtype: str | None = dataclasses.field(default=None, metadata={
        "help": "compute dtype, as jaxclf serve's --dtype: none keeps the model's; bfloat16 pays on CPUs with "
                "AMX or AVX512-BF16 (README, 'Reduced precision')", "choices": DTYPES})
    backend: str = dataclasses.field(default="jax", metadata={
        "help": "what runs the forward, as jaxclf serve's --backend: jax (XLA, every local device), or "
                "onnxruntime or openvino (the graph `jaxclf export-onnx` wrote, --onnx-file; this host's CPU)",
        "choices": BACKENDS})
    onnx_file: str | None = None  # the graph the onnxruntime and openvino backends run; none: MODEL_DIR/model.onnx
    compilation_cache: str | None = None  # persistent XLA compilation cache directory, as jaxclf serve's; none: off
    restart: bool = False  # delete this output directory's earlier shards and start the job over
    progress: bool | None = None  # progress bar on stderr; none: only when stderr is a terminal

    def __post_init__(self) -> None:
        for name in ("batch_size", "sort_window", "shard_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise ConfigError(f"input_format {self.input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
        check_backend(self.backend, self.onnx_file, self.dtype)
        if self.format not in OUTPUT_FORMATS:
            raise ConfigError(f"format {self.format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        if not self.text_field:
            raise ConfigError("text_field must name a column or key, got an empty string")
        if self.id_field == "":
            raise ConfigError("id_field must name a column or key, or be left out")
        if self.id_field is not None and self.id_field == self.text_field:
            raise ConfigError(f"id_field and text_field are both {self.text_field!r}; name two different fields")
