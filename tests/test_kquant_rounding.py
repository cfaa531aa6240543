"""K-quant writing (Q4_K, Q5_K, Q6_K blocks and llama.cpp's Q4_K_M / Q5_K_M / Q6_K type mixes).

Three references:
- llama.cpp itself, when llama-cpp-python is installed: its `ggml_quantize_chunk` on the same float32 rows must
  give the same bytes (any rows: zero, constant, one-signed, mixed magnitudes, huge, tiny), and its
  `llama_model_quantize` on an F32 GGUF of a tiny Phi-3 must choose the same type for every tensor and write
  the same bytes as `phinano quantize` does. Skipped, with the reason, when llama-cpp-python is absent (or
  cannot run here).
- the `gguf` package's K-quant dequantizers (an independent reader of the layout): blocks must decode to values
  within the type's rounding error of the input.
- llama.cpp's type-mix rules, written out by hand for the released Phi shapes.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

gguf = pytest.importorskip("gguf")

from phinano import PhinanoError  # noqa: E402
from phinano.formats import kquant_rounding as kq  # noqa: E402
from phinano.formats.gguf_write import encode_tensor, write_gguf  # noqa: E402
from phinano.quantize import (TYPES, block_32_type, hf_mix_types, k_mix_type, matrix_type,  # noqa: E402
                              q4_k_m_type, use_more_bits)

K_TYPES = ["Q4_K", "Q5_K", "Q6_K"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ rows to round
BLOCK_KINDS = ["normal", "zero", "constant", "negative", "positive", "sparse", "integers", "spike", "uniform"]


def block_values(kind: str, rng: np.random.Generator, scale: float) -> np.ndarray:
    """32 values of one kind (a Q4_K/Q5_K block, two Q6_K blocks), times `scale`."""
    values = {
        "normal": lambda: rng.standard_normal(32),
        "zero": lambda: np.zeros(32),
        "constant": lambda: np.full(32, rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 2.0)),
        "negative": lambda: -np.abs(rng.standard_normal(32)),
        "positive": lambda: np.abs(rng.standard_normal(32)) + rng.uniform(0, 3),
        "sparse": lambda: rng.standard_normal(32) * (rng.random(32) < 0.1),
        "integers": lambda: rng.integers(-4, 5, 32).astype(np.float64),  # exact ties when scales are round
        "spike": lambda: np.where(np.arange(32) == rng.integers(32), 50.0, 0.01 * rng.standard_normal(32)),
        "uniform": lambda: rng.uniform(-1, 1, 32),
    }[kind]()
    return values * scale


@st.composite
def rows(draw, max_blocks: int = 3, exponents=(-30, 5)):
    """(R, 256*n) float32 rows whose 32-value pieces each have their own kind and magnitude (10**e), so that one
    super-block mixes large, small and zero blocks (the small ones get 6-bit scale 0)."""
    n_rows, n_blocks = draw(st.integers(1, 2)), draw(st.integers(1, max_blocks))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pieces = n_rows * n_blocks * 8
    kinds = draw(st.lists(st.sampled_from(BLOCK_KINDS), min_size=pieces, max_size=pieces))
    spread = draw(st.sampled_from([0, 1, 3, 8]))  # decades between the pieces' magnitudes
    base = draw(st.integers(exponents[0] + spread, exponents[1]))
    values = [block_values(k, rng, 10.0 ** (base - rng.uniform(0, spread))) for k in kinds]
    values = np.concatenate(values).astype(np.float32).reshape(n_rows, n_blocks * 256)
    if draw(st.booleans()):  # as a bf16 checkpoint holds them: 8 significant bits, so many exact rounding ties
        values = ((values.view(np.uint32) >> 16) << 16).view(np.float32)
    return values


def dequantized(data: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])


# ------------------------------------------------------------------ decoding gives the input back, roughly
# worst |error| / max |x| of a super-block: half a step of 15, 31 or 63 levels over the range, plus the error of
# the 6-bit (8-bit) block scales and the weighted fit's clipping; measured at most 0.127, 0.063, 0.016 over 4000
# super-blocks mixed from the kinds above (a misplaced nibble or scale would be off by ~1)
RELATIVE = {"Q4_K": 0.15, "Q5_K": 0.08, "Q6_K": 0.025}
# when the float16 super-block scale is subnormal (or 0), it loses relative precision: the largest value such a
# block holds is about 2**-24 (float16's smallest step) * 127 * 32 (Q6_K's largest scale * level)
ABSOLUTE = 2.0**-24 * 127 * 32


@SETTINGS
@given(values=rows(exponents=(-30, 4)), qtype=st.sampled_from(K_TYPES))
def test_blocks_decode_near_the_input(values, qtype):
    data = kq.quantize(values, qtype)
    assert data.dtype == np.uint8 and data.shape == (values.shape[0], values.shape[1] // 256 * kq.BLOCK_BYTES[qtype])
    back = dequantized(data, qtype).reshape(values.shape)
    superblocks, back = values.reshape(-1, 256), back.reshape(-1, 256)
    bound = RELATIVE[qtype] * np.abs(superblocks).max(axis=-1, keepdims=True) + ABSOLUTE
    assert np.all(np.abs(back - superblocks) <= bound)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_zero_rows_are_zero_bytes_and_constant_rows_come_back(qtype):
    assert not kq.quantize(np.zeros((2, 512), np.float32), qtype).any()
    for c in (0.37, -0.37, 3.0, -250.0):
        back = dequantized(kq.quantize(np.full((1, 256), c, np.float32), qtype), qtype)
        assert np.allclose(back, c, rtol=RELATIVE[qtype] / 2, atol=0)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_more_levels_mean_smaller_errors(qtype):
    """A check that the types are not mixed up: on the same gaussian rows, Q6_K < Q5_K < Q4_K in RMS error,
    each near its known size (about 2**-bits of the range)."""
    values = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    rms = np.sqrt(np.mean((dequantized(kq.quantize(values, qtype), qtype) - values) ** 2))
    assert {"Q4_K": 0.05 < rms < 0.09, "Q5_K": 0.025 < rms < 0.045, "Q6_K": 0.01 < rms < 0.022}[qtype]


def test_chunks_and_threads_do_not_change_the_bytes(monkeypatch):
    values = np.random.default_rng(1).standard_normal((3, 7, 512)).astype(np.float32)  # experts-like (E, N, K)
    whole = {t: kq.quantize(values, t, threads=1) for t in K_TYPES}
    monkeypatch.setattr(kq, "CHUNK", 3)
    for t in K_TYPES:
        split = kq.quantize(values, t, threads=2)
        assert split.shape == (3, 7, 2 * kq.BLOCK_BYTES[t])
        assert np.array_equal(split, whole[t])
        assert np.array_equal(split.reshape(21, -1)[5], kq.quantize(values.reshape(21, 512)[5], t))  # one row alone


@pytest.mark.parametrize("qtype", K_TYPES)
def test_bad_values_are_refused_with_one_clear_line(qtype):
    with pytest.raises(PhinanoError, match="rows of 300 values cannot be cut into .* super-blocks of 256"):
        kq.quantize(np.ones((2, 300), np.float32), qtype)
    for bad in (np.nan, np.inf):
        values = np.ones((1, 256), np.float32)
        values[0, 7] = bad
        with pytest.raises(PhinanoError, match="not finite"):
            kq.quantize(values, qtype)
    with pytest.raises(PhinanoError, match="too large for .* float16 scales"):  # the scale overflows float16
        kq.quantize(np.full((1, 256), 3e9, np.float32), qtype)


def test_encode_tensor_writes_k_quants_from_bf16_and_float32():
    values = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    for t in K_TYPES:
        assert np.array_equal(encode_tensor(values, t), kq.quantize(values, t))
        assert np.array_equal(encode_tensor(bf16, t), kq.quantize((bf16.astype(np.uint32) << 16).view(np.float32), t))
    for unwritable in ("IQ4_NL", "Q2_K", "NOPE"):  # read by gguf, written by neither gguf nor phinano; unknown
        with pytest.raises(PhinanoError, match=f"^cannot write tensors of type {unwritable}$"):
            encode_tensor(values, unwritable)


def test_nearest_int_rounds_halves_to_even_like_the_float_trick():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, -7.5, 4194303.0, 12.0], np.float32)
    assert kq.nearest_int(v).tolist() == [0, 2, 2, 0, -2, 3, -8, 4194303, 12]


def test_running_sum_adds_left_to_right():
    # float32: ((1e8 + 1) - 1e8) + 1 = (1e8 - 1e8) + 1 = 1; pairwise, (1e8 + 1) + (-1e8 + 1) would be 0
    v = np.array([[1e8], [1.0], [-1e8], [1.0]], np.float32)
    assert kq.running_sum(v).tolist() == [1.0]


# ------------------------------------------------------------------ the compiled searches against the NumPy port
def numpy_and_compiled(values: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of (R, 256 n) rows from the NumPy searches and from their compiled twins (overflowing scales
    included, as in the llama.cpp comparison below)."""
    blocks = values.reshape(-1, 256)
    with np.errstate(all="ignore"):
        return kq.QUANTIZERS[qtype](blocks, compiled=False), kq.QUANTIZERS[qtype](blocks, compiled=True)


