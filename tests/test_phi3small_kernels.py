"""Phi-3-small's two ops, each written twice: the blocksparse attention (a readable mask in NumPy, a Numba
kernel that reads only the visible key blocks) and the GEGELU. Property-tested against each other, and the mask
against the pattern as the released code states it (block grid, local band, per-head vertical stride)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phinano.kernels import fast, reference

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")


def released_block_pattern(H, n_blocks, local_blocks, vert_stride, homo):
    """The block mask as the released Triton helper builds it (_get_sparse_attn_mask): (H, blocks, blocks)."""
    q = np.arange(n_blocks)[None, :, None]
    k = np.arange(n_blocks)[None, None, :]
    step = 0 if homo else max(1, int(vert_stride / H))
    vertical = np.stack([(np.arange(n_blocks) + h * step + 1) % vert_stride == 0 for h in range(H)])[:, None, :]
    return (q >= k) & ((q - k < local_blocks) | vertical)


@pytest.mark.parametrize("H, vert_stride, homo", [(4, 8, False), (8, 4, False), (4, 3, True)])
def test_mask_is_the_released_block_pattern_times_causal(H, vert_stride, homo):
    block, local, S = 4, 3, 61
    step = 0 if homo else max(1, int(vert_stride / H))
    visible = reference.blocksparse_visible(H, 0, S, S, block, local, vert_stride, step)  # (H, S, S)
    blocks = released_block_pattern(H, -(-S // block), local, vert_stride, homo)
    expected = np.kron(blocks, np.ones((block, block), bool))[:, :S, :S] & np.tril(np.ones((S, S), bool))
    np.testing.assert_array_equal(visible, expected)
    # the part of the pattern that makes it sparse is really there: some causal keys are hidden
    assert (~visible & np.tril(np.ones((S, S), bool))).any()
    if not homo:  # ... and the heads differ
        assert not (visible == visible[:1]).all()


def test_mask_of_a_later_step_is_a_slice_of_the_prefill_mask():
    full = reference.blocksparse_visible(4, 0, 50, 50, 4, 2, 4, 1)
    np.testing.assert_array_equal(reference.blocksparse_visible(4, 37, 13, 50, 4, 2, 4, 1), full[:, 37:])


@settings(max_examples=40, deadline=None)
@given(
    kvh=st.integers(1, 3), group=st.integers(1, 3), hd=st.sampled_from([4, 8]),
    start=st.integers(0, 70), T=st.integers(1, 9), block=st.integers(1, 8),
    local=st.integers(1, 4), stride=st.integers(1, 5), step=st.integers(0, 2), seed=st.integers(0, 2**16),
)
def test_fast_blocksparse_attention_equals_reference(kvh, group, hd, start, T, block, local, stride, step, seed):
    rng = np.random.default_rng(seed)
    H, S = kvh * group, start + T
    q = rng.standard_normal((T, H, hd), dtype=np.float32)
    k = rng.standard_normal((S, kvh, hd), dtype=np.float32)
    v = rng.standard_normal((S, kvh, hd), dtype=np.float32)
    args = (start, block, local, stride, step)
    expected = reference.blocksparse_attention(q, k, v, *args)
    np.testing.assert_allclose(fast.blocksparse_attention(q, k, v, *args), expected, rtol=2e-5, atol=2e-5)


def test_blocksparse_attention_ignores_the_hidden_keys():
    """Changing a key/value the pattern hides changes nothing; changing a visible one does."""
    rng = np.random.default_rng(0)
    T, H, S, HD = 1, 2, 40, 4
    q = rng.standard_normal((T, H, HD), dtype=np.float32)
    k = rng.standard_normal((S, 1, HD), dtype=np.float32)
    v = rng.standard_normal((S, 1, HD), dtype=np.float32)
    args = (S - 1, 4, 2, 3, 0)  # query 39 (block 9) sees blocks 8, 9 and vertical blocks 2, 5
    visible = reference.blocksparse_visible(H, *args[:1], T, S, *args[1:])[0, 0]
    assert visible.tolist() == [j // 4 in (2, 5, 8, 9) for j in range(S)]
    base = fast.blocksparse_attention(q, k, v, *args)
    for j, sees in [(0, False), (9, True), (17, False), (21, True), (31, False), (33, True)]:
        k2, v2 = k.copy(), v.copy()
        k2[j] += 5
        v2[j] += 5
        changed = not np.allclose(fast.blocksparse_attention(q, k2, v2, *args), base)
        assert changed == sees, j
        np.testing.assert_allclose(reference.blocksparse_attention(q, k2, v2, *args),
                                   fast.blocksparse_attention(q, k2, v2, *args), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 5), F=st.integers(1, 40), limit=st.sampled_from([None, 20.0, 0.5]), seed=st.integers(0, 999))
def test_fast_gegelu_equals_reference(T, F, limit, seed):
    x = (np.random.default_rng(seed).standard_normal((T, 2 * F)) * 30).astype(np.float32)
    x[0, 0] = np.inf if F > 1 else x[0, 0]
    np.testing.assert_allclose(fast.gegelu(x, limit), reference.gegelu(x, limit), rtol=1e-6, atol=1e-6)


def test_gegelu_is_the_released_formula():
    x = np.array([[1.0, 2.0, 30.0, -30.0, -1.0, 25.0]], np.float32)  # pairs (gelu, linear)
    a, b = np.array([1.0, 20.0, -1.0]), np.array([2.0, -20.0, 20.0])  # clamped at 20 as released
    expected = a / (1 + np.exp(-1.702 * a)) * (b + 1)
    np.testing.assert_allclose(reference.gegelu(x, 20.0)[0], expected, rtol=1e-6)
