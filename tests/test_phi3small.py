"""Phi-3-small end to end: tiny random checkpoints in the released layout (names, shards, tied head, the
`rotary_emb.inv_freq` buffers), loaded by phinano and compared with mlx-lm's independent `phi3small` (when mlx is
installed), the blocksparse pattern shown to matter, the longrope switch of the 128k model pinned, `phinano info`.

The reference is mlx-lm run one token at a time (its multi-token prefill builds the blocksparse mask on the wrong
rows when the length is not a multiple of the block, see docs/phi3-small.md), with its rope replaced by the
released one for the 128k model (mlx-lm has no su/longrope scaling for Phi-3-small).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import phinano
from phinano import PhinanoError
from phinano.config import PHI3SMALL_DUMMY_TOKEN_IDS, load_config
from phinano.kernels import reference

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

VOCAB = 100352  # the released vocabulary: the dummy ids sit at its end, mlx-lm hard-codes them
LOGIT_TOLERANCE = 1e-4  # absolute, on logits of standard deviation ~0.8 (measured: at most 3e-6, docs/phi3-small.md)

# A tiny Phi-3-small: 4 layers (blocksparse on 0 and 2), 8 query heads in 2 KV groups of 4, head dim 8, blocks of
# 32 tokens (mlx-lm accepts only 32 or 64), 2 local blocks, vertical stride 4 with per-head offsets. Prompts of
# 100 tokens plus 64 generated reach block 5: the local band, vertical blocks and head offsets all decide what a
# query sees there.
TINY = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
            ff_intermediate_size=48, blocksparse_block_size=32, blocksparse_num_local_blocks=2,
            blocksparse_vert_stride=4, blocksparse_triton_kernel_block_size=32, dense_attention_every_n_layers=2,
            max_position_embeddings=512)
ORIGINAL = 96  # the 128k model's original length (8192 released), crossed during generation here


def phi3small_config(long_context: bool = False, **overrides) -> dict:
    """config.json as the released checkpoints spell it (configuration_phi3_small.py keys)."""
    config = {
        "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small", "auto_map": {},
        "vocab_size": VOCAB, "hidden_act": "gegelu", "gegelu_limit": 20.0, "gegelu_pad_to_256": True,
        "ff_dim_multiplier": None, "layer_norm_epsilon": 1e-5, "rope_embedding_base": 1000000,
        "rope_position_scale": 1.0, "rope_scaling": None, "mup_attn_multiplier": 1.0, "mup_embedding_multiplier": 10.0,
        "mup_use_scaling": True, "mup_width_multiplier": 8.0, "blocksparse_homo_head_pattern": False,
        "bos_token_id": 100257, "eos_token_id": 100257, "torch_dtype": "float32", **TINY,
    }
    if long_context:
        half = config["hidden_size"] // config["num_attention_heads"] // 2
        config["rope_scaling"] = {"type": "su", "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                  "long_factor": [1.0 + 3.0 * i for i in range(half)],
                                  "original_max_position_embeddings": ORIGINAL}
    config.update(overrides)
    return config


def make_phi3small(folder: Path, long_context: bool = False, seed: int = 0, shards: int = 1,
                   inv_freq: bool = True, lm_head_copy: bool = False, bf16: bool = False, **overrides) -> Path:
    """Random weights in the released names, tied head (no lm_head.weight), optionally sharded with an index,
    float32 or (as released) bfloat16."""
    from safetensors.numpy import save_file

    if bf16:
        import torch
        from safetensors.torch import save_file as save_torch

        def save_file(tensors, path, metadata):  # noqa: F811 - bf16 needs torch's writer
            save_torch({n: torch.from_numpy(t).to(torch.bfloat16) for n, t in tensors.items()}, path, metadata)

    folder.mkdir(parents=True, exist_ok=True)
    config = phi3small_config(long_context, **overrides)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 100257,
                                                               "eos_token_id": [100257, 100266]}))
    cfg = load_config(folder)
    from phinano.weights import expected_shapes

    rng = np.random.default_rng(seed)
    tensors = {}
    # Wide enough that every greedy choice depends on the context, with clear top-1/top-2 gaps: with the head
    # tied, a near-identity final norm would just predict the input token again (embed . embed is largest).
    for name, shape in expected_shapes(cfg).items():
        if name == "model.final_layernorm.weight":
            value = rng.standard_normal(shape)
        elif name.endswith("layernorm.weight"):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            value = rng.standard_normal(shape)  # x 10 (muP) in the residual: the layers' outputs must match it
        else:
            gain = 6.0 if name.endswith(("dense.weight", "down_proj.weight")) else 1.5
            value = rng.standard_normal(shape) / math.sqrt(shape[1]) * gain
        tensors[name] = value.astype(np.float32)
    if inv_freq:  # some checkpoints carry the rotary buffers; they are ignored
        for i in range(cfg.num_hidden_layers):
            tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(cfg.head_dim // 2, np.float32)
    if lm_head_copy:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.nbytes for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    made = {}

    def make(kind: str = "8k", **options) -> Path:
        key = (kind, tuple(sorted(options.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(f"phi3small-{kind}")
            made[key] = make_phi3small(root, long_context=kind == "128k", **options)
        return made[key]

    return make


def prompt(n: int = 100, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, 100256, n).tolist()


# ------------------------------------------------------------------ loading
def test_loads_the_released_layout(small):
    single = phinano.load(small("8k"), backend="numpy", tokenizer=False)
    sharded = phinano.load(small("8k", shards=3, inv_freq=False, lm_head_copy=True), backend="numpy", tokenizer=False)
    cfg = single.config
    assert cfg.architecture == "Phi3SmallForCausalLM" and cfg.tie_word_embeddings
    assert single.weights.lm_head is single.weights.embed  # tied: the head is the embedding table
    assert sharded.weights.lm_head is sharded.weights.embed  # a carried lm_head copy is not used
    assert single.weights.final_norm_bias is not None  # model.final_layernorm.{weight,bias}
    bf16 = phinano.load(small("8k", shards=2, bf16=True), backend="numpy", tokenizer=False)  # as released
    assert bf16.weights.dtype == "bfloat16"
    assert np.abs(bf16.forward(prompt(40)) - single.forward(prompt(40)))[:, :100000].max() < 0.5
    assert single.stop_token_ids == (100257, 100266)
    ids = prompt(40)
    np.testing.assert_array_equal(single.forward(ids), sharded.forward(ids))
    logits = single.forward(ids)
    assert (logits[:, list(PHI3SMALL_DUMMY_TOKEN_IDS)] == np.finfo(np.float32).min).all()
    assert np.isfinite(logits).all() and (np.delete(logits, PHI3SMALL_DUMMY_TOKEN_IDS, axis=1) > -1e6).all()


def test_refuses_a_checkpoint_that_does_not_fit(small, tmp_path):
    folder = small("8k")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["num_key_value_heads"] = 4  # query_key_value would be (8 + 8) * 8 rows, the file has (8 + 4) * 8
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(PhinanoError, match="query_key_value.weight is"):
        phinano.load(bad, tokenizer=False)


@pytest.mark.parametrize("key, value, words", [
    ("hidden_act", "gelu", "'hidden_act' must be \"gegelu\""),
    ("ff_dim_multiplier", 2, "exactly one of 'ff_intermediate_size' and 'ff_dim_multiplier'"),
    ("blocksparse_vert_stride", 0, "'blocksparse_vert_stride' must be a positive integer"),
    ("mup_width_multiplier", "8", "'mup_width_multiplier' must be a number >= 0"),
    ("num_attention_heads", 6, "must be a multiple of 'num_attention_heads'"),
])
def test_config_errors_name_the_key(key, value, words):
    from phinano.config import config_from_dict

    with pytest.raises(PhinanoError) as e:
        config_from_dict(phi3small_config(**{key: value}))
    assert words in str(e.value)


def test_config_values_of_the_release():
    from phinano.config import config_from_dict

    released = phi3small_config(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                num_hidden_layers=32, ff_intermediate_size=14336, max_position_embeddings=131072,
                                blocksparse_block_size=64, blocksparse_num_local_blocks=16, blocksparse_vert_stride=8)
    released["rope_scaling"] = {"type": "su", "short_factor": [1.0] * 64, "long_factor": [2.0] * 64,
                                "original_max_position_embeddings": 8192}
    cfg = config_from_dict(released)
    assert (cfg.head_dim, cfg.softmax_scale, cfg.embedding_multiplier, cfg.logit_divisor) == (128, 1 / 128, 10, 8)
    assert cfg.rope_short_mscale == 1.0  # not Phi-3-mini's attention factor
    assert cfg.rope_long_mscale == pytest.approx(math.sqrt(1 + math.log(16) / math.log(8192)))
    # the release's LongRopeConfig: -1 (its default) or 0 mean "not given"; a value > 0 is used
    scaling = dict(released["rope_scaling"], short_mscale=-1, long_mscale=0)
    assert config_from_dict({**released, "rope_scaling": scaling}).rope_short_mscale == 1.0
    scaling = dict(released["rope_scaling"], short_mscale=1.1, long_mscale=1.2)
    given = config_from_dict({**released, "rope_scaling": scaling})
    assert (given.rope_short_mscale, given.rope_long_mscale) == (1.1, 1.2)
    # its longrope branch ignores rope_position_scale; the 8k model's rotary uses it
    assert config_from_dict({**released, "rope_position_scale": 2.0}).rope_position_scale == 1.0
    scaled = config_from_dict(phi3small_config(rope_position_scale=2.0))
    from phinano.rope import rope_tables

    cos, sin = rope_tables(scaled, 3, 4, "default")  # positions 3..6 rotate as 6, 8, 10, 12 would
    plain_cos, plain_sin = rope_tables(config_from_dict(phi3small_config()), 0, 13, "default")
    np.testing.assert_array_equal(cos, plain_cos[6:13:2])
    np.testing.assert_array_equal(sin, plain_sin[6:13:2])
    assert len(cfg.dummy_token_ids) == 91
    from phinano.families import family

    assert family(cfg) == "Phi-3-small-128k-instruct"  # what `phinano info` says it is shaped like
    del released["rope_scaling"]
    assert family(config_from_dict({**released, "max_position_embeddings": 8192})) == "Phi-3-small-8k-instruct"
    from phinano.weights import parameter_counts

    assert parameter_counts(cfg) == (7_392_272_384, 7_392_272_384)  # the published 7.4B, head tied
    from phinano.blocks import phi3small

    assert [phi3small.is_dense(cfg, i) for i in range(4)] == [False, True, False, True]
    assert phi3small.head_step(cfg) == 1  # max(1, int(8 / 32))
    # ff_dim_multiplier instead: multiplier * (hidden // 3) * 2, rounded up to 256
    del released["ff_intermediate_size"]
    assert config_from_dict({**released, "ff_dim_multiplier": 3}).intermediate_size == 8192


# ------------------------------------------------------------------ the engine agrees with itself
def test_backends_and_cached_decode_agree(small):
    ids = prompt(120)
    ref = phinano.load(small("8k"), backend="numpy", tokenizer=False)
    fast = phinano.load(small("8k"), backend="numba", tokenizer=False)
    full = ref.forward(ids)
    np.testing.assert_allclose(fast.forward(ids), full, atol=2e-4, rtol=0)
    cache = fast.new_cache(len(ids))  # prefill 70, then one token at a time: the decode kernel
    steps = [fast.step(cache, ids[:70])] + [fast.step(cache, [t]) for t in ids[70:]]  # past the local band
    np.testing.assert_allclose(np.concatenate(steps), full, atol=2e-4, rtol=0)


def test_step_batch_rows_equal_each_sequence_alone(small):
    """Batched decode (phinano serve) runs Phi-3-small's dense and blocksparse layers per sequence too:
    each row bit for bit the sequence's own step, with sequences inside and past the local band."""
    model = phinano.load(small("8k"), tokenizer=False)
    lengths, ids = [5, 40, 90], [7, 11, 13]
    alone, together = [], []
    for n in lengths:
        for caches in (alone, together):
            cache = model.new_cache(n + 3)
            model.step(cache, prompt(n, seed=n))
            caches.append(cache)
    for _ in range(3):
        expected = np.stack([model.step(c, [t], last_only=True)[0] for c, t in zip(alone, ids)])
        got = model.step_batch(together, ids)
        assert np.array_equal(got, expected)
        ids = [int(i) for i in got.argmax(axis=1)]