@SETTINGS
@given(values=rows(exponents=(-38, 30)), qtype=st.sampled_from(K_TYPES))
def test_compiled_rounding_equals_numpy(values, qtype):
    """`quantize` runs the compiled searches; they must give the NumPy port's bytes on every kind of block and
    any magnitude (ties of bf16 values, all-zero and constant blocks, subnormal and overflowing scales)."""
    mine, compiled = numpy_and_compiled(values, qtype)
    assert differing_blocks(compiled, mine, qtype) == []


@SETTINGS
@given(values=arrays(np.float32, st.sampled_from([(1, 256), (2, 512)]),
                     elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
       qtype=st.sampled_from(K_TYPES))
def test_compiled_rounding_of_arbitrary_floats_equals_numpy(values, qtype):
    mine, compiled = numpy_and_compiled(values, qtype)
    assert differing_blocks(compiled, mine, qtype) == []


def test_compiled_searches_equal_numpy_on_their_own():
    """The two searches, compared directly on many blocks (scales, minimums and levels, bit for bit)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((32, 3000)) * 10.0 ** rng.uniform(-30, 20, 3000)).astype(np.float32)  # (n, S)
    x[:, :50], x[:, 50:100] = 0, x[:1, 50:100]  # zero and constant blocks
    with np.errstate(all="ignore"):
        weights = np.sqrt(kq.running_sum(x * x) / np.float32(32)) + np.abs(x)
        for got, want in zip(kq.make_qkx2_quants_compiled(x, weights, 31, -0.5, 0.1, 15),
                             kq.make_qkx2_quants(x, weights, 31, -0.5, 0.1, 15)):
            assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))
        for got, want in zip(kq.make_qx_quants_compiled(x[:16], 32), kq.make_qx_quants(x[:16], 32)):
            assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))


# ------------------------------------------------------------------ llama.cpp's own quantizer
@pytest.fixture(scope="module")
def llama_lib_dir() -> Path:
    """Where llama-cpp-python keeps llama.cpp's shared libraries (found without importing llama_cpp, whose
    Python side needs packages the comparison does not)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.skip("llama-cpp-python is not installed: llama.cpp's own quantizer cannot be compared")
    return Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(spec.origin).parent / "lib")


