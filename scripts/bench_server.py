"""Benchmark `phinano serve`: aggregate new tokens/s, requests/s and time to first token for 1 and 4 concurrent
streaming clients, which the server decodes together in one batch (docs/server.md, "One model, several
clients: batching").

    python scripts/bench_server.py                                   # the shipped nano model (else a tiny one)
    python scripts/bench_server.py --model ./my-phi3 --new 64 --requests 2 --write docs/benchmarks.md
    python scripts/make_random_checkpoint.py --out /tmp/phi3-mini-random   # a full-size model (7.6 GB), then
    python scripts/bench_server.py --model /tmp/phi3-mini-random --new 32 --requests 1 --rounds 1
    python scripts/bench_server.py --model /tmp/phi3-mini-random --step-batch 4 --rounds 5   # decode step only
        (that folder also needs a tokenizer.json and tokenizer_config.json: Phi-3's, copied from a release)

Starts the server as a real process on a free 127.0.0.1 port, warms it up, then for each concurrency level
runs `--requests` streaming `POST /v1/completions` requests per client (greedy, `ignore_eos` so every answer is
exactly `--new` tokens) from that many client threads, each sending its next request when the last one ends;
the levels take turns for `--rounds` rounds, and each level's figures pool its rounds.
Reported per level: requests/s (requests / wall time), time to first token (request sent -> first SSE chunk
with text; includes the prompt's prefill, during which the batch waits, and any wait in the queue), median
and 90th percentile, the aggregate new tokens/s (all tokens over the wall time, prefills included), and the
aggregate decode tokens/s (clients x the median request's tokens after its first over the time after its first:
what the batched decode steps give, without the prefills); then both of the last level over the first's. With --write the table replaces the "## Server" section of the markdown file
(created if absent), with the command, machine, date and load.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import cpu_name, write_section  # scripts/bench.py, beside this file

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model(tmp: Path) -> str:
    """The shipped nano model if it is installed, else the tests' tiny random checkpoint (needs torch)."""
    from phinano.nano import nano_path

    if nano_path("nano-phi3") is not None:
        return "nano-phi3"
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import add_tiny_tokenizer, make_phi3

    folder = make_phi3(tmp / "tiny", "mini-4k")
    add_tiny_tokenizer(folder)
    return str(folder)


def start_server(model: str, port: int, threads: int | None, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "phinano.cli", "serve", "--model", model, "--name", "bench", "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the server did not start in 300 s:\n{log.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/version")
            if conn.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.2)


