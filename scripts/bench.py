"""Benchmark phinano (numba and numpy backends) against Transformers on one checkpoint, in one run.

    python scripts/make_random_checkpoint.py --out /tmp/phi3-mini            # full-size random Phi-3-mini
    python scripts/bench.py --model /tmp/phi3-mini --write docs/benchmarks.md

For every engine, in its own process (so peak memory is its own): load time, prefill tokens/s for
128- and 512-token prompts, time to first token (128-token prompt), decode tokens/s over 64 new tokens,
and peak resident memory; the median of --runs runs. The parent process measures the machine's memory
bandwidth in the same run (the best of four streaming readers of 1 GiB: a BLAS matvec, a compiled uint16 sum,
NumPy's sum, and phinano's own bf16 kernel on the same bytes; each printed), so decode speed is reported as a
share of the bandwidth limit = bandwidth / bytes of weights read per token.

phinano-numba also measures its share at the same moment (`decode_turns`): in its own process, decode steps and
the streaming readers take turns, and each round's step is compared with that round's best reader, so the
share does not depend on how the machine's memory speed drifted between the probe and the engine's run.

Prefill is set against the machine's float32 GEMM rate the same way: the parent times a float32 product of
each prompt's shape (`gemm_rates`), every engine's prefill is printed in GFLOP/s (`prefill_flops` counts its
work) and as a share of that rate, and phinano-numba's prefills take turns with the probe in its process
(`prefill_turns`).

Engines: phinano-numba, phinano-numpy, hf-bf16, hf-fp32 (Transformers, CPU, same thread count), and
llama.cpp when llama-cpp-python is installed and --gguf names the same weights converted to GGUF. On a CPU
with AMX, phinano-numba-amx1 (prefill with plain bf16 activations) and phinano-numba-noamx (prefill through
float32 BLAS) show what the tiles and the activation split each bring.

Quantized rows: phinano against llama.cpp on the same GGUF files, in one run:

    for t in q8_0 q4_0 q4_k_m; do phinano quantize --model /tmp/phi3-mini --type $t --out /tmp/mini-$t.gguf; done
    python scripts/bench.py --quantized /tmp/mini-q8_0.gguf,/tmp/mini-q4_0.gguf,/tmp/mini-q4_k_m.gguf \
        --threads 2 --write docs/benchmarks.md

With --rounds R the two engines take turns R times per file (phinano, llama.cpp, then llama.cpp, phinano, ...)
and each figure is the median over the rounds: a shared machine's speed drifts over minutes, and taking turns
spreads that drift over both engines instead of giving it to whichever ran second.

Each file's bandwidth limit counts the bytes of its tensors as stored (the packed blocks), the embedding
table only gathered unless it is also the head. The checkpoint needs its tokenizer files: llama.cpp does not
load a GGUF without a vocabulary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("phinano-numba", "phinano-numpy", "hf-bf16", "hf-fp32", "llama.cpp")
# Variants of phinano-numba for the CPUs with AMX (kernels/amx.py): prefill with plain bf16 activations (one
# part instead of three), and without the tiles at all (float32 BLAS). Each runs in its own process with its
# environment; the worker runs it as phinano-numba.
VARIANTS = {"phinano-numba-amx1": {"PHINANO_AMX_PARTS": "1"}, "phinano-numba-noamx": {"PHINANO_AMX": "0"}}


# ------------------------------------------------------------------------------------------- measuring
def peak_rss_gb() -> float:
    """Peak resident set size of this process (VmHWM), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def available_gb() -> float:
    """Memory the system can still give (MemAvailable), in GB; infinite where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("inf")


def streaming_readers(threads: int, gib: float = 1.0) -> tuple[dict, int]:
    """The streaming readers of the bandwidth probe, each a no-argument callable reading the same `gib`-GiB
    array once, and the bytes each reads: a float32 BLAS matrix-vector product, a compiled (Numba) parallel
    sum of uint16 values (the bf16 kernels' access pattern), NumPy's float32 sum (one thread), and phinano's
    own bf16 product on the same bytes read as bf16 weights."""
    import numba
    import numpy as np

    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    rows = int(gib * 2**30 / 4 / 8192)
    a = np.random.default_rng(0).standard_normal((rows, 8192), dtype=np.float32)
    x = np.ones(8192, np.float32)
    bits = a.view(np.uint16)  # the same bytes read as uint16

    @numba.njit(parallel=True, cache=False)
    def u16_sum(b):
        total = 0
        for i in numba.prange(b.shape[0]):
            s = 0
            for j in range(b.shape[1]):
                s += b[i, j]
            total += s
        return total

    from phinano.kernels import fast

    weights, x1 = bits.reshape(-1, 8192), np.ones((1, 8192), np.float32)  # the bytes as bf16 (2 * rows, 8192)
    # BLAS last: its threads spin for a while after a call and would slow whatever reader came next
    readers = {"Numba uint16 parallel sum": lambda: u16_sum(bits), "NumPy float32 sum": lambda: a.sum(),
               "phinano bf16 linear": lambda: fast.linear(x1, weights), "float32 BLAS matvec": lambda: a @ x}
    for read in readers.values():
        read()  # compile, fault the pages in
    return readers, a.nbytes


def measure_bandwidth(threads: int, gib: float = 1.0, runs: int = 7) -> tuple[float, str]:
    """The streaming limit: the best of the four `streaming_readers`, GB/s, with a line naming each.

    The bf16 reader also shows how close the kernel alone comes to the best reader; the rest of a decode
    step's share is the other ops and the drift between the probe and the engine runs (`decode_turns`
    measures without the drift). Which reader is best differs between CPU kinds, so the limit is the best of
    them, measured in the same run as the engines."""
    readers, nbytes = streaming_readers(threads, gib)

    def best(read) -> float:
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            read()
            times.append(time.perf_counter() - t)
        return nbytes / min(times) / 1e9

    probes = {name: best(read) for name, read in readers.items()}
    line = ", ".join(f"{name} {gbs:.1f}" for name, gbs in probes.items())
    return max(probes.values()), f"best of: {line} GB/s"


def gemm_rates(threads: int, tokens: list[int], K: int = 3072, N: int = 8192, runs: int = 5) -> tuple[dict, str]:
    """The machine's float32 matrix-product rate, GFLOP/s, for each prompt length T in `tokens`: a (T, K) x
    (K, N) product shaped like Phi-3-mini's gate or up projection, the best of two ways of running it (each
    printed): NumPy's BLAS on its own threads, and the N columns split into one part per thread, each a
    single-threaded BLAS call (how phinano's prefill calls BLAS, `runtime.in_parts`). Short prompts get their
    own rate: a 128-row product runs BLAS slower than a 512-row one, so a prefill is compared with the rate
    of its own shape."""
    import numpy as np

    from phinano.kernels.runtime import in_parts

    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, K), dtype=np.float32)  # (N, K) rows, as phinano's widened tiles are

    def in_threads(x, y):
        def part(i: int, parts: int) -> None:
            a, b = N * i // parts, N * (i + 1) // parts
            y[:, a:b] = x @ w[a:b].T
        in_parts(part, threads)

    rates, lines = {}, []
    for T in tokens:
        x = rng.standard_normal((T, K), dtype=np.float32)
        y = np.empty((T, N), np.float32)
        # NumPy's BLAS last: its threads spin for a while after a call and would slow the other way
        ways = {"one part per thread": lambda: in_threads(x, y), "NumPy BLAS": lambda: np.matmul(x, w.T, out=y)}
        best = {}
        for name, run in ways.items():
            run()  # warm: threads started, w in cache as far as it fits
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            best[name] = 2 * T * K * N / min(times) / 1e9
        rates[T] = max(best.values())
        lines.append(f"T={T}: " + ", ".join(f"{name} {g:.0f}" for name, g in best.items()))
    return rates, "; ".join(lines) + " GFLOP/s"


def prefill_flops(folder: Path, n: int) -> float:
    """Floating-point operations of an n-token prefill that keeps the last position's logits only: 2 per
    weight a token multiplies (every layer matrix; PhiMoE's 2 routed experts of its E), the head once, and
    causal attention's two products (2 x 2 x H x HD per visible key: n (n + 1) / 2 keys, or fewer within a
    sliding window). Norms, rotary and activations are left out (under 1 % at these sizes)."""
    from phinano.config import load_config
    from phinano.formats import read_tensors

    cfg = load_config(folder)
    per_token, head = 0, 0
    for name, t in read_tensors(folder).items():
        if len(t.shape) != 2 or name == "model.embed_tokens.weight":
            continue
        params = t.shape[0] * t.shape[1]
        if name == "lm_head.weight":
            head = params
        elif ".experts." in name:
            per_token += params * cfg.num_experts_per_tok // cfg.num_local_experts
        elif name.startswith("model.layers."):
            per_token += params
    if cfg.tie_word_embeddings and not head:
        head = cfg.vocab_size * cfg.hidden_size
    window = cfg.sliding_window or n
    keys = sum(min(i + 1, window) for i in range(n))  # keys each position sees, summed
    attention = 4 * cfg.num_attention_heads * cfg.head_dim * keys * cfg.num_hidden_layers
    return 2.0 * (n * per_token + head) + attention


def decode_turns(model, prompt: list[int], bytes_per_token: int, threads: int, rounds: int, gib: float = 1.0) -> dict:
    """Decode steps and the bandwidth probe taking turns in one process: each round times one decode step and
    then each streaming reader once, so the step and the best reader see the machine at the same moment (the
    memory speed of a shared machine can drift by half within minutes). Per round the share is the step's
    GB/s (bytes_per_token / step time) over the best reader's GB/s; the medians over the rounds are returned.
    BLAS's own threads spin for a while after a call and would slow the next step: a pause follows them."""
    import numpy as np

    readers, nbytes = streaming_readers(threads, gib)
    readers.pop("NumPy float32 sum")  # one thread: never the best reader
    cache = model.new_cache(len(prompt) + rounds + 2)
    model.step(cache, prompt, last_only=True)
    token = [prompt[-1]]
    steps, probes = [], []
    model.step(cache, token, last_only=True)  # warm
    for _ in range(rounds):
        t = time.perf_counter()
        model.step(cache, token, last_only=True)
        steps.append(bytes_per_token / (time.perf_counter() - t) / 1e9)
        best = 0.0
        for read in readers.values():
            t = time.perf_counter()
            read()
            best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
        probes.append(best)
        time.sleep(0.2)
    share = np.median(np.array(steps) / np.array(probes))
    return {"step_gbps": float(np.median(steps)), "probe_gbps": float(np.median(probes)), "share": float(share),
            "rounds": rounds}


def prefill_turns(model, prompts: dict, flops: dict, threads: int, rounds: int, K: int = 3072, N: int = 8192) -> dict:
    """Prefills and the GEMM probe taking turns in one process, as `decode_turns` does for decode: each round
    times a prefill of every prompt length n and then the float32 product of its shape (`gemm_rates`), so
    both see the machine at the same moment. Returns, per n, the medians over the rounds of the prefill's
    GFLOP/s (flops[n] / time), of the probe's, and of their ratio."""
    import numpy as np

    out = {}
    for n, ids in prompts.items():
        done, probe = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            model.step(model.new_cache(n), ids, last_only=True)
            done.append(flops[n] / (time.perf_counter() - t) / 1e9)
            rates, _ = gemm_rates(threads, [n], K, N, runs=3)
            probe.append(rates[n])
            time.sleep(0.3)  # NumPy's BLAS threads spin for a while after a call: let them settle first
        out[n] = {"gflops": float(np.median(done)), "gemm": float(np.median(probe)),
                  "share": float(np.median(np.array(done) / np.array(probe))), "rounds": rounds}
    return out


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of stored (packed) weights one decode step reads from a GGUF file: every tensor once, the embedding
    table only gathered unless there is no output.weight (a tied head reads it whole)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    names = {t.name for t in tensors}
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or "output.weight" not in names)