@pytest.fixture(scope="module")
def ggml(llama_lib_dir):
    """llama.cpp's ggml library, as llama-cpp-python ships it, with ggml_quantize_chunk's signature."""
    found = sorted(llama_lib_dir.glob("libggml-base.*")) + sorted(llama_lib_dir.glob("ggml-base.*"))
    if not found:
        pytest.skip(f"no libggml-base in {llama_lib_dir}")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def llama_cpp_rows(lib, values: np.ndarray, qtype: str) -> np.ndarray:
    """llama.cpp's bytes for (R, K) float32 rows, without an importance matrix (the path llama-quantize takes)."""
    values = np.ascontiguousarray(values, np.float32)
    out = np.zeros((values.shape[0], values.shape[1] // 256 * kq.BLOCK_BYTES[qtype]), np.uint8)
    lib.ggml_quantize_chunk(int(gguf.GGMLQuantizationType[qtype]), values.ctypes.data, out.ctypes.data, 0,
                            values.shape[0], values.shape[1], None)
    return out


def differing_blocks(mine: np.ndarray, theirs: np.ndarray, qtype: str) -> list[int]:
    size = kq.BLOCK_BYTES[qtype]
    return np.nonzero((mine.reshape(-1, size) != theirs.reshape(-1, size)).any(axis=-1))[0].tolist()


@SETTINGS
@given(values=rows(exponents=(-38, 30)), qtype=st.sampled_from(K_TYPES))
def test_rounding_equals_llama_cpp(ggml, values, qtype):
    """Byte for byte, on every kind of block and any magnitude - even where the float16 scales overflow (which
    kq.quantize refuses, as llama-quantize does, but whose bytes the rounding still shares with C)."""
    with np.errstate(all="ignore"):
        mine = kq.QUANTIZERS[qtype](values.reshape(-1, 256)).reshape(values.shape[0], -1)
    assert differing_blocks(mine, llama_cpp_rows(ggml, values, qtype), qtype) == []


@SETTINGS
@given(values=arrays(np.float32, st.sampled_from([(1, 256), (2, 512)]),
                     elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
       qtype=st.sampled_from(K_TYPES))
def test_rounding_of_arbitrary_floats_equals_llama_cpp(ggml, values, qtype):
    """Any finite float32 values hypothesis thinks of (subnormals, repeats, extremes) round as in C."""
    with np.errstate(all="ignore"):
        mine = kq.QUANTIZERS[qtype](values.reshape(-1, 256)).reshape(values.shape[0], -1)
    assert differing_blocks(mine, llama_cpp_rows(ggml, values, qtype), qtype) == []


# Tiny Phi-3 shapes for the whole-file comparison. hidden 256, 8 layers: every row splits into super-blocks and
# use_more_bits picks layers 0, 3, 6, 7. tied-288: a tied head (token_embd takes output's type) and ffn_down rows
# of 288 (falling back to Q5_0/Q5_1/Q8_0). narrow: rows of 96 and 200 (output Q8_0, the rest Q5_x, ffn_down F16).
FILE_SHAPES = {
    "dense-8": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4, layers=8),
    "tied-288": dict(hidden_size=256, intermediate_size=288, num_attention_heads=4, num_key_value_heads=2, layers=3,
                     tie_word_embeddings=True),
    "narrow": dict(hidden_size=96, intermediate_size=200, num_attention_heads=6, num_key_value_heads=2, layers=2),
}
LLAMA_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
                "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory):
    """shape name -> (folder of the checkpoint, its F32 GGUF file), made once per module with Transformers."""
    pytest.importorskip("torch")
    from transformers import Phi3Config, Phi3ForCausalLM

    from phinano.config import load_config
    from phinano.formats import read_tensors
    from tiny_models import VOCAB, init_weights, save_checkpoint

    root, made = tmp_path_factory.mktemp("kquant"), {}

    def make(name: str):
        if name not in made:
            spec = dict(FILE_SHAPES[name])
            config = Phi3Config(vocab_size=VOCAB, num_hidden_layers=spec.pop("layers"), pad_token_id=0,
                                bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
                                original_max_position_embeddings=256, **spec)
            model = Phi3ForCausalLM(config).eval()
            init_weights(model, seed=3)
            folder = save_checkpoint(model, root / name)
            cfg = load_config(folder)
            tensors = {n: np.asarray(t, np.float32) for n, t in read_tensors(folder).items()
                       if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
            made[name] = folder, write_gguf(root / f"{name}-f32.gguf", cfg, tensors, lambda n, a: "F32")
        return made[name]

    return make


QUANTIZE = """
import ctypes, sys
try:
    import llama_cpp
except ImportError as e:
    print(f"llama_cpp cannot be imported: {e}")
    sys.exit(3)
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def llama_quantize(source: Path, out: Path, ftype: str) -> Path:
    """llama.cpp's quantizer (llama-quantize's library call), in a child process: a llama.cpp built for another
    CPU dies of SIGILL, which must not take the test run with it."""
    done = subprocess.run([sys.executable, "-c", QUANTIZE, str(source), str(out), ftype], capture_output=True,
                          text=True, timeout=600)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    if done.returncode == -signal.SIGILL:
        pytest.skip("llama.cpp's CPU backend uses instructions this CPU lacks (SIGILL): rebuild llama-cpp-python "
                    "for this machine to compare whole files")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("shape", FILE_SHAPES)
@pytest.mark.parametrize("type_name", LLAMA_FTYPES)
def test_quantized_file_equals_llama_quantize(llama_lib_dir, tiny_f32, tmp_path, shape, type_name):
    """`phinano quantize --type q4_k_m` (q5_k_m, q6_k, and the legacy types with their Q6_K head) against
    llama.cpp's quantizer run on the same weights as an F32 GGUF: the same tensors, each of the same type,
    with the same bytes."""
    from phinano.config import load_config
    from phinano.formats import read_tensors
    from phinano.quantize import write_quantized

    folder, f32_file = tiny_f32(shape)
    theirs = llama_quantize(f32_file, tmp_path / "llama.gguf", LLAMA_FTYPES[type_name])
    mine = write_quantized(folder, load_config(folder), read_tensors(folder), type_name, tmp_path / "mine.gguf", None)
    theirs = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    mine = {t.name: t for t in gguf.GGUFReader(mine).tensors}
    assert {n: t.tensor_type.name for n, t in mine.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    for name, t in mine.items():
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(theirs[name].data).view(np.uint8)), name


def test_quantized_file_reads_back(tiny_f32, tmp_path):
    """Without llama.cpp: a q4_k_m file of the 8-layer shape holds the mix's types, and the gguf package reads
    every tensor back near the checkpoint's values."""
    from phinano.config import load_config
    from phinano.formats import read_tensors
    from phinano.formats.gguf_write import gguf_names
    from phinano.quantize import write_quantized

    folder, _ = tiny_f32("dense-8")
    cfg, tensors = load_config(folder), read_tensors(folder)
    written = {t.name: t for t in gguf.GGUFReader(write_quantized(folder, cfg, tensors, "q4_k_m", tmp_path / "q.gguf",
                                                                  None)).tensors}
    kinds = {n: t.tensor_type.name for n, t in written.items()}
    assert kinds["output.weight"] == "Q6_K" and kinds["token_embd.weight"] == "Q4_K"
    assert [kinds[f"blk.{i}.attn_qkv.weight"] for i in range(8)] == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K",
                                                                     "Q6_K", "Q6_K"]
    assert [kinds[f"blk.{i}.ffn_up.weight"] for i in range(8)] == ["Q4_K"] * 8
    for name, values in gguf_names(cfg, {n: np.asarray(t, np.float32) for n, t in tensors.items()}).items():
        t = written[name]
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(values.shape)
        bound = RELATIVE.get(t.tensor_type.name, 0) * np.abs(values).max() + ABSOLUTE
        assert np.abs(back - values).max() <= bound, name


# ------------------------------------------------------------------ the type mixes, by hand
def test_use_more_bits_for_32_layers():
    """The first and last 4 of 32 layers and every third between (llama.cpp: i < n/8, i >= 7n/8, (i - n/8) % 3 == 2)."""
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(3) if use_more_bits(i, 3)] == [2]


MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


@pytest.mark.parametrize("mix,base", [("Q4_K_M", "Q4_K"), ("Q5_K_M", "Q5_K")])
def test_phi3_mini_mix(mix, base):
    """Phi-3-mini (32 layers, D 3072, F 8192, V 32064): Q6_K for output and, in the use_more_bits layers, the
    fused attn_qkv (which llama.cpp counts as attention values) and ffn_down; the mix's type elsewhere."""
    shapes = {"attn_qkv": (9216, 3072), "attn_output": (3072, 3072), "ffn_up": (16384, 3072),
              "ffn_down": (3072, 8192), "attn_norm": (3072,), "ffn_norm": (3072,)}
    assert k_mix_type(mix, "token_embd.weight", (32064, 3072), 32) == base
    assert k_mix_type(mix, "output.weight", (32064, 3072), 32) == "Q6_K"
    assert k_mix_type(mix, "output_norm.weight", (3072,), 32) == "F32"
    assert k_mix_type(mix, "rope_factors_long.weight", (48,), 32) == "F32"
    for layer in range(32):
        more = "Q6_K" if layer in MORE_BITS_32 else base
        want = {"attn_qkv": more, "ffn_down": more, "attn_output": base, "ffn_up": base, "attn_norm": "F32",
                "ffn_norm": "F32"}
        got = {part: k_mix_type(mix, f"blk.{layer}.{part}.weight", shape, 32) for part, shape in shapes.items()}
        assert got == want, layer


