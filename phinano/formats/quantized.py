"""Quantized weights as GGML stores them: packed blocks that stay packed until a kernel reads them.

A `QuantizedTensor` stands for an (N, K) float matrix held as N rows of K / B blocks; a block packs B
consecutive weights of a row into a fixed number of bytes. The model never looks inside: it hands the
tensor to `linear` or `embed` like any weight array, and the kernels know how to multiply it.

One entry per type in `LAYOUTS` says how big a block is and how to turn blocks back into floats. Adding
a type is adding its `Layout` to `LAYOUTS` and its compiled kernels to `phinano.kernels.quantized.KERNELS`
(the K-quants do it from modules of their own: formats/kquants.py and kernels/kquants.py).

Q8_0 (GGML's 8-bit type), exactly as llama.cpp writes it in GGUF files: a block of 32 weights is 34 bytes,

    bytes 0..1    d     float16 scale, little-endian
    bytes 2..33   q[i]  32 int8 values
    weight i  =  d * q[i]

`quantize_q8_0` makes one from float32 weights with GGML's own arithmetic (bit for bit what
`quantize_row_q8_0_ref` in ggml and the `gguf` package's quantizer give).

GGML's legacy 4- and 5-bit types Q4_0, Q4_1, Q5_0 and Q5_1 are laid out in their own section below; they
are read (from GGUF files), not made here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import PhinanoError


@dataclass(frozen=True)
class Layout:
    """How one quantization type packs a row: blocks of `block` weights in `block_bytes` bytes each."""

    qtype: str  # GGML's name, e.g. "Q8_0"
    block: int  # weights per block, along a row (K)
    block_bytes: int  # bytes per block
    dequantize_blocks: Callable[[np.ndarray], np.ndarray]  # (n, block_bytes) uint8 -> (n, block) float32


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """(n, 34) uint8 Q8_0 blocks -> (n, 32) float32 weights d * q (exact: an 11-bit by 8-bit product)."""
    d = blocks[:, :2].view(np.float16).astype(np.float32)  # (n, 1) scales
    q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (n, 32)
    return d * q


# ---------------------------------------------------------------------------------------------------------
# Q4_0, Q4_1, Q5_0, Q5_1: GGML's legacy 4- and 5-bit types, blocks of 32 weights, as llama.cpp writes them
#
#     Q4_0 (18 bytes):  d float16 |                               qs 16 bytes    weight = d * (q - 8)
#     Q4_1 (20 bytes):  d float16 | m float16 |                   qs 16 bytes    weight = d * q + m
#     Q5_0 (22 bytes):  d float16 |             qh 4 bytes      | qs 16 bytes    weight = d * (q - 16)
#     Q5_1 (24 bytes):  d float16 | m float16 | qh 4 bytes      | qs 16 bytes    weight = d * q + m
#
# qs holds 4 bits of each q: byte i's low nibble is q[i], its high nibble q[i + 16]. In the Q5 types, qh is a
# little-endian uint32 whose bit j is the fifth bit (16) of q[j]. Every weight is exact in float32 (d * q
# has at most 11 + 5 significant bits); d * q + m is then rounded once, as in GGML.
# ---------------------------------------------------------------------------------------------------------


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at bytes at, at + 1 of each (n, block_bytes) block, as (n, 1) float32 (exact)."""
    return blocks[:, at : at + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) float32 q in 0..15: low nibbles are q[0..15], high ones q[16..31]."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) float32, 16 where bit j is set, else 0."""
    return np.unpackbits(qh, axis=1, bitorder="little").astype(np.float32) * 16


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """(n, 18) uint8 Q4_0 blocks -> (n, 32) float32 weights d * (q - 8)."""
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8)


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """(n, 20) uint8 Q4_1 blocks -> (n, 32) float32 weights d * q + m."""
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)


def _dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """(n, 22) uint8 Q5_0 blocks -> (n, 32) float32 weights d * (q - 16)."""
    q = _nibbles(blocks[:, 6:]) + _fifth_bits(blocks[:, 2:6])  # (n, 32) in 0..31
    return _f16(blocks, 0) * (q - 16)


def _dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """(n, 24) uint8 Q5_1 blocks -> (n, 32) float32 weights d * q + m."""
    q = _nibbles(blocks[:, 8:]) + _fifth_bits(blocks[:, 4:8])  # (n, 32) in 0..31
    return _f16(blocks, 0) * q + _f16(blocks, 2)


