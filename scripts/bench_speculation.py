"""Prompt-lookup speculation on the shipped nano-phi3: acceptance and decode speed, plain vs drafted.

    python scripts/bench_speculation.py                 # prints a Markdown table for docs/benchmarks.md
    python scripts/bench_speculation.py --new 128 --runs 5 --k 2 4 8

Acceptance only means something on a trained model (a random checkpoint's continuations have nothing to do
with its prompt), so this runs nano-phi3 on three kinds of work, each prompt taken from the running
interpreter's standard library (heapq.py and json/__init__.py are held out from the nano models'
training, docs/nano.md):

    edit a code file    a module's first ~400 tokens, then its first lines again: the answer copies the file
    extract from text   a module's docstring, then a sentence of it again: the answer quotes the document
    open-ended          a bare function signature: nothing to copy but the model's own output; greedy, and
                        sampled (temperature 0.8, top-p 0.95, seed 0: the tokens equal plain sampling's too)

For each, no drafts and --k draft lengths: decode tokens/s (median of --runs) by the wall clock and by this
process's CPU time (less disturbed by other work on a shared machine: the generation's CPU time less its
prefill's), drafts kept / drafted, new tokens per model step, and whether the tokens equal the plain loop's
(they must).

With --verify-cost, the other half of the trade on any checkpoint, e.g. a full-size random one (its
acceptance would mean nothing, but what a step costs does not depend on the weights' values):

    python scripts/bench_speculation.py --model /tmp/phi3-mini-random --verify-cost --k 2 4 8 --threads 2

times one model step of K + 1 positions (a draft being checked) against one of 1 position, after a 64-token
prompt. Speculation gains when the new tokens per step (the table above) exceed that cost ratio: the
speed-up is about (new tokens per step) / (cost of a K + 1 step in 1-position steps). --context N times
the same steps after N cached positions instead (random keys and values: what attention costs does not
depend on them), e.g. 8192 on a 128k model:

    python scripts/make_random_checkpoint.py --out /tmp/phi35-mini-random --config phi-3.5-mini
    python scripts/bench_speculation.py --model /tmp/phi35-mini-random --verify-cost --context 8192 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sysconfig
import time
from pathlib import Path

import numpy as np

import phinano
from phinano.generate import generate_tokens
from phinano.rope import rope_variant


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=0.8, top_p=0.95, seed=0)  # nano-phi3's own generation_config.json settings, seeded


def workloads(tok) -> dict[str, tuple[list[int], dict]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = tok.encode((stdlib / "heapq.py").read_text())
    document = (stdlib / "json" / "__init__.py").read_text()
    return {
        "edit a code file": (code[:400] + code[:24], GREEDY),
        "extract from text": (tok.encode(document[:1600] + "\n# As the documentation above says:\n"
                                         + document[200:260]), GREEDY),
        "open-ended, greedy": (tok.encode("def fibonacci(n):\n"), GREEDY),
        "open-ended, sampled": (tok.encode("def fibonacci(n):\n"), SAMPLED),
    }


def run(model, ids, new, k, options=GREEDY) -> tuple[list[int], dict]:
    """The tokens and the stats of one generation; stats["cpu_seconds"]: this process's CPU time for it."""
    stats: dict = {}
    start = time.process_time()
    tokens = list(generate_tokens(model, ids, new, stop_token_ids=[], prompt_lookup_num_tokens=k or None,
                                  stats=stats, **options))
    stats["cpu_seconds"] = time.process_time() - start
    return tokens, stats