def test_q6_k_mix_is_q6_k_everywhere_but_the_kept_tensors():
    for name, shape in [("token_embd.weight", (32064, 3072)), ("output.weight", (32064, 3072)),
                        ("blk.5.attn_qkv.weight", (9216, 3072)), ("blk.6.ffn_down.weight", (3072, 8192))]:
        assert k_mix_type("Q6_K", name, shape, 32) == "Q6_K"
    assert k_mix_type("Q6_K", "blk.0.attn_norm.weight", (3072,), 32) == "F32"


def test_tied_head_and_phimoe():
    # Phi-4-mini ties its head: no output.weight, so token_embd is quantized as the output would be
    assert q4_k_m_type("token_embd.weight", (200064, 3072), 32, tied_embeddings=True) == "Q6_K"
    assert q4_k_m_type("token_embd.weight", (200064, 3072), 32, tied_embeddings=False) == "Q4_K"
    # Phi-3.5-MoE (16 experts, D 4096, F 6400): the router stays F32; experts' ffn_down follows use_more_bits
    assert k_mix_type("Q4_K_M", "blk.3.ffn_gate_inp.weight", (16, 4096), 32) == "F32"
    assert k_mix_type("Q4_K_M", "blk.3.ffn_down_exps.weight", (16, 4096, 6400), 32) == "Q6_K"
    assert k_mix_type("Q4_K_M", "blk.4.ffn_down_exps.weight", (16, 4096, 6400), 32) == "Q4_K"
    assert k_mix_type("Q4_K_M", "blk.4.ffn_gate_exps.weight", (16, 6400, 4096), 32) == "Q4_K"
    assert k_mix_type("Q4_K_M", "blk.9.attn_v.weight", (1024, 4096), 32) == "Q6_K"
    assert k_mix_type("Q4_K_M", "blk.9.attn_k.weight", (1024, 4096), 32) == "Q4_K"
    assert k_mix_type("Q4_K_M", "blk.10.attn_v.weight", (1024, 4096), 32) == "Q4_K"


