"""InferenceEngine: batched = unbatched, no compilation after start-up, cache, queue limits, deadlines."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import threading
import time

import jax
import numpy as np
import pytest

import jaxclf
from hypothesis import given, settings, strategies as st

from jaxclf.serve import compilation
from jaxclf.serve import engine as inference
from jaxclf.config import ConfigError
from jaxclf.serve.cache import ResultCache
from jaxclf.serve.config import EngineConfig
from jaxclf.serve.engine import InferenceEngine
from jaxclf.serve.errors import DeadlineExceeded, EngineClosedError, QueueFullError
from jaxclf.serve.planning import CALL_OVERHEAD_SLOTS, plan_calls
from jaxclf.serve.results import BatchPredictionResult, Prediction, PredictionResult
from jaxclf.tokenizer import bucket_for


@pytest.fixture(scope="module")
def mixed_texts(sample_texts) -> list[str]:
    """From 2 tokens to past the model's 32-token limit (truncated), so batches mix length buckets."""
    return sample_texts[:40] + ["", "ok", "no.", "Ünïcödé naïve café ☕ 🚀", "word " * 60,
                                "a much longer sentence about tacos, blenders and trains " * 3]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, mixed_texts):
    """Unbatched logits: TextClassifier.logits on each text alone."""
    clf = jaxclf.load(tiny_model_dir)
    return {t: clf.logits([t])[0] for t in mixed_texts}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = InferenceEngine(tiny_model_dir, max_batch_size=16, batch_buckets=(1, 4, 16), length_buckets=(16, 32),
                          max_wait_ms=5, cache_size=0)
    yield eng
    eng.close()


def assert_matches(results: list[Prediction], texts: list[str], reference) -> None:
    assert len(results) == len(texts)
    for text, result in zip(texts, results):
        np.testing.assert_allclose(result.logits, reference[text], atol=1e-6, rtol=0, err_msg=text)
        assert result.predicted_class == max(result.probabilities, key=result.probabilities.get)
        assert result.confidence == pytest.approx(max(result.probabilities.values()))
        assert sum(result.probabilities.values()) == pytest.approx(1.0)


def test_buckets_compiled_ahead_of_time(engine):
    assert engine.batch_buckets == (1, 4, 16)
    assert engine.length_buckets == (16, 32)
    assert engine.aot_compilations == 6 and engine.compilations == 6
    assert engine.stray_compilations == 0
    assert len(engine.version) == 12 and engine.version == inference.model_version(engine.model_path)


def test_every_bucket_runs_once_before_the_engine_serves(tiny_model_dir, monkeypatch):
    """A compiled bucket's first run is its slowest (first use of its kernels and buffers): start-up pays it."""
    calls = []

    def counting(*args, **kwargs):
        weights, executables = compilation.compile_buckets(*args, **kwargs)

        def counted(bucket, executable):
            def run(weights, ids, mask):
                calls.append((bucket, ids.shape, mask.shape))
                return executable(weights, ids, mask)
            return run
        return weights, {bucket: counted(bucket, ex) for bucket, ex in executables.items()}

    monkeypatch.setattr(inference, "compile_buckets", counting)
    eng = InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(1, 4), length_buckets=(16, 32))
    try:
        assert sorted(calls) == [((b, t), (b, t), (b, t)) for b in (1, 4) for t in (16, 32)]
        assert eng.stats().batches == 0 and eng.stats().requests == 0  # warming is not traffic
        eng.predict_single("tacos")
        assert len(calls) == 5
    finally:
        eng.close()


def test_batch_equals_unbatched_logits_for_mixed_lengths(mixed_texts, engine, reference):
    texts = list(mixed_texts)
    random.Random(0).shuffle(texts)
    assert_matches(engine.predict_batch(texts).results, texts, reference)  # 46 texts: 16 + 16 + 14
    for size in (1, 3, 4, 5, 16):
        assert_matches(engine.predict_batch(texts[:size]).results, texts[:size], reference)


def test_concurrent_requests_are_batched_and_equal_unbatched(mixed_texts, engine, reference):
    before = engine.stats()
    results: dict[int, Prediction] = {}
    errors = []

    def client(i: int) -> None:
        try:
            for k in range(5):
                n = (i * 5 + k) % len(mixed_texts)
                results[i * 5 + k] = engine.predict_single(mixed_texts[n])
        except Exception as e:  # reported below; a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    order = sorted(results)
    assert_matches([results[j] for j in order], [mixed_texts[j % len(mixed_texts)] for j in order], reference)
    after = engine.stats()
    assert after.batched_texts - before.batched_texts == 120
    assert after.batches - before.batches < 120  # some calls carried several requests


