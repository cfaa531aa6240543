"""safetensors checkpoints -> named NumPy arrays, memory-mapped, shape-checked.

A safetensors file is: an 8-byte little-endian header length N, N bytes of JSON
(`{"name": {"dtype": "BF16", "shape": [...], "data_offsets": [start, end]}, "__metadata__": {...}}`),
then the raw little-endian tensor bytes (offsets count from the end of the header).

We read the header ourselves and hand out `np.memmap` views, so loading copies nothing: a tensor's pages
are read from disk the first time a kernel touches them. NumPy has no bfloat16, so a BF16 tensor is handed
out as its raw 16-bit patterns in a `np.uint16` array. That is the one convention for bf16 in phinano:
**a uint16 weight array holds bfloat16 bits**; kernels widen it to float32 as they read it (put the 16 bits
in the high half of a 32-bit word: exact).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .errors import PhinanoError

# safetensors dtype -> the NumPy dtype phinano holds it in (bf16 as raw uint16 bits, see above)
DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Memory-map one .safetensors file: {tensor name: read-only array view}. Validates every offset."""
    path = Path(path)
    if not path.is_file():
        raise PhinanoError(f"{path}: safetensors file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PhinanoError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise PhinanoError(f"{path}: malformed or truncated safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PhinanoError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise PhinanoError(f"{path}: malformed safetensors header (not a JSON object)")
    header.pop("__metadata__", None)

    data_start = 8 + n
    buffer = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise PhinanoError(f"{path}: malformed header entry for tensor '{name}'") from None
        if dtype_name not in DTYPES:
            raise PhinanoError(f"{path}: tensor '{name}' has dtype {dtype_name}; phinano reads BF16, F16 and F32")
        dtype = np.dtype(DTYPES[dtype_name])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (0 <= start <= end) or end - start != nbytes:
            raise PhinanoError(f"{path}: tensor '{name}' offsets {start}..{end} do not fit shape {shape} of {dtype_name}")
        if data_start + end > size:
            raise PhinanoError(
                f"{path}: truncated file: tensor '{name}' ends at byte {data_start + end} but the file has {size}"
            )
        tensors[name] = buffer[data_start + start : data_start + end].view(dtype).reshape(shape)
    return tensors


def read_checkpoint(folder: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a model folder: `model.safetensors`, or the shards listed in `model.safetensors.index.json`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PhinanoError(f"{index}: malformed shard index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise PhinanoError(f"{folder}: missing shard file(s) listed in the index: {', '.join(missing)}")
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(read_safetensors(folder / shard))
        absent = [name for name, shard in weight_map.items() if name not in tensors]
        if absent:
            raise PhinanoError(f"{index}: tensors listed in the index are not in their shard: {', '.join(absent[:5])}")
        return tensors
    single = folder / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    raise PhinanoError(f"{folder}: no model.safetensors or model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------------
# What a checkpoint must hold, and the containers the model reads it through.
# ---------------------------------------------------------------------------------------------------------


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint of this config must have, with its shape."""
    D, F, V, E = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_local_experts
    q, kv = cfg.q_size, cfg.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if cfg.is_moe:
        shapes["model.norm.bias"] = (D,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    if cfg.lm_head_bias:
        shapes["lm_head.bias"] = (V,)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "self_attn.o_proj.weight"] = (D, q)
        if cfg.is_moe:  # Phi-3.5-MoE: LayerNorms with bias, separate q/k/v, 16 experts of w1/w3/w2
            shapes[p + "input_layernorm.bias"] = (D,)
            shapes[p + "post_attention_layernorm.bias"] = (D,)
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[p + f"self_attn.{name}.weight"] = (rows, D)
                if cfg.attention_bias:
                    shapes[p + f"self_attn.{name}.bias"] = (rows,)
            if cfg.attention_bias:
                shapes[p + "self_attn.o_proj.bias"] = (D,)
            shapes[p + "block_sparse_moe.gate.weight"] = (E, D)
            for e in range(E):
                x = p + f"block_sparse_moe.experts.{e}."
                shapes[x + "w1.weight"] = (F, D)
                shapes[x + "w3.weight"] = (F, D)
                shapes[x + "w2.weight"] = (D, F)
        else:  # Phi-3: fused projections, stored as they are on disk
            shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, D)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * F, D)
            shapes[p + "mlp.down_proj.weight"] = (D, F)
    return shapes


def check_tensors(tensors: dict[str, np.ndarray], cfg: Config, where: str) -> None:
    """Raise one error that names every missing, unexpected and mis-shaped tensor."""
    want = expected_shapes(cfg)
    problems = []
    missing = [n for n in want if n not in tensors]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    # A tied checkpoint may still carry an lm_head copy; rotary inv_freq buffers are harmless leftovers.
    ignorable = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    extra = [n for n in tensors if n not in want and n not in ignorable and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    wrong = [f"{n} is {tuple(tensors[n].shape)}, expected {s}" for n, s in want.items() if n in tensors and tuple(tensors[n].shape) != s]
    if wrong:
        problems.append("wrong shape: " + "; ".join(wrong[:8]))
    if problems:
        raise PhinanoError(f"{where}: checkpoint does not match config.json ({cfg.architecture}): " + " | ".join(problems))


@dataclass
class LayerWeights:
    """One decoder layer. Linear weights are (out, in), as stored; y = x @ W.T.

    Phi-3 stores q/k/v fused as `qkv_proj` (rows Q | K | V) and gate/up fused as `gate_up_proj`
    (rows gate | up): `q`, `k`, `v`, `gate` and `up` are row views into those stored tensors, not copies.
    """

    attn_norm: np.ndarray  # (D,)   RMSNorm weight (PhiMoE: LayerNorm weight)
    attn_norm_bias: np.ndarray | None  # (D,)   PhiMoE LayerNorm bias
    q: np.ndarray  # (H*HD, D)
    k: np.ndarray  # (KVH*HD, D)
    v: np.ndarray  # (KVH*HD, D)
    q_bias: np.ndarray | None  # (H*HD,)   PhiMoE only
    k_bias: np.ndarray | None  # (KVH*HD,)
    v_bias: np.ndarray | None  # (KVH*HD,)
    o: np.ndarray  # (D, H*HD)
    o_bias: np.ndarray | None  # (D,)
    mlp_norm: np.ndarray  # (D,)
    mlp_norm_bias: np.ndarray | None  # (D,)
    gate: np.ndarray | None = None  # (F, D)   dense MLP: silu branch
    up: np.ndarray | None = None  # (F, D)     dense MLP: linear branch
    down: np.ndarray | None = None  # (D, F)
    router: np.ndarray | None = None  # (E, D)   PhiMoE: router logits = x @ router.T
    experts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None  # E x (w1 (F,D), w3 (F,D), w2 (D,F))


@dataclass
class Weights:
    embed: np.ndarray  # (V, D) embedding table, rows gathered by token id
    layers: list[LayerWeights]  # L layers
    final_norm: np.ndarray  # (D,)
    final_norm_bias: np.ndarray | None  # (D,)  PhiMoE only
    lm_head: np.ndarray  # (V, D) (the embedding table itself when tied)
    lm_head_bias: np.ndarray | None  # (V,)  PhiMoE only
    dtype: str  # storage dtype of the matrices: "bfloat16", "float16" or "float32"

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for a in self._arrays():
            if id(a) not in seen:
                seen.add(id(a))
                total += a.nbytes
        return total

    def _arrays(self):
        yield from (self.embed, self.final_norm, self.lm_head)
        for layer in self.layers:
            for value in vars(layer).values():
                if isinstance(value, np.ndarray):
                    yield value
                elif isinstance(value, list):
                    for triple in value:
                        yield from triple


def _dtype_name(array: np.ndarray) -> str:
    return {np.dtype(np.uint16): "bfloat16", np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}[array.dtype]


def load_weights(folder: str | Path, cfg: Config) -> Weights:
    """Open the checkpoint in `folder`, check it against `cfg`, and arrange it by layer (no copies)."""
    t = read_checkpoint(folder)
    check_tensors(t, cfg, str(folder))
    q, kv, F = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    get = t.get
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        common = dict(
            attn_norm=t[p + "input_layernorm.weight"],
            attn_norm_bias=get(p + "input_layernorm.bias"),
            o=t[p + "self_attn.o_proj.weight"],
            o_bias=get(p + "self_attn.o_proj.bias"),
            mlp_norm=t[p + "post_attention_layernorm.weight"],
            mlp_norm_bias=get(p + "post_attention_layernorm.bias"),
        )
        if cfg.is_moe:
            ex = p + "block_sparse_moe.experts."
            layers.append(
                LayerWeights(
                    q=t[p + "self_attn.q_proj.weight"],
                    k=t[p + "self_attn.k_proj.weight"],
                    v=t[p + "self_attn.v_proj.weight"],
                    q_bias=get(p + "self_attn.q_proj.bias"),
                    k_bias=get(p + "self_attn.k_proj.bias"),
                    v_bias=get(p + "self_attn.v_proj.bias"),
                    router=t[p + "block_sparse_moe.gate.weight"],
                    experts=[
                        (t[ex + f"{e}.w1.weight"], t[ex + f"{e}.w3.weight"], t[ex + f"{e}.w2.weight"])
                        for e in range(cfg.num_local_experts)
                    ],
                    **common,
                )
            )
        else:
            qkv = t[p + "self_attn.qkv_proj.weight"]  # (H*HD + 2*KVH*HD, D): rows Q | K | V
            gate_up = t[p + "mlp.gate_up_proj.weight"]  # (2F, D): rows gate | up
            layers.append(
                LayerWeights(
                    q=qkv[:q], k=qkv[q : q + kv], v=qkv[q + kv :],
                    q_bias=None, k_bias=None, v_bias=None,
                    gate=gate_up[:F], up=gate_up[F:], down=t[p + "mlp.down_proj.weight"],
                    **common,
                )
            )
    embed = t["model.embed_tokens.weight"]
    return Weights(
        embed=embed,
        layers=layers,
        final_norm=t["model.norm.weight"],
        final_norm_bias=get("model.norm.bias"),
        lm_head=embed if cfg.tie_word_embeddings else t["lm_head.weight"],
        lm_head_bias=get("lm_head.bias"),
        dtype=_dtype_name(embed),
    )
