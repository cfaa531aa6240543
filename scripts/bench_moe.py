"""Phi-3.5-MoE layers next to Phi-3-mini layers: decode speed, weight bytes read per token, resident memory.

    python scripts/bench_moe.py --out /tmp/phinano-moe-bench --layers 2 --repeat 3 --write docs/benchmarks.md

Makes (once) two random bf16 checkpoints in --out with the real layer shapes but only --layers layers:
Phi-3.5-MoE (D 4096, 32/8 heads, 16 experts of width 6400, LayerNorm, biases; release layout and config
spelling) and Phi-3-mini-4k (D 3072, 32 heads, MLP 8192). Uses scripts/make_random_checkpoint.py when it can
make them, else its own streaming safetensors writer. Then, for each checkpoint and backend, in a fresh
process (so memory figures are its own): a 1-token prompt, --new greedy tokens, and

- decode tokens/s, warm: the median decode step of a second pass over the same tokens, when every weight they
  need is resident; and cold: the first pass's decode steps (the first step, which compiles, left out),
  which include paging in each expert the first time a token is routed to it,
- bytes of weights read per decoded token, counted exactly: every array handed to the kernels during the
  decode steps (norms, attention, router, the chosen experts, head, and the gathered embedding row),
- resident memory (VmRSS) after loading, after the first token and at the end, and the peak (VmHWM);
  weights are memory-mapped, so an expert is resident only once some token has been routed to it,
- for PhiMoE, how many distinct experts per layer the generation touched.

Checkpoints stay in --out (keep it outside the repository, e.g. /tmp).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench import write_section  # scripts/bench.py, beside this file

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------- checkpoints


def moe_config(layers: int) -> dict:
    """Phi-3.5-MoE-instruct's config.json in the release's spelling, with fewer layers."""
    long_factor = [1.0 + 0.05 * i for i in range(64)]  # a plausible list of 64; values do not affect speed
    return {
        "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "vocab_size": 32064, "hidden_size": 4096,
        "intermediate_size": 6400, "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 64, "long_factor": long_factor,
                         "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122,
                         "original_max_position_embeddings": 4096},
        "sliding_window": 131072, "attention_bias": True, "lm_head_bias": True, "num_local_experts": 16,
        "num_experts_per_tok": 2, "router_jitter_noise": 0.01, "input_jitter_noise": 0.01,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000, "torch_dtype": "bfloat16",
    }


def mini_config(layers: int) -> dict:
    """Phi-3-mini-4k-instruct's config.json with fewer layers."""
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 32,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": None, "sliding_window": 2047, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000, "torch_dtype": "bfloat16",
    }


def write_random_checkpoint(folder: Path, config: dict) -> None:
    """Random bf16 weights for `config`, streamed into one model.safetensors (never all in memory).

    The values are bf16 bit patterns with random sign and mantissa and a fixed exponent: magnitudes in
    [1/128, 1/64), norm weights 1 and biases 0. Cheap to make, finite, and as good as any for timing.
    """
    import numpy as np

    sys.path.insert(0, str(REPO))
    from phinano.config import config_from_dict
    from phinano.formats.safetensors import write_safetensors
    from phinano.weights import expected_shapes

    shapes = expected_shapes(config_from_dict(config))
    rng = np.random.default_rng(0)

    def chunks(name: str, shape: tuple[int, ...]):
        n = int(np.prod(shape))
        if len(shape) == 1:  # norm weights 1, all biases 0
            yield np.full(n, np.uint16(0x3F80) if name.endswith("norm.weight") else np.uint16(0), np.uint16)
            return
        for start in range(0, n, 1 << 24):
            bits = rng.integers(0, 1 << 16, min(1 << 24, n - start), dtype=np.uint16)
            yield (bits & np.uint16(0x807F)) | np.uint16(0x3C00)  # sign, mantissa; exponent 2^-7

    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "model.safetensors", [(name, np.uint16, shape, lambda name=name, shape=shape:
                                                      chunks(name, shape)) for name, shape in shapes.items()])
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    generation = {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007]}
    (folder / "generation_config.json").write_text(json.dumps(generation))


def ensure_checkpoint(folder: Path, kind: str, layers: int) -> Path:
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    maker = REPO / "scripts" / "make_random_checkpoint.py"
    name = {"moe": "phi-3.5-moe", "mini": "phi-3-mini-4k"}[kind]
    if maker.is_file():
        done = subprocess.run([sys.executable, str(maker), "--out", str(folder), "--config", name, "--layers",
                               str(layers)], capture_output=True, text=True)
        if done.returncode == 0 and (folder / "config.json").is_file():
            return folder
        print(f"[{maker.name} --config {name} failed, writing the checkpoint here]\n{done.stderr[-500:]}",
              file=sys.stderr)
    print(f"writing {kind} checkpoint with {layers} layers to {folder} ...", file=sys.stderr, flush=True)
    write_random_checkpoint(folder, moe_config(layers) if kind == "moe" else mini_config(layers))
    return folder


# ------------------------------------------------------------------------------------------- measuring
def memory() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in GB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024 / 1e9
    return out