def test_no_compilation_after_ready_under_concurrent_mixed_load(mixed_texts, engine):
    compiled = engine.compilations
    rng = random.Random(1)
    errors = []

    def client(seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(6):
                if r.random() < 0.5:
                    engine.predict_single(r.choice(mixed_texts))
                else:
                    engine.predict_batch(r.sample(mixed_texts, r.randint(1, 20)))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(rng.random(),)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert engine.compilations == compiled and engine.stray_compilations == 0


def test_one_long_text_does_not_pad_a_batch_of_short_ones(tiny_model_dir, sample_texts, reference):
    """15 short texts and one truncated to 32 tokens: two calls, (16, 16) and (1, 32), not one (16, 32)."""
    eng = InferenceEngine(tiny_model_dir, max_batch_size=16, batch_buckets=(1, 4, 16), length_buckets=(16, 32),
                          cache_size=0)
    heads = dict.fromkeys(" ".join(t.split()[:3]) for t in sample_texts)  # first words, unique, in order
    texts = [t for t in heads if len(eng.tokenizer.encode(t).ids) <= 16][:15] + ["word " * 60]
    assert len(texts) == 16
    calls = []
    eng.add_batch_listener(calls.append)
    try:
        clf = jaxclf.load(tiny_model_dir)
        want = {t: clf.logits([t])[0] for t in texts}
        assert_matches(eng.predict_batch(texts).results, texts, want)
    finally:
        eng.close()
    assert sorted((c.size, c.padded_batch, c.padded_length) for c in calls) == [(1, 1, 32), (15, 16, 16)]


def test_engine_applies_the_model_s_head_tail_truncation(tiny_model_dir, sample_texts, tmp_path):
    import json
    import shutil

    d = tmp_path / "head_tail"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["truncation_head"] = 6
    (d / "config.json").write_text(json.dumps(cfg))
    long_text = " ".join(sample_texts[:10])
    clf, plain = jaxclf.load(d), jaxclf.load(tiny_model_dir)
    with InferenceEngine(d, max_batch_size=4, batch_buckets=(1, 4), cache_size=0) as eng:
        results = eng.predict_batch([long_text, "short"]).results
    np.testing.assert_allclose(results[0].logits, clf.logits([long_text])[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(results[1].logits, plain.logits(["short"])[0], atol=1e-6, rtol=0)
    assert not np.allclose(results[0].logits, plain.logits([long_text])[0], atol=1e-4)


def _plan_cost(groups, lengths, batch_buckets, length_buckets) -> int:
    return sum(bucket_for(len(g), batch_buckets) * bucket_for(max(lengths[i] for i in g), length_buckets)
               + CALL_OVERHEAD_SLOTS for g in groups)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 128), min_size=1, max_size=9))
def test_plan_calls_is_a_cheapest_partition_into_length_groups(lengths):
    batch_buckets, length_buckets = (1, 2, 4), (16, 32, 48, 64, 96, 128)
    groups = plan_calls(lengths, batch_buckets, length_buckets)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(1 <= len(g) <= 4 for g in groups)
    # Brute force over every way to cut the length-sorted rows into consecutive groups of <= 4.
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])

    def cheapest(start: int) -> int:
        if start == len(order):
            return 0
        return min(_plan_cost([order[start:end]], lengths, batch_buckets, length_buckets) + cheapest(end)
                   for end in range(start + 1, min(start + 4, len(order)) + 1))

    assert _plan_cost(groups, lengths, batch_buckets, length_buckets) == cheapest(0)


def test_stray_compile_detector_sees_a_compile_during_a_request(engine):
    """The listener that guards the test above does fire when a request path compiles."""
    before = engine.stray_compilations
    with compilation.ServingRequest(engine):
        jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))  # a fresh function: must compile
    jax.jit(lambda x: x * 5 + 2)(np.arange(7.0))  # outside a request: not the engine's business
    assert engine.stray_compilations == before + 1
    engine._stray_compiles.pop()  # leave the shared engine's counter as it was


