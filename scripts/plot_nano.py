"""Draw docs/nano-loss.png from the training logs written by scripts/train_nano.py.

A development-time tool (needs matplotlib, which phinano never imports):

    python scripts/plot_nano.py                        # reads phinano/nano/*/training_log.json
    python scripts/plot_nano.py --nano build/nano-quick --out /tmp/loss.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = ("nano-phi3", "nano-phimoe")
COLORS = {"nano-phi3": "tab:blue", "nano-phimoe": "tab:orange"}


def smooth(values: list[float], width: int) -> list[float]:
    """Trailing mean over `width` steps (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot(nano: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name in MODELS:
        path = nano / name / "training_log.json"
        if not path.exists():
            continue
        log = json.loads(path.read_text())
        tokens = log["tokens_per_step"]
        x = [(e["step"] + 1) * tokens / 1e6 for e in log["train"]]
        y = [e["loss"] for e in log["train"]]
        color = COLORS[name]
        ax.plot(x, y, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(x, smooth(y, 10), color=color, linewidth=1.6, label=f"{name} train (10-step mean)")
        hx = [e["step"] * tokens / 1e6 for e in log["heldout"]]
        hy = [e["loss"] for e in log["heldout"]]
        ax.plot(hx, hy, "o--", color=color, markersize=3.5, linewidth=1,
                label=f"{name} held-out, 16-window probe (all 98k tokens at the end: "
                      f"ppl {math.exp(log['heldout_loss']):.1f})")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_ylim(bottom=0)
    ax.set_title("nano models: next-token loss on the Python standard library")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nano", type=Path, default=REPO / "phinano" / "nano", help="folder holding the two models")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "nano-loss.png")
    args = ap.parse_args(argv)
    plot(args.nano, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
