"""Draw Phi-3-small's blocksparse attention pattern for docs/phi3-small.md (docs/phi3-small-pattern.png).

    python scripts/plot_blocksparse.py

The released pattern (blocks of 64 tokens, 16 local blocks, vertical stride 8, query head h shifted by h blocks)
over the first 48 blocks (3072 tokens), for query heads 0-3, one cell per (query block, key block). The mask is
phinano's own (kernels/reference.py::blocksparse_visible) at one token per block: a block is visible when its
first token is.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from phinano.kernels.reference import blocksparse_visible  # noqa: E402

BLOCKS, HEADS = 48, 4
# one token per block: block size 1 in the mask is the block grid itself
visible = blocksparse_visible(HEADS, 0, BLOCKS, BLOCKS, 1, 16, 8, 1)  # (H, query block, key block)

fig, axes = plt.subplots(1, HEADS, figsize=(9, 2.6), dpi=90)
for h, ax in enumerate(axes):
    ax.imshow(np.where(visible[h], 0.15, 1.0), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"query head {h}", fontsize=9)
    ax.set_xticks([0, 16, 32, 47])
    ax.set_yticks([0, 16, 32, 47])
    ax.tick_params(labelsize=7)
    ax.set_xlabel("key block (64 tokens)", fontsize=8)
axes[0].set_ylabel("query block", fontsize=8)
fig.suptitle("Phi-3-small blocksparse layers: dark = attended (16 local blocks + every 8th block, shifted per head)",
             fontsize=9)
fig.tight_layout()
out = Path(__file__).resolve().parent.parent / "docs" / "phi3-small-pattern.png"
fig.savefig(out)
print(out, out.stat().st_size, "bytes")
