"""What quantization costs in accuracy: perplexity and logit drift of the nano models, per block type.

    python scripts/quant_accuracy.py                     # prints a markdown table
    python scripts/quant_accuracy.py --write docs/quantization.md   # replaces its "Accuracy" table

Each model is loaded as shipped (bf16) and again with `quantize=TYPE` (every matrix rounded into the type's
blocks, exactly as `phinano quantize` writes them). On held-out standard-library modules (not in the nano
models' training data) it reports perplexity, the largest and mean |logit - bf16 logit| relative to the largest
bf16 logit, and how often the top token is the same as bf16's.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import phinano  # noqa: E402
from phinano.quantize import TYPES  # noqa: E402

HELD_OUT = ["json/__init__.py", "heapq.py", "bisect.py", "fnmatch.py"]  # held out from the nano training data
TOKENS = 512  # per module, <s> included


def held_out_ids(model) -> list[list[int]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / m).read_text(encoding="utf-8") for m in HELD_OUT if (stdlib / m).is_file()]
    return [model.tokenizer.encode(t[:6000])[:TOKENS] for t in texts]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def measure(name: str, types: list[str]) -> list[tuple]:
    base = phinano.load(name)
    prompts = held_out_ids(base)
    reference = [base.forward(ids) for ids in prompts]
    rows = []
    for qtype in ["bf16", *types]:
        model = base if qtype == "bf16" else phinano.load(name, quantize=qtype)
        nll, count, drift_max, drift_sum, same = 0.0, 0, 0.0, 0.0, 0
        for ids, ref in zip(prompts, reference):
            logits = ref if model is base else model.forward(ids)
            lp = log_softmax(logits[:-1])
            nll -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
            count += len(ids) - 1
            scale = np.abs(ref).max()
            drift = np.abs(logits - ref) / scale
            drift_max, drift_sum = max(drift_max, float(drift.max())), drift_sum + float(drift.mean()) * len(ids)
            same += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        total = sum(len(ids) for ids in prompts)
        rows.append((name, qtype, float(np.exp(nll / count)), drift_max, drift_sum / total, same / total))
    return rows


def table(rows: list[tuple]) -> str:
    lines = ["| model | type | held-out perplexity | max logit drift | mean logit drift | same top token |",
             "|---|---|---|---|---|---|"]
    for name, qtype, ppl, dmax, dmean, same in rows:
        lines.append(f"| {name} | {qtype} | {ppl:.2f} | {dmax:.2e} | {dmean:.2e} | {same:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", default=[t for t in TYPES if t not in ("f16", "bf16")])
    parser.add_argument("--write", type=Path, default=None, help="markdown file whose Accuracy table to replace")
    args = parser.parse_args(argv)
    rows = [row for name in ("nano-phi3", "nano-phimoe") for row in measure(name, args.types)]
    text = table(rows)
    print(text)
    if args.write is not None:
        doc = args.write.read_text(encoding="utf-8")
        start, end = "<!-- accuracy:start -->", "<!-- accuracy:end -->"
        if start not in doc or end not in doc:
            raise SystemExit(f"{args.write}: no {start} ... {end} markers")
        head, rest = doc.split(start, 1)
        args.write.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