def test_rows_that_256_does_not_divide_fall_back():
    assert k_mix_type("Q4_K_M", "output.weight", (320, 96), 2) == "Q8_0"
    assert k_mix_type("Q4_K_M", "output.weight", (320, 100), 2) == "F16"
    assert k_mix_type("Q4_K_M", "blk.0.ffn_down.weight", (256, 288), 8) == "Q8_0"  # Q6_K -> Q8_0
    assert k_mix_type("Q4_K_M", "blk.1.ffn_down.weight", (256, 288), 8) == "Q5_0"  # Q4_K -> Q5_0
    assert k_mix_type("Q5_K_M", "blk.1.ffn_down.weight", (256, 288), 8) == "Q5_1"  # Q5_K -> Q5_1
    assert k_mix_type("Q5_K_M", "blk.1.ffn_down.weight", (256, 200), 8) == "F16"  # nor 32
    with pytest.raises(PhinanoError, match="unknown type mix"):
        k_mix_type("Q3_K_M", "output.weight", (320, 256), 2)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_files_have_llama_cpps_q6_k_head(qtype):
    """llama.cpp's quantizer stores the head of a 4- or 5-bit legacy file as Q6_K (Q8_0 where 256 does not
    divide its rows), keeps the MoE router unrounded and rows that are not whole blocks in F16."""
    assert block_32_type(qtype, "output.weight", (32064, 3072)) == "Q6_K"
    assert block_32_type(qtype, "output.weight", (320, 96)) == "Q8_0"
    assert block_32_type(qtype, "token_embd.weight", (32064, 3072)) == qtype
    assert block_32_type(qtype, "token_embd.weight", (200064, 3072), tied_embeddings=True) == "Q6_K"
    assert block_32_type(qtype, "blk.3.ffn_down.weight", (3072, 8192)) == qtype
    assert block_32_type(qtype, "blk.3.ffn_down.weight", (256, 200)) == "F16"
    assert block_32_type(qtype, "blk.3.ffn_gate_inp.weight", (16, 4096)) == "F32"
    assert block_32_type(qtype, "blk.3.attn_norm.weight", (4096,)) == "F32"