class CountingOps:
    """A kernel backend that passes every call through and adds up the bytes of the weights handed to it."""

    def __init__(self, ops):
        self.ops = ops
        self.bytes = 0

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def linear(self, x, w, b=None):
        self.bytes += w.nbytes + (b.nbytes if b is not None else 0)
        return self.ops.linear(x, w, b)

    def layernorm(self, x, w, b, eps):
        self.bytes += w.nbytes + b.nbytes
        return self.ops.layernorm(x, w, b, eps)

    def rmsnorm(self, x, w, eps):
        self.bytes += w.nbytes
        return self.ops.rmsnorm(x, w, eps)

    def embed(self, table, ids):
        self.bytes += table[ids].nbytes  # the gathered rows only
        return self.ops.embed(table, ids)


def worker(folder: str, backend: str, new: int, threads: int | None) -> dict:
    """Runs in its own process: load, 1-token prompt, `new` greedy tokens; returns the measurements."""
    import numpy as np

    import phinano
    from phinano.tracing import RoutingLog

    t0 = time.perf_counter()
    model = phinano.load(folder, backend=backend, threads=threads, tokenizer=False)
    load_s = time.perf_counter() - t0
    after_load = memory()
    counting = CountingOps(model.ops)
    model.ops = counting
    recorder = RoutingLog()

    def generate() -> tuple[list[float], list[int], dict]:
        """`new` greedy tokens from <s>, one forward step each; wall time and weight bytes of every step."""
        cache = model.new_cache(new + 1)
        token = np.array([1], np.int64)  # <s>
        step_s, step_bytes, after_first = [], [], {}
        for step in range(new):
            counting.bytes = 0
            t = time.perf_counter()
            logits = model.step(cache, token, observer=recorder.observer, last_only=True)[0]
            step_s.append(time.perf_counter() - t)
            step_bytes.append(counting.bytes)
            token = np.array([int(np.argmax(logits))], np.int64)
            if step == 0:
                after_first = memory()
        return step_s, step_bytes, after_first

    # Cold: weights are paged in as they are first touched (a new expert costs a page-in the first time).
    step_s, step_bytes, after_first = generate()
    # Warm: the same tokens again (greedy), so every weight they need is resident.
    warm_s, _, _ = generate()
    end = memory()
    total, active = model.parameter_counts()
    cfg = model.config
    out = {
        "backend": backend, "layers": cfg.num_hidden_layers, "moe": cfg.is_moe, "load_s": load_s,
        "decode_tok_s": 1.0 / float(np.median(warm_s[1:])), "cold_tok_s": (new - 1) / float(np.sum(step_s[1:])),
        "first_step_s": step_s[0],
        "bytes_per_token": float(np.mean(step_bytes[1:])), "weights_on_disk": model.weights.nbytes,
        "params_total": total, "params_active": active,
        "rss_load_gb": after_load["VmRSS"], "rss_first_gb": after_first["VmRSS"], "rss_end_gb": end["VmRSS"],
        "hwm_gb": end["VmHWM"], "new": new,
    }
    if cfg.is_moe:
        out["experts_touched"] = [len({int(e) for step in recorder.steps for e in step[i][0].ravel()})
                                  for i in range(cfg.num_hidden_layers)]
    return out