def one_request(port: int, new: int) -> tuple[float, float, int]:
    """(time to first text chunk, total time, new tokens) of one streaming completion."""
    body = json.dumps({"model": "bench", "prompt": PROMPT, "max_tokens": new, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    for raw in response:  # one SSE line at a time
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    total = time.perf_counter() - t0
    return (total if first is None else first), total, tokens


def run_level(port: int, clients: int, requests: int, new: int) -> tuple[list[tuple[float, float, int]], float]:
    """`requests` requests from `clients` threads: each one's (TTFT, total time, new tokens), and the wall time."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    remaining = [requests]

    def client():
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            r = one_request(port, new)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summarize(clients: int, results: list[tuple[float, float, int]], wall: float) -> dict:
    """requests/s, TTFT median and p90, new tokens/s and decode tokens/s of one level (all its rounds together)."""
    ttft = sorted(r[0] for r in results)
    decode = statistics.median((n - 1) / (total - first) for first, total, n in results)  # one client's, after its first
    return {"clients": clients, "requests": len(results), "wall_s": wall, "rps": len(results) / wall,
            "ttft_median": statistics.median(ttft), "ttft_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
            "tokens_per_s": sum(r[2] for r in results) / wall, "decode_per_s": clients * decode}


def render(args, model: str, levels: list[dict], load: tuple[float, float], tiny: bool = False) -> str:
    lines = ["| clients | requests | requests/s | TTFT median s | TTFT p90 s | new tokens/s | decode tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in levels:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['rps']:.3f} | {r['ttft_median']:.3f} | "
                     f"{r['ttft_p90']:.3f} | {r['tokens_per_s']:.2f} | {r['decode_per_s']:.2f} |")
    command = "python scripts/bench_server.py" + "".join(
        f" --{k} {v}" for k, v in (("model", args.model), ("clients", args.clients if args.clients != "1,4" else None),
                                   ("new", args.new), ("requests", args.requests), ("rounds", args.rounds),
                                   ("threads", args.threads)) if v is not None)
    first, last = levels[0], levels[-1]
    gain = last["tokens_per_s"] / first["tokens_per_s"]
    decode_gain = last["decode_per_s"] / first["decode_per_s"]
    return "\n".join([
        f"Command: `{command}`  ",
        f"Model: {model}; machine: {cpu_name()}, {os.cpu_count()} cores; date {datetime.date.today().isoformat()}; "
        f"1-minute load average {load[0]:.2f} before the run, {load[1]:.2f} after  ",
        f"Streaming `POST /v1/completions`, greedy, {args.new} new tokens each (ignore_eos), a "
        f"{len(PROMPT)}-character prompt; TTFT counts the prompt's prefill and any wait behind other prefills."
        + (" The tiny model is random: its first text often waits for a run of byte-fallback tokens." if tiny else "")
        + (" Other work kept the machine busy (load above its core count): absolute speeds are lower than on a"
           " quiet machine; the levels took turns, so they ran under the same load."
           if max(load) > (os.cpu_count() or 1) else ""),
        "",
        *lines,
        "",
        f"The server decodes the running requests together, one pass over the weights per token for all of them: "
        f"{last['clients']} clients got {gain:.2f}x the aggregate new tokens/s of {first['clients']} "
        f"({last['tokens_per_s']:.2f} vs {first['tokens_per_s']:.2f}, prefills included: each prompt's prefill "
        f"runs alone while the batch waits) and {decode_gain:.2f}x its decode tokens/s "
        f"({last['decode_per_s']:.2f} vs {first['decode_per_s']:.2f}).",
    ])


def bench_steps(model_name: str, batch: int, repeats: int, prompt_tokens: int = 8) -> str:
    """The decode step alone, in this process: `Model.step` of one sequence against `Model.step_batch` of
    `batch` sequences (each prefilled with its own random prompt), taking turns `repeats` times. The
    server's gain without HTTP, prefills or scheduling: what one pass over the weights for B rows costs."""
    import numpy as np

    import phinano

    model = phinano.load(model_name)
    rng = np.random.default_rng(0)
    caches = [model.new_cache(prompt_tokens + 2 * repeats + 2) for _ in range(batch)]
    for cache in caches:
        model.step(cache, rng.integers(100, model.config.vocab_size, prompt_tokens).tolist(), last_only=True)
    ids = rng.integers(100, model.config.vocab_size, batch).tolist()
    model.step_batch([model.new_cache(1) for _ in range(batch)], ids)  # compile before timing
    alone, together = [], []
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.step(caches[0], ids[:1], last_only=True)
        alone.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model.step_batch(caches, ids)
        together.append(time.perf_counter() - t0)
    a, b = min(alone), min(together)
    return (f"Model: {model_name}; machine: {cpu_name()}, {os.cpu_count()} cores; date "
            f"{datetime.date.today().isoformat()}; 1-minute load average {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after; best of {repeats}, taking turns  \n"
            f"one decode step: {a:.3f} s for 1 sequence (`Model.step`), {b:.3f} s for {batch} "
            f"(`Model.step_batch`): {batch * a / b:.2f}x the tokens/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder / name (default: nano-phi3, else a tiny random one)")
    p.add_argument("--clients", default="1,4", help="concurrency levels (default 1,4)")
    p.add_argument("--requests", type=int, default=2, help="requests per client, level and round (default 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over the levels, interleaved so that a change in the machine's load hits all alike "
                        "(default 3)")
    p.add_argument("--new", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--threads", type=int, default=None, help="the server's kernel threads (default: all cores)")
    p.add_argument("--write", default=None, help="put the table in this markdown file's '## Server' section")
    p.add_argument("--step-batch", type=int, default=None, metavar="B",
                   help="instead: time one decode step of 1 sequence against B together, in this process (--model)")
    args = p.parse_args(argv)
    if args.step_batch:
        print(bench_steps(args.model or "nano-phi3", args.step_batch, args.rounds))
        return 0

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or default_model(Path(tmp))
        port = free_port()
        log = Path(tmp) / "server.log"
        print(f"starting phinano serve --model {model} on 127.0.0.1:{port} ...", flush=True)
        server = start_server(model, port, args.threads, log)
        try:
            one_request(port, 4)  # warm-up: the server compiled its kernels before it listened; this touches caches
            counts = [int(c) for c in args.clients.split(",")]
            runs = {clients: ([], 0.0) for clients in counts}
            for round_ in range(args.rounds):
                for clients in counts:
                    results, wall = run_level(port, clients, clients * args.requests, args.new)
                    runs[clients] = (runs[clients][0] + results, runs[clients][1] + wall)
                    print(f"round {round_ + 1}, {clients} client(s): {len(results) / wall:.2f} requests/s", flush=True)
            levels = [summarize(clients, *runs[clients]) for clients in counts]
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
    tiny = args.model is None and model != "nano-phi3"
    load = (load_before, os.getloadavg()[0])
    table = render(args, "tiny random Phi-3 (tests/tiny_models.py)" if tiny else model, levels, load, tiny)
    print(table)
    if args.write:
        write_section(Path(args.write), "## Server", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
