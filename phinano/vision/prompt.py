"""Image markers in a prompt: `<|image_1|>`, `<|image_2|>`, ... and the positions they stand for.

The released processor splits the prompt text at the markers and tokenizes each piece of text on its own, with
the tokenizer's `<s>` and the leading-space prefix of every piece: so `<s>` follows every image, and text right
after a marker starts a new word. Marker N becomes the image's positions, each holding the id -N.

Here that is two steps:
    `split(text)`          text -> ["text", 1, "text", 2, "text"]  (the tokenizer encodes the strings:
                                                                    Tokenizer.encode_prompt -> ids with one -N each)
    `expand(ids, counts)`  one -N per marker -> counts[N-1] copies of -N  (counts: hd.positions of each image)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import PhinanoError

MARKER = re.compile(r"<\|image_(\d+)\|>")


def split(text: str) -> list:
    """The prompt text around its markers: strings and image numbers alternate, starting and ending with a string
    (possibly empty), as re.split gives them. Numbers must be 1..n, each used once."""
    parts = MARKER.split(text)
    numbers = [int(n) for n in parts[1::2]]
    check_numbers(numbers)
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]


def check_numbers(numbers: Sequence[int]) -> None:
    if sorted(numbers) != list(range(1, len(numbers) + 1)):
        shown = ", ".join(f"<|image_{n}|>" for n in numbers)
        raise PhinanoError(f"image markers must be <|image_1|> .. <|image_n|>, each once; the prompt has {shown}")


def markers(ids: Sequence[int]) -> list[int]:
    """The image numbers of the -N markers in ids, in the order they appear."""
    return [-int(i) for i in ids if i < 0]


def expand(ids: Sequence[int], counts: Sequence[int]) -> list[int]:
    """Replace each marker -N (one id) by counts[N-1] copies of -N. The markers must match the images: numbers
    1 .. len(counts), each once."""
    found = markers(ids)
    if len(found) != len(counts):
        raise PhinanoError(f"the prompt has {len(found)} image marker(s) (<|image_N|>) for {len(counts)} image(s)")
    check_numbers(found)
    out: list[int] = []
    for i in ids:
        out.extend([int(i)] * counts[-i - 1] if i < 0 else [int(i)])
    return out