# ------------------------------------------------------------------------------------------- reporting
def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def load_average() -> str:
    """The 1-minute load average (other processes competing for the cores)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def table(results: list[dict]) -> str:
    gb = 1e9
    rows = [
        "| checkpoint | backend | decode tok/s warm (cold) | weights read per token | = GB/s read (warm) | on disk | "
        "params active / total | RSS after load → 1st token → end (peak) | experts touched per layer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        touched = "—"
        if r["moe"]:
            touched = " ".join(f"{n}/16" for n in r["experts_touched"]) + f" (after {r['new']} tokens)"
        cells = [
            f"{'Phi-3.5-MoE' if r['moe'] else 'Phi-3-mini'} × {r['layers']} layers",
            r["backend"],
            f"{r['decode_tok_s']:.2f} ({r['cold_tok_s']:.2f})",
            f"{r['bytes_per_token'] / gb:.3f} GB",
            f"{r['bytes_per_token'] * r['decode_tok_s'] / gb:.1f}",
            f"{r['weights_on_disk'] / gb:.2f} GB",
            f"{r['params_active'] / 1e9:.3f}B / {r['params_total'] / 1e9:.3f}B",
            f"{r['rss_load_gb']:.2f} → {r['rss_first_gb']:.2f} → {r['rss_end_gb']:.2f} ({r['hwm_gb']:.2f}) GB",
            touched,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_layer_lines() -> list[str]:
    """Bytes one decode step reads per layer, from the shapes (the table's counts add the embedding row and head)."""
    moe_attn = 2 * (4096 * 4096 * 2 + 1024 * 4096 * 2 + 4096 * 2 + 1024 * 2 + 4 * 4096)  # q, o, k, v, biases, norms
    moe_router = 2 * 16 * 4096
    moe_expert = 2 * 3 * 4096 * 6400
    mini_attn = 2 * (9216 * 3072 + 3072 * 3072 + 2 * 3072)
    mini_mlp = 2 * (16384 * 3072 + 3072 * 8192)
    moe_layer, moe_read = moe_attn + moe_router + 16 * moe_expert, moe_attn + moe_router + 2 * moe_expert
    return [
        f"- One Phi-3.5-MoE layer holds {moe_layer / 1e9:.2f} GB of bf16 weights; a decode step reads "
        f"{moe_read / 1e9:.3f} GB of it (attention {moe_attn / 1e6:.0f} MB, router {moe_router / 1e3:.0f} kB, "
        f"2 experts × {moe_expert / 1e6:.0f} MB).",
        f"- One Phi-3-mini layer holds and reads {(mini_attn + mini_mlp) / 1e9:.3f} GB "
        f"(attention {mini_attn / 1e6:.0f} MB, MLP {mini_mlp / 1e6:.0f} MB).",
        "- Both checkpoints also read the bf16 head (32064 × hidden, 263 MB for MoE, 197 MB for mini) and one "
        "embedding row per token.",
    ]


def full_model_lines(results: list[dict]) -> list[str]:
    """What the measured read rate would mean for the full 32-layer models, if it held."""
    rate = {r["moe"]: r["bytes_per_token"] * r["decode_tok_s"] for r in results if r["backend"] == "numba"}
    if len(rate) < 2:
        return []
    moe_token = 32 * 0.399e9 + 0.263e9  # attention + router + 2 experts per layer, head
    mini_token = 32 * 0.227e9 + 0.197e9
    return [
        f"- Extrapolated to all 32 layers at the measured read rate (numba): Phi-3.5-MoE reads {moe_token / 1e9:.1f} GB "
        f"per token → about {rate[True] / moe_token:.1f} tok/s; Phi-3-mini reads {mini_token / 1e9:.1f} GB → about "
        f"{rate[False] / mini_token:.1f} tok/s. That holds only while the experts in use stay in RAM: the full MoE "
        "is 83.7 GB on disk, so on a machine with less memory, experts are paged in from disk as tokens reach them.",
    ]


def total_ram_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0




def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/phinano-moe-bench", help="where the random checkpoints are kept")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--new", type=int, default=24, help="greedy tokens per run (numba); numpy runs a third of them")
    p.add_argument("--backends", nargs="+", default=["numba", "numpy"], choices=["numba", "numpy"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="fresh-process runs per row; the median one is reported")
    p.add_argument("--write", default=None, help="markdown file to put the section into (docs/benchmarks.md)")
    p.add_argument("--worker", nargs=3, metavar=("FOLDER", "BACKEND", "NEW"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        folder, backend, new = args.worker
        print(json.dumps(worker(folder, backend, int(new), args.threads)))
        return 0

    out = Path(args.out)
    folders = {kind: ensure_checkpoint(out / f"{kind}-{args.layers}L", kind, args.layers) for kind in ("moe", "mini")}
    load_before = load_average()
    results = []
    for kind, folder in folders.items():
        for backend in args.backends:
            new = args.new if backend == "numba" else max(4, args.new // 3)
            cmd = [sys.executable, __file__, "--worker", str(folder), backend, str(new)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            runs = []
            for run in range(args.repeat):
                print(f"running {kind} / {backend} ({new} tokens), run {run + 1} of {args.repeat} ...",
                      file=sys.stderr, flush=True)
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if done.returncode != 0:
                    print(done.stderr, file=sys.stderr)
                    return 1
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            runs.sort(key=lambda r: r["decode_tok_s"])
            results.append(runs[len(runs) // 2])  # the run with the median warm decode speed
    body = "\n".join([
        f"Command: `python scripts/bench_moe.py --out {args.out} --layers {args.layers} --new {args.new} "
        f"--backends {' '.join(args.backends)} --repeat {args.repeat}`  ",
        f"Machine: {machine()}, {total_ram_gb():.0f} GB RAM; {datetime.date.today().isoformat()}; 1-minute load "
        f"average {load_before} before the run, {load_average()} after (the run itself uses the cores).",
        "",
        f"Random bf16 checkpoints with the real layer shapes and {args.layers} layers each, 1-token prompt, greedy "
        "decoding. \"Weights read per token\" counts the bytes of every weight array handed to the kernels in a "
        "decode step (norms, attention, router, chosen experts, head, the embedding row), averaged over the "
        "decode steps. Warm: second pass over the same tokens, everything they need resident; cold: first pass, "
        "including the page faults of each expert's first use (the files were in the OS page cache, so these are "
        "memory-to-memory faults; from disk, cold is slower). RSS counts the memory-mapped weight pages this "
        "process has touched (plus ~0.1 GB of Python and compiled kernels).",
        "",
        table(results),
        "",
        *per_layer_lines(),
        *full_model_lines(results),
    ])
    print(body)
    if args.write:
        write_section(Path(args.write), "## Phi-3.5-MoE vs dense layers", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