def gguf_type_name(path: Path) -> str:
    """The file's most common matrix type (Q8_0, Q4_0, Q4_K...) with the share of bytes it holds."""
    import gguf

    sizes: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        sizes[t.tensor_type.name] = sizes.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return ", ".join(f"{k} {v / sum(sizes.values()):.0%}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])
                     if v / sum(sizes.values()) >= 0.01)


def weight_bytes_per_token(folder: Path) -> int:
    """Bytes of weights one decode step reads: every matrix once, the embedding table only gathered
    (unless it is also the tied lm_head); PhiMoE reads 2 of its experts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from phinano.config import load_config
    from phinano.formats import read_tensors

    cfg = load_config(folder)
    total = 0
    for name, t in read_tensors(folder).items():
        if name == "model.embed_tokens.weight" and not cfg.tie_word_embeddings:
            continue
        if ".experts." in name:
            total += t.nbytes * cfg.num_experts_per_tok // cfg.num_local_experts
        else:
            total += t.nbytes
    return total


# --------------------------------------------------------------------------------------------- workers
def prompts(vocab: int, lengths: list[int]) -> dict[int, list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return {n: rng.integers(100, min(vocab, 32000), n).tolist() for n in lengths}


def run_phinano(args, backend: str) -> dict:
    import phinano
    from phinano.generate import generate_tokens

    t = time.perf_counter()
    model = phinano.load(args.model, backend=backend, threads=args.threads, tokenizer=False)
    ids = prompts(model.config.vocab_size, args.prompt)
    model.generate(ids[args.prompt[0]][:8], 2, stop_token_ids=[])  # compile / warm up
    load = time.perf_counter() - t
    out = {"load_s": load, "prefill": {}, "ttft": [], "decode": []}
    for n in args.prompt:
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            model.step(model.new_cache(n), ids[n], last_only=True)
            times.append(time.perf_counter() - t)
        out["prefill"][n] = n / statistics.median(times)
    for _ in range(args.runs):
        stats: dict = {}
        for _ in generate_tokens(model, ids[args.prompt[0]], args.new, stop_token_ids=[], stats=stats):
            pass
        out["ttft"].append(stats["prefill_seconds"])
        out["decode"].append((stats["new_tokens"] - 1) / stats["decode_seconds"])
    out["peak_rss_gb"] = peak_rss_gb()  # the engine's own, before the probe's array below
    if backend == "numba" and args.bytes_per_token and available_gb() > 2.5:  # the probe's 1 GiB must fit too
        out["turns"] = decode_turns(model, ids[args.prompt[0]], args.bytes_per_token, args.threads, 3 * args.runs)
    if backend == "numba" and not str(args.model).endswith(".gguf"):
        flops = {n: prefill_flops(Path(args.model), n) for n in args.prompt}
        out["prefill_turns"] = prefill_turns(model, ids, flops, args.threads, max(3, args.runs))
    return out


def run_hf(args, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    ids = prompts(model.config.vocab_size, args.prompt)
    with torch.no_grad():
        model.generate(torch.tensor([ids[args.prompt[0]][:8]]), max_new_tokens=2, do_sample=False)
    load = time.perf_counter() - t
    out = {"load_s": load, "prefill": {}, "ttft": [], "decode": []}
    gen = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        for n in args.prompt:
            x = torch.tensor([ids[n]])
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                model(x, logits_to_keep=1)
                times.append(time.perf_counter() - t)
            out["prefill"][n] = n / statistics.median(times)
        x = torch.tensor([ids[args.prompt[0]]])
        for _ in range(args.runs):
            t = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, **gen)
            first = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(x, max_new_tokens=args.new, min_new_tokens=args.new, **gen)
            whole = time.perf_counter() - t
            out["ttft"].append(first)
            out["decode"].append((args.new - 1) / max(whole - first, 1e-9))
    return out


def run_llama_cpp(args) -> dict:
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=args.gguf, n_ctx=max(args.prompt) + args.new + 8, n_threads=args.threads,
                n_batch=512, verbose=False)
    load = time.perf_counter() - t
    ids = prompts(llm.n_vocab(), args.prompt)
    out = {"load_s": load, "prefill": {}, "ttft": [], "decode": []}
    for n in args.prompt:
        times = []
        for _ in range(args.runs):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids[n])
            times.append(time.perf_counter() - t)
        out["prefill"][n] = n / statistics.median(times)
    for _ in range(args.runs):  # greedy generation; the first yield comes after the prompt's evaluation
        llm.reset()
        t = time.perf_counter()
        for i, _token in enumerate(llm.generate(ids[args.prompt[0]], top_k=1, reset=True)):
            if i == 0:
                first = time.perf_counter() - t
                t = time.perf_counter()
            if i == args.new - 1:
                break
        out["ttft"].append(first)
        out["decode"].append((args.new - 1) / (time.perf_counter() - t))
    return out


def worker(args) -> None:
    engine = args.worker
    if engine.startswith("phinano-"):
        out = run_phinano(args, engine.split("-", 1)[1])
    elif engine.startswith("hf-"):
        out = run_hf(args, engine.split("-", 1)[1])
    else:
        out = run_llama_cpp(args)
    out["ttft"] = statistics.median(out["ttft"])
    out["decode"] = statistics.median(out["decode"])
    out.setdefault("peak_rss_gb", peak_rss_gb())
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------------------------------------- parent
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def available(engine: str, args) -> str | None:
    """None if the engine can run, else why not."""
    if engine.startswith("hf-"):
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            return "torch/transformers not installed"
    if engine == "llama.cpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "llama-cpp-python not installed"
        if not args.gguf:
            return "no --gguf file given"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (e.g. from make_random_checkpoint.py)")
    p.add_argument("--quantized", default=None,
                   help="comma-separated GGUF files: phinano vs llama.cpp on each (instead of the --model table)")
    p.add_argument("--engines", default="phinano-numba,phinano-numpy,hf-bf16,hf-fp32,llama.cpp")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="--quantized: times the two engines take turns per file")
    p.add_argument("--prompt", default="128,512", help="prompt lengths for prefill (the first also for decode)")
    p.add_argument("--new", type=int, default=64, help="new tokens for the decode measurement")
    p.add_argument("--gguf", default=None, help="the same weights as GGUF, for llama.cpp")
    p.add_argument("--write", default=None, help="write the results table into this markdown file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bytes-per-token", type=int, default=0, help=argparse.SUPPRESS)  # the parent tells the worker
    args = p.parse_args(argv)
    args.prompt = [int(n) for n in str(args.prompt).split(",")]
    if args.rounds < 1 or args.runs < 1:
        p.error(f"--runs and --rounds must be at least 1, got {args.runs} and {args.rounds}")
    if args.worker:
        worker(args)
        return 0
    if args.quantized:
        return main_quantized(args)
    if not args.model:
        p.error("--model or --quantized is required")

    folder = Path(args.model)
    bytes_per_token = weight_bytes_per_token(folder)
    checkpoint_gb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    print(f"measuring memory bandwidth ({args.threads} threads) ...", flush=True)
    bandwidth, args.probes = measure_bandwidth(args.threads)
    limit = bandwidth * 1e9 / bytes_per_token
    print(f"bandwidth {bandwidth:.1f} GB/s; {bytes_per_token / 1e9:.2f} GB read per token -> "
          f"decode limit {limit:.2f} tokens/s", flush=True)
    print("measuring the float32 GEMM rate ...", flush=True)
    args.gemm, args.gemm_line = gemm_rates(args.threads, args.prompt)
    args.flops = {n: prefill_flops(folder, n) for n in args.prompt}
    print(f"GEMM rate ({args.gemm_line})", flush=True)

    results: dict[str, dict | str] = {}
    for engine in args.engines.split(","):
        why = available(engine, args)
        if why:
            results[engine] = why
            print(f"{engine}: skipped ({why})")
            continue
        print(f"{engine} ...", flush=True)
        results[engine] = run_engine(engine, str(folder), args.gguf, args, bytes_per_token)
        print(f"{engine}: {results[engine]}", flush=True)

    table = render(args, results, bandwidth, bytes_per_token, limit, checkpoint_gb)
    print(table)
    if args.write:
        write_section(Path(args.write), "## Full-size decode and prefill", table)
    return 0


def run_engine(engine: str, model: str, gguf_path: str | None, args, bytes_per_token: int = 0) -> dict | str:
    """One engine in its own process (so that its peak memory is its own): its RESULT dict, or why it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads),
           "NUMBA_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), **VARIANTS.get(engine, {})}
    cmd = [sys.executable, __file__, "--worker", "phinano-numba" if engine in VARIANTS else engine,
           "--model", model, "--threads", str(args.threads),
           "--runs", str(args.runs), "--prompt", ",".join(map(str, args.prompt)), "--new", str(args.new),
           "--bytes-per-token", str(bytes_per_token)]
    if gguf_path:
        cmd += ["--gguf", gguf_path]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    if r.returncode or line is None:
        return "failed: " + (r.stderr.strip().splitlines() or ["no output"])[-1]
    return json.loads(line[len("RESULT "):])


