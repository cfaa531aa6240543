"""What each AMX activation split costs in accuracy: logit drift and perplexity against float32 products.

    python scripts/amx_accuracy.py                                   # the two nano models
    python scripts/amx_accuracy.py --model /tmp/phi3-mini-random --tokens 128
    python scripts/amx_accuracy.py --write docs/kernels.md           # replaces its "AMX accuracy" table

On a CPU with AMX (kernels/amx.py), a prefill's bf16 products run on tiles with each float32 activation split
into 3 bf16 parts (exact), 2 (about 16 bits) or 1 (plain bf16, rounded to nearest); "off" is the numba
backend without the tiles (float32 BLAS), to show how far two float32 engines drift apart. Each model's
logits over prompts (held-out standard-library modules, the first --tokens tokens of each; random ids for a
checkpoint without a tokenizer) are compared with the NumPy reference backend's (float32 BLAS products):
the largest and mean |logit - reference|
relative to the largest reference logit, how often the top token is the reference's, and the perplexity of
the prompt's own next tokens.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import phinano  # noqa: E402
from phinano.kernels import amx, fast  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_accuracy import held_out_ids, log_softmax  # noqa: E402


def prompts_for(model, tokens: int) -> list[list[int]]:
    """Held-out standard-library modules, or random ids for a checkpoint without a tokenizer."""
    if model.tokenizer is None:
        return [np.random.default_rng(0).integers(0, model.config.vocab_size, tokens).tolist()]
    return [ids[:tokens] for ids in held_out_ids(model)]


def measure(name: str, tokens: int) -> list[tuple]:
    reference = phinano.load(name, backend="numpy")
    model = phinano.load(name)
    prompts = prompts_for(model, tokens)
    expected = [reference.forward(ids) for ids in prompts]
    rows = []
    for parts in ("off", 3, 2, 1):  # off: the numba backend's float32 tiles and BLAS, for scale
        amx_from = fast.AMX_MIN_TOKENS
        if parts == "off":
            fast.AMX_MIN_TOKENS = 1 << 62
        else:
            amx.set_parts(parts)
        nll, count, drift_max, drift_sum, same, total = 0.0, 0, 0.0, 0.0, 0, 0
        for ids, ref in zip(prompts, expected):
            logits = model.forward(ids)
            lp = log_softmax(logits[:-1])
            nll -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
            count += len(ids) - 1
            drift = np.abs(logits - ref) / np.abs(ref).max()
            drift_max, drift_sum = max(drift_max, float(drift.max())), drift_sum + float(drift.mean()) * len(ids)
            same += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            total += len(ids)
        fast.AMX_MIN_TOKENS = amx_from
        ref_nll = -sum(log_softmax(r[:-1])[np.arange(len(i) - 1), i[1:]].sum() for i, r in zip(prompts, expected))
        rows.append((Path(name).name, parts, float(np.exp(nll / count)), float(np.exp(ref_nll / count)),
                     drift_max, drift_sum / total, same / total, total))
    amx.set_parts(3)
    return rows


def table(rows: list[tuple]) -> str:
    lines = ["| model | parts | perplexity | float32 perplexity | max logit drift | mean logit drift | same top token "
             "| tokens |", "|---|---|---|---|---|---|---|---|"]
    for name, parts, ppl, ref_ppl, dmax, dmean, same, total in rows:
        lines.append(f"| {name} | {parts} | {ppl:.4f} | {ref_ppl:.4f} | {dmax:.1e} | {dmean:.1e} | "
                     f"{100 * same:.2f} % | {total} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model name or folder (default: the two nano models)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per prompt")
    p.add_argument("--write", default=None, help="replace the table under '### AMX accuracy' in this file")
    args = p.parse_args()
    if not amx.available():
        print("this CPU has no AMX bf16 tiles (or PHINANO_AMX=0): nothing to measure", file=sys.stderr)
        return 1
    rows = [row for name in (args.model or ["nano-phi3", "nano-phimoe"]) for row in measure(name, args.tokens)]
    body = table(rows)
    print(body)
    if args.write:
        path = Path(args.write)
        text = path.read_text()
        head = "### AMX accuracy"
        start = text.index(head)
        end = text.find("\n#", start + len(head))
        command = " ".join(["python scripts/amx_accuracy.py", *sys.argv[1:]])
        stamp = f"`{command}` on {datetime.date.today().isoformat()}:"
        text = text[:start] + f"{head}\n\n{stamp}\n\n{body}\n" + (text[end:] if end >= 0 else "")
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
