"""How fast are the Numba kernels here? Prints weight-streaming GB/s of `linear` against a BLAS reference.

    python scripts/kernel_bench.py              # decode matvecs: bf16 vs BLAS, then bf16 vs the quantized types
    python scripts/kernel_bench.py --prefill    # + the fused-vs-BLAS crossover in tokens, and attention
    python scripts/kernel_bench.py --startup    # + compile time and cached start time, in fresh processes
    python scripts/kernel_bench.py --no-decode --attention   # decode attention over caches from memory

Decode: y = x @ w.T with w a 1 GiB bfloat16 matrix (32768 x 16384, uint16 bits) through
`fast.linear` (and 1 GiB of each Phi-3-mini matrix shape in turn, beside it), against NumPy's float32 BLAS
matrix-vector product on a 1 GiB float32 matrix (16384 x 16384)
timed in the same run: that product streams memory at the machine's read rate, so the ratio says how
close the kernel gets to the bandwidth limit. GB/s counts weight bytes read once per call.
Then bf16 against the quantized types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; `--types` picks some)
on Phi-3-mini's down_proj shape (3072 x 8192), on 1 thread and on all: a set of such matrices of about 1 GiB
is multiplied in turn, as a model's layers are, so the weights come from memory and not from the CPU's
caches. GB/s counts the bytes as stored (per 32 weights Q8_0: 34, Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24;
per 256 weights Q4_K: 144, Q5_K: 176, Q6_K: 210).
Beside each type, a streaming-read probe on the same matrices (a parallel sum of their bytes as 64-bit words,
which does nothing but read): the memory limit for that data size, in the same run; "share" is the kernel's
GB/s over the probe's.
Last, each format's compute ceiling per core, which other processes on the cores barely change.
--attention: decode attention (one query) over 16 layers' KV caches in turn, so that the cache comes from
memory as in a decode step, at Phi-3-mini's and Phi-4-mini's head shapes, taking turns with the streaming-read
probe on the same caches; "share" is the median of the rounds' ratios.
Median (and best) of --repeats runs after one warm-up. The machine is shared: run it when it is quiet.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench import cpu_name  # scripts/bench.py, beside this file


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was around the numbers."""
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of fn() over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times))