def merge_rounds(results: list) -> dict | str:
    """One engine's RESULT dicts from several rounds -> the median of each speed and time, the largest peak
    RSS; a round that failed or was skipped (a string) makes the whole a failure."""
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        return failed[0]
    med = statistics.median
    merged = {"load_s": med(r["load_s"] for r in results), "ttft": med(r["ttft"] for r in results),
              "decode": med(r["decode"] for r in results), "peak_rss_gb": max(r["peak_rss_gb"] for r in results),
              "prefill": {n: med(r["prefill"][n] for r in results) for n in results[0]["prefill"]}}
    if all("prefill_turns" in r for r in results):
        merged["prefill_turns"] = {
            n: {**{k: med(r["prefill_turns"][n][k] for r in results) for k in ("gflops", "gemm", "share")},
                "rounds": sum(r["prefill_turns"][n].get("rounds", 0) for r in results)}
            for n in results[0]["prefill_turns"]}
    if all("turns" in r for r in results):
        merged["turns"] = {k: med(r["turns"][k] for r in results) for k in ("step_gbps", "probe_gbps", "share")}
        merged["turns"]["rounds"] = sum(r["turns"]["rounds"] for r in results)
    return merged


def turns_line(name: str, r: dict) -> list[str]:
    """The sentence on `decode_turns` for an engine's result, if it has one."""
    if not isinstance(r, dict) or "turns" not in r:
        return []
    t = r["turns"]
    return [f"- {name}, decode steps and the probe taking turns ({t['rounds']} rounds in its process): a step "
            f"read {t['step_gbps']:.1f} GB/s of weights while the best reader read {t['probe_gbps']:.1f} GB/s "
            f"(medians); **{100 * t['share']:.0f} % of the limit at the same moment** (median of the rounds' ratios)"]


