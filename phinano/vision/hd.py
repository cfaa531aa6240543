"""Tower features -> the image's positions in the text stream: 2x2 merge, separators, projector.

For an image whose HD version is an h x w grid of crops (preprocess.py), with G = 12 merged patches a side:

    each crop's (576, 1024) features -> a 12 x 12 grid of (4096,) vectors: each 2 x 2 block of patches
        concatenated as (top-left, top-right, bottom-left, bottom-right)
    the grid crops side by side -> one (12h) x (12w) grid, read row by row, `sub_GN` after every row
    then `glb_GN`
    then the global view's 12 x 12 grid, row by row, `sub_GN` after every row
    -> (12h * (12w + 1) + 1 + 12 * 13, 4096) -> linear (4096 -> D), exact GELU, linear (D -> D) -> (N, D)

N = (h*w + 1) * 144 + 1 + (h + 1) * 12 positions: `positions(h, w)`. The separators are learned vectors,
`model.vision_embed_tokens.sub_GN` and `glb_GN`; the projector is `img_projection.0` and `img_projection.2`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .clip import GRID, WIDTH

PREFIX = "model.vision_embed_tokens."
MERGED = GRID // 2  # G: 12 merged patches a side, 144 per crop


@dataclass
class Projector:
    sub_GN: np.ndarray  # (4C,) after every row of merged patches
    glb_GN: np.ndarray  # (4C,) between the grid of crops and the global view
    w1: np.ndarray  # (D, 4C)
    b1: np.ndarray  # (D,)
    w2: np.ndarray  # (D, D)
    b2: np.ndarray  # (D,)


def projector_shapes(D: int) -> dict[str, tuple[int, ...]]:
    return {
        PREFIX + "sub_GN": (1, 1, 1, 4 * WIDTH),
        PREFIX + "glb_GN": (1, 1, 4 * WIDTH),
        PREFIX + "img_projection.0.weight": (D, 4 * WIDTH),
        PREFIX + "img_projection.0.bias": (D,),
        PREFIX + "img_projection.2.weight": (D, D),
        PREFIX + "img_projection.2.bias": (D,),
    }


def load_projector(t: dict) -> Projector:
    return Projector(
        sub_GN=t[PREFIX + "sub_GN"].reshape(-1), glb_GN=t[PREFIX + "glb_GN"].reshape(-1),
        w1=t[PREFIX + "img_projection.0.weight"], b1=t[PREFIX + "img_projection.0.bias"],
        w2=t[PREFIX + "img_projection.2.weight"], b2=t[PREFIX + "img_projection.2.bias"],
    )


def positions(rows: int, columns: int) -> int:
    """Positions an image with an h x w grid of crops takes in the text stream (the released processor's count)."""
    return (rows * columns + 1) * MERGED * MERGED + 1 + (rows + 1) * MERGED


def merge_2x2(features: np.ndarray) -> np.ndarray:
    """One crop's (576, C) patch features -> (12, 12, 4C): each 2 x 2 block of patches side by side in the
    channel axis, in the order (top-left, top-right, bottom-left, bottom-right)."""
    C = features.shape[-1]
    x = features.reshape(MERGED, 2, MERGED, 2, C)  # (block row, row in block, block column, column in block, C)
    return x.transpose(0, 2, 1, 3, 4).reshape(MERGED, MERGED, 4 * C)


def with_row_ends(grid: np.ndarray, separator: np.ndarray) -> np.ndarray:
    """A (rows, columns, 4C) grid -> (rows * (columns + 1), 4C): read row by row, `separator` after each row."""
    ends = np.broadcast_to(separator, (grid.shape[0], 1, grid.shape[2]))
    return np.concatenate([grid, ends], axis=1).reshape(-1, grid.shape[2])


def image_sequence(ops, w: Projector, features: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Tower features of one image, (1 + h*w, 576, C) with the global view first -> the (N, 4C) sequence
    before the projector."""
    sub_gn, glb_gn = ops.widen(w.sub_GN), ops.widen(w.glb_GN)
    tiles = np.stack([merge_2x2(f) for f in features[1:]])  # (h*w, 12, 12, 4C), row by row
    tiles = tiles.reshape(rows, columns, MERGED, MERGED, -1)  # (h, w, 12, 12, 4C)
    grid = tiles.transpose(0, 2, 1, 3, 4).reshape(rows * MERGED, columns * MERGED, -1)  # (12h, 12w, 4C)
    return np.concatenate([
        with_row_ends(grid, sub_gn),  # (12h * (12w + 1), 4C)
        glb_gn[None],  # (1, 4C)
        with_row_ends(merge_2x2(features[0]), sub_gn),  # (12 * 13, 4C)
    ])


def project(ops, w: Projector, sequence: np.ndarray) -> np.ndarray:
    """(N, 4C) -> (N, D): linear, exact GELU, linear."""
    return ops.linear(ops.gelu(ops.linear(sequence, w.w1, w.b1)), w.w2, w.b2)
