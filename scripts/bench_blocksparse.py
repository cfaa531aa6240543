"""Decode cost of Phi-3-small's blocksparse attention against dense attention, one query over S cached keys.

    python scripts/bench_blocksparse.py [--threads N]

Phi-3-small-7B shapes: 32 query heads, 8 KV heads, head dim 128; the released pattern (blocks of 64, 16 local
blocks, vertical stride 8, per-head offsets). Prints milliseconds per call (median of 7) and the keys each query
head reads. Numbers are noisy on a shared machine.
"""

import argparse
import time

import numpy as np

from phinano.kernels import fast


def median_ms(fn, repeat=7):
    fn()  # compile / warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    fast.set_threads(args.threads)
    rng = np.random.default_rng(0)
    H, KVH, HD = 32, 8, 128
    print(f"{'S':>7} {'dense ms':>9} {'blocksparse ms':>15} {'keys read (head 0)':>19}")
    for S in (1024, 4096, 16384, 65536):
        q = rng.standard_normal((1, H, HD), dtype=np.float32)
        k = rng.standard_normal((S, KVH, HD), dtype=np.float32)
        v = rng.standard_normal((S, KVH, HD), dtype=np.float32)
        dense = median_ms(lambda: fast.attention(q, k, v, S - 1, None))
        sparse = median_ms(lambda: fast.blocksparse_attention(q, k, v, S - 1, 64, 16, 8, 1))
        qb = (S - 1) // 64
        band = max(0, qb - 15)
        keys = 64 * len([b for b in range(band) if (b + 1) % 8 == 0]) + (S - band * 64)
        print(f"{S:>7} {dense:>9.2f} {sparse:>15.2f} {keys:>19}")


if __name__ == "__main__":
    main()
