"""Phi-3-vision and Phi-3.5-vision: images in, as the released model sees them.

One image's trip (docs/vision.md walks it with real shapes):

    preprocess.py  pixels -> HD image -> global view + h x w grid of 336 x 336 crops, CLIP-normalised
    clip.py        the crops, a few at a time -> CLIP ViT-L/14-336 -> (576, 1024) features each (hidden_states[-2])
    hd.py          2x2 merge, `sub_GN` after every row, `glb_GN` before the global view, projector -> (N, D)
    prompt.py      `<|image_N|>` in the prompt -> N positions, filled with those N vectors (model.py)

`Vision` holds the weights and the crop budget; `Vision.embed(ops, image)` is the whole trip of one image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PhinanoError
from . import clip, hd, preprocess

DEFAULT_NUM_CROPS = 16  # Phi-3-vision-128k's preprocessor_config.json; used when a folder has none
IGNORED = (  # tensors some released checkpoints carry that nothing reads
    hd.PREFIX + "wte.weight",  # a second copy of model.embed_tokens.weight
    clip.PREFIX + "embeddings.position_ids",  # an index buffer (0 .. 576)
)


@dataclass
class Vision:
    tower: clip.Tower
    projector: hd.Projector
    num_crops: int  # the most crops of the grid (preprocessor_config.json): 16, or 4 for Phi-3.5-vision's multi-frame

    def embed(self, ops, image) -> np.ndarray:
        """One image (path, bytes or PIL image) -> the (N, D) vectors of its N positions in the text stream."""
        crops = preprocess.crops(image, self.num_crops)  # (1 + h*w, 3, 336, 336)
        features = clip.features(ops, self.tower, crops.pixels)  # (1 + h*w, 576, C)
        sequence = hd.image_sequence(ops, self.projector, features, crops.rows, crops.columns)  # (N, 4C)
        return hd.project(ops, self.projector, sequence)  # (N, D)

    def positions(self, image) -> int:
        """The positions an image takes in the text stream, from its size alone (no tower run)."""
        img = preprocess.open_image(image)
        return hd.positions(*preprocess.grid(img.width, img.height, self.num_crops))


def vision_shapes(D: int) -> dict[str, tuple[int, ...]]:
    """Every image tensor of a Phi-3-vision checkpoint with text width D, with its shape."""
    return {**clip.tower_shapes(), **hd.projector_shapes(D)}


def load_vision(tensors: dict, num_crops: int = DEFAULT_NUM_CROPS) -> Vision:
    return Vision(clip.load_tower(tensors), hd.load_projector(tensors), num_crops)


def read_num_crops(folder: str | Path) -> int:
    """`num_crops` from the folder's preprocessor_config.json (DEFAULT_NUM_CROPS without the file)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return DEFAULT_NUM_CROPS
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("num_crops", DEFAULT_NUM_CROPS)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise PhinanoError(f"{path}: not a JSON object ({e})") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PhinanoError(f"{path}: 'num_crops' must be a positive integer, got {value!r}")
    return value