def prefill_turns_line(name: str, r: dict) -> list[str]:
    """The sentence on `prefill_turns` for an engine's result, if it has one."""
    if not isinstance(r, dict) or "prefill_turns" not in r:
        return []
    parts = [f"{n} tokens {t['gflops']:.0f} GFLOP/s while the probe did {t['gemm']:.0f}: **{100 * t['share']:.0f} %**"
             for n, t in r["prefill_turns"].items()]
    rounds = next(iter(r["prefill_turns"].values())).get("rounds", "")
    return [f"- {name}, prefills and the GEMM probe of their shape taking turns ({rounds} rounds in its process; "
            "medians): " + "; ".join(parts) + " of the float32 GEMM rate at the same moment"]


def main_quantized(args) -> int:
    """phinano-numba and llama.cpp on each GGUF file of --quantized, taking turns --rounds times, in one run."""
    files = [Path(f) for f in args.quantized.split(",") if f]
    for f in files:
        if not f.is_file():
            print(f"no such GGUF file: {f}", file=sys.stderr)
            return 1
    print(f"measuring memory bandwidth ({args.threads} threads) ...", flush=True)
    bandwidth, args.probes = measure_bandwidth(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for f in files:
        per_token = gguf_bytes_per_token(f)
        limit = bandwidth * 1e9 / per_token
        engines = ("phinano-numba", "llama.cpp")
        rounds = {engine: [] for engine in engines}
        for i in range(args.rounds):
            for engine in engines if i % 2 == 0 else engines[::-1]:  # take turns: drift hits both alike
                why = available(engine, argparse.Namespace(gguf=str(f)))
                print(f"{f.name} {engine} (round {i + 1} of {args.rounds}) ...", flush=True)
                r = why or run_engine(engine, str(f), str(f) if engine == "llama.cpp" else None, args, per_token)
                print(f"{f.name} {engine}: {r}", flush=True)
                rounds[engine].append(r)
        for engine in engines:
            rows.append((f, per_token, limit, engine, merge_rounds(rounds[engine])))
    table = render_quantized(args, rows, bandwidth, load_before)
    print(table)
    if args.write:
        write_section(Path(args.write), "## Quantized decode and prefill: phinano vs llama.cpp", table)
    return 0


def render_quantized(args, rows, bandwidth, load_before) -> str:
    P = args.prompt
    head = ("| file (matrix types by bytes) | GB read per token | limit tok/s | engine | decode tok/s | share of limit | "
            + " | ".join(f"prefill {n} tok/s" for n in P) + f" | TTFT ({P[0]}) s | load s | peak RSS GB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for f, per_token, limit, engine, r in rows:
        cells = f"| {f.name} ({gguf_type_name(f)}) | {per_token / 1e9:.2f} | {limit:.2f} | {engine} | "
        if isinstance(r, str):
            lines.append(cells + r + " |" + " |" * (head.count("|") - 6))
            continue
        lines.append(cells + f"{r['decode']:.2f} | {100 * r['decode'] / limit:.0f} % | "
                     + " | ".join(f"{_pf(r, n):.1f}" for n in P)
                     + f" | {r['ttft']:.2f} | {r['load_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    ratios = []
    for f in dict.fromkeys(row[0] for row in rows):
        mine = next((r for g, _, _, e, r in rows if g == f and e == "phinano-numba"), None)
        theirs = next((r for g, _, _, e, r in rows if g == f and e == "llama.cpp"), None)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            ratios.append(f"- {f.name}: phinano / llama.cpp decode {mine['decode'] / theirs['decode']:.2f}x, prefill "
                          f"{P[-1]} {_pf(mine, P[-1]) / _pf(theirs, P[-1]):.2f}x")
        ratios += turns_line(f"{f.name}, phinano", mine)
    date = datetime.date.today().isoformat()
    return "\n".join([
        f"Command: `python scripts/bench.py --quantized {args.quantized} --threads {args.threads} --runs {args.runs} "
        f"--rounds {args.rounds} --prompt {','.join(map(str, P))} --new {args.new}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; date {date}; 1-minute load average "
        f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after  ",
        f"Memory bandwidth (1 GiB, same run; {args.probes}): {bandwidth:.1f} GB/s; limit = bandwidth / bytes "
        "of packed weights read per token  ",
        f"Median of {args.runs} runs in each of {args.rounds} rounds (the engines taking turns), then the median over "
        f"the rounds; decode = {args.new} new tokens after a {P[0]}-token prompt; activations stay "
        "float32 in phinano (llama.cpp rounds them to 8 bits for its integer dot products).",
        "",
        *lines,
        "",
        *ratios,
    ])


def render(args, results, bandwidth, bytes_per_token, limit, checkpoint_gb) -> str:
    P = args.prompt
    head = ("| engine | load s | " + " | ".join(f"prefill {n} tok/s" for n in P)
            + f" | TTFT ({P[0]}) s | decode tok/s | share of limit | peak RSS GB | RSS / checkpoint |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = results.get("phinano-numba")
    for engine, r in results.items():
        if isinstance(r, str):
            lines.append(f"| {engine} | {r} |" + " |" * (head.count("|") - 3))
            continue
        lines.append(f"| {engine} | {r['load_s']:.1f} | " + " | ".join(f"{_pf(r, n):.1f}" for n in P)
                     + f" | {r['ttft']:.2f} | {r['decode']:.2f} | {100 * r['decode'] / limit:.0f} % | "
                     f"{r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / checkpoint_gb:.2f} |")
    ratios = []
    if isinstance(base, dict):
        for engine, r in results.items():
            if engine != "phinano-numba" and isinstance(r, dict):
                ratios.append(f"- phinano-numba vs {engine}: decode {base['decode'] / r['decode']:.2f}x, prefill "
                              f"{P[-1]} {_pf(base, P[-1]) / _pf(r, P[-1]):.2f}x")
        ratios += turns_line("phinano-numba", base)
        ratios += prefill_turns_line("phinano-numba", base)
    for engine, r in results.items():
        if isinstance(r, dict) and getattr(args, "gemm", None):
            rates = [f"{n} tokens {_pf(r, n) * args.flops[n] / n / 1e9:.0f} GFLOP/s = "
                     f"{100 * _pf(r, n) * args.flops[n] / n / 1e9 / args.gemm[n]:.0f} %" for n in P]
            ratios.append(f"- {engine} prefill against the float32 GEMM rate of its prompt's shape: "
                          + ", ".join(rates))
    date = datetime.date.today().isoformat()
    return "\n".join([
        f"Command: `python scripts/bench.py --model {args.model} --engines {args.engines} --threads {args.threads} "
        f"--runs {args.runs} --prompt {','.join(map(str, P))} --new {args.new}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; date {date}  ",
        f"Checkpoint: {checkpoint_gb:.2f} GB on disk; {bytes_per_token / 1e9:.2f} GB of weights read per decoded token  ",
        f"Memory bandwidth (1 GiB, same run; {args.probes}): {bandwidth:.1f} GB/s → decode limit "
        f"{limit:.2f} tokens/s  ",
        *([f"float32 GEMM rate (same run; (T, 3072) x (3072, 8192), best of: {args.gemm_line}): "
           + ", ".join(f"{args.gemm[n]:.0f} GFLOP/s at T = {n}" for n in P) + "; a prefill does "
           + ", ".join(f"{args.flops[n] / 1e9:.0f} GFLOP at {n} tokens" for n in P) + "  "]
          if getattr(args, "gemm", None) else []),
        f"Median of {args.runs} runs; decode = {args.new} new tokens after a {P[0]}-token prompt.",
        "",
        *lines,
        "",
        *ratios,
    ])


def _pf(r: dict, n: int) -> float:
    return r["prefill"][str(n)] if str(n) in r["prefill"] else r["prefill"][n]


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the section `title` of a markdown file, leaving the other sections alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + title + "\n\n" + body + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + title + "\n\n" + body + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
