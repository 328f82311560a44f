"""Bulk prediction (jaxclf.bulk, `jaxclf predict --input ... --output ...`): exact, streaming, resumable, multi-host."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import jaxclf
from jaxclf.bulk import BulkConfig, read_predictions, run
from jaxclf.bulk.writer import OutputError
from jaxclf.cli import run_command
from jaxclf.cli.predict import main as predict_main
from jaxclf.train.data import DataError

from training_runs import free_port, subprocess_env  # subprocess_env: JAX, with the suite's XLA cache

ROOT = Path(__file__).resolve().parents[1]
# Small shards, windows and batches, so a few hundred rows make several of each (and partial ones).
SMALL = BulkConfig(batch_size=16, sort_window=64, shard_rows=100, id_field="id")
SMALL_FLAGS = ["--batch-size", "16", "--sort-window", "64", "--shard-rows", "100"]


def write_jsonl(path: Path, texts: list[str], ids: list | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": ids[i] if ids else f"doc-{i}", "text": text}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(sample_texts) -> list[str]:
    """Sample texts plus texts past the tiny model's 32 tokens (truncated), unicode and an empty one."""
    long = [" ".join(sample_texts[i:i + 6]) for i in range(0, 60, 6)]
    return sample_texts + long + ["Café au lait, très bon ☕", "", "ok"]


@pytest.fixture(scope="module")
def expected(tiny_model_dir, corpus) -> list[dict]:
    return jaxclf.load(tiny_model_dir).predict(corpus)


def assert_same_predictions(rows: list[dict], expected: list[dict], tol: float = 1e-5) -> None:
    assert len(rows) == len(expected)
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    worst = max(abs(r["probabilities"][k] - e["probabilities"][k]) for r, e in zip(rows, expected)
                for k in e["probabilities"])
    assert worst < tol, f"probabilities differ by up to {worst:g}"
    assert max(abs(r["confidence"] - e["confidence"]) for r, e in zip(rows, expected)) < tol


def shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*"))}


# ----------------------------------------------------------------------------------------------- in process