def test_predict_async(mixed_texts, engine, reference):
    async def main():
        return await asyncio.gather(*(engine.predict_async(t) for t in mixed_texts[:12]))

    assert_matches(list(asyncio.run(main())), mixed_texts[:12], reference)


def test_result_cache_hits_and_misses(mixed_texts, tiny_model_dir, reference):
    with InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(1, 4), length_buckets=(32,),
                         cache_size=2, max_wait_ms=1) as eng:
        a, b, c = mixed_texts[:3]
        first = eng.predict_single(a)
        assert not first.cached and (eng.cache.hits, eng.cache.misses) == (0, 1)
        again = eng.predict_single(a)
        assert again.cached and again.logits == first.logits and (eng.cache.hits, eng.cache.misses) == (1, 1)
        eng.predict_batch([b, c])  # capacity 2: evicts a, the least recently used
        assert not eng.predict_single(a).cached
        assert eng.stats().cache_hits == 1 and eng.stats().cache_misses == 4
        assert_matches([again], [a], reference)


def test_result_cache_is_keyed_by_model_version():
    cache = ResultCache(10)
    p = Prediction("x", 1.0, {"x": 1.0}, (0.0,), "v1")
    cache.put(("v1", "t"), p)
    assert cache.get(("v2", "t")) is None and cache.get(("v1", "t")) is p
    with pytest.raises(ValueError, match="cache_size"):
        ResultCache(-1)


def test_unbatched_mode_gives_the_same_answers(mixed_texts, tiny_model_dir, reference):
    with InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(1, 4), batching=False,
                         cache_size=0) as eng:
        assert_matches([eng.predict_single(t) for t in mixed_texts[:6]], mixed_texts[:6], reference)
        assert_matches(eng.predict_batch(mixed_texts[:9]).results, mixed_texts[:9], reference)
        assert eng.stray_compilations == 0


def test_queue_full_is_immediate_and_expired_requests_are_dropped_unrun(tiny_model_dir):
    # The batcher waits up to 1.5 s to fill a batch of 4, so two requests sit in a queue of two.
    with InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(1, 4), length_buckets=(32,),
                         max_queue_size=2, max_wait_ms=1500, request_timeout_s=0.3, cache_size=0) as eng:
        queued = [eng.submit("first"), eng.submit("second")]
        start = time.perf_counter()
        with pytest.raises(QueueFullError, match="max_queue_size=2"):
            eng.predict_single("third")
        assert time.perf_counter() - start < 0.1
        # Past their 0.3 s deadline when the batcher takes them at 1.5 s: dropped, never run.
        for future in queued:
            with pytest.raises(DeadlineExceeded, match="dropped without running"):
                future.result(timeout=5)
        stats = eng.stats()
        assert stats.batches == 0 and stats.dropped_deadline == 2 and stats.rejected_queue_full == 1


def test_caller_gives_up_at_its_deadline(tiny_model_dir):
    with InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(1, 4), length_buckets=(32,),
                         max_wait_ms=1000, request_timeout_s=0.2, cache_size=0) as eng:
        start = time.perf_counter()
        with pytest.raises(DeadlineExceeded):
            eng.predict_single("nobody will wait a second for this")
        assert 0.15 < time.perf_counter() - start < 0.8
        eng.close()  # flushes the queue: the cancelled request is skipped
        assert eng.stats().batches == 0 and eng.stats().dropped_deadline == 1


def test_close_finishes_queued_work_then_refuses(mixed_texts, tiny_model_dir, reference):
    eng = InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(1, 4), length_buckets=(32,),
                          max_wait_ms=5000, cache_size=0)
    futures = [eng.submit(t) for t in mixed_texts[:3]]
    start = time.perf_counter()
    eng.close()  # does not wait out max_wait_ms
    assert time.perf_counter() - start < 2
    assert_matches([f.result(timeout=0) for f in futures], mixed_texts[:3], reference)
    with pytest.raises(EngineClosedError):
        eng.predict_single("too late")


def test_bad_buckets_fail_fast_with_the_reason(tiny_model_dir):
    with pytest.raises(ValueError, match="largest of batch_buckets must equal max_batch_size=32"):
        InferenceEngine(tiny_model_dir, batch_buckets=(1, 4, 16))
    with pytest.raises(ValueError, match=r"must equal the model's max text length \(max_position_embeddings, or its "
                                         r"tokenizer's truncation\)=32"):
        InferenceEngine(tiny_model_dir, max_batch_size=4, length_buckets=(8, 16))
    with pytest.raises(ValueError, match="strictly increasing"):
        InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(4, 1, 4))