def random_bf16(rng: np.random.Generator, shape: tuple[int, int], std: float = 0.02) -> np.ndarray:
    """Random bf16 bits (uint16), made a block of rows at a time (no full-size float32 temporary)."""
    w = np.empty(shape, np.uint16)
    step = max(1, (16 << 20) // shape[1])
    for r in range(0, shape[0], step):
        block = rng.standard_normal((min(step, shape[0] - r), shape[1]), dtype=np.float32) * np.float32(std)
        w[r : r + step] = block.view(np.uint32) >> 16
    return w


def bench_decode(fast, repeats: int) -> None:
    rng = np.random.default_rng(0)
    N, K = 32768, 16384  # 1 GiB of bf16
    w = random_bf16(rng, (N, K))
    x = rng.standard_normal((1, K), dtype=np.float32)
    fast.linear(x, w)  # compile or load from cache
    med, best = timed(lambda: fast.linear(x, w), repeats)
    gbs = w.nbytes / 1e9
    print(f"linear bf16 decode, {N} x {K} ({w.nbytes / 2**30:.2f} GiB): {gbs / med:6.1f} GB/s median, {gbs / best:6.1f} best")
    del w
    # A model's matrices are smaller, with shorter rows: 1 GiB of each Phi-3-mini shape, multiplied in turn
    # (q/k/v/o, gate and up, down), against the one large product above. Short rows read slower when every
    # work item starts new memory streams (fast.py, "Which rows are read together").
    for n, k in ((3072, 3072), (8192, 3072), (3072, 8192)):
        ws = [random_bf16(rng, (n, k)) for _ in range(2**30 // (2 * n * k))]
        xk = rng.standard_normal((1, k), dtype=np.float32)
        m, b = timed(lambda: [fast.linear(xk, one) for one in ws], repeats)
        g = sum(one.nbytes for one in ws) / 1e9
        print(f"  {len(ws)} bf16 matrices of {n} x {k} in turn: {g / m:6.1f} GB/s median, {g / b:6.1f} best"
              f" ({g / m / (gbs / med):.0%} of the large product's median)")
        del ws

    wf = rng.standard_normal((16384, 16384), dtype=np.float32)  # 1 GiB of float32
    xf = rng.standard_normal(16384, dtype=np.float32)
    med_b, best_b = timed(lambda: wf @ xf, repeats)
    gbf = wf.nbytes / 1e9
    print(f"BLAS float32 matvec, 16384 x 16384 ({wf.nbytes / 2**30:.2f} GiB): {gbf / med_b:6.1f} GB/s median, {gbf / best_b:6.1f} best")
    print(f"linear / BLAS read rate: {(gbs / med) / (gbf / med_b):.0%} (median), {(gbs / best) / (gbf / best_b):.0%} (best)")
    med_f, best_f = timed(lambda: fast.linear(xf[None], wf), repeats)
    print(f"linear float32 decode on the same float32 matrix: {gbf / med_f:6.1f} GB/s median, {gbf / best_f:6.1f} best")


# Typical values of each quantized type's float16 fields, by byte offset in a block (d at 0; m at 2 in
# Q4_1 and Q5_1). Random bytes there would include inf, nan and subnormals, which some CPUs compute slowly.
FLOAT16_FIELDS = {
    "Q8_0": {0: 0.01},
    "Q4_0": {0: 0.01},
    "Q4_1": {0: 0.01, 2: -0.08},
    "Q5_0": {0: 0.005},
    "Q5_1": {0: 0.005, 2: -0.08},
    "Q4_K": {0: 0.001, 2: 0.002},  # d, dmin
    "Q5_K": {0: 0.001, 2: 0.002},
    "Q6_K": {208: 0.001},  # d is at the end of a Q6_K block
}


def random_quantized(rng: np.random.Generator, qtype: str, shape: tuple[int, int]):
    """Random blocks of a quantized type (any q bytes, typical scales and mins): what the kernel reads,
    without quantizing."""
    from phinano.formats.quantized import LAYOUTS, QuantizedTensor

    layout = LAYOUTS[qtype]
    N, K = shape
    data = rng.integers(0, 256, (N, K // layout.block * layout.block_bytes), dtype=np.uint8)
    blocks = data.reshape(-1, layout.block_bytes)
    for at, value in FLOAT16_FIELDS[qtype].items():
        blocks[:, at : at + 2] = np.float16(value).reshape(1, 1).view(np.uint8)
    return QuantizedTensor(qtype, shape, data)


def random_weights(rng: np.random.Generator, name: str, shape: tuple[int, int]):
    """Random bf16 bits or random blocks of quantized type `name`."""
    return random_bf16(rng, shape) if name == "bf16" else random_quantized(rng, name, shape)


def core_rate(fast, rng: np.random.Generator, name: str) -> tuple[float, float]:
    """(G weights/s, GB/s of stored bytes) of the fused kernel on one thread, on a 96 x 2048 matrix that
    stays in the CPU's L2 cache, by process CPU time: what unpacking and arithmetic allow a core, whatever
    the memory does, and nearly unchanged when other processes take turns on the core (wall-clock rates
    then drop, CPU time does not)."""
    w = random_weights(rng, name, (96, 2048))
    rows, kernels = fast._reader(w)  # what linear() reads and runs for this weight
    matmul = kernels.matmul
    x = rng.standard_normal((1, 2048), dtype=np.float32)
    y = np.empty((1, 96), np.float32)
    fast.set_threads(1)
    matmul(x, rows, y)
    best = float("inf")
    for _ in range(7):
        t0 = time.process_time()
        for _ in range(500):
            matmul(x, rows, y)
        best = min(best, (time.process_time() - t0) / 500)
    return 96 * 2048 / best / 1e9, w.nbytes / best / 1e9


def stream_read_gbs(arrays: list[np.ndarray], repeats: int) -> tuple[float, float]:
    """(median, best) GB/s of reading every byte of `arrays` once, in parallel (a sum of their 64-bit words):
    the read rate that bounds a kernel streaming the same data."""
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def total(words):
        s = np.uint64(0)
        for i in prange(words.shape[0]):
            s += words[i]
        return s

    words = [a.reshape(-1).view(np.uint64) for a in arrays]
    total(words[0][:1024])
    med, best = timed(lambda: [total(w) for w in words], repeats)
    gb = sum(a.nbytes for a in arrays) / 1e9
    return gb / med, gb / best


def bench_decode_formats(fast, repeats: int, threads: int, qtypes: list[str]) -> None:
    """bf16 and quantized matvecs on 3072 x 8192 matrices, about 1 GiB of each in turn, 1 thread and `threads`;
    then each format's compute ceiling per core (`core_rate`)."""
    rng = np.random.default_rng(3)
    N, K = 3072, 8192
    x = rng.standard_normal((1, K), dtype=np.float32)
    print(f"\ndecode matvec on {N} x {K} matrices, about 1 GiB of each format multiplied in turn:")
    for name in ["bf16", *qtypes]:
        one = random_weights(rng, name, (N, K))
        weights = [one] + [random_weights(rng, name, (N, K)) for _ in range(2**30 // one.nbytes - 1)]
        stored = sum(w.nbytes for w in weights) / 1e9
        for n in sorted({1, threads}):
            fast.set_threads(n)
            med, best = timed(lambda: [fast.linear(x, w) for w in weights], repeats)
            read_med, read_best = stream_read_gbs([w if name == "bf16" else w.data for w in weights], repeats)
            print(f"  {name:5s} {n} thread{'s' if n > 1 else ' '}: {stored / med:5.1f} GB/s median, {stored / best:5.1f} best"
                  f"  ({len(weights) * N * K / med / 1e9:5.1f} G weights/s); read probe {read_med:5.1f} median,"
                  f" {read_best:5.1f} best; share {stored / med / read_med:4.0%} median, {stored / best / read_best:4.0%} best",
                  flush=True)
        del one, weights
    print("compute ceiling per core (L2-resident 96 x 2048, 1 thread, CPU time):")
    for name in ["bf16", *qtypes]:
        weights_per_s, bytes_per_s = core_rate(fast, rng, name)
        print(f"  {name:5s} {bytes_per_s:5.1f} GB/s  ({weights_per_s:5.1f} G weights/s)", flush=True)
    fast.set_threads(threads)


def bench_prefill(fast, repeats: int, qtypes: list[str]) -> None:
    """Tokens x (16384, 3072) (Phi-3-mini's gate_up_proj) in bf16 and each quantized type: fused kernel vs
    tiles + BLAS, which says from how many tokens on `linear` should switch (`blas_min_tokens`)."""
    from phinano.kernels.quantized import KERNELS

    rng = np.random.default_rng(1)
    N, K = 16384, 3072
    w = random_bf16(rng, (N, K))
    wf = (w.astype(np.uint32) << 16).view(np.float32)
    rows, kernels = fast._reader(w)  # bf16 read as pairs (`fast._bf16_matmul`)
    readers = {"bf16": (rows, kernels.matmul, kernels.widen_rows, kernels.blas_min_tokens)}
    for name in qtypes:
        k = KERNELS[name]
        readers[name] = (random_quantized(rng, name, (N, K)).data, k.matmul, k.widen_rows, k.blas_min_tokens)
    print(f"\nlinear on a {N} x {K} matrix, GFLOP/s of the fused kernel / of tiles + BLAS; linear() switches to BLAS at")
    print("  " + ", ".join(f"{name} {r[3]}" for name, r in readers.items()) + " tokens")
    columns = [f"{name + ' fused/tiles':>17}" for name in readers] + [f"{'f32 BLAS (whole f32 copy)':>26}"]
    print(f"{'tokens':>6} " + " ".join(columns))
    for T in (1, 2, 4, 8, 16, 32, 48, 64, 128, 512):
        x = rng.standard_normal((T, K), dtype=np.float32)
        y = np.empty((T, N), np.float32)

        def gflops(fn, worth_timing: bool = True) -> float:
            return 2.0 * T * N * K / 1e9 / timed(fn, repeats)[0] if worth_timing else float("nan")

        cells = []
        for rows, matmul, widen_rows, _ in readers.values():
            fused = gflops(lambda: matmul(x, rows, y), T <= 128)
            tiles = gflops(lambda: fast._matmul_blas(x, rows, widen_rows), T >= 4)
            cells.append(f"{fused:8.1f}/{tiles:<8.1f}")
        full = gflops(lambda: x @ wf.T)
        print(f"{T:>6} " + " ".join(cells) + f" {full:26.1f}", flush=True)


def bench_attention(fast, reference, repeats: int) -> None:
    rng = np.random.default_rng(2)
    print("\nattention, ms (fast vs NumPy reference):")
    for T, S, H, KVH, HD in ((1, 4096, 32, 32, 96), (1, 4096, 24, 8, 128), (512, 512, 32, 32, 96)):
        q = rng.standard_normal((T, H, HD), dtype=np.float32)
        k = rng.standard_normal((S, KVH, HD), dtype=np.float32)
        v = rng.standard_normal((S, KVH, HD), dtype=np.float32)
        f = timed(lambda: fast.attention(q, k, v, S - T, None), repeats)[0]
        r = timed(lambda: reference.attention(q, k, v, S - T, None), 1)[0]
        kv = 2 * k.nbytes / 1e9
        print(f"  T={T:<4} S={S:<5} H={H:<3} KVH={KVH:<3} HD={HD:<4} fast {f * 1e3:8.1f}  reference {r * 1e3:8.1f}"
              + (f"   (KV cache read at {kv / f:.1f} GB/s)" if T == 1 else ""))


def bench_decode_attention(fast, repeats: int) -> None:
    """One query's attention over `layers` caches in turn (each read once from memory, as a decode step reads
    its layers'), the probe reading the same caches in between: GB/s of cache read and the share of the
    probe's rate at the same moment."""
    rng = np.random.default_rng(3)
    layers = 16
    print(f"\ndecode attention, 1 query, {layers} layers' caches in turn (float32), against a read of the same caches:")
    for S, H, KVH, HD in ((512, 32, 32, 96), (2047, 32, 32, 96), (512, 24, 8, 128), (2047, 24, 8, 128)):
        q = rng.standard_normal((1, H, HD), dtype=np.float32)
        ks = [rng.standard_normal((S, KVH, HD), dtype=np.float32) for _ in range(layers)]
        vs = [rng.standard_normal((S, KVH, HD), dtype=np.float32) for _ in range(layers)]
        gb = 2 * sum(k.nbytes for k in ks) / 1e9
        rates, shares = [], []
        for _ in range(repeats):
            t = timed(lambda: [fast.attention(q, k, v, S - 1, None) for k, v in zip(ks, vs)], 1)[0]
            probe = stream_read_gbs(ks + vs, 1)[0]
            rates.append(gb / t)
            shares.append(gb / t / probe)
        print(f"  S={S:<5} H={H:<3} KVH={KVH:<3} HD={HD:<4} {np.median(rates):5.1f} GB/s "
              f"(best {max(rates):5.1f}), {100 * np.median(shares):3.0f} % of the read at the same moment, "
              f"{1e3 * gb / layers / np.median(rates):6.2f} ms a layer")
        del ks, vs


_STARTUP = """
import time
t0 = time.perf_counter()
import numpy as np
from phinano.kernels import fast
t1 = time.perf_counter()
x = np.ones((1, 256), np.float32)
w = np.ones((64, 256), np.uint16)
fast.linear(x, w)
t2 = time.perf_counter()
for T in (5, 64):
    fast.linear(np.ones((T, 256), np.float32), w)
fast.rmsnorm(x, w[0], 1e-5)
fast.rope(np.ones((1, 2, 96), np.float32), np.ones((1, 96), np.float32), np.ones((1, 96), np.float32))
fast.attention(np.ones((1, 4, 96), np.float32), np.ones((3, 2, 96), np.float32), np.ones((3, 2, 96), np.float32), 2, None)
fast.swiglu(x, x)
fast.softmax(x)
fast.embed(w, np.array([1, 2]))
t3 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {t3 - t2:.2f}")
"""


def bench_startup() -> None:
    """Import + first linear call + the other kernels, cold (empty Numba cache) and then cached."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        print("\nstartup, seconds: import phinano.kernels.fast | first linear() | the other kernels")
        for label in ("first run (compiles)", "second run (cached)"):
            out = subprocess.run([sys.executable, "-c", _STARTUP], env=env, capture_output=True, text=True, check=True)
            imp, first, rest = (float(s) for s in out.stdout.split())
            print(f"  {label:22s} import {imp:5.2f}   first linear {first:6.2f}   other kernels {rest:6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", action="store_true", help="also the token-count crossover and attention")
    parser.add_argument("--startup", action="store_true", help="also compile and cached start times")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode benchmarks")
    parser.add_argument("--attention", action="store_true", help="also decode attention over caches from memory")
    parser.add_argument("--ceilings", action="store_true",
                        help="only each format's compute ceiling per core (best of 3), quick and robust to load")
    parser.add_argument("--types", default=",".join(FLOAT16_FIELDS), help="quantized types to measure, comma-separated")
    args = parser.parse_args(argv)

    from phinano.kernels import fast, reference

    qtypes = [name for name in args.types.split(",") if name]
    unknown = sorted(set(qtypes) - set(FLOAT16_FIELDS))
    if unknown:
        parser.error(f"unknown --types {', '.join(unknown)} (choose from {', '.join(FLOAT16_FIELDS)})")
    threads = fast.set_threads(args.threads)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load_average()} before")
    print(f"kernel threads: {threads}; BLAS threads: OpenBLAS default (OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')})")
    if args.ceilings:
        rng = np.random.default_rng(0)
        print("compute ceiling per core (L2-resident 96 x 2048, 1 thread, CPU time, best of 3):")
        for name in ["bf16", *qtypes]:
            weights_per_s, bytes_per_s = max(core_rate(fast, rng, name) for _ in range(3))
            print(f"  {name:5s} {bytes_per_s:5.1f} GB/s  ({weights_per_s:5.1f} G weights/s)", flush=True)
        return 0
    if not args.no_decode:
        bench_decode(fast, args.repeats)
        bench_decode_formats(fast, args.repeats, threads, qtypes)
    if args.prefill:
        bench_prefill(fast, args.repeats, qtypes)
        bench_attention(fast, reference, args.repeats)
    if args.attention:
        bench_decode_attention(fast, args.repeats)
    if args.startup:
        bench_startup()
    print(f"\nload average {load_average()} after (1, 5, 15 minutes; other processes share the cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
