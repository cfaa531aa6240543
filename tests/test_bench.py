"""scripts/bench.py's share of the bandwidth limit at the same moment (`decode_turns`): decode steps and the
streaming readers taking turns in one process. The timings are the machine's; what is checked is that each
round pairs one step with the best reader of that round, and that the figures reach the rendered text."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import phinano


def load_script(name: str):
    """A script of scripts/ as a module (they are not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / name
    spec = importlib.util.spec_from_file_location(name[:-3] + "_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return load_script("bench.py")


def test_decode_turns_pairs_each_step_with_the_best_reader_of_its_round(checkpoint_dir, monkeypatch):
    bench = load_bench()
    model = phinano.load(checkpoint_dir("mini-4k"), tokenizer=False)
    clock = iter(np.arange(0.0, 1000.0, 0.5))  # each of the script's perf_counter() calls: half a second later
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: float(next(clock)), sleep=lambda s: None))
    gib = 1 / 1024
    turns = bench.decode_turns(model, [5, 6, 7, 8], bytes_per_token=10**9, threads=1, rounds=3, gib=gib)
    # each step and each reader took 0.5 s: a step reads 2 GB/s, every reader 1 MiB / 0.5 s
    reader = 2**30 * gib / 0.5 / 1e9
    assert turns["rounds"] == 3
    assert turns["step_gbps"] == pytest.approx(2.0) and turns["probe_gbps"] == pytest.approx(reader)
    assert turns["share"] == pytest.approx(2.0 / reader)

    merged = bench.merge_rounds([{"load_s": 1, "ttft": 1, "decode": 1, "peak_rss_gb": 1, "prefill": {"8": 1},
                                  "turns": dict(turns, share=s)} for s in (0.5, 0.7, 0.9)])
    assert merged["turns"]["share"] == 0.7 and merged["turns"]["rounds"] == 9
    line = bench.turns_line("phinano-numba", merged)[0]
    assert "9 rounds" in line and "70 % of the limit at the same moment" in line
    assert bench.turns_line("hf-bf16", {"decode": 1.0}) == []


def test_prefill_flops_count_every_matrix_once_per_token_the_head_once_and_causal_attention(checkpoint_dir):
    bench = load_bench()
    folder = Path(checkpoint_dir("mini-4k"))
    cfg = phinano.load(folder, tokenizer=False).config
    D, F, q, kv, L = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size, cfg.num_hidden_layers
    per_token = L * ((q + 2 * kv) * D + D * q + 2 * F * D + D * F)  # qkv, o, gate_up, down
    for n in (1, 5, cfg.sliding_window + 3):
        keys = sum(min(i + 1, cfg.sliding_window) for i in range(n))  # the window caps what a position sees
        expected = 2 * (n * per_token + cfg.vocab_size * D) + 4 * cfg.num_attention_heads * cfg.head_dim * keys * L
        assert bench.prefill_flops(folder, n) == expected


def test_gemm_rates_name_both_ways_for_every_prompt_length():
    bench = load_bench()
    rates, line = bench.gemm_rates(threads=2, tokens=[3, 8], K=64, N=96, runs=2)
    assert set(rates) == {3, 8} and all(r > 0 for r in rates.values())
    assert line.count("NumPy BLAS") == 2 and line.count("one part per thread") == 2 and line.endswith("GFLOP/s")