def verify_cost(model, ks: list[int], runs: int, context: int = 0) -> None:
    """Print the time of one model step of K + 1 positions against one of 1 (the best of `runs`, the sizes
    taking turns), as a Markdown table: after a 64-token prompt, or after `context` cached positions whose
    keys and values are random numbers (a long prompt's prefill would take minutes, and attention's cost
    does not depend on the values)."""
    prompt = [(7 * i) % (model.config.vocab_size - 3) + 3 for i in range(64)]  # any ids: the cost is what counts
    cache = model.new_cache((context or 64) + max(ks) + 1)
    if context:
        rng = np.random.default_rng(0)
        rows = (context, *cache.k.shape[2:])  # (context, KVH, HD): one layer's filled positions
        for layer in range(cache.k.shape[0]):  # one layer at a time: no temporary the size of the cache
            cache.k[layer, :context] = rng.standard_normal(rows, np.float32)
            cache.v[layer, :context] = rng.standard_normal(rows, np.float32)
        cache.length = context
    else:
        model.step(cache, prompt, last_only=True)
    before = cache.length
    best = {k: float("inf") for k in [0, *ks]}
    for turn in range(runs + 1):  # turn 0 compiles and warms up, and is not counted
        for k in best:
            start = time.perf_counter()
            model.step(cache, prompt[:k + 1])  # every position's logits, as checking a draft needs
            seconds = time.perf_counter() - start
            cache.truncate(before)
            if turn:
                best[k] = min(best[k], seconds)
    after = f"{context} cached positions" if context else "a 64-token prompt"
    print(f"{model.name}: one step of K + 1 positions after {after}, best of {runs}; {cpu_model()}, "
          f"{datetime.date.today()}\n")
    print("| positions in the step | step ms | cost in 1-position steps |")
    print("|---|---|---|")
    for k, seconds in best.items():
        print(f"| {k + 1} | {seconds * 1000:.1f} | {seconds / best[0]:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nano-phi3")
    p.add_argument("--new", type=int, default=128, help="new tokens per generation")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="draft lengths to try")
    p.add_argument("--threads", type=int, default=1, help="kernel threads (default 1: steadier on a shared machine)")
    p.add_argument("--verify-cost", action="store_true",
                   help="time steps of K + 1 positions against 1 position on --model instead (any checkpoint)")
    p.add_argument("--context", type=int, default=0,
                   help="with --verify-cost: cached positions before the steps (default: a 64-token prompt)")
    args = p.parse_args()
    if args.runs < 1 or min(args.k) < 1:
        p.error(f"--runs and every --k must be at least 1, got --runs {args.runs} and --k {' '.join(map(str, args.k))}")
    if args.context < 0 or (args.context and not args.verify_cost):
        p.error(f"--context must be at least 0 and goes with --verify-cost, got --context {args.context}")

    model = phinano.load(args.model, threads=args.threads)
    if args.verify_cost:
        before = args.context or 64  # positions cached before each step
        longest = before + max(args.k) + 1
        if longest > model.config.max_position_embeddings:
            p.error(f"{before} cached positions and --k {max(args.k)} need {longest} positions; "
                    f"{model.name} has {model.config.max_position_embeddings}")
        if rope_variant(model.config, before + 1) != rope_variant(model.config, longest):
            p.error(f"the steps after {before} cached positions would cross {model.name}'s original length "
                    f"({model.config.original_max_position_embeddings}), where the rope factors change and a cache "
                    "must be recomputed; choose a --context clear of it")
        verify_cost(model, args.k, args.runs, args.context)
        return
    run(model, model.tokenizer.encode("def f(x):\n    return x\n\ndef f(x):"), 8, 4)  # compile the kernels
    print(f"{args.model}, numba backend, {args.threads} thread(s), {args.new} new tokens, median of {args.runs} "
          f"runs; {cpu_model()}, {datetime.date.today()}\n")
    print("| work | prompt tokens | drafts | decode tok/s (wall) | decode tok/s (CPU time) | speed-up (CPU time) | "
          "drafts kept | new tokens per step | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (ids, options) in workloads(model.tokenizer).items():
        prefill_cpu = statistics.median(run(model, ids, 1, 0, options)[1]["cpu_seconds"] for _ in range(args.runs))
        plain, base = None, None
        for k in [0, *args.k]:
            wall, cpu, stats = [], [], {}
            for _ in range(args.runs):
                tokens, stats = run(model, ids, args.new, k, options)
                wall.append((stats["new_tokens"] - 1) / stats["decode_seconds"])
                cpu.append((stats["new_tokens"] - 1) / max(1e-9, stats["cpu_seconds"] - prefill_cpu))
            speed = statistics.median(cpu)
            row = f"| {name} | {len(ids)} | {k or 'off'} | {statistics.median(wall):.0f} | {speed:.0f} | "
            if k == 0:
                plain, base = tokens, speed
                print(row + "1.00 | - | 1.00 | - |")
                continue
            steps = stats["new_tokens"] - stats["accepted"]  # one model step per token not taken from a draft
            print(row + f"{speed / base:.2f} | {stats['accepted']}/{stats['drafted']} "
                  f"({stats['accepted'] / max(1, stats['drafted']):.0%}) | {stats['new_tokens'] / steps:.2f} | "
                  f"{'yes' if tokens == plain else 'NO'} |")


if __name__ == "__main__":
    main()