def test_the_blocksparse_pattern_matters(small):
    """Layers 0 and 2 really are sparse: attending densely, or with one pattern for all heads, changes the
    logits past the local band (64 tokens) and nowhere before it."""
    ids = prompt(150)
    base = phinano.load(small("8k"), backend="numpy", tokenizer=False).forward(ids)
    for variant in (dict(dense_attention_every_n_layers=1), dict(blocksparse_homo_head_pattern=True)):
        other = phinano.load(small("8k", **variant), backend="numpy", tokenizer=False).forward(ids)
        np.testing.assert_allclose(other[:64], base[:64], atol=1e-4, rtol=0)
        assert np.abs(other[64:] - base[64:]).max() > 0.05, variant


def test_attention_observer_shows_the_pattern(small):
    model = phinano.load(small("8k"), backend="numpy", tokenizer=False)
    seen = {}
    model.forward(prompt(150), observer={"attention": lambda layer, p: seen.setdefault(layer, p)})
    cfg = model.config
    visible = reference.blocksparse_visible(8, 0, 150, 150, 32, 2, 4, 1)
    assert ((seen[0] > 0) == visible).all() and ((seen[2] > 0) == visible).all()
    assert ((seen[1] > 0) == np.tril(np.ones((150, 150), bool))).all()
    assert cfg.dense_attention_every_n_layers == 2