def test_default_length_buckets_stop_at_the_tokenizer_s_truncation(tiny_model_dir, tmp_path):
    """An imported MiniLM has 512 positions but reads 256 tokens: no bucket past what a row can hold."""
    import json
    import shutil

    d = tmp_path / "short_tokenizer"
    shutil.copytree(tiny_model_dir, d)
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["truncation"] = {"direction": "Right", "max_length": 20, "strategy": "LongestFirst", "stride": 0}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with InferenceEngine(d, max_batch_size=4, cache_size=0) as eng:
        assert eng.length_buckets == (20,)  # the model's 32 positions: (32,) before
        result = eng.predict_single("word " * 100)
        assert eng.stray_compilations == 0 and result.predicted_class in eng.labels
    with pytest.raises(ValueError, match="max text length .*=20"):
        InferenceEngine(d, max_batch_size=4, length_buckets=(8, 32))


# --- the original framework's API (README "Inference Service") --------------------------------------

def test_seed_constructor_takes_a_file_inside_the_model_directory_and_a_device(tiny_model_dir, reference):
    """The seed passes "./final-model/model.pt": any path inside a model directory means that directory."""
    with InferenceEngine(model_path=str(tiny_model_dir / "model.pt"), device="cpu", max_batch_size=4,
                         cache_size=1000) as eng:
        assert eng.model_path == tiny_model_dir
        assert eng.device.platform == "cpu"
        assert {device for w in eng._weights for device in w.devices()} == {eng.device}  # the model is there
        result = eng.predict_single("Best tacos in town")
        assert isinstance(result, PredictionResult) and PredictionResult is Prediction
        assert result.processing_time_ms > 0 and not result.cached
        assert eng.predict_single("Best tacos in town").cached
    with InferenceEngine(tiny_model_dir / "config.json", max_batch_size=4) as eng:  # an existing file too
        assert eng.model_path == tiny_model_dir


@pytest.mark.parametrize("device, message", [
    ("tpu", "device 'tpu' is not available to JAX on this machine"),
    ("banana", "device must be one of auto, cpu, gpu, cuda, tpu, got 'banana'"),
])
def test_a_device_jax_does_not_have_is_refused_by_name(tiny_model_dir, device, message):
    if device == "tpu" and any(d.platform == "tpu" for d in jax.devices()):
        pytest.skip("this machine has a TPU")
    with pytest.raises(ConfigError, match=message):
        InferenceEngine(model_path=tiny_model_dir, device=device, max_batch_size=4)


def test_predict_batch_takes_more_texts_than_the_queue_holds(mixed_texts, tiny_model_dir, reference):
    with InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(1, 4), max_queue_size=5,
                         cache_size=0) as eng:
        batch = eng.predict_batch(mixed_texts)  # 46 texts through a queue of 5
        assert isinstance(batch, BatchPredictionResult) and len(batch.results) == len(mixed_texts)
        assert_matches(batch.results, mixed_texts, reference)
        assert batch.model_version == eng.version
        assert batch.processing_time_ms + 1 >= max(r.processing_time_ms for r in batch.results) > 0
        assert eng.stats().rejected_queue_full == 0


def test_module_level_predict_functions(engine, mixed_texts, reference):
    single = inference.predict_single(mixed_texts[0], engine)
    batch = inference.predict_batch(mixed_texts[:5], engine)
    assert_matches([single], mixed_texts[:1], reference)
    assert_matches(batch.results, mixed_texts[:5], reference)
    assert jaxclf.predict_single is inference.predict_single and jaxclf.predict_batch is inference.predict_batch
    assert jaxclf.PredictionResult is PredictionResult and jaxclf.BatchPredictionResult is BatchPredictionResult


