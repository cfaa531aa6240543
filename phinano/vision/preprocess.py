"""Pixels -> normalised 336 x 336 crops, as Phi-3-vision's released image processor makes them.

    any image -> RGB -> (portrait: transposed) -> resized with Pillow's bilinear filter to width 336 * s
              -> padded top and bottom with white to a multiple of 336 -> (transposed back)
              -> /255, minus CLIP's mean, over CLIP's std                          the HD image (3, 336h, 336w)
              -> crops: the global view first (the HD image shrunk to 336 x 336 by bicubic interpolation),
                 then the h x w grid of 336 x 336 tiles, row by row                (1 + h*w, 3, 336, 336)

The scale s is the largest with s * ceil(s / ratio) <= num_crops, where ratio = long side / short side, so
the grid never has more than `num_crops` tiles (num_crops comes from the model's preprocessor_config.json).
The bicubic interpolation is torch's `interpolate(mode="bicubic", align_corners=False)`, written out below:
the cubic convolution kernel with a = -0.75, edge pixels repeated, no antialiasing (when shrinking it skips
pixels rather than averaging them, as the released processor does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np

from ..errors import PhinanoError
from .clip import IMAGE_SIZE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # per RGB channel, of pixels scaled to 0..1
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = (255, 255, 255)


@dataclass
class Crops:
    """One image, ready for the tower."""

    pixels: np.ndarray  # (1 + h*w, 3, 336, 336) float32: the global view, then the grid row by row
    rows: int  # h: crops down
    columns: int  # w: crops across


def open_image(image, name: str = "image"):
    """A path, bytes, or a PIL image -> a loaded PIL image. Anything unreadable or empty is one PhinanoError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        img = image
    else:
        try:
            if isinstance(image, (bytes, bytearray)):
                name = "image data" if name == "image" else name
                img = Image.open(BytesIO(bytes(image)))
            elif isinstance(image, (str, Path)):
                name = str(image)
                img = Image.open(image)
            else:
                raise PhinanoError(f"{name}: expected a file path, image bytes or a PIL image, "
                                   f"got {type(image).__name__}")
            img.load()
        except FileNotFoundError:
            raise PhinanoError(f"{name}: no such image file") from None
        except IsADirectoryError:
            raise PhinanoError(f"{name}: is a directory, not an image") from None
        except Image.DecompressionBombError as e:  # PIL's guard against a small file that unpacks to gigabytes
            raise PhinanoError(f"{name}: image too large ({e})") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise PhinanoError(f"{name}: not a readable image ({e})") from None
    if img.width == 0 or img.height == 0:
        raise PhinanoError(f"{name}: image has zero size ({img.width}x{img.height})")
    return img


def crop_scale(width: int, height: int, num_crops: int) -> int:
    """The largest s with s * ceil(s / ratio) <= num_crops (ratio = long side / short side >= 1): the HD image
    is 336 * s pixels along its long side."""
    ratio = max(width, height) / min(width, height)
    s = 1
    while (s + 1) * math.ceil((s + 1) / ratio) <= num_crops:
        s += 1
    return s


def grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(rows, columns) of crops the HD image of a width x height image has, without making it."""
    long, short = max(width, height), min(width, height)
    s = crop_scale(width, height, num_crops)
    new_short = int(s * IMAGE_SIZE / (long / short))
    if new_short == 0:
        raise PhinanoError(f"image of {width}x{height} is too thin to resize to {s * IMAGE_SIZE} pixels")
    across, down = s, math.ceil(new_short / IMAGE_SIZE)
    return (down, across) if width >= height else (across, down)


def hd_image(img, num_crops: int):
    """The released HD transform on a PIL image: RGB, long side 336 * s, short side padded with white to a
    multiple of 336 (the image centred, the odd pixel at the bottom). Returns a PIL image."""
    from PIL import Image, ImageOps

    img = img.convert("RGB")
    portrait = img.width < img.height
    if portrait:  # work on the landscape orientation, as the release does, and turn back at the end
        img = img.transpose(Image.Transpose.TRANSPOSE)
    ratio = img.width / img.height
    new_w = int(crop_scale(img.width, img.height, num_crops) * IMAGE_SIZE)
    new_h = int(new_w / ratio)
    if new_h == 0:
        raise PhinanoError(f"image of {img.width}x{img.height} is too thin to resize to width {new_w}")
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pad = math.ceil(new_h / IMAGE_SIZE) * IMAGE_SIZE - new_h
    img = ImageOps.expand(img, border=(0, pad // 2, 0, pad - pad // 2), fill=PAD_COLOUR)
    if portrait:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def normalise(img) -> np.ndarray:
    """A PIL RGB image -> (3, height, width) float32: pixel / 255, minus CLIP's mean, over CLIP's std."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)  # (height, width, 3)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def bicubic_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's bicubic resampling along one axis (align_corners=False, a = -0.75, no antialias):
    output pixel i reads input pixels floor(c)-1 .. floor(c)+2, c = (i + 0.5) * n_in / n_out - 0.5, each index
    clamped to the edge. Returns (indices, weights), each (n_out, 4)."""
    a = -0.75

    def near(d):  # the kernel for 0 <= d <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # ... for 1 <= d <= 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    # In float32, as torch computes them for a float32 image (the rounding of c shows past a few hundred pixels).
    f32 = np.float32
    centre = f32(n_in / n_out) * (np.arange(n_out, dtype=f32) + f32(0.5)) - f32(0.5)
    first = np.floor(centre)
    t = np.clip(centre - first, f32(0), f32(1))  # (n_out,): distance past input pixel floor(c)
    weights = np.stack([far(1 + t), near(t), near(1 - t), far(2 - t)], axis=1)  # (n_out, 4)
    indices = np.clip(first.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)  # (n_out, 4)
    return indices, weights


def bicubic_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(3, H, W) -> (3, height, width) float32 by separable bicubic interpolation (bicubic_weights), in float64."""
    rows, row_weights = bicubic_weights(x.shape[1], height)
    cols, col_weights = bicubic_weights(x.shape[2], width)
    x = x.astype(np.float64)
    x = np.einsum("chkw,hk->chw", x[:, rows, :], row_weights)  # (3, height, W)
    x = np.einsum("chwk,wk->chw", x[:, :, cols], col_weights)  # (3, height, width)
    return x.astype(np.float32)


def crops(image, num_crops: int) -> Crops:
    """An image (path, bytes or PIL image) -> its global view and grid of crops, normalised."""
    hd = normalise(hd_image(open_image(image), num_crops))  # (3, 336h, 336w)
    h, w = hd.shape[1] // IMAGE_SIZE, hd.shape[2] // IMAGE_SIZE
    tiles = hd.reshape(3, h, IMAGE_SIZE, w, IMAGE_SIZE).transpose(1, 3, 0, 2, 4)  # (h, w, 3, 336, 336)
    tiles = tiles.reshape(h * w, 3, IMAGE_SIZE, IMAGE_SIZE)  # row by row
    overview = bicubic_resize(hd, IMAGE_SIZE, IMAGE_SIZE)[None]  # (1, 3, 336, 336)
    return Crops(np.concatenate([overview, tiles]).astype(np.float32), h, w)
