"""GGML's K-quants (Q4_K, Q5_K, Q6_K), exactly as llama.cpp writes them in GGUF files.

A K-quant block is a *super-block* of 256 consecutive weights of a row. It holds one or two float16
numbers for the whole super-block and small integer scales for its sub-blocks, so that most of the scale
information costs 6 or 8 bits instead of 16. All multi-byte numbers are little-endian.

Q4_K, 144 bytes, 8 sub-blocks of 32 weights, weight = d * sc[j] * q - dmin * m[j]  (q = 0..15):

    bytes   0..1     d       float16, scale of the sub-block scales
    bytes   2..3     dmin    float16, scale of the sub-block minimums
    bytes   4..15    scales  8 six-bit scales sc[j] and 8 six-bit minimums m[j], packed (see below)
    bytes  16..143   qs      128 bytes of 4-bit q, in four groups of 32 bytes: group g holds
                             sub-block 2g in its low nibbles and sub-block 2g + 1 in its high nibbles
                             (byte 32g + i: low nibble = weight 64g + i, high nibble = weight 64g + 32 + i)

Q5_K, 176 bytes: Q4_K with a fifth bit for every weight, weight = d * sc[j] * q - dmin * m[j]  (q = 0..31):

    bytes   0..15    d, dmin, scales  as in Q4_K
    bytes  16..47    qh      32 bytes of fifth bits: bit j of byte i is the 16s bit of weight 32j + i
    bytes  48..175   qs      the low 4 bits, laid out as Q4_K's qs

Q6_K, 210 bytes, 16 sub-blocks of 16 weights, weight = d * sc[j] * (q - 32)  (q = 0..63, sc int8):

    bytes   0..127   ql      low 4 bits of q, two halves of 64 bytes: half h, byte i < 32 holds weight
                             128h + i (low nibble) and 128h + 64 + i (high nibble); byte 32 + i holds
                             weights 128h + 32 + i and 128h + 96 + i
    bytes 128..191   qh      high 2 bits of q, two halves of 32 bytes: half h, byte i holds the top bits
                             of weights 128h + i, + 32, + 64, + 96 in its bit pairs 0-1, 2-3, 4-5, 6-7
    bytes 192..207   scales  16 int8 scales, sc[j] for weights 16j .. 16j + 15
    bytes 208..209   d       float16

The 12 bytes of Q4_K/Q5_K scales hold sixteen 6-bit numbers. The first four scales and minimums fit in
the low six bits of bytes 0..7; the last four are split into a low nibble in bytes 8..11 and two high
bits parked in the free top bits of bytes 0..7:

    byte  0.. 3   hh ssssss    ssssss = sc[0..3],  hh = bits 4-5 of sc[4..7]
    byte  4.. 7   hh mmmmmm    mmmmmm = m[0..3],   hh = bits 4-5 of m[4..7]
    byte  8..11   mmmm ssss    ssss = bits 0-3 of sc[4..7],  mmmm = bits 0-3 of m[4..7]

The float32 arithmetic is GGML's (and the `gguf` package's): d * sc is rounded to float32, then times q,
then minus dmin * m. Every product here is exact in float32: d has 11 significant bits, sc and m at most 6
(Q6_K: |sc| <= 128, at most 7), q at most 5 (Q6_K: |q - 32| <= 32, at most 5), so at most 23 of float32's
24, and float16's range, subnormals included, lies well inside float32's normal range. Only the final
subtraction of Q4_K/Q5_K rounds, whatever order or fused multiply-add a kernel uses.
"""

from __future__ import annotations

import numpy as np

from .quantized import LAYOUTS, Layout, _f16

SUPER_BLOCK = 256  # weights per K-quant block


def _scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) uint8 packed scales of Q4_K/Q5_K -> sc, m: (n, 8) uint8 each, 0..63 (drawing above)."""
    low_sc, low_m, nibbles = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]  # (n, 4) each
    sc = np.concatenate([low_sc & 0x3F, (nibbles & 0x0F) | (low_sc >> 6 << 4)], axis=1)  # (n, 8)
    m = np.concatenate([low_m & 0x3F, (nibbles >> 4) | (low_m >> 6 << 4)], axis=1)  # (n, 8)
    return sc, m


def _low_bits_of_q(qs: np.ndarray) -> np.ndarray:
    """(n, 128) Q4_K/Q5_K qs bytes -> (n, 8, 32) uint8 low 4 bits per sub-block: group g's low
    nibbles are sub-block 2g, its high nibbles sub-block 2g + 1."""
    groups = qs.reshape(-1, 4, 1, 32)  # (n, group, 1, 32)
    return np.concatenate([groups & 0x0F, groups >> 4], axis=2).reshape(-1, 8, 32)


def _scaled_minus_min(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K blocks and their (n, 8, 32) q -> (n, 256) float32 d * sc * q - dmin * m."""
    sc, m = _scales_and_mins(blocks[:, 4:16])  # (n, 8) each
    scale = (_f16(blocks, 0) * sc)[:, :, None]  # (n, 8, 1) d * sc, exact
    minimum = (_f16(blocks, 2) * m)[:, :, None]  # (n, 8, 1) dmin * m, exact
    return (scale * q.astype(np.float32) - minimum).reshape(-1, SUPER_BLOCK)


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 144) uint8 Q4_K blocks -> (n, 256) float32 weights d * sc * q - dmin * m."""
    return _scaled_minus_min(blocks, _low_bits_of_q(blocks[:, 16:144]))


def _dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 176) uint8 Q5_K blocks -> (n, 256) float32 weights d * sc * q - dmin * m, q = low | fifth << 4."""
    qh = blocks[:, 16:48]  # (n, 32): bit j of byte i belongs to weight 32j + i
    fifth = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n, 8, 32)
    return _scaled_minus_min(blocks, _low_bits_of_q(blocks[:, 48:176]) | (fifth << 4))


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 210) uint8 Q6_K blocks -> (n, 256) float32 weights d * sc * (q - 32)."""
    ql = blocks[:, 0:128].reshape(-1, 2, 2, 32)  # (n, half, first or second 32 bytes, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, half, quarter, 32): quarters 0, 1 then 2, 3
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # (n, half, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3  # (n, half, quarter, 32)
    q = (low | (high << 4)).astype(np.float32) - np.float32(32)  # (n, 2, 4, 32), -32 .. 31
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16): one per 16 weights
    scale = (_f16(blocks, 208) * sc)[:, :, None]  # (n, 16, 1) d * sc, exact
    return (scale * q.reshape(-1, 16, 16)).reshape(-1, SUPER_BLOCK)


K_LAYOUTS = (
    Layout("Q4_K", SUPER_BLOCK, 144, _dequantize_q4_k),
    Layout("Q5_K", SUPER_BLOCK, 176, _dequantize_q5_k),
    Layout("Q6_K", SUPER_BLOCK, 210, _dequantize_q6_k),
)
LAYOUTS.update({layout.qtype: layout for layout in K_LAYOUTS})  # QuantizedTensor now accepts these types