def test_bulk_predictions_equal_classifier_predict(tiny_model_dir, corpus, expected, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", corpus)
    out = tmp_path / "out"
    summary = run(str(tiny_model_dir), [str(source)], out, SMALL)

    rows = list(read_predictions(out))
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(len(corpus))]  # every row once, input order
    assert_same_predictions(rows, expected)
    assert len(list(out.glob("part-*.jsonl"))) == -(-len(corpus) // 100)

    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["rows"] == summary["predictions"] == len(corpus)
    assert summary["label_counts"] == {label: Counter(e["label"] for e in expected)[label]
                                       for label in ("negative", "neutral", "positive")}
    counts = np.histogram([e["confidence"] for e in expected], bins=20, range=(0, 1))[0].tolist()
    assert summary["confidence_histogram"]["counts"] == counts
    assert summary["bad_rows"] == {"count": 0, "listed": []}
    from jaxclf.serve.engine import model_version
    assert summary["model"]["version"] == model_version(tiny_model_dir)
    assert summary["throughput"]["rows_per_second"] > 0


def test_every_input_format_gives_the_same_predictions(tiny_model_dir, corpus, expected, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    texts = [t for t in corpus if t.strip()]  # plain text has no empty documents (a blank line is no row)
    want = [e for t, e in zip(corpus, expected) if t.strip()]
    csv_path = tmp_path / "in.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "text", "other"])
        w.writerows([i, t, "x,y"] for i, t in enumerate(texts))
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    writer = ArrayRecordWriter(str(tmp_path / "in.array_record"), "group_size:1")
    for i, t in enumerate(texts):
        writer.write(json.dumps({"key": i, "text": t}).encode())
    writer.close()

    logits = jaxclf.load(tiny_model_dir).logits(texts)
    runs = {"csv": (["in.csv"], "key", "jsonl", True), "txt": (["in.txt"], None, "jsonl", False),
            "array_record": (["in.array_record"], "key", "jsonl", False),
            "parquet": (["in.txt"], None, "parquet", True)}
    for name, (inputs, id_field, fmt, with_logits) in runs.items():
        out = tmp_path / f"out-{name}"
        run(str(tiny_model_dir), [str(tmp_path / i) for i in inputs], out,
            BulkConfig(batch_size=16, sort_window=64, shard_rows=100, id_field=id_field, format=fmt,
                       logits=with_logits))
        rows = list(read_predictions(out))
        assert_same_predictions(rows, want)
        if with_logits:
            np.testing.assert_allclose(np.array([r["logits"] for r in rows]), logits, atol=1e-5)
        else:
            assert "logits" not in rows[0]
        ids = [r["id"] for r in rows]
        expected_ids = {"csv": [str(i) for i in range(len(texts))], "array_record": list(range(len(texts)))}
        assert ids == expected_ids.get(name, list(range(len(texts)))), name
    assert sorted(p.suffix for p in (tmp_path / "out-parquet").glob("part-*")) == [".parquet"] * -(-len(texts) // 100)


def test_a_bad_row_fails_the_job_naming_file_and_line(tiny_model_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", ["fine", "also fine", "good"])
    lines = source.read_text().splitlines()
    lines.insert(3, '{"id": "x", "text": "no closing brace"')  # line 4
    source.write_text("\n".join(lines) + "\n")
    code = run_command(predict_main, ["--model", str(tiny_model_dir), "--input", str(source),
                                      "--output", str(tmp_path / "out")], prog="jaxclf predict")
    err = capsys.readouterr().err
    assert code == 2
    assert f"{source}:4: malformed JSON" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_skip_bad_counts_and_lists_bad_rows_across_files(tiny_model_dir, tmp_path):
    part1 = tmp_path / "a.csv"  # sorted first by the glob
    part1.write_bytes(b"id,text\n"
                      b"a1,first text\n"
                      b"a2,too,many,fields\n"          # line 3
                      b"a3,\"quoted, with comma\nand a second line\"\n"   # lines 4-5: one row
                      b"a4,caf\xe9 in latin-1\n"        # line 6: not UTF-8
                      b"a5,last of a\n")
    part2 = tmp_path / "b.jsonl"
    part2.write_text('{"id": "b1", "text": "from b"}\n'
                     '{"id": "b2", "body": "no text key"}\n'   # line 2
                     '\n'
                     '{"id": "b3", "text": 42}\n'               # line 4
                     '{"id": "b4", "text": "end"}\n', encoding="utf-8")
    config = BulkConfig(id_field="id", skip_bad=True, batch_size=4, sort_window=4, shard_rows=3)
    summary = run(str(tiny_model_dir), [str(tmp_path / "*.*")], tmp_path / "out", config)

    rows = list(read_predictions(tmp_path / "out"))
    assert [r["id"] for r in rows] == ["a1", "a3", "a5", "b1", "b4"]
    good = ["first text", "quoted, with comma\nand a second line", "last of a", "from b", "end"]
    assert_same_predictions(rows, jaxclf.load(tiny_model_dir).predict(good))
    assert summary["rows"] == 9 and summary["predictions"] == 5
    assert summary["bad_rows"]["count"] == 4
    listed = summary["bad_rows"]["listed"]
    assert listed[0].startswith(f"{part1}:3: 4 fields, expected 2")
    assert listed[1].startswith(f"{part1}:6: not valid UTF-8: byte 0xe9")
    assert listed[2].startswith(f"{part2}:2: missing key 'text'")
    assert listed[3].startswith(f"{part2}:4: 'text' must be a string")


def test_a_missing_column_or_input_is_one_clear_error(tiny_model_dir, tmp_path):
    bad_csv = tmp_path / "in.csv"
    bad_csv.write_text("id,body\n1,hello\n")
    with pytest.raises(DataError, match=r"in.csv:1: header has no 'text' column; found columns: 'id', 'body'"):
        run(str(tiny_model_dir), [str(bad_csv)], tmp_path / "out")
    with pytest.raises(DataError, match="no file matches"):
        run(str(tiny_model_dir), [str(tmp_path / "*.jsonl")], tmp_path / "out")


def test_a_registry_reference_names_the_model_and_its_version(tiny_model_dir, corpus, expected, tmp_path):
    from jaxclf.registry import Registry
    Registry(tmp_path / "reg").register(tiny_model_dir, name="sentiment")
    source = write_jsonl(tmp_path / "in.jsonl", corpus[:40])
    summary = run("sentiment@v1", [str(source)], tmp_path / "out", SMALL, registry=str(tmp_path / "reg"))
    assert summary["model"]["version"] == "sentiment@v1" and summary["model"]["ref"] == "sentiment@v1"
    assert_same_predictions(list(read_predictions(tmp_path / "out")), expected[:40])


def test_the_grain_source_resumes_from_its_state(tmp_path):
    from jaxclf.bulk.reader import ChunkDataset, resolve_inputs
    source = write_jsonl(tmp_path / "in.jsonl", [f"text {i}" for i in range(50)])
    config = BulkConfig(shard_rows=20, sort_window=8)
    dataset = ChunkDataset(resolve_inputs([str(source)]), config, wanted=lambda block: block != 1)
    it = iter(dataset)
    head = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [(c.block, c.positions, c.total_rows) for c in it]
    resumed = iter(dataset)
    resumed.set_state(state)
    assert [(c.block, c.positions, c.total_rows) for c in resumed] == rest
    assert [c.positions for c in head] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    assert rest[0][1] == list(range(40, 48)) and rest[-1] == (-1, [], 50)  # block 1 skipped; then the count


def test_quick_form_prints_one_json_line_per_text(tiny_model_dir, capsys):
    assert predict_main(["--model", str(tiny_model_dir), "great food", "slow service"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.pop("text") for line in lines] == ["great food", "slow service"]
    assert lines == jaxclf.load(tiny_model_dir).predict(["great food", "slow service"])


def test_quick_form_refuses_the_bulk_only_backend_flags(tiny_model_dir, capsys):
    for flags in (["--backend", "openvino"], ["--onnx-file", "m.onnx"]):
        with pytest.raises(SystemExit) as exit_info:
            predict_main(["--model", str(tiny_model_dir), *flags, "great food"])
        assert exit_info.value.code == 2
        assert "are for the bulk form (--input/--output)" in capsys.readouterr().err


def test_resume_refuses_other_settings_and_restart_starts_over(tiny_model_dir, corpus, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", corpus[:150])
    out = tmp_path / "out"
    run(str(tiny_model_dir), [str(source)], out, SMALL)
    first = shard_files(out)
    # The same job again: everything is committed, nothing is rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    run(str(tiny_model_dir), [str(source)], out, SMALL)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == mtimes
    with pytest.raises(OutputError, match="shard_rows: was 100, now 50"):
        run(str(tiny_model_dir), [str(source)], out, BulkConfig(batch_size=16, sort_window=64, shard_rows=50, id_field="id"))
    run(str(tiny_model_dir), [str(source)], out, BulkConfig(batch_size=16, sort_window=64, shard_rows=50, id_field="id",
                                                           restart=True))
    assert len(shard_files(out)) == 3 and shard_files(out) != first
    # Another compute dtype makes other logits: refused too, and restart runs the job in it.
    bf16 = dataclasses.replace(SMALL, shard_rows=50, dtype="bfloat16")
    with pytest.raises(OutputError, match="dtype"):
        run(str(tiny_model_dir), [str(source)], out, bf16)
    summary = run(str(tiny_model_dir), [str(source)], out, dataclasses.replace(bf16, restart=True))
    assert summary["rows"] == 150 and json.loads((out / "job.json").read_text())["dtype"] == "bfloat16"


def test_forward_compiles_each_bucket_once_and_pads_like_pad_rows(tiny_model_dir):
    from jaxclf.bulk.forward import BucketedForward, _pad
    from jaxclf.tokenizer import pad_rows
    rows = [[5] * n for n in (3, 30, 7, 16, 17, 2, 31, 9)]
    assert all((a == b).all() for a, b in zip(_pad(rows, 0, 8, 32), pad_rows(rows, 0, (8, 32))))
    clf = jaxclf.load(tiny_model_dir)
    forward = BucketedForward(clf, batch_size=4)
    plan = forward.plan([len(r) for r in rows])
    assert [sorted(len(rows[i]) for i in index) for index, _, _ in plan] == [[2, 3, 7, 9], [16, 17, 30, 31]]
    assert [(b, t) for _, b, t in plan] == [(4, 16), (4, 32)]
    first = forward.logits(rows)
    again = forward.logits(rows[::-1])[::-1]
    assert forward.compilations == 2
    np.testing.assert_allclose(first, again, atol=1e-6)
    ids, mask = pad_rows(rows, 0, (8, 32))
    reference = clf._compiled_forward()(clf._state, ids, mask)  # the classifier's own jitted forward
    np.testing.assert_allclose(first, np.asarray(reference), atol=1e-5)



def test_one_cpu_device_runs_a_big_batch_in_row_chunks_with_the_same_logits(tiny_model_dir):
    from jaxclf.bulk.forward import BucketedForward
    from jaxclf.model import ROW_CHUNK_TOKENS
    clf = jaxclf.load(tiny_model_dir)
    forward = BucketedForward(clf, batch_size=128)
    rows = [[5 + (i % 7)] * (20 + i % 13) for i in range(128)]  # 128 rows x 32 tokens: twice ROW_CHUNK_TOKENS
    assert 128 * 32 == 2 * ROW_CHUNK_TOKENS
    got = forward.logits(rows)
    assert "while" in forward.executable(128, 32).as_text()  # the chunk loop
    small_calls = np.concatenate([forward.logits(rows[i:i + 4]) for i in range(0, 128, 4)])  # 128 tokens each
    assert "while" not in forward.executable(4, 32).as_text()
    np.testing.assert_allclose(got, small_calls, atol=1e-6)


# ----------------------------------------------------------------------------------------------- subprocesses


def predict_cmd(model: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jaxclf.cli.predict", "--model", str(model), "--input", str(source),
            "--output", str(out), "--id-field", "id", *extra]


def run_predict(cmd: list[str], devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(devices), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"predict failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def committed_shards(out: Path) -> int:
    manifest = out / "manifest-p00000.json"
    try:
        return len(json.loads(manifest.read_text())["shards"])
    except (OSError, ValueError):  # not written yet (it is replaced atomically, so never half-written)
        return 0


@pytest.mark.slow
def test_sigkill_then_rerun_gives_every_row_once_as_uninterrupted(tiny_model_dir, corpus, tmp_path):
    n = 8000
    texts = [corpus[i % len(corpus)] for i in range(n)]
    source = write_jsonl(tmp_path / "in.jsonl", texts)
    flags = ["--batch-size", "32", "--sort-window", "100", "--shard-rows", "200"]  # 40 shards
    reference = tmp_path / "reference"
    run_predict(predict_cmd(tiny_model_dir, source, reference, *flags))

    out = tmp_path / "out"
    kill_after = random.Random().randint(1, 30)  # committed shards before the kill: a random point
    proc = subprocess.Popen(predict_cmd(tiny_model_dir, source, out, *flags), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while committed_shards(out) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(random.Random().uniform(0, 0.05))  # land anywhere: mid-window, mid-shard, mid-commit
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill:\n{proc.stderr.read()[-2000:]}"
    proc.stderr.close()
    done = committed_shards(out)
    assert 1 <= done < 40 and not (out / "summary.json").exists()

    run_predict(predict_cmd(tiny_model_dir, source, out, *flags))
    rows = list(read_predictions(out))
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(n)]  # each exactly once, none missing
    assert shard_files(out) == shard_files(reference)  # byte for byte: the same predictions
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predictions"] == n and summary["throughput"]["processes"][0]["runs"] == 2


@pytest.mark.slow
def test_two_processes_on_two_devices_each_equal_one_process(tiny_model_dir, corpus, expected, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", corpus * 3)
    flags = SMALL_FLAGS  # batch 16: 8 rows on each of the 2 devices
    single = tmp_path / "single"
    run_predict(predict_cmd(tiny_model_dir, source, single, *flags), devices=2)

    multi = tmp_path / "multi"
    port = free_port()
    procs = [subprocess.Popen(predict_cmd(tiny_model_dir, source, multi, *flags, "--coordinator",
                                          f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)),
                              cwd=ROOT, env=subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]

    assert shard_files(multi) == shard_files(single)  # merged, exactly the 1-process output
    for process in (0, 1):
        manifest = json.loads((multi / f"manifest-p{process:05d}.json").read_text())
        assert manifest["shards"] and all(s["block"] % 2 == process for s in manifest["shards"])
        assert manifest["runs"][0]["devices"] == 2
    assert_same_predictions(list(read_predictions(multi)), expected * 3)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (single, multi))
    assert a["label_counts"] == b["label_counts"] and b["predictions"] == 3 * len(corpus)
    assert len(b["throughput"]["processes"]) == 2


MEASURE_RSS = """
import resource, sys
from jaxclf.cli import run_command
from jaxclf.cli.predict import main
code = run_command(main, sys.argv[1:])
print("MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(code)
"""


@pytest.mark.slow
def test_streaming_200k_rows_keeps_memory_flat(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    words = "good bad food service slow fast great awful cafe staff price music table".split()

    def peak_rss_mib(rows: int) -> float:
        source = tmp_path / f"in-{rows}.jsonl"
        with open(source, "w") as f:
            for i in range(rows):
                f.write(json.dumps({"id": i, "text": " ".join(rng.choices(words, k=rng.randint(2, 9)))}) + "\n")
        cmd = [sys.executable, "-c", MEASURE_RSS, *predict_cmd(tiny_model_dir, source, tmp_path / f"out-{rows}",
                                                                "--batch-size", "512", "--sort-window", "2048",
                                                                "--shard-rows", "50000")[3:]]
        proc = run_predict(cmd)
        line = next(line for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KIB"))
        assert json.loads((tmp_path / f"out-{rows}" / "summary.json").read_text())["predictions"] == rows
        return int(line.split()[1]) / 1024

    small, large = peak_rss_mib(2_000), peak_rss_mib(200_000)
    print(f"peak RSS: {small:.0f} MiB for 2k rows, {large:.0f} MiB for 200k rows")
    assert large - small < 100, f"peak RSS {large:.0f} MiB for 200k rows vs {small:.0f} MiB for 2k rows"
