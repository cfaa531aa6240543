"""Batched decoding (`Model.step_batch`, `linear_rows`, the serve engine's scheduler) never changes a token.

- Kernels: each row of `linear_rows` is bit for bit (np.array_equal) the same row through `linear` alone, for
  bf16, float16, float32 and every quantized type, on both backends; the 4 x 4 tiles of `linear` are not
  (which is why the batch path needs its own op).
- Model: each row of `step_batch` equals `step` on that sequence alone, at different positions, across the
  sliding window, with per-sequence longrope factors, grouped-query attention, partial rotary and PhiMoE.
- Engine: concurrent jobs decode together and each gets exactly the tokens it gets alone (greedy, seeded
  sampling with mixed settings, stop strings and logprobs); a job cancelled mid-stream stops alone.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import phinano  # noqa: E402
from phinano.generate import stream_text  # noqa: E402
from phinano.kernels import fast, reference  # noqa: E402
from phinano.kernels.quantized import KERNELS  # noqa: E402
from phinano.formats.gguf_write import encode_tensor  # noqa: E402
from phinano.formats.quantized import QuantizedTensor  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stored(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 weights as a checkpoint stores them: bf16 bits (uint16), float16 or float32."""
    if dtype == "bf16":
        return (w.view(np.uint32) >> 16).astype(np.uint16)
    return w.astype(np.float16 if dtype == "f16" else np.float32)


def assert_rows_as_alone(ops, x, w, b=None) -> None:
    y = ops.linear_rows(x, w, b)
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == np.float32
    for t in range(x.shape[0]):
        assert np.array_equal(y[t], ops.linear(x[t : t + 1], w, b)[0], equal_nan=True), f"row {t} of {len(x)}"


# ------------------------------------------------------------------ kernels
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["bf16", "f16", "f32"]), B=st.integers(1, 9),
       N=st.integers(1, 70), K=st.integers(1, 300), bias=st.booleans())
def test_linear_rows_equals_each_row_alone(seed, dtype, B, N, K, bias):
    rng = np.random.default_rng(seed)
    w = stored(rng.standard_normal((N, K)).astype(np.float32), dtype)
    x = rng.standard_normal((B, K)).astype(np.float32)
    b = stored(rng.standard_normal(N).astype(np.float32), dtype) if bias else None
    for ops in (fast, reference):
        assert_rows_as_alone(ops, x, w, b)


@pytest.mark.parametrize("qtype", sorted(KERNELS))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), B=st.integers(2, 40), N=st.integers(1, 21))
def test_linear_rows_equals_each_row_alone_on_quantized_weights(qtype, seed, B, N):
    """B up to 40 passes every type's BLAS threshold: linear_rows must not take that path."""
    rng = np.random.default_rng(seed)
    w = QuantizedTensor(qtype, (N, 256), encode_tensor(rng.standard_normal((N, 256)).astype(np.float32), qtype))
    x = rng.standard_normal((B, 256)).astype(np.float32)
    assert_rows_as_alone(fast, x, w)
    assert_rows_as_alone(reference, x[:3], w)


def test_linear_of_several_tokens_rounds_differently_which_is_why_rows_exist():
    """The reason for linear_rows. The bf16 decode kernel sums each token alone whatever the count
    (vector.py, "bf16 pairs"), so a few bf16 tokens through `linear` already equal each token alone; but from
    the BLAS (or AMX) threshold on `linear` takes tiles, and float16 / float32 weights use 4 x 4 tiles even
    for a few tokens: those sum in another order. linear_rows never does. The test pins both."""
    rng = np.random.default_rng(0)
    bf16 = stored(rng.standard_normal((64, 3072)).astype(np.float32), "bf16")
    f16 = rng.standard_normal((64, 3072)).astype(np.float16)
    for w, T, linear_is_alone in ((bf16, 4, True), (bf16, fast.BLAS_MIN_TOKENS, False), (f16, 4, False)):
        x = rng.standard_normal((T, 3072)).astype(np.float32)
        alone = np.concatenate([fast.linear(x[t : t + 1], w) for t in range(T)])
        assert np.array_equal(fast.linear(x, w), alone) == linear_is_alone, (w.dtype, T)
        assert np.array_equal(fast.linear_rows(x, w), alone)


def test_linear_rows_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="linear_rows"):
        fast.linear_rows(np.zeros((2, 5), np.float32), np.zeros((3, 4), np.float32))


