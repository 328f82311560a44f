"""EngineConfig / ServeConfig (every serving knob, one default each) and the flags generated from them."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from jaxclf.cli import flags
from jaxclf.config import ConfigError
from jaxclf.serve import __main__ as serve_main
from jaxclf.serve.config import EngineConfig, ServeConfig, override


def parser_for(*classes) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test", exit_on_error=False)
    for cls in classes:
        flags.add_config_arguments(parser, cls, cls.__name__)
    return parser


@pytest.mark.parametrize("cls", [EngineConfig, ServeConfig])
def test_every_field_has_a_flag_with_its_comment_and_default(cls):
    comments = flags._field_comments(cls)
    parser = parser_for(cls)
    actions = {}
    for a in parser._actions:  # the field's own flag comes first (an "off" flag may follow it)
        actions.setdefault(a.dest, a)
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help") or comments.get(field.name)
        assert help_text, f"{cls.__name__}.{field.name} has no comment"
        action = actions[field.name]
        assert f"--{field.name.replace('_', '-')}" in action.option_strings
        assert action.help.startswith(help_text.replace("%", "%%")) and "(default: " in action.help


def test_flags_not_given_keep_the_dataclass_defaults():
    args = parser_for(EngineConfig, ServeConfig).parse_args([])
    assert flags.config_from_args(EngineConfig, args) == EngineConfig()
    assert flags.config_from_args(ServeConfig, args) == ServeConfig()


def test_flags_parse_by_type():
    args = parser_for(EngineConfig, ServeConfig).parse_args([
        "--max-batch-size", "16", "--batch-buckets", "1,4,16", "--max-wait-ms", "2.5", "--no-batching",
        "--no-compilation-cache", "--device", "cpu", "--port", "0", "--rate-limit", "3",
        "--cors-origins", "http://a", "--cors-origins", "http://b,http://c",
        "--backend", "onnxruntime", "--onnx-file", "m.onnx"])
    engine = flags.config_from_args(EngineConfig, args)
    assert engine == EngineConfig(max_batch_size=16, batch_buckets=(1, 4, 16), max_wait_ms=2.5, batching=False,
                                  compilation_cache_dir=None, device="cpu", backend="onnxruntime",
                                  onnx_file="m.onnx")
    serve = flags.config_from_args(ServeConfig, args, threads=3)
    assert serve == ServeConfig(port=0, rate_limit=3.0, cors_origins=("http://a", "http://b", "http://c"),
                                threads=3)


def test_bad_flag_values_are_argparse_errors():
    parser = parser_for(EngineConfig)
    with pytest.raises(argparse.ArgumentError, match="expected comma-separated int values like 1,4,16; got '1,x'"):
        parser.parse_args(["--batch-buckets", "1,x"])
    with pytest.raises(argparse.ArgumentError, match="invalid int value"):
        parser.parse_args(["--cache-size", "lots"])


@pytest.mark.parametrize("make, message", [
    (lambda: EngineConfig(max_batch_size=0), "max_batch_size must be an integer > 0, got 0"),
    (lambda: EngineConfig(batch_buckets=(1, 4)), "the largest of batch_buckets must equal max_batch_size=32"),
    (lambda: EngineConfig(length_buckets=(32, 16)), "length_buckets must be strictly increasing"),
    (lambda: EngineConfig(request_timeout_s=0), "request_timeout_s must be a number > 0"),
    (lambda: EngineConfig(device="quantum"), "device must be one of auto, cpu, gpu, cuda, tpu"),
    (lambda: EngineConfig(backend="tensorrt"), "backend must be one of jax, onnxruntime, openvino, got 'tensorrt'"),
    (lambda: EngineConfig(onnx_file="m.onnx"), "onnx_file='m.onnx' is read only by backend='onnxruntime' or "
                                               "'openvino'"),
    (lambda: EngineConfig(backend="onnxruntime", device="tpu"), "backend='onnxruntime' runs on the CPU"),
    (lambda: EngineConfig(backend="openvino", device="gpu"), "backend='openvino' runs on the CPU"),
    (lambda: EngineConfig(dtype="int8"), "dtype must be one of float32, bfloat16, float16 (or unset"),
    (lambda: EngineConfig(backend="onnxruntime", dtype="bfloat16"), "dtype='bfloat16' is for backend='jax'"),
    (lambda: ServeConfig(port=70000), "port must be at most 65535"),
    (lambda: ServeConfig(rate_limit=-1.0), "rate_limit must be a number > 0"),
    (lambda: ServeConfig(cors_origins="http://a"), "cors_origins must be a list of origins"),
    (lambda: ServeConfig(admin_token="  "), "admin_token must not be empty"),
    (lambda: override(ServeConfig(), max_text=3), "unknown ServeConfig setting(s) max_text; accepted: host,"),
])
def test_bad_settings_are_config_errors_naming_the_field(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value)


def test_admin_token_is_not_in_the_repr():
    assert "s3cret-token-value" not in repr(ServeConfig(admin_token="s3cret-token-value"))


def test_command_line_batch_buckets_alone_set_the_largest_batch(monkeypatch):
    args = serve_main.parse_args(["--model", "m", "--batch-buckets", "1,8"])
    assert serve_main.engine_config(args).max_batch_size == 8
    args = serve_main.parse_args(["--model", "m"])
    assert serve_main.engine_config(args) == EngineConfig()


def test_default_buckets_are_few_for_memory_and_cover_every_size():
    """12 executables for the default 32 texts x 128 tokens (36 held ~605 MiB resident; see serve.planning)."""
    from jaxclf.serve.planning import default_batch_buckets, default_length_buckets, model_length_buckets

    assert default_batch_buckets(32) == (1, 4, 32) and default_batch_buckets(1) == (1,)
    assert default_batch_buckets(2) == (1, 2) and default_batch_buckets(8) == (1, 4, 8)
    assert default_batch_buckets(128) == (1, 4, 32, 128)
    assert default_length_buckets(128) == model_length_buckets(None, 128) == (32, 48, 64, 128)
    assert default_length_buckets(512) == (32, 48, 64, 128, 256, 512)
    assert default_length_buckets(40) == (32, 40) and default_length_buckets(16) == (16,)