# ------------------------------------------------------------------ the longrope switch (128k)
def test_longrope_switch_recomputes_with_long_factors(small):
    """phinano's choice (as for Phi-3 longrope): a generation that crosses the original length recomputes the
    whole sequence with the long factors, so cached generation equals recomputing every step from scratch.
    The released code instead keeps the keys it rotated with the short factors (test below)."""
    model = phinano.load(small("128k"), backend="numba", tokenizer=False)
    ids = prompt(ORIGINAL - 10)
    new = model.generate(ids, 20, stop_token_ids=[])  # the switch at the 11th new token
    seq = list(ids)
    for _ in range(20):  # no cache: every step a full forward, rotated by the factors of its total length
        seq.append(int(np.argmax(model.forward(seq)[-1])))
    assert new == seq[len(ids):]


# ------------------------------------------------------------------ mlx-lm, an independent implementation
def _mlx():
    pytest.importorskip("mlx.core", reason="mlx not installed (pip install 'mlx[cpu]' mlx-lm)")
    pytest.importorskip("mlx_lm", reason="mlx-lm not installed")
    import mlx.core as mx
    import mlx.nn as nn

    return mx, nn


def _released_rope(mx, nn, cfg, variant: str):
    """The released rotary for mlx-lm: NeoX pairs, base rope_embedding_base, positions x rope_position_scale,
    and for the 128k model the short or long factors with their mscale multiplying cos and sin."""

    class ReleasedRope(nn.Module):
        def __init__(self):
            super().__init__()
            HD = cfg.head_dim
            base = np.float32(cfg.rope_theta) ** (np.arange(0, HD, 2).astype(np.float32) / np.float32(HD))
            factors = np.ones(HD // 2, np.float32)
            self.mscale = 1.0
            if variant != "default":
                factors = np.asarray(cfg.rope_long_factor if variant == "long" else cfg.rope_short_factor, np.float32)
                self.mscale = cfg.rope_long_mscale if variant == "long" else cfg.rope_short_mscale
            self._inv = mx.array((np.float32(1.0) / (factors * base)).astype(np.float32))

        def __call__(self, x, offset: int = 0):
            L = x.shape[-2]
            pos = mx.arange(offset, offset + L).astype(mx.float32)
            if variant == "default":  # the released longrope branch does not scale positions
                pos = pos * cfg.raw.get("rope_position_scale", 1.0)
            angles = pos[:, None] * self._inv[None, :]
            angles = mx.concatenate([angles, angles], axis=-1)
            cos, sin = mx.cos(angles) * self.mscale, mx.sin(angles) * self.mscale
            half = x.shape[-1] // 2
            rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
            return x * cos + rotated * sin

    return ReleasedRope()


class MlxReference:
    """mlx-lm's Phi3SmallForCausalLM on the same folder, stepped one token at a time."""

    def __init__(self, folder: Path, cfg):
        mx, nn = _mlx()
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.models.phi3small import Model, ModelArgs

        self.mx, self.nn, self.cfg, self.make_cache = mx, nn, cfg, make_prompt_cache
        self.model = Model(ModelArgs.from_dict(json.loads((Path(folder) / "config.json").read_text())))
        weights = {}
        for file in sorted(Path(folder).glob("model*.safetensors")):
            weights.update(mx.load(str(file)))
        self.model.load_weights(list(self.model.sanitize(weights).items()), strict=True)
        self.variant = None
        self.set_rope("short" if cfg.rope_type == "longrope" else "default")

    def set_rope(self, variant: str) -> None:
        if variant != self.variant:
            for layer in self.model.layers:
                layer.self_attn.rope = _released_rope(self.mx, self.nn, self.cfg, variant)
            self.variant = variant

    def run(self, ids: list[int], cache=None):
        """Feed ids one at a time; returns (logits (T, V) float32, cache)."""
        mx = self.mx
        cache = cache if cache is not None else self.make_cache(self.model)
        rows = []
        for t in ids:
            out = self.model(mx.array([[t]]), cache=cache)
            rows.append(np.array(out[0, -1].astype(mx.float32)))
        return np.stack(rows), cache

    def greedy(self, ids: list[int], n: int) -> dict:
        """n greedy tokens, with the logits rows of every position seen. Crossing the 128k model's original
        length, phinano's behaviour: a fresh cache, all positions re-rotated with the long factors. At that
        step it also runs the released code's behaviour once (the cached keys stay short-rotated)."""
        cfg, seq = self.cfg, list(ids)
        self.set_rope("short" if cfg.rope_type == "longrope" else "default")
        logits, cache = self.run(seq)
        rows = {self.variant: [logits]}
        tokens, stale = [], None
        for _ in range(n):
            token = int(np.argmax(rows[self.variant][-1][-1]))
            tokens.append(token)
            seq.append(token)
            if self.variant == "short" and len(seq) > cfg.original_max_position_embeddings:
                self.set_rope("long")
                stale, _ = self.run([token], cache)  # the released code: new keys long, cached keys short
                logits, cache = self.run(seq)  # phinano: everything again with the long factors
                rows["long"] = [logits]
                continue
            logits, cache = self.run([token], cache)
            rows[self.variant].append(logits)
        return {"tokens": tokens, "stale": stale, **{k: np.concatenate(v) for k, v in rows.items()}}


@pytest.fixture(scope="module")
def mlx_runs(small):
    """The mlx-lm runs, once per module (importing mlx_lm imports Transformers: seconds)."""
    runs = {}

    def run(kind: str):
        if kind not in runs:
            model = phinano.load(small(kind), backend="numba", tokenizer=False)
            ids = prompt(100 if kind == "8k" else ORIGINAL - 20)  # 128k: the switch at the 21st new token
            runs[kind] = (model, ids, MlxReference(small(kind), model.config).greedy(ids, 64))
        return runs[kind]

    return run


def _compare_logits(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest difference of the logits both leave unmasked; the dummy ids masked in both (they: -inf,
    phinano and the released code: the float32 minimum)."""
    masked = list(PHI3SMALL_DUMMY_TOKEN_IDS)
    assert np.isneginf(theirs[:, masked]).all() and (ours[:, masked] == np.finfo(np.float32).min).all()
    keep = np.ones(ours.shape[1], bool)
    keep[masked] = False
    return float(np.abs(ours[:, keep] - theirs[:, keep]).max())


def test_matches_mlx_lm_8k(mlx_runs):
    model, ids, theirs = mlx_runs("8k")
    new = model.generate(ids, 64, stop_token_ids=[])
    assert new == theirs["tokens"]
    ours = model.forward(ids + new)  # mlx-lm's rows: positions 0 .. 163
    worst = _compare_logits(ours, theirs["default"])
    assert worst < LOGIT_TOLERANCE, worst
    numpy_backend = phinano.load(model.name, backend="numpy", tokenizer=False)
    assert _compare_logits(numpy_backend.forward(ids + new), theirs["default"]) < LOGIT_TOLERANCE


def test_matches_mlx_lm_128k_across_the_switch(mlx_runs):
    model, ids, theirs = mlx_runs("128k")
    new = model.generate(ids, 64, stop_token_ids=[])
    assert new == theirs["tokens"]
    short = theirs["short"]  # positions 0 .. ORIGINAL - 1, short factors, short mscale 1.0
    assert len(short) == ORIGINAL
    assert _compare_logits(model.forward((ids + new)[:ORIGINAL]), short) < LOGIT_TOLERANCE
    worst = _compare_logits(model.forward(ids + new), theirs["long"])  # all positions, long factors
    assert worst < LOGIT_TOLERANCE, worst


def test_released_cached_generation_keeps_short_keys_and_differs(mlx_runs):
    """Pins the difference: the step that crosses the original length run over a cache of short-rotated keys
    (the released code's cached generation) gives other logits than phinano's recompute with the long factors
    (which mlx-lm with a fresh cache reproduces, above)."""
    model, ids, theirs = mlx_runs("128k")
    seq = ids + theirs["tokens"][:ORIGINAL + 1 - len(ids)]  # up to the first position rotated with long factors
    ours = model.forward(seq)[-1:]
    assert _compare_logits(ours, theirs["long"][ORIGINAL:ORIGINAL + 1]) < LOGIT_TOLERANCE
    assert _compare_logits(ours, theirs["stale"]) > 1e-2


# ------------------------------------------------------------------ phinano info
def test_info_describes_blocksparse_and_mup(small, capsys):
    from phinano.cli import main
    from test_phi3small_tokenizer import write_test_vocab

    write_test_vocab(small("8k"))  # the CLI loads the tokenizer too
    assert main(["info", "--model", str(small("8k")), "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "Phi3SmallForCausalLM" in out
    assert "blocksparse on layers 0, 2 (block 32, 2 local blocks, vertical stride 4, head h shifted by 1*h blocks)" \
        "; dense on 1, 3" in out
    assert "embeddings x 10, attention scale 0.125, logits / 8, 91 dummy token ids masked" in out

