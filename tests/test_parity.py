"""phinano vs Transformers on tiny random checkpoints shaped like every dense Phi model.

Tolerance: |phinano - Transformers| <= 1e-4 * max|logits| (LOGIT_RTOL). Both compute in float32 on the
same weights (bf16 widens to float32 exactly), so the only differences are float32 rounding from a
different order of accumulation (BLAS blocking, softmax and rotary summation): ~1e-6 relative is what we
observe. A real bug is orders of magnitude larger: test_tolerance_catches_bugs shows that a sliding
window one key too wide, or short/long rope factors swapped, move logits far beyond the tolerance.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import phinano  # noqa: E402
from tiny_models import DENSE_SPECS, VOCAB, hf_reference  # noqa: E402

LOGIT_RTOL = 1e-4
VARIANTS = [(name, dtype, shard) for name in DENSE_SPECS for dtype, shard in (("float32", False), ("bfloat16", True))]


def prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, n)


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids)[None])).logits[0].float().numpy()


def hf_greedy(hf, ids, n: int) -> tuple[list[int], float]:
    """Transformers' greedy tokens (no early stop) and the smallest top-1/top-2 logit gap seen, relative to
    that step's largest |logit| (the scale the tolerance is stated in)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor(np.asarray(ids)[None]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    gaps = [float(np.diff(np.sort(s[0].numpy())[-2:])[0] / np.abs(s[0].numpy()).max()) for s in out.logits]
    return out.sequences[0, len(ids):].tolist(), min(gaps)


def layer_report(model, hf, ids) -> str:
    """[OK]/[DIFF] per layer, so a parity failure points at the first layer that differs."""
    ours: list = []
    model.forward(ids, observer={"residual": lambda layer, x: ours.append(x)})
    with torch.no_grad():
        theirs = hf(torch.tensor(np.asarray(ids)[None]), output_hidden_states=True).hidden_states
    lines = []
    for i, (a, b) in enumerate(zip(ours, theirs)):  # Transformers' last entry is after the final norm
        b = b[0].numpy()
        diff = np.abs(a - b).max()
        ok = diff <= LOGIT_RTOL * max(1.0, np.abs(b).max())
        lines.append(f"{'[OK]  ' if ok else '[DIFF]'} {'embedding' if i == 0 else f'layer {i - 1}'}: max |diff| {diff:.2e}")
    return "\n".join(lines)


@pytest.mark.parametrize("name,dtype,shard", VARIANTS)
def test_logits_match_transformers(checkpoint_dir, name, dtype, shard):
    folder = checkpoint_dir(name, dtype, shard)
    hf = hf_reference(folder)
    model = phinano.load(folder, backend="numpy")
    ids = prompt(100)  # crosses the sliding window (24/30) and the longrope original length (48)
    ref, out = hf_logits(hf, ids), model.forward(ids)
    assert out.dtype == np.float32 and out.shape == (100, VOCAB)
    diff = np.abs(out - ref).max()
    print(f"{name} {dtype}: max |diff| {diff:.2e}, max |logit| {np.abs(ref).max():.1f}")
    assert diff <= LOGIT_RTOL * np.abs(ref).max(), layer_report(model, hf, ids)


@pytest.mark.parametrize("name,dtype,shard", VARIANTS)
@pytest.mark.parametrize("prompt_len", [30, 60])
def test_greedy_64_tokens_match_transformers(checkpoint_dir, name, dtype, shard, prompt_len):
    """30-token prompts cross the sliding window and longrope's original length (48) while generating;
    60-token prompts start past it (long factors from the prefill on)."""
    folder = checkpoint_dir(name, dtype, shard)
    hf = hf_reference(folder)
    # No in-tolerance difference may be able to flip an argmax: take the first of a few fixed prompts whose
    # every greedy step has a top-1/top-2 gap above twice the logit tolerance.
    for seed in range(prompt_len, prompt_len + 6):
        ids = prompt(prompt_len, seed=seed)
        expected, gap = hf_greedy(hf, ids, 64)
        if gap > 2 * LOGIT_RTOL and len(set(expected)) > 8:  # and not stuck repeating a token
            break
    else:
        pytest.fail("every prompt hits a near-tie or a repeat; widen the tiny model's init")
    for backend in ("numpy", "numba"):
        model = phinano.load(folder, backend=backend)
        assert model.generate(ids, 64, stop_token_ids=[]) == expected, backend


@pytest.mark.parametrize("name", ["mini-4k", "mini-128k"])
def test_cached_decoding_equals_full_recompute(checkpoint_dir, name):
    """Each cached greedy step picks the argmax of a from-scratch forward over the whole sequence, also
    across the longrope switch (where generation drops the cache and recomputes)."""
    model = phinano.load(checkpoint_dir(name), backend="numpy")
    ids = list(prompt(40, seed=3))
    new = model.generate(ids, 24, stop_token_ids=[])
    for i, token in enumerate(new):
        assert int(np.argmax(model.forward(ids + new[:i])[-1])) == token


def test_cached_step_logits_equal_forward(checkpoint_dir):
    model = phinano.load(checkpoint_dir("medium"), backend="numpy")
    ids = prompt(50, seed=4)
    cache = model.new_cache(50)
    steps = [model.step(cache, ids[:20])] + [model.step(cache, ids[i : i + 1], last_only=True) for i in range(20, 50)]
    full = model.forward(ids)
    np.testing.assert_allclose(np.concatenate(steps), full, atol=LOGIT_RTOL * np.abs(full).max())


def test_tolerance_catches_bugs(checkpoint_dir):
    """The tolerance is tight enough to see the classic Phi-3 mistakes."""
    ids = prompt(100)
    for name, bug in [("mini-4k", dict(sliding_window=25)),  # W+1 keys instead of W (docs/pitfalls.md#sliding-window)
                      ("mini-128k", "swap")]:  # long factors where short belong (docs/pitfalls.md#longrope-by-length)
        folder = checkpoint_dir(name)
        ref = hf_logits(hf_reference(folder), ids[:40])
        model = phinano.load(folder, backend="numpy")
        cfg = model.config
        if bug == "swap":
            bug = dict(rope_short_factor=cfg.rope_long_factor)
        model.config = dataclasses.replace(cfg, **bug)
        assert np.abs(model.forward(ids[:40]) - ref).max() > 100 * LOGIT_RTOL * np.abs(ref).max()
        report = layer_report(model, hf_reference(folder), ids[:40])
        assert report.splitlines()[0].startswith("[OK]") and "[DIFF] layer 0" in report, report


def test_backends_agree_on_logits(checkpoint_dir):
    folder = checkpoint_dir("4-mini", "bfloat16", True)
    ids = prompt(70)
    a = phinano.load(folder, backend="numpy").forward(ids)
    b = phinano.load(folder, backend="numba").forward(ids)
    assert np.abs(a - b).max() <= LOGIT_RTOL * np.abs(a).max()