def test_tensors_without_a_gguf_name_keep_the_chosen_block_32_type():
    """load(quantize="q8_0") of a vision checkpoint: llama.cpp's files have no image tower, so no rule picks
    its matrices' types; they take the chosen one, as before the per-tensor rules. A mix cannot do that."""
    fc1 = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight"
    tower = {fc1: np.zeros((256, 256)), "model.embed_tokens.weight": np.zeros((320, 256)),
             "lm_head.weight": np.zeros((320, 256))}
    kinds = hf_mix_types(tower, "Q4_0")
    assert kinds[fc1] == "Q4_0"
    assert kinds["lm_head.weight"] == "Q6_K" and kinds["model.embed_tokens.weight"] == "Q4_0"
    with pytest.raises(PhinanoError, match="no GGUF name"):
        hf_mix_types(tower, "Q4_K_M")


def test_q8_0_files_keep_a_q8_0_head():
    assert block_32_type("Q8_0", "output.weight", (32064, 3072)) == "Q8_0"
    assert block_32_type("Q8_0", "token_embd.weight", (200064, 3072), tied_embeddings=True) == "Q8_0"
    assert block_32_type("Q8_0", "blk.3.ffn_gate_inp.weight", (16, 4096)) == "F32"


def test_types_and_the_names_of_a_checkpoint():
    assert {"q4_k_m", "q5_k_m", "q6_k"} <= set(TYPES)
    assert matrix_type("Q4_K_M", "blk.0.attn_qkv.weight", np.zeros((768, 256)), 8) == "Q6_K"
    assert matrix_type("Q4_0", "blk.0.attn_qkv.weight", np.zeros((768, 256))) == "Q4_0"
    assert matrix_type("Q4_K_M", "blk.0.attn_norm.weight", np.zeros(256), 8) == "F32"
    # load(quantize=) holds Hugging Face names: they are translated as the GGUF writer translates them
    dense = {"model.embed_tokens.weight": np.zeros((320, 256)), "lm_head.weight": np.zeros((320, 256)),
             **{f"model.layers.{i}.self_attn.qkv_proj.weight": np.zeros((768, 256)) for i in range(8)},
             **{f"model.layers.{i}.mlp.down_proj.weight": np.zeros((256, 512)) for i in range(8)},
             "model.layers.0.input_layernorm.weight": np.zeros(256)}
    kinds = hf_mix_types(dense, "Q4_K_M")
    assert kinds["lm_head.weight"] == "Q6_K" and kinds["model.embed_tokens.weight"] == "Q4_K"
    assert [kinds[f"model.layers.{i}.self_attn.qkv_proj.weight"] for i in range(8)] == \
        ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert kinds["model.layers.0.input_layernorm.weight"] == "F32"
    tied = {n: t for n, t in dense.items() if n != "lm_head.weight"}
    assert hf_mix_types(tied, "Q4_K_M")["model.embed_tokens.weight"] == "Q6_K"
    moe = {"model.layers.0.block_sparse_moe.experts.3.w2.weight": np.zeros((256, 512)),
           "model.layers.1.block_sparse_moe.experts.3.w2.weight": np.zeros((256, 512)),
           "model.layers.0.block_sparse_moe.gate.weight": np.zeros((16, 256))}
    kinds = hf_mix_types(moe, "Q4_K_M")  # 2 layers: use_more_bits(i, 2) is i >= 1
    assert kinds == {"model.layers.0.block_sparse_moe.experts.3.w2.weight": "Q4_K",
                     "model.layers.1.block_sparse_moe.experts.3.w2.weight": "Q6_K",
                     "model.layers.0.block_sparse_moe.gate.weight": "F32"}
