"""Prompt-lookup speculation returns exactly the plain loop's tokens: greedy, seeded sampling, repetition
penalty and stop ids, across the sliding window and the longrope switch, on tiny checkpoints and nano-phi3.
The drafts are Transformers' PromptLookupCandidateGenerator's."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import phinano  # noqa: E402
from phinano.errors import PhinanoError  # noqa: E402
from phinano import generate as generate_module  # noqa: E402
from phinano.generate import Sequence, generate_tokens  # noqa: E402
from phinano.nano import nano_path  # noqa: E402
from phinano.rope import rope_variant  # noqa: E402
from phinano.sampling import OptionError  # noqa: E402
from phinano.speculate import prompt_lookup  # noqa: E402
from tiny_models import VOCAB  # noqa: E402


def repetitive_prompt(seed: int, n: int = 12) -> list[int]:
    """A phrase, a few other tokens, the phrase again: what input-grounded prompts look like to the lookup."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(3, VOCAB, n).tolist()
    return phrase + rng.integers(3, VOCAB, 6).tolist() + phrase


# ------------------------------------------------------------------ the drafts
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 6), st.sets(st.integers(0, 5), max_size=2))
def test_drafts_are_transformers_prompt_lookup(tokens, k, stops):
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    finder = PromptLookupCandidateGenerator(eos_token_id=torch.tensor(sorted(stops)) if stops else None,
                                            num_output_tokens=k, max_matching_ngram_size=2, max_length=1000)
    candidates, _ = finder.get_candidates(torch.tensor([tokens]))
    assert prompt_lookup(tokens, k, stops) == candidates[0, len(tokens):].tolist()


def test_draft_examples():
    assert prompt_lookup([1, 2, 3, 4, 1, 2], 2) == [3, 4]  # bigram (1, 2) found at the start
    assert prompt_lookup([5, 2, 7, 9, 2], 3) == [7, 9, 2]  # no earlier bigram (9, 2): unigram 2
    assert prompt_lookup([1, 2, 3, 1, 2], 5, stops={3}) == []  # cut before a stop id
    assert prompt_lookup([1, 2, 3], 4) == [] and prompt_lookup([1, 2, 1, 2], 0) == []


# ------------------------------------------------------------------ equal to the plain loop
def spec_and_plain(model, ids, new, **options) -> tuple[list[int], list[int], dict]:
    stats: dict = {}
    spec = list(generate_tokens(model, ids, new, stats=stats, **options))
    options.pop("prompt_lookup_num_tokens")
    return spec, list(generate_tokens(model, ids, new, **options)), stats


@pytest.mark.parametrize("name,backend", [("mini-4k", "numpy"), ("mini-128k", "numpy"), ("mini-128k", "numba")])
def test_speculation_gives_the_plain_loops_tokens(checkpoint_dir, name, backend):
    """mini-4k: 30 + 40 tokens run far past the 24-key window; mini-128k: they cross the original length 48."""
    model = phinano.load(checkpoint_dir(name), backend=backend)
    accepted = rejected = 0
    ids = repetitive_prompt(0)
    greedy = model.generate(ids, 40, stop_token_ids=[])
    for options in [dict(prompt_lookup_num_tokens=1), dict(prompt_lookup_num_tokens=6),
                    dict(prompt_lookup_num_tokens=4, temperature=0.9, top_k=20, seed=0),
                    dict(prompt_lookup_num_tokens=4, temperature=1.1, top_p=0.9, sampler_order="llama.cpp",
                         seed=0),
                    dict(prompt_lookup_num_tokens=3, repetition_penalty=1.3),
                    dict(prompt_lookup_num_tokens=5, stop_token_ids=greedy[25:26])]:
        options.setdefault("stop_token_ids", [])
        spec, plain, stats = spec_and_plain(model, ids, 40, **options)
        assert spec == plain, options
        accepted += stats["accepted"]
        rejected += stats["drafted"] - stats["accepted"]
    assert accepted and rejected, "drafts must be both kept and rolled back for the test to mean anything"


def first_token_recurs(model, n: int, at: int) -> list[int]:
    """A random prompt of n tokens whose greedy first new token is also its token `at`: the lookup after the
    prefill then drafts what followed position `at`."""
    for seed in range(100):
        ids = np.random.default_rng(seed).integers(3, VOCAB, n).tolist()
        ids[at] = model.generate(ids, 1, stop_token_ids=[])[0]
        if model.generate(ids, 1, stop_token_ids=[])[0] == ids[at]:
            return ids
    raise AssertionError("no such prompt")