# ------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """make(name, dtype) -> a tiny checkpoint folder with a tokenizer, each made once."""
    from tiny_models import add_tiny_tokenizer, make_phi3

    root, made = tmp_path_factory.mktemp("batching"), {}

    def make(name: str, dtype: str = "bfloat16"):
        if (name, dtype) not in made:
            if name == "moe":
                from test_moe import make_phimoe

                folder = make_phimoe(root / f"moe-{dtype}", dtype)
            else:
                folder = make_phi3(root / f"{name}-{dtype}", name, dtype)
            add_tiny_tokenizer(folder)
            made[name, dtype] = folder
        return made[name, dtype]

    return make


def prefilled(model, lengths: list[int], seed: int = 0) -> list:
    """One cache per length, each holding that many random tokens' keys (prefilled alone)."""
    rng = np.random.default_rng(seed)
    caches = []
    for n in lengths:
        cache = model.new_cache(n + 8)
        model.step(cache, rng.integers(3, model.config.vocab_size, n).tolist())
        caches.append(cache)
    return caches


@pytest.mark.parametrize("name", ["mini-4k", "medium", "4-mini", "mini-128k", "moe"])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_step_batch_rows_equal_each_sequence_alone(checkpoints, name, backend):
    """Positions 3 .. 60 straddle the sliding window (24, 30) and the longrope switch (48): in one batch some
    sequences rotate with the short factors and others with the long ones."""
    model = phinano.load(checkpoints(name), backend=backend)
    lengths = [3, 30, 50, 60] if name in ("4-mini", "mini-128k") else [3, 20, 31, 40]
    ids = [5, 17, 99, 5]
    alone = prefilled(model, lengths)
    together = prefilled(model, lengths)
    for _ in range(3):  # a few steps, each token fed back
        expected = np.stack([model.step(c, [t], last_only=True)[0] for c, t in zip(alone, ids)])
        got = model.step_batch(together, ids)
        assert np.array_equal(got, expected)
        assert [c.length for c in together] == [c.length for c in alone]
        for a, b in zip(alone, together):
            assert np.array_equal(a.k[:, : a.length], b.k[:, : b.length]) and a.variant == b.variant
        ids = [int(i) for i in got.argmax(axis=1)]


def test_step_batch_refuses_a_mismatch_and_a_full_cache(checkpoints):
    model = phinano.load(checkpoints("mini-4k"))
    with pytest.raises(phinano.PhinanoError, match="one token per cache"):
        model.step_batch([model.new_cache(4)], [1, 2])
    full = model.new_cache(1)
    model.step(full, [1])
    with pytest.raises(phinano.PhinanoError, match="holds 1 positions"):
        model.step_batch([model.new_cache(4), full], [1, 2])


# ------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def served(checkpoints):
    """(model, engine factory): engines made by the factory are closed at the end."""
    from phinano.serve.engine import Engine

    model = phinano.load(checkpoints("mini-4k"), threads=1)
    engines = []

    def engine(**args) -> Engine:
        engines.append(Engine(model, "tiny", **args))
        engines[-1].ready.wait(120)
        return engines[-1]

    yield model, engine
    for e in engines:
        e.close()


def batch_sizes(monkeypatch, model) -> list[int]:
    """The number of sequences in every step_batch call from now on."""
    sizes, real = [], model.step_batch
    monkeypatch.setattr(model, "step_batch", lambda caches, ids: sizes.append(len(caches)) or real(caches, ids))
    return sizes


def job(model, prompt: str, max_new: int, stop_strings=(), top_logprobs=None, **sampling):
    from phinano.serve.engine import Job

    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return Job(ids, max_new, dict(sampling), list(stop_strings), top_logprobs)


def run(engine, jobs, cancel_first_after: int | None = None) -> list:
    """Submit every job at once and wait for their ends; with cancel_first_after, the first job is cancelled
    after that many pieces (its entry is then the pieces it got)."""
    async def main():
        for j in jobs:
            engine.submit(j)

        async def cut(j):
            got = []
            async for event in j.stream():
                got.append(event)
                if len(got) == cancel_first_after:
                    j.cancel()
                    return got

        first = cut(jobs[0]) if cancel_first_after else jobs[0].result()
        return await asyncio.wait_for(asyncio.gather(first, *(j.result() for j in jobs[1:])), 120)

    return asyncio.run(main())


PROMPTS = ["hello there", "write a short poem about the sea.", "why is the sky blue?", "the quick brown fox"]