def test_prefill_turns_pair_each_prefill_with_the_gemm_probe_of_its_round(checkpoint_dir, monkeypatch):
    bench = load_bench()
    model = phinano.load(checkpoint_dir("mini-4k"), tokenizer=False)
    clock = iter(np.arange(0.0, 1000.0, 0.5))  # every perf_counter() call: half a second later
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: float(next(clock)), sleep=lambda s: None))
    probes = iter([10.0, 30.0, 20.0, 40.0, 40.0, 40.0])  # GFLOP/s of each round's probe, in order
    monkeypatch.setattr(bench, "gemm_rates", lambda threads, tokens, K, N, runs: ({tokens[0]: next(probes)}, ""))
    prompts = {3: [5, 6, 7], 4: [5, 6, 7, 8]}
    turns = bench.prefill_turns(model, prompts, {3: 3e9, 4: 4e9}, threads=1, rounds=3)
    # each prefill took 0.5 s: 6 and 8 GFLOP/s, against probes 10, 30, 20 and 40, 40, 40
    assert turns[3]["gflops"] == pytest.approx(6.0) and turns[3]["gemm"] == pytest.approx(20.0)
    assert turns[3]["share"] == pytest.approx(0.3)  # the median of 0.6, 0.2, 0.3
    assert turns[4]["share"] == pytest.approx(0.2) and turns[4]["rounds"] == 3

    merged = bench.merge_rounds([{"load_s": 1, "ttft": 1, "decode": 1, "peak_rss_gb": 1, "prefill": {"3": 1},
                                  "prefill_turns": {"3": dict(turns[3], share=s)}} for s in (0.5, 0.9, 0.7)])
    assert merged["prefill_turns"]["3"]["share"] == 0.7 and merged["prefill_turns"]["3"]["rounds"] == 9
    line = bench.prefill_turns_line("phinano-numba", merged)[0]
    assert "3 tokens 6 GFLOP/s while the probe did 20: **70 %**" in line and "9 rounds" in line


def test_bench_prefill_rotates_who_goes_first_and_pairs_each_round(monkeypatch):
    bench_prefill = load_script("bench_prefill.py")
    calls = []
    runs = {"phinano": lambda ids: calls.append(("phinano", len(ids))),
            "hf-bf16": lambda ids: calls.append(("hf-bf16", len(ids)))}
    # phinano's prefills take 1 s, 2 s, 4 s in rounds 1-3 and Transformers' always 2 s: fake the clock
    clock = {"now": 0.0}
    cost = {"phinano": iter([1.0, 2.0, 4.0]), "hf-bf16": iter([2.0, 2.0, 2.0])}

    def step(ids, name, real):
        real(ids)
        clock["now"] += next(cost[name])

    timed = {n: (lambda ids, n=n, real=r: step(ids, n, real)) for n, r in runs.items()}
    monkeypatch.setattr(bench_prefill, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    seconds = bench_prefill.turns(timed, {8: list(range(8))}, rounds=3)
    assert [n for n, _ in calls] == ["phinano", "hf-bf16", "hf-bf16", "phinano", "phinano", "hf-bf16"]
    assert seconds["phinano", 8] == [1.0, 2.0, 4.0] and seconds["hf-bf16", 8] == [2.0, 2.0, 2.0]
    rows = bench_prefill.table(seconds, ["phinano", "hf-bf16"], [8], "hf-bf16")
    assert rows[2] == "| phinano | 4.0 (1.00x) |"  # median 2 s -> 4 tok/s; per-round ratios 2, 1, 0.5
    assert rows[3] == "| hf-bf16 | 4.0 |"


@pytest.mark.parametrize("engine, switch", [("phinano-numba-amx1", {"PHINANO_AMX_PARTS": "1"}),
                                            ("phinano-numba-noamx", {"PHINANO_AMX": "0"}),
                                            ("phinano-numba", {})])
def test_engine_variants_run_phinano_numba_with_their_switch(engine, switch, monkeypatch):
    """A variant is phinano-numba in a process whose environment carries its switch, and only its own."""
    bench = load_bench()
    seen = {}

    def run(cmd, capture_output, text, env):
        seen["cmd"], seen["env"] = cmd, env
        return SimpleNamespace(returncode=0, stdout='RESULT {"decode": 1}\n', stderr="")

    monkeypatch.delenv("PHINANO_AMX", raising=False)
    monkeypatch.delenv("PHINANO_AMX_PARTS", raising=False)
    monkeypatch.setattr(bench.subprocess, "run", run)
    args = SimpleNamespace(threads=2, runs=1, prompt=[8], new=2)
    assert bench.run_engine(engine, "/model", None, args) == {"decode": 1}
    assert seen["cmd"][seen["cmd"].index("--worker") + 1] == "phinano-numba"
    assert {k: seen["env"].get(k) for k in ("PHINANO_AMX", "PHINANO_AMX_PARTS")} == {
        k: switch.get(k) for k in ("PHINANO_AMX", "PHINANO_AMX_PARTS")}
