"""`phinano trace`: pictures of one forward pass, tied together by an index.html that works offline.

    phinano trace --model nano-phimoe --out trace "def add(a, b):"
    -> trace/lens.png, trace/attention-layer0.png, ..., trace/routing.png, trace/norms.png, trace/index.html

The numbers come from `phinano.trace` (tracing.py); this module only draws them, with matplotlib (the optional
`pictures` extra, imported when the command runs). It uses matplotlib's Figure objects directly, not pyplot,
so it changes no global plotting state. The page embeds nothing from the network: its images are files
beside it and its style is inline. The folder is written whole or not at all (files go to a scratch folder
first and are moved in at the end).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import PhinanoError

INSTALL = 'phinano trace draws with matplotlib: pip install "phinano[pictures]" (or pip install matplotlib)'
MAX_LABELLED = 64  # more tokens than this: the lens grid is shaded only (the words would not fit)


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PhinanoError(INSTALL) from None


def short_label(tokenizer, token: int, width: int = 8) -> str:
    """A token as it reads in a small cell: SentencePiece's '▁' as '·' (a space), byte pieces as their
    character or \\xNN, newlines and tabs as \\n and \\t; cut to `width` characters."""
    piece = tokenizer.id_to_token(int(token)) if tokenizer is not None else None
    if piece is None:
        return f"#{int(token)}"
    byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
    if byte:
        text = chr(int(byte[1], 16))
        text = {"\n": "\\n", "\t": "\\t", " ": "·"}.get(text, text if text.isprintable() else f"\\x{byte[1]}")
    else:
        text = piece.replace("\u2581", "·").replace("\n", "\\n").replace("\t", "\\t")
    text = text.replace("$", r"\$")  # matplotlib would read $...$ as mathematics
    return text if len(text) <= width else text[: width - 1] + "…"


def number_list(text: str, flag: str) -> list[int]:
    """'0,3' -> [0, 3]; anything else raises ValueError naming the flag (the CLI checks this before loading)."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--{flag} takes numbers separated by commas, e.g. 0,3; got {text!r}") from None
    if not numbers:
        raise ValueError(f"--{flag} is empty; give numbers separated by commas, e.g. 0,3")
    return numbers


def choose(numbers: list[int] | str | None, what: str, count: int) -> list[int] | None:
    """Layers or heads as sorted distinct indices 0..count-1 (negative numbers count from the end); None stays
    None. Out of range: PhinanoError."""
    if numbers is None:
        return None
    if isinstance(numbers, str):
        try:
            numbers = number_list(numbers, what)
        except ValueError as e:
            raise PhinanoError(str(e)) from None
    for n in numbers:
        if not -count <= n < count:
            raise PhinanoError(f"--{what}: {n} is out of range; the model has {what} 0..{count - 1}")
    return sorted({n % count for n in numbers})


# ------------------------------------------------------------------------------------------------ the pictures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _token_axis(ax, labels: list[str], axis: str = "x") -> None:
    T = len(labels)
    step = max(1, T // MAX_LABELLED)  # long prompts: every step-th token named
    ticks = list(range(0, T, step))
    if axis == "x":
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    else:
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)


def draw_lens(t, labels: list[str], tokenizer, path: Path) -> None:
    """Layers (rows, layer 0 at the bottom) x positions: the lens' top token in each cell, shaded by its
    probability. The input token under each column; the cell above says what the model would emit next."""
    L, T = t.lens_top_ids.shape
    fig = _figure(min(2.0 + 0.42 * T, 30.0), 1.6 + 0.45 * L)
    ax = fig.add_subplot()
    image = ax.imshow(t.lens_probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower",
                      interpolation="nearest")
    if T <= MAX_LABELLED:
        for layer in range(L):
            for pos in range(T):
                p = float(t.lens_probs[layer, pos])
                ax.text(pos, layer, short_label(tokenizer, t.lens_top_ids[layer, pos], 6), ha="center",
                        va="center", fontsize=6, color="white" if p > 0.55 else "black")
    _token_axis(ax, labels)
    ax.set_yticks(range(L), [f"layer {i}" for i in range(L)], fontsize=7)
    ax.set_title("logit lens: each layer's top next token (shade: its probability)", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, pad=0.01).ax.tick_params(labelsize=7)
    fig.savefig(path)