def test_concurrent_greedy_jobs_get_exactly_their_tokens_alone(served, monkeypatch):
    model, engine = served
    e = engine()
    sizes = batch_sizes(monkeypatch, model)
    ends = run(e, [job(model, p, 40 + 10 * i, stop_token_ids=[]) for i, p in enumerate(PROMPTS)])
    assert max(sizes) == 4  # they did decode together
    for i, (p, end) in enumerate(zip(PROMPTS, ends)):
        alone = model.generate(job(model, p, 1).ids, 40 + 10 * i, stop_token_ids=[])
        assert end.tokens == alone and end.stats["new_tokens"] == len(alone)
        assert end.text == model.tokenizer.decode(alone, skip_special_tokens=True)
        assert end.stats["finish_reason"] == "length"


def test_mixed_sampling_settings_stops_and_logprobs_each_as_alone(served, monkeypatch):
    model, engine = served
    e = engine()
    sizes = batch_sizes(monkeypatch, model)
    settings_ = [dict(temperature=0.9, seed=1, top_k=20), dict(temperature=0.7, top_p=0.8, seed=2,
                 repetition_penalty=1.3), dict(temperature=0.0), dict(temperature=1.2, min_p=0.05, seed=3)]
    stops = [(), ("e",), (), ("the", "a ")]
    jobs = [job(model, p, 60, s, top_logprobs=2 if i == 2 else None, **o)
            for i, (p, o, s) in enumerate(zip(PROMPTS, settings_, stops))]
    ends = run(e, jobs)
    assert max(sizes) >= 3
    for j, end, o, s in zip(jobs, ends, settings_, stops):
        stats: dict = {}
        text = "".join(stream_text(model, j.ids, 60, stop_strings=s, stats=stats, **o))
        assert end.text == text and end.stats["finish_reason"] == stats["finish_reason"]
        assert end.stats["new_tokens"] == stats["new_tokens"]
    logprobs = ends[2].logprobs
    assert len(logprobs) == len([t for t in ends[2].tokens if t not in model.stop_token_ids])
    assert all(len(lp.top) == 2 and lp.top[0][2] >= lp.logprob - 1e-6 for lp in logprobs)


def test_a_cancelled_job_stops_alone_and_the_others_finish_as_alone(served, monkeypatch, caplog):
    model, engine = served
    e = engine()
    sizes = batch_sizes(monkeypatch, model)
    jobs = [job(model, p, 200 if i == 0 else 50, stop_token_ids=[]) for i, p in enumerate(PROMPTS)]
    with caplog.at_level(logging.INFO, logger="phinano.serve"):
        cut, *ends = run(e, jobs, cancel_first_after=3)
        for _ in range(200):  # the worker logs the stop at its next turn
            if "stopped a generation after" in caplog.text:
                break
            asyncio.run(asyncio.sleep(0.05))
    assert len(cut) == 3 and max(sizes) == 4
    assert int(caplog.text.split("stopped a generation after")[1].split()[0]) < 200
    for j, end in zip(jobs[1:], ends):
        assert end.tokens == model.generate(j.ids, 50, stop_token_ids=[])


def test_jobs_beyond_max_batch_wait_in_the_queue_and_a_cancelled_one_is_skipped(served, monkeypatch, caplog):
    model, engine = served
    e = engine(max_batch=2)
    sizes = batch_sizes(monkeypatch, model)
    jobs = [job(model, p, 30, stop_token_ids=[]) for p in PROMPTS]
    jobs[3].cancel()  # its client went away while it waited
    with caplog.at_level(logging.INFO, logger="phinano.serve"):
        async def main():
            for j in jobs:
                e.submit(j)
            return await asyncio.wait_for(asyncio.gather(*(j.result() for j in jobs[:3])), 120)

        ends = asyncio.run(main())
    assert max(sizes) == 2 and "skipped a queued request" in caplog.text
    for j, end in zip(jobs, ends):
        assert end.tokens == model.generate(j.ids, 30, stop_token_ids=[])


def test_a_job_crossing_the_longrope_switch_recomputes_alone_inside_the_batch(checkpoints, monkeypatch):
    """mini-128k switches to the long factors at 48 positions: each job passes it at its own step."""
    from phinano.serve.engine import Engine

    model = phinano.load(checkpoints("mini-128k"), threads=1)
    e = Engine(model, "tiny")
    try:
        e.ready.wait(120)
        sizes = batch_sizes(monkeypatch, model)
        jobs = [job(model, p, 40, stop_token_ids=[]) for p in PROMPTS]
        assert all(len(j.ids) < 48 < len(j.ids) + 40 for j in jobs)
        ends = run(e, jobs)
        assert max(sizes) == 4
        for j, end in zip(jobs, ends):
            assert end.tokens == model.generate(j.ids, 40, stop_token_ids=[])
    finally:
        e.close()