LAYOUTS: dict[str, Layout] = {
    layout.qtype: layout
    for layout in (
        Layout("Q8_0", 32, 34, _dequantize_q8_0),
        Layout("Q4_0", 32, 18, _dequantize_q4_0),
        Layout("Q4_1", 32, 20, _dequantize_q4_1),
        Layout("Q5_0", 32, 22, _dequantize_q5_0),
        Layout("Q5_1", 32, 24, _dequantize_q5_1),
    )
}


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """An (N, K) float matrix kept in packed blocks of type `qtype` (see `LAYOUTS`).

    `data` is (N, K / block * block_bytes) uint8: row r's blocks in order, as they lie in a GGUF file (a
    memory map is fine; nothing here writes to it). `shape` and `ndim` describe the float matrix, so
    shape checks written for arrays work unchanged. Indexing selects whole rows: `t[a:b]`, `t[ids]`.
    It is compared and hashed by identity (eq=False), never by its bytes, so it can key a dict or a cache.
    """

    qtype: str
    shape: tuple[int, int]  # (N, K) of the float matrix it stands for
    data: np.ndarray  # (N, K // block * block_bytes) uint8

    def __post_init__(self) -> None:
        if self.qtype not in LAYOUTS:
            raise PhinanoError(f"unsupported quantization type {self.qtype!r} (phinano reads {', '.join(LAYOUTS)})")
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        layout = self.layout
        if len(self.shape) != 2 or self.shape[1] % layout.block:
            raise PhinanoError(f"a {self.qtype} tensor must be 2-D with rows a multiple of {layout.block} wide, not {self.shape}")
        want = (self.shape[0], self.shape[1] // layout.block * layout.block_bytes)
        if not isinstance(self.data, np.ndarray) or self.data.dtype != np.uint8 or self.data.shape != want:
            got = f"{self.data.dtype} {self.data.shape}" if isinstance(self.data, np.ndarray) else type(self.data).__name__
            raise PhinanoError(f"a {self.qtype} tensor of shape {self.shape} needs uint8 data of shape {want}, got {got}")

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.qtype]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        """Bytes of packed data (what a matrix-vector product reads)."""
        return self.data.nbytes

    def __getitem__(self, rows) -> QuantizedTensor:
        """Whole rows, selected as NumPy selects along the first axis (a slice or 1-D ids) -> QuantizedTensor."""
        data = None if isinstance(rows, tuple) else self.data[rows]  # (n, row bytes) for whole rows
        if data is None or data.ndim != 2:
            raise IndexError(f"a QuantizedTensor selects whole rows (a slice or 1-D ids), not {rows!r}")
        return QuantizedTensor(self.qtype, (data.shape[0], self.shape[1]), data)


def dequantize(t: QuantizedTensor) -> np.ndarray:
    """The (N, K) float32 matrix a QuantizedTensor stands for (what the `gguf` package's dequantize gives)."""
    layout = t.layout
    blocks = np.ascontiguousarray(t.data).reshape(-1, layout.block_bytes)  # (N * K / block, block_bytes)
    return layout.dequantize_blocks(blocks).reshape(t.shape)


def _round_half_away_from_zero(v: np.ndarray) -> np.ndarray:
    """C's roundf, exactly: halves go away from zero (NumPy's round goes to even; v + 0.5 can round up)."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= 0.5), v)


def quantize_q8_0(w: np.ndarray) -> QuantizedTensor:
    """float32 (N, K) weights, K a multiple of 32 -> Q8_0, with GGML's arithmetic: per block of 32,
    d = max|w| / 127 in float32, q = roundf(w * (1 / d)) (q = 0 where d = 0), d stored as float16."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % 32:
        raise PhinanoError(f"Q8_0 needs a 2-D matrix with rows a multiple of 32 wide, not {w.shape}")
    blocks = w.reshape(-1, 32)  # (n, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # (n, 1) float32
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = _round_half_away_from_zero(blocks * inverse).astype(np.int8)  # (n, 32), |q| <= 127
    with np.errstate(over="ignore"):  # a scale beyond float16's range becomes inf, as in GGML
        d16 = d.astype(np.float16)
    packed = np.concatenate([d16.view(np.uint8), q.view(np.uint8)], axis=1)  # (n, 34)
    return QuantizedTensor("Q8_0", w.shape, packed.reshape(w.shape[0], w.shape[1] // 32 * 34))
