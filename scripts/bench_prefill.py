"""Prefill, phinano against Transformers bf16, taking turns in one process.

    python scripts/make_random_checkpoint.py --out /tmp/phi3-mini        # full-size random Phi-3-mini
    python scripts/bench_prefill.py --model /tmp/phi3-mini --prompt 32,128,512 --rounds 3

On the CPUs with AMX both engines multiply bf16 tiles, and the AMX unit's speed here drifts by up to 2x
within minutes (other guests share the cores). Figures from separate processes minutes apart then compare
the drift more than the engines. So one process loads both models (phinano's weights memory-mapped,
Transformers' in bf16: about 2 x 7.6 GB for Phi-3-mini) and, for each prompt length and round, runs one
prefill of each in turn, the order rotating from round to round. Reported per engine: the median tokens/s
over the rounds and the median of each round's ratio to Transformers bf16.

The engines (--engines, comma-separated):
- phinano:       the numba backend as it runs by default (on AMX: activations in 3 exact bf16 parts);
- phinano-amx1:  the same with plain bf16 activations (`amx.set_parts(1)`; faster, less exact);
- phinano-blas:  the same without AMX (float32 tiles and BLAS, `fast.AMX_MIN_TOKENS` set out of reach);
- hf-bf16:       Transformers in bfloat16, `model(ids, logits_to_keep=1)`, torch with the same thread count.
A prefill here is one forward pass over the prompt that keeps the last position's logits, in both engines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import cpu_name, prompts  # noqa: E402

ENGINES = ("phinano", "phinano-amx1", "phinano-blas", "hf-bf16")


def engines(model_dir: str, names: list[str], threads: int) -> dict:
    """name -> a function prefill(ids) for each engine asked for (all models loaded once, here)."""
    runs = {}
    # Transformers first: phinano sets OMP_WAIT_POLICY=PASSIVE (sleeping waiters) for its own OpenMP pool
    # when imported, and torch's pool, a separate copy of the runtime, must start before that with its
    # defaults (spinning waiters), or Transformers runs slower here than it does alone.
    if "hf-bf16" in names:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()

        def hf_prefill(ids):
            with torch.no_grad():
                hf(torch.tensor([ids]), logits_to_keep=1)

        runs["hf-bf16"] = hf_prefill
        hf_prefill(list(range(1, 17)))  # torch's OpenMP threads start here, with torch's own wait policy
    if any(n.startswith("phinano") for n in names):
        import phinano
        from phinano.kernels import amx, fast

        model = phinano.load(model_dir, threads=threads, tokenizer=False)

        def phinano_with(parts: int | None, amx_from: int):
            def prefill(ids):
                saved = amx.PARTS, fast.AMX_MIN_TOKENS
                amx.PARTS = saved[0] if parts is None else parts
                fast.AMX_MIN_TOKENS = amx_from
                try:
                    model.step(model.new_cache(len(ids)), ids, last_only=True)
                finally:
                    amx.PARTS, fast.AMX_MIN_TOKENS = saved

            return prefill

        runs["phinano"] = phinano_with(None, fast.AMX_MIN_TOKENS)
        runs["phinano-amx1"] = phinano_with(1, fast.AMX_MIN_TOKENS)
        runs["phinano-blas"] = phinano_with(None, 1 << 62)
    return {n: runs[n] for n in names}


def turns(runs: dict, ids: dict, rounds: int) -> dict:
    """(engine, prompt length) -> seconds of each round's prefill; in each round and length every engine runs
    once, the first of them rotating from round to round."""
    names = list(runs)
    seconds = {(n, T): [] for n in names for T in ids}
    for r in range(rounds):
        for T in ids:
            for n in names[r % len(names):] + names[: r % len(names)]:
                t = time.perf_counter()
                runs[n](ids[T])
                seconds[n, T].append(time.perf_counter() - t)
            print(f"round {r + 1}, {T} tokens: " + ", ".join(f"{n} {T / seconds[n, T][-1]:.1f}" for n in names),
                  flush=True)
    return seconds


def table(seconds: dict, names: list[str], lengths: list[int], base: str | None) -> list[str]:
    """Markdown rows: median tokens/s per engine and length, with the median per-round ratio to `base`."""
    lines = ["| engine | " + " | ".join(f"prefill {T} tok/s" for T in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for n in names:
        cells = []
        for T in lengths:
            cell = f"{T / statistics.median(seconds[n, T]):.1f}"
            if base and n != base:
                ratio = statistics.median(b / s for s, b in zip(seconds[n, T], seconds[base, T]))
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (safetensors, as Transformers loads it)")
    p.add_argument("--engines", default="phinano,phinano-amx1,phinano-blas,hf-bf16")
    p.add_argument("--prompt", default="32,128,512", help="prompt lengths")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    names = args.engines.split(",")
    unknown = [n for n in names if n not in ENGINES]
    if unknown or args.rounds < 1:
        p.error(f"unknown engine {unknown[0]!r} (choose from {', '.join(ENGINES)})" if unknown
                else "--rounds must be at least 1")
    lengths = [int(n) for n in args.prompt.split(",")]
    runs = engines(args.model, names, args.threads)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    ids = prompts(vocab, lengths)
    for run in runs.values():  # compile, fault the weights in
        run(ids[lengths[0]][:16])
        run(ids[lengths[0]])
    seconds = turns(runs, ids, args.rounds)
    base = "hf-bf16" if "hf-bf16" in names else None
    lines = [f"Command: `python scripts/bench_prefill.py --model {args.model} --engines {args.engines} "
             f"--prompt {args.prompt} --rounds {args.rounds} --threads {args.threads}`  ",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; date "
             f"{datetime.date.today().isoformat()}; medians over {args.rounds} rounds taking turns in one process",
             "", *table(seconds, names, lengths, base)]
    if base:
        lines += ["", f"In brackets: the median over the rounds of the speed against {base} in the same round."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