def test_no_verify_step_straddles_the_longrope_switch(checkpoint_dir, monkeypatch):
    """A draft is cut where the rotary factor set would change: a step that appends to the cache never holds
    positions on both sides of the original length (the plain loop rotates each with its own set); the switch
    itself is the plain loop's: the whole sequence again, with the long factors, from position 0."""
    model = phinano.load(checkpoint_dir("mini-128k"), backend="numpy")
    ids = first_token_recurs(model, 44, at=10)  # the first lookup drafts 8 tokens from position 45: past 48
    cfg, steps = model.config, []
    original = model.step

    def step(cache, ids=None, **kwargs):
        steps.append((cache.length, len(ids)))
        return original(cache, ids, **kwargs)

    proposed = []  # (length of the sequence, draft as proposed: the loop cuts it in place) of every lookup
    lookup = generate_module.prompt_lookup

    def recorded_lookup(seen, *args):
        draft = lookup(seen, *args)
        proposed.append((len(seen), list(draft)))
        return draft

    monkeypatch.setattr(generate_module, "prompt_lookup", recorded_lookup)
    monkeypatch.setattr(model, "step", step)
    stats: dict = {}
    spec = list(generate_tokens(model, ids, 30, stop_token_ids=[], prompt_lookup_num_tokens=8, stats=stats))
    assert any(rope_variant(cfg, n) != rope_variant(cfg, n + len(draft)) for n, draft in proposed), \
        "some draft must reach across the switch, for its cut to be tested"
    for start, T in steps[1:]:
        assert start == 0 or rope_variant(cfg, start + 1) == rope_variant(cfg, start + T), steps
    assert sum(start == 0 for start, _ in steps) == 2, "the prefill and one recompute at the switch"
    monkeypatch.undo()
    assert spec == model.generate(ids, 30, stop_token_ids=[])


def test_a_multi_token_step_gives_the_single_steps_logits(checkpoint_dir):
    """Greedy equality rests on this: verifying k drafts in one step of k+1 positions gives the logits of k+1
    single steps, up to float32 rounding of a different summation order (both backends). The tiny models'
    top-1/top-2 gaps are far above it (test_parity.py); docs/speculation.md says what a near-tie would do."""
    for backend in ("numpy", "numba"):
        model = phinano.load(checkpoint_dir("medium"), backend=backend)
        ids = repetitive_prompt(4)
        one, many = Sequence(model, 60), Sequence(model, 60)
        one.feed(ids[:20])
        many.feed(ids[:20])
        singles = np.stack([one.feed([t]) for t in ids[20:28]])  # (8, V)
        together = many.feed_rows(ids[20:28], 8)  # (8, V)
        np.testing.assert_allclose(together, singles, atol=1e-5 * np.abs(singles).max())
        many.truncate(22)  # roll back 6 positions, then go on: as if they had never been fed
        np.testing.assert_allclose(many.feed([ids[22]]), singles[2], atol=1e-5 * np.abs(singles).max())