def draw_attention(t, layer: int, heads: list[int], labels: list[str], window: int | None, path: Path) -> None:
    """One panel per head: query (row) x key (column) attention probabilities, shown on a square-root scale
    so that small weights stay visible; keys outside the causal window are exactly 0 (white)."""
    from matplotlib.colors import PowerNorm

    maps = t.attention(layer)  # (H, T, T)
    T = maps.shape[1]
    columns = min(len(heads), 4)
    rows = -(-len(heads) // columns)
    side = 2.4 if T <= 24 else 3.2
    fig = _figure(0.6 + side * columns, 0.5 + side * rows)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat[len(heads):]:
        ax.set_axis_off()
    masked = np.ma.masked_equal(maps, 0.0)  # hidden keys drawn as background
    for n, (ax, head) in enumerate(zip(axes.flat, heads)):
        image = ax.imshow(masked[head], cmap="magma_r", norm=PowerNorm(0.5, 0.0, 1.0), interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=8)
        ax.tick_params(labelsize=6)
        if T <= 24 and n % columns == 0:  # the query tokens named down the left edge; elsewhere positions
            _token_axis(ax, labels, "y")
    cut = f", window {window}" if window is not None and window < T else ""
    fig.suptitle(f"attention, layer {layer}: query (row) reads key (column){cut}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, pad=0.01).ax.tick_params(labelsize=7)
    fig.savefig(path)


def draw_routing(t, labels: list[str], experts: int, path: Path) -> None:
    """Left: layers x positions, coloured by the first expert, 'first+second' written in each cell. Right:
    layers x experts, how many of the prompt's tokens each expert took (first or second choice)."""
    chosen = t.routing_experts  # (L, T, 2)
    L, T, _ = chosen.shape
    fig = _figure(min(3.5 + 0.42 * T, 32.0), 1.8 + 0.5 * L)
    grid = fig.add_gridspec(1, 2, width_ratios=[max(T, 8), max(experts * 0.6, 6)])
    ax = fig.add_subplot(grid[0])
    ax.imshow(chosen[:, :, 0], cmap="tab20", vmin=-0.5, vmax=19.5, aspect="auto", origin="lower",
              interpolation="nearest")
    if T <= MAX_LABELLED:
        for layer in range(L):
            for pos in range(T):
                a, b = chosen[layer, pos]
                ax.text(pos, layer, f"{a}+{b}", ha="center", va="center", fontsize=6)
    _token_axis(ax, labels)
    ax.set_yticks(range(L), [f"layer {i}" for i in range(L)], fontsize=7)
    ax.set_title("routing: first+second expert of each token (colour: the first)", fontsize=9)
    counts = np.zeros((L, experts), np.int64)  # (L, E)
    for layer in range(L):
        np.add.at(counts[layer], chosen[layer].reshape(-1), 1)
    ax2 = fig.add_subplot(grid[1])
    image = ax2.imshow(counts, cmap="Greens", aspect="auto", origin="lower", interpolation="nearest")
    ax2.set_xticks(range(experts), [str(e) for e in range(experts)], fontsize=6)
    ax2.set_yticks(range(L), [f"layer {i}" for i in range(L)], fontsize=7)
    ax2.set_xlabel("expert", fontsize=7)
    ax2.set_title("tokens per expert", fontsize=9)
    fig.colorbar(image, ax=ax2, shrink=0.8, pad=0.02).ax.tick_params(labelsize=7)
    fig.savefig(path)


def draw_norms(t, labels: list[str], path: Path) -> None:
    """|x| of the residual stream after the embedding and each layer: one line per layer across positions."""
    rows, T = t.residual_norms.shape
    fig = _figure(min(3.0 + 0.3 * T, 24.0), 3.2)
    ax = fig.add_subplot()
    for row in range(rows):
        name = "embedding" if row == 0 else f"after layer {row - 1}"
        ax.plot(range(T), t.residual_norms[row], marker="." if T <= MAX_LABELLED else None, lw=1.2, label=name)
    _token_axis(ax, labels)
    ax.set_ylabel("|x|", fontsize=8)
    ax.set_yscale("log")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, ncol=min(rows, 6))
    ax.set_title("residual stream norm per position", fontsize=9)
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------------- the page

_STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1400px;
padding:0 1em;color:#222;background:#fff}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em;border-bottom:1px solid #ddd}
img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}
p.how{color:#555;font-size:.92em;max-width:60em}code{background:#f3f3f3;padding:0 .2em}"""


def write_page(path: Path, title: str, prompt: str, tokens: list[str], sections: list[tuple[str, str, str]]) -> None:
    """index.html: the prompt, its tokens, then one section (heading, how to read it, image file) per picture."""
    e = html.escape
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{e(title)}</h1>",
             f"<pre>{e(prompt)}</pre>", f"<p class=\"how\">{len(tokens)} tokens: " +
             " ".join(f"<code>{e(tok)}</code>" for tok in tokens) + "</p>"]
    for heading, how, image in sections:
        parts.append(f"<h2 id=\"{e(Path(image).stem)}\">{e(heading)}</h2><p class=\"how\">{e(how)}</p>"
                     f"<img src=\"{e(image)}\" alt=\"{e(heading)}\">")
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts), encoding="utf-8")