def test_health_check_reports_status_buckets_queue_and_stray_compilations(tiny_model_dir):
    eng = InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(1, 4), length_buckets=(16, 32),
                          cache_size=10)
    eng.predict_batch(["tacos", "trains"])
    eng.predict_single("tacos")  # from the cache
    health = eng.health_check()
    json.dumps(health)  # JSON-ready, for a probe endpoint
    assert health["status"] == "ok" and health["problems"] == []
    assert health["model_version"] == eng.version and health["platform"] == "cpu"
    assert sorted(map(tuple, health["compiled_buckets"])) == [(1, 16), (1, 32), (4, 16), (4, 32)]
    assert health["queue_depth"] == 0 and health["stray_compilations"] == 0 and health["aot_compilations"] == 4
    assert health["requests"] == 3 and health["cache_hits"] == 1 and health["batch_workers_alive"] == 2
    with compilation.ServingRequest(eng):  # a request that compiles breaks the serving promise
        jax.jit(lambda x: x * 7 - 1)(np.arange(3.0))
    health = eng.health_check()
    assert health["status"] == "degraded" and health["problems"] == ["1 compilation(s) triggered by requests"]
    eng.close()
    assert eng.health_check()["status"] == "closed"


def test_engine_config_with_keyword_overrides(tiny_model_dir):
    config = EngineConfig(max_batch_size=4, batch_buckets=(1, 4), cache_size=7)
    with InferenceEngine(tiny_model_dir, config, cache_size=3, max_wait_ms=2) as eng:
        assert eng.engine_config == dataclasses.replace(config, cache_size=3, max_wait_ms=2)
        assert eng.cache.capacity == 3 and eng.max_wait_s == 0.002 and eng.max_batch_size == 4
    with pytest.raises(ConfigError, match="unknown EngineConfig setting.* max_batchsize; accepted: device, "):
        InferenceEngine(tiny_model_dir, max_batchsize=4)


def _backend_compiles_during(fn):
    """(fn's result, XLA compiles it ran) with JAX's in-memory caches emptied first."""
    events = []

    def listener(event, duration, **kwargs):
        if event == compilation.BACKEND_COMPILE_EVENT:
            events.append(kwargs.get("fun_name"))

    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return result, len(events)


def test_load_skips_the_random_initialisation_and_gives_the_eagerly_initialised_model(tiny_model_dir):
    # Random init compiles a program per parameter shape, kept resident: ~95 MiB on the benchmark model.
    from flax import nnx
    from jaxclf import model_dir, weights
    from jaxclf.model import create_model

    loaded, loaded_compiles = _backend_compiles_during(lambda: jaxclf.load(tiny_model_dir))
    config, tensors, _, _ = model_dir.read(tiny_model_dir)

    def eager():
        model = create_model(config, seed=0)
        weights.load_torch_state(model, tensors)
        return model

    expected, eager_compiles = _backend_compiles_during(eager)
    assert loaded_compiles <= 4 < eager_compiles
    # Every variable, the dropout RNG keys and counts included, as the eager initialisation leaves it.
    got, want = nnx.state(loaded.model), nnx.state(expected)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    texts = ["a lovely little cafe", "awful"]
    np.testing.assert_array_equal(loaded.logits(texts), jaxclf.TextClassifier(expected, loaded.tokenizer).logits(texts))


def test_large_batches_run_in_row_chunks_with_the_same_logits(tiny_model_dir):
    """On a CPU a batch over ROW_CHUNK_TOKENS tokens runs as a loop over row chunks (its activations stay in cache)."""
    from jaxclf.model import ROW_CHUNK_TOKENS, in_row_chunks, row_chunk_tokens

    assert (row_chunk_tokens("cpu"), row_chunk_tokens("gpu"), row_chunk_tokens("tpu")) == (ROW_CHUNK_TOKENS, None, None)

    clf = jaxclf.load(tiny_model_dir)
    model = clf.model
    model.eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, clf.config.vocab_size, size=(6, 20), dtype=np.int32)
    mask = (np.arange(20)[None, :] < rng.integers(1, 21, size=(6, 1))).astype(np.int32)  # mixed lengths

    def run(max_tokens):
        fn = jax.jit(lambda i, m: in_row_chunks(model, i, m, max_tokens))
        return np.asarray(fn(ids, mask)), str(jax.make_jaxpr(fn)(ids, mask))

    whole, whole_program = run(120)  # 6 x 20 tokens fit: one call, no loop
    assert run(None)[1] == whole_program  # None (GPUs, TPUs: row_chunk_tokens): never a loop
    chunked, chunked_program = run(50)  # the largest divisor of 6 rows with rows x 20 <= 50: 2 rows, 3 chunks
    assert "scan" not in whole_program
    assert "scan" in chunked_program and "i32[3,2,20]" in chunked_program
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)
    np.testing.assert_allclose(whole, np.asarray(model(ids, mask)), atol=1e-6, rtol=0)
