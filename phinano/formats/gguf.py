"""GGUF: the single-file format of llama.cpp and Ollama. Read through the `gguf` package's reader.

A GGUF file is a header, key-value metadata (hyperparameters, the tokenizer) and tensors, each stored as
F32 / F16 / BF16 or in quantized blocks. The `gguf` package memory-maps the file and hands out each tensor's
bytes as a NumPy view; nothing is copied here. Quantized tensors stay packed (formats/quantized.py): the
kernels multiply them as they are.

llama.cpp's converter writes Phi-3 with its own names and layout; this module translates both back to the
Hugging Face checkpoint's, so the rest of phinano reads a GGUF exactly as it reads safetensors:

    token_embd / output_norm / output        model.embed_tokens / model.norm / lm_head
    blk.i.attn_norm, ffn_norm                model.layers.i.input_layernorm, post_attention_layernorm
    blk.i.attn_qkv (Phi-3: Q | K | V fused)  self_attn.qkv_proj
    blk.i.attn_q / attn_k / attn_v (PhiMoE)  self_attn.q_proj / k_proj / v_proj
    blk.i.attn_output                        self_attn.o_proj
    blk.i.ffn_up (Phi-3: gate | up fused)    mlp.gate_up_proj          blk.i.ffn_down   mlp.down_proj
    blk.i.ffn_gate_inp (PhiMoE router)       block_sparse_moe.gate
    blk.i.ffn_{gate,up,down}_exps (E, ., .)  block_sparse_moe.experts.e.{w1,w3,w2}  (views of one stacked tensor)
    rope_factors_long / rope_factors_short   the config's longrope factor lists (not weights)

GGUF lists a tensor's dimensions innermost first (ne[0] = the input width); NumPy's shape is the reverse, which
is the (out, in) layout of the Hugging Face checkpoint.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Config, config_from_dict
from ..errors import PhinanoError
from .mapping import advise_huge_pages

GGUF_ARCHITECTURES = {"phi3": "Phi3ForCausalLM", "phimoe": "PhimoeForCausalLM"}
PLAIN_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 kept as its uint16 bits


@dataclass
class GGUFFile:
    path: Path
    metadata: dict  # key -> str | int | float | bool | list
    tensors: dict  # GGUF tensor name -> np.ndarray (F32/F16/BF16) or QuantizedTensor, memory-mapped


def is_gguf(path: str | Path) -> bool:
    """Whether a path is a GGUF file (by its 4-byte magic, not its name)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def read_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file: its metadata as plain Python values and its tensors, memory-mapped."""
    from gguf import GGUFValueType

    path = Path(path)
    if not path.is_file():
        raise PhinanoError(f"{path}: GGUF file not found")
    try:
        reader = _reader_class()(path, "r")
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PhinanoError(f"{path}: not a readable GGUF file ({reason})") from None
    advise_huge_pages(reader.data)

    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or not field.types:
            continue
        try:  # strings are decoded here: a damaged file's bytes may not be UTF-8
            value = field.contents()
        except (UnicodeDecodeError, ValueError) as e:
            raise PhinanoError(f"{path}: metadata {name!r} is not readable ({type(e).__name__}: {e})") from None
        if field.types[0] == GGUFValueType.ARRAY and field.types[-1] == GGUFValueType.STRING:
            value = list(value)
        metadata[name] = value

    tensors = {}
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise PhinanoError(f"{path}: truncated file: tensor '{t.name}' ends past the end of the file")
        tensors[t.name] = _tensor(path, t)
    return GGUFFile(path, metadata, tensors)


def _reader_class():
    """The `gguf` package's reader, with arrays read whole.

    The stock reader walks a metadata array one item at a time, two NumPy views per item: a Phi-4-mini file
    (200k tokens, 400k merges, 200k scores and types) takes close to a minute to open. Here a numeric array is
    one view of its bytes and a string array one pass over the (u64 length, utf-8 bytes) items with memoryview
    slices, which `ReaderField.contents` decodes the same way; everything else is the package's own code.
    """
    from gguf import GGUFReader, GGUFValueType

    class WholeArrayReader(GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            count = self._get(orig_offs + 4, np.uint64)
            offs, n = orig_offs + 12, int(count[0])
            item_type = GGUFValueType(raw_itype[0])
            types = [GGUFValueType.ARRAY, item_type]
            if item_type in self.gguf_scalar_to_np:  # numbers: the whole array is one part
                values = self._get(offs, self.gguf_scalar_to_np[item_type], n)
                if values.size != n:
                    raise ValueError(f"array of {n} items runs past the end of the file")
                return offs + values.nbytes - orig_offs, [raw_itype, count, values], [2], types
            if item_type != GGUFValueType.STRING:  # nested arrays: rare, left to the package
                return super()._get_field_parts(orig_offs, raw_type)
            raw = memoryview(self.data)
            length_of = struct.Struct(">Q" if (self.byte_order == "S") == np.little_endian else "<Q").unpack_from
            strings = []
            for _ in range(n):
                (length,) = length_of(raw, offs)
                if offs + 8 + length > len(raw):
                    raise ValueError(f"string array of {n} items runs past the end of the file")
                strings.append(raw[offs + 8:offs + 8 + length])
                offs += 8 + length
            return offs - orig_offs, [raw_itype, count, *strings], list(range(2, 2 + n)), types

    return WholeArrayReader


def _tensor(path: Path, t):
    """One tensor as phinano holds it: a NumPy view for F32/F16/BF16, a QuantizedTensor for block types (a
    list of them, one per expert, for PhiMoE's stacked (E, out, in) expert tensors)."""
    kind = t.tensor_type.name
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # NumPy order: (out, in) or (E, out, in)
    if kind in PLAIN_TYPES:
        return t.data.view(PLAIN_TYPES[kind]).reshape(shape)
    from .quantized import LAYOUTS, QuantizedTensor

    if kind not in LAYOUTS:
        raise PhinanoError(f"{path}: tensor '{t.name}' has type {kind}; phinano reads "
                           f"{', '.join([*PLAIN_TYPES, *LAYOUTS])}")
    if len(shape) == 3:
        return [QuantizedTensor(kind, shape[1:], t.data[e]) for e in range(shape[0])]
    if len(shape) != 2:
        raise PhinanoError(f"{path}: tensor '{t.name}' is a {len(shape)}-D {kind} tensor; expected a matrix")
    return QuantizedTensor(kind, shape, t.data)


# ---------------------------------------------------------------------------------------------------------
# Metadata -> config.json, in the released checkpoints' spelling (config.py validates it)
# ---------------------------------------------------------------------------------------------------------


def config_from_gguf(gguf: GGUFFile) -> Config:
    meta, tensors, where = gguf.metadata, gguf.tensors, f"{gguf.path} (GGUF metadata)"
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise PhinanoError(f"{gguf.path}: unsupported GGUF architecture {arch!r}; phinano runs "
                           f"{', '.join(GGUF_ARCHITECTURES)} (Phi-3/3.5/4-mini, Phi-3-medium, Phi-3.5-MoE)")

    def key(name: str, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise PhinanoError(f"{where}: required key '{arch}.{name}' is missing")
        return value  # floats are float32 in GGUF (1e-5 reads 9.99999975e-06): the same float32 the kernels use

    def count(name: str, default=None) -> int:  # the sizes the head dimension is worked out from, checked first
        value = key(name, default)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise PhinanoError(f"{where}: '{arch}.{name}' must be a positive integer, got {value!r}")
        return int(value)

    if "token_embd.weight" not in tensors:
        raise PhinanoError(f"{gguf.path}: missing tensor 'token_embd.weight'")
    vocab, hidden = tensors["token_embd.weight"].shape
    heads = count("attention.head_count")
    context = key("context_length")
    raw = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": vocab,
        "hidden_size": count("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "max_position_embeddings": context,
        "original_max_position_embeddings": key("rope.scaling.original_context_length", context),
        "rope_theta": key("rope.freq_base", 10000.0),
        "sliding_window": meta.get(f"{arch}.attention.sliding_window") or None,  # the converter writes 0 for none
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    head_dim = raw["hidden_size"] // heads
    if count("attention.key_length", head_dim) != head_dim:  # SlimMoE: 128, with hidden 4096 / 16 heads
        head_dim = raw["head_dim"] = count("attention.key_length")
    rotary = count("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raw["partial_rotary_factor"] = rotary / head_dim
    if "rope_factors_long.weight" in tensors:  # longrope: the factor lists travel as two F32 tensors
        raw["rope_scaling"] = {
            "type": "longrope",
            "short_factor": _factors(gguf, "rope_factors_short.weight"),
            "long_factor": _factors(gguf, "rope_factors_long.weight"),
        }
        if f"{arch}.rope.scaling.attn_factor" in meta:
            raw["rope_scaling"]["attention_factor"] = key("rope.scaling.attn_factor")
    if arch == "phimoe":
        raw.update(num_local_experts=key("expert_count"), num_experts_per_tok=key("expert_used_count"),
                   attention_bias="blk.0.attn_q.bias" in tensors, lm_head_bias="output.bias" in tensors,
                   router_jitter_noise=0.01)  # not in GGUF; the release's value, the sparsemixer's threshold / 2
        mscales = [key(f"rope.scaling.{k}", 0.0) or None for k in ("short_mscale", "long_mscale")]
        if "rope_scaling" in raw and None not in mscales:  # written by phinano's quantizer, not by llama.cpp's
            raw["rope_scaling"].update(short_mscale=mscales[0], long_mscale=mscales[1])
            raw["rope_scaling"].pop("attention_factor", None)
    return config_from_dict(raw, where=where)


def _factors(gguf: GGUFFile, name: str) -> list[float]:
    values = gguf.tensors.get(name)
    if values is None:
        raise PhinanoError(f"{gguf.path}: longrope needs tensor '{name}', which is missing")
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.ndim != 1:
        raise PhinanoError(f"{gguf.path}: tensor '{name}' must be a 1-D F32 list of factors")
    return [float(v) for v in values]


# ---------------------------------------------------------------------------------------------------------
# Tensor names -> the Hugging Face checkpoint's
# ---------------------------------------------------------------------------------------------------------

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj", "ffn_gate_inp": "block_sparse_moe.gate",
}
_EXPERTS = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}  # stacked (E, out, in)
_CONFIG_ONLY = {"rope_factors_long.weight", "rope_factors_short.weight"}


def hf_tensors(gguf: GGUFFile) -> dict:
    """The file's tensors under their Hugging Face names (views; a stacked expert tensor becomes E views).
    Names phinano does not know are kept as they are, so the checkpoint check reports them."""
    out = {}
    for name, tensor in gguf.tensors.items():
        if name in _CONFIG_ONLY:
            continue
        parts = name.split(".")
        if parts[0] in _TOP and len(parts) == 2:
            out[f"{_TOP[parts[0]]}.{parts[1]}"] = tensor
        elif parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit():
            _, i, kind, suffix = parts
            if kind in _LAYER:
                out[f"model.layers.{i}.{_LAYER[kind]}.{suffix}"] = tensor
            elif kind in _EXPERTS:
                for e in range(len(tensor)):
                    out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{_EXPERTS[kind]}.{suffix}"] = tensor[e]
            else:
                out[name] = tensor
        else:
            out[name] = tensor
    return out