def test_a_short_step_of_a_bf16_model_is_bit_for_bit_the_single_steps(checkpoint_dir):
    """Numba backend, bf16 weights: the linears sum each position as it would be alone (vector.py, tiles of
    tokens), and decode attention cuts the keys at fixed positions (fast._attention_parts), so a step of T
    positions gives exactly the logits of T single steps, while T stays below the AMX and BLAS switches and
    T x (query heads per KV head) below ATTENTION_BLAS_MIN_ROWS. A draft that short then returns greedy's
    tokens exactly, near-ties included (docs/speculation.md)."""
    from phinano.kernels import fast

    model = phinano.load(checkpoint_dir("medium", "bfloat16"), backend="numba")
    cfg = model.config
    T = min(4, (fast.ATTENTION_BLAS_MIN_ROWS - 1) // (cfg.num_attention_heads // cfg.num_key_value_heads))
    assert T >= 2
    ids = repetitive_prompt(4)
    one, many = Sequence(model, 60), Sequence(model, 60)
    one.feed(ids[:20])
    many.feed(ids[:20])
    singles = np.stack([one.feed([t]) for t in ids[20 : 20 + T]])  # (T, V)
    together = many.feed_rows(ids[20 : 20 + T], T)  # (T, V)
    assert np.array_equal(together, singles)


def test_nano_phi3_on_an_input_grounded_prompt():
    """A code file, then its first lines again: the continuation copies the file in part, many drafts are kept, and
    the tokens are plain greedy's (64 new tokens, 8-token drafts). (scripts/bench_speculation.py measures the
rates; docs/benchmarks.md quotes them.)"""
    folder = nano_path("nano-phi3")
    if folder is None:
        pytest.skip("nano-phi3 is not built; run scripts/train_nano.py")
    source = Path(sysconfig.get_paths()["stdlib"]) / "heapq.py"
    if not source.is_file():
        pytest.skip("heapq.py not in this Python's stdlib")
    model = phinano.load(str(folder))
    code = model.tokenizer.encode(source.read_text())[:300]
    ids = code + code[:40]
    spec, plain, stats = spec_and_plain(model, ids, 64, stop_token_ids=[], prompt_lookup_num_tokens=8)
    assert spec == plain
    assert stats["accepted"] >= 20, stats  # 39 of 131 drafted when written


def test_verify_cost_benchmark(checkpoint_dir, monkeypatch, capsys):
    """scripts/bench_speculation.py --verify-cost: one row per step size (K + 1 positions), the 1-position step
    as the unit, and the cache rolled back between steps (each step sees the same 64-token prompt)."""
    import runpy
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_speculation.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--model", str(checkpoint_dir("mini-4k")), "--verify-cost",
                                      "--k", "2", "4", "--runs", "1"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [line.split("|")[1:4] for line in capsys.readouterr().out.splitlines() if line[:3] in ("| 1", "| 3", "| 5")]
    assert [r[0].strip() for r in rows] == ["1", "3", "5"]
    assert rows[0][2].strip() == "1.00" and all(float(r[1]) > 0 for r in rows)

    monkeypatch.setattr(sys, "argv", [str(script), "--verify-cost", "--k", "0"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 2 and "every --k must be at least 1" in capsys.readouterr().err

    # --context: every step runs after that many cached positions (random keys and values), within the context
    from phinano.model import Model

    model_dir = str(checkpoint_dir("mini-4k"))
    context = phinano.load(model_dir, backend="numpy").config.max_position_embeddings - 3
    lengths = []  # the cache's length as each step starts
    step = Model.step
    monkeypatch.setattr(Model, "step", lambda self, cache, *a, **kw: (lengths.append(cache.length),
                                                                        step(self, cache, *a, **kw))[1])
    monkeypatch.setattr(sys, "argv", [str(script), "--model", model_dir, "--verify-cost", "--k", "2",
                                      "--runs", "1", "--context", str(context)])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert f"after {context} cached positions" in out and "| 3 |" in out
    assert lengths == [context] * 4  # 1 and 3 positions, a warm-up turn and a counted one
    for argv, error in (
        (["--model", model_dir, "--verify-cost", "--k", "3", "--context", str(context)], f"need {context + 4} positions"),
        (["--context", "8"], "goes with --verify-cost"),
        # steps from 45 to 48 positions would cross mini-128k's original length (48): its rope factors change there
        (["--model", str(checkpoint_dir("mini-128k")), "--verify-cost", "--k", "3", "--context", "45"],
         "original length (48)"),
    ):
        monkeypatch.setattr(sys, "argv", [str(script), *argv])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
        assert exit_info.value.code == 2 and error in capsys.readouterr().err


def test_options_are_checked(checkpoint_dir):
    model = phinano.load(checkpoint_dir("mini-4k"), backend="numpy")
    with pytest.raises(OptionError, match="prompt_lookup_num_tokens must be >= 0"):
        model.generate([5, 6, 7], 4, prompt_lookup_num_tokens=-1)
    assert model.generate([5, 6, 7], 4, prompt_lookup_num_tokens=0) == model.generate([5, 6, 7], 4)
    cache = model.new_cache(8)
    model.step(cache, [5, 6, 7])
    with pytest.raises(PhinanoError, match="cannot truncate a cache of 3 positions to 4"):
        cache.truncate(4)
    cache.truncate(0)
    assert cache.length == 0 and cache.variant is None
