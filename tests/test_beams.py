"""Beam search equals Transformers' generate(num_beams=B) token for token: with and without stop ids, every
early_stopping mode, length penalties of both signs, across the sliding window and the longrope switch
(dense: Transformers recomputes the cache itself; PhiMoE: its rotary patched to pass the length, as in
test_moe.py), on tiny checkpoints and the shipped nano-phi3."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import phinano  # noqa: E402
from phinano import PhinanoError  # noqa: E402
from phinano.beams import beam_search  # noqa: E402
from phinano.nano import nano_path  # noqa: E402
from test_moe import clear_prompt, transformers_with_long_factors  # noqa: E402
from test_moe import moe_checkpoint  # noqa: E402,F401  (the fixture)
from tiny_models import VOCAB, hf_reference  # noqa: E402

NEW = 30
# (num_beams, length_penalty, early_stopping, which greedy tokens become stop ids: a slice of the greedy path,
# so that hypotheses really finish early; None = no stop ids)
SETTINGS = [(2, 1.0, False, None), (4, 1.0, False, None), (3, 1.0, False, slice(5, 6)),
            (3, 0.5, True, slice(5, 7)), (4, 2.0, "never", slice(3, 4)), (4, -1.0, False, slice(4, 5)),
            (3, 0.0, "never", slice(8, 9))]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Transformers' beam steps are tiny: with several threads on a shared machine they spend most of their
    time waiting for each other (10 s instead of 0.5 s per generation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


def hf_beams(hf, ids, new, B, length_penalty, early_stopping, eos) -> list[int]:
    """Transformers' best hypothesis, without the prompt and the padding after a finished one."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=new, num_beams=B, do_sample=False,
                          length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos or None,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_same(mine: list[int], theirs: list[int], what: str) -> None:
    assert mine == theirs[: len(mine)] and all(t == 0 for t in theirs[len(mine):]), f"{what}\n{mine}\n{theirs}"


@pytest.mark.parametrize("name,prompt_len", [("mini-4k", 20), ("mini-128k", 30), ("medium", 20)])
def test_beam_search_equals_transformers(checkpoint_dir, name, prompt_len):
    """mini-4k / medium: 20 + 30 tokens cross the 24 / 30-key window; mini-128k: 30 + 30 cross the original
    length 48, where every beam's cache is recomputed with the long factors."""
    folder = checkpoint_dir(name)
    hf = hf_reference(folder)
    model = phinano.load(folder, backend="numpy")
    differs_from_greedy = ended_early = 0
    ids = prompt(prompt_len, 0)
    greedy = model.generate(ids, NEW, stop_token_ids=[])
    for B, penalty, early, eos_slice in SETTINGS:
        eos = greedy[eos_slice] if eos_slice else []
        theirs = hf_beams(hf, ids, NEW, B, penalty, early, eos)
        mine = model.generate(ids, NEW, num_beams=B, length_penalty=penalty, early_stopping=early,
                              stop_token_ids=eos)
        assert_same(mine, theirs, f"{name} B={B} lp={penalty} early={early} eos={eos}")
        differs_from_greedy += mine != greedy[: len(mine)]
        ended_early += len(mine) < NEW
    assert differs_from_greedy and ended_early, "the settings must exercise beams that beat greedy and stop ids"


def test_beam_search_with_the_model_stop_list(checkpoint_dir):
    """stop_token_ids None: the model's own list (generation_config.json), as Transformers uses it."""
    folder = checkpoint_dir("mini-4k")
    hf, model = hf_reference(folder), phinano.load(folder, backend="numpy")
    ids = prompt(20, 5)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, num_beams=3, do_sample=False,
                             pad_token_id=0)[0, 20:].tolist()
    assert_same(model.generate(ids, 12, num_beams=3), theirs, "model stop list")


def test_moe_beams_across_the_longrope_switch(moe_checkpoint):
    """PhiMoE: Transformers 5.23 keeps the short factors past the original length; patched to pass the length
    (the released model's behaviour, docs/moe.md), its beams equal ours across the switch (30 + 30 > 48)."""
    folder = moe_checkpoint()
    hf, model = hf_reference(folder), phinano.load(folder, backend="numpy")
    ids = [int(t) for t in clear_prompt(model, 30)]
    with transformers_with_long_factors():
        for B, penalty, early in [(3, 1.0, False), (2, 0.5, True)]:
            theirs = hf_beams(hf, ids, NEW, B, penalty, early, None)
            assert_same(model.generate(ids, NEW, num_beams=B, length_penalty=penalty, early_stopping=early,
                                       stop_token_ids=[]), theirs, f"moe B={B}")


def test_nano_beams_across_the_window_and_the_switch():
    """nano-phi3 (255-key window, original length 512): a 500-token prompt and 24 new tokens cross both."""
    folder = nano_path("nano-phi3")
    if folder is None:
        pytest.skip("nano-phi3 is not built; run scripts/train_nano.py")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = phinano.load(str(folder))
    source = Path(sysconfig.get_paths()["stdlib"]) / "heapq.py"  # held out from the nano models' training
    if not source.is_file():
        pytest.skip("heapq.py not in this Python's stdlib")
    ids = model.tokenizer.encode(source.read_text())[:500]
    theirs = hf_beams(hf, ids, 24, 3, 1.0, False, list(model.stop_token_ids))
    assert_same(model.generate(ids, 24, num_beams=3), theirs, "nano-phi3")


def test_beam_search_returns_the_score_and_checks_its_options(checkpoint_dir):
    model = phinano.load(checkpoint_dir("mini-4k"), backend="numpy")
    ids = prompt(10, 1)
    tokens, score = beam_search(model, ids, 8, 2, stop_token_ids=[])
    assert len(tokens) == 8 and score < 0
    # The score is the hypothesis' summed log-probability / length (length_penalty 1).
    logits = model.forward(ids + tokens)[len(ids) - 1 : -1].astype(np.float64)  # (8, V): each new token's row
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    np.testing.assert_allclose(score, logp[np.arange(8), tokens].sum() / 8, rtol=1e-4)
    assert model.generate(ids, 8, num_beams=1, stop_token_ids=[]) == model.generate(ids, 8, stop_token_ids=[])
    for bad, words in [(dict(num_beams=0), "num_beams must be from 1"),
                       (dict(num_beams=10**30), "num_beams must be from 1 .* to 256"),  # was: OverflowError
                       (dict(num_beams=2, top_p=(5,)), "top_p"),  # was: numpy's "truth value is ambiguous"
                       (dict(num_beams=2, stop_token_ids=3), "stop_token_ids must be a list of token ids"),
                       (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be"),
                       (dict(num_beams=2, length_penalty="long"), "length_penalty must be a number"),
                       (dict(num_beams=2, temperature=0.7), "beam search does not sample"),
                       (dict(num_beams=2, images=["cat.jpg"]), "beam search takes text prompts only")]:
        with pytest.raises(PhinanoError, match=words):
            model.generate(ids, 4, **bad)