def write_trace(model, prompt: str, out: str | Path, layers: str | list[int] | None = None,
                heads: str | list[int] | None = None) -> Path:
    """Trace `prompt` through `model` and write the pictures and index.html into `out`; returns the page's
    path. layers: attention maps of these layers (default: the first and the last); heads: of these heads
    (default all). Both as '0,3' strings (the CLI's flags) or lists."""
    from .tracing import trace

    check_matplotlib()
    cfg, tok = model.config, model.tokenizer
    if tok is None:
        raise PhinanoError(f"{model.name or 'this model'} has no tokenizer: phinano trace needs one to read the prompt")
    if not prompt:
        raise PhinanoError("the prompt is empty")
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    layers, heads = choose(layers, "layers", L), choose(heads, "heads", H)
    layers = layers if layers is not None else sorted({0, L - 1})
    heads = heads if heads is not None else list(range(H))
    ids = tok.encode(prompt)
    t = trace(model, ids, attention=layers)
    labels = [short_label(tok, i) for i in ids]

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PhinanoError(f"{out}: a file is there; phinano trace writes a folder of pictures")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as e:  # no permission, a read-only file system
        raise PhinanoError(f"{out}: cannot write the trace there ({e.strerror or e})") from None
    try:
        sections = [("Logit lens", "Each layer's residual stream put through the final norm and the head: the "
                     "token it would predict next at each position (columns: the input token at that position; "
                     "rows: layers, the top row is the model's real prediction). Dark cells are confident.",
                     "lens.png")]
        draw_lens(t, labels, tok, scratch / "lens.png")
        for layer in layers:
            name = f"attention-layer{layer}.png"
            draw_attention(t, layer, heads, labels, cfg.sliding_window, scratch / name)
            sections.append((f"Attention, layer {layer}", "Row: the query token; column: the key it reads; "
                             "darker is more weight (square-root scale). Nothing above the diagonal (causal); "
                             "with a sliding window, nothing left of the band.", name))
        if cfg.is_moe:
            draw_routing(t, labels, cfg.num_local_experts, scratch / "routing.png")
            sections.append(("Expert routing", "The two experts the sparsemixer sent each token to, per layer "
                             "(first+second), and how many tokens each expert took.", "routing.png"))
        draw_norms(t, labels, scratch / "norms.png")
        sections.append(("Residual norms", "The length of each position's residual stream after the embedding and "
                         "after each layer (log scale).", "norms.png"))
        write_page(scratch / "index.html", f"phinano trace: {model.name or cfg.architecture}", prompt, labels,
                   sections)
        out.mkdir(exist_ok=True)
        for item in sorted(scratch.iterdir()):  # index.html last: the page appears when its pictures are there
            if item.name != "index.html":
                os.replace(item, out / item.name)
        os.replace(scratch / "index.html", out / "index.html")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out / "index.html"
