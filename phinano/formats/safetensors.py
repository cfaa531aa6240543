"""safetensors: the format Hugging Face checkpoints come in. Read memory-mapped; written streamed.

A safetensors file is: an 8-byte little-endian header length N, N bytes of JSON
(`{"name": {"dtype": "BF16", "shape": [...], "data_offsets": [start, end]}, "__metadata__": {...}}`),
then the raw little-endian tensor bytes (offsets count from the end of the header).

We read the header ourselves and hand out `np.memmap` views, so loading copies nothing: a tensor's pages
are read from disk the first time a kernel touches them. NumPy has no bfloat16, so a BF16 tensor is handed
out as its raw 16-bit patterns in a `np.uint16` array. That is the one convention for bf16 in phinano:
**a uint16 weight array holds bfloat16 bits**; kernels widen it to float32 as they read it (put the 16 bits
in the high half of a 32-bit word: exact).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import PhinanoError
from .mapping import advise_huge_pages

# safetensors dtype -> the NumPy dtype phinano holds it in (bf16 as raw uint16 bits, see above)
DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Memory-map one .safetensors file: {tensor name: read-only array view}. Validates every offset."""
    path = Path(path)
    if not path.is_file():
        raise PhinanoError(f"{path}: safetensors file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PhinanoError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise PhinanoError(f"{path}: malformed or truncated safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PhinanoError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise PhinanoError(f"{path}: malformed safetensors header (not a JSON object)")
    header.pop("__metadata__", None)

    data_start = 8 + n
    buffer = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    advise_huge_pages(buffer)
    tensors = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (start, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
                raise TypeError("offsets are not integers")
        except (KeyError, TypeError, ValueError):
            raise PhinanoError(f"{path}: malformed header entry for tensor '{name}'") from None
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise PhinanoError(f"{path}: tensor '{name}' has dtype {dtype_name}; phinano reads BF16, F16 and F32")
        dtype = np.dtype(DTYPES[dtype_name])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (0 <= start <= end) or end - start != nbytes:
            raise PhinanoError(f"{path}: tensor '{name}' offsets {start}..{end} do not fit shape {shape} of {dtype_name}")
        if data_start + end > size:
            raise PhinanoError(
                f"{path}: truncated file: tensor '{name}' ends at byte {data_start + end} but the file has {size}"
            )
        tensors[name] = buffer[data_start + start : data_start + end].view(dtype).reshape(shape)
    return tensors


def read_checkpoint(folder: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a model folder: `model.safetensors`, or the shards listed in `model.safetensors.index.json`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PhinanoError(f"{index}: malformed shard index ({e!r})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise PhinanoError(f"{folder}: missing shard file(s) listed in the index: {', '.join(missing)}")
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(read_safetensors(folder / shard))
        absent = [name for name, shard in weight_map.items() if name not in tensors]
        if absent:
            raise PhinanoError(f"{index}: tensors listed in the index are not in their shard: {', '.join(absent[:5])}")
        return tensors
    single = folder / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    raise PhinanoError(f"{folder}: no model.safetensors or model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------------------
# Writing (the scripts' random checkpoints; the tests' hand-made files)
# ---------------------------------------------------------------------------------------------------------

# The dtype name written for each NumPy dtype (uint16 = bf16 bits, the one convention above).
DTYPE_NAMES = {np.dtype(np.uint16): "BF16", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (as torch's .to(torch.bfloat16))."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def write_safetensors(path: str | Path, tensors, metadata: dict | None = None) -> int:
    """Write one .safetensors file and return its tensor bytes.

    tensors: a dict {name: array}, or a list of (name, dtype, shape, chunks) where chunks() yields the
    tensor's bytes in order (arrays or bytes): the header is written first, from the shapes alone, then the
    data chunk by chunk, so a 7 GB checkpoint is never in memory at once. Arrays are uint16 (bf16 bits),
    float16 or float32. The file appears only when complete (written to `<path>.partial`, then renamed).

    Hand-written because the `safetensors` package's NumPy API neither knows bfloat16 nor streams.
    """
    if isinstance(tensors, dict):
        tensors = [(name, a.dtype, a.shape, lambda a=a: [np.ascontiguousarray(a)]) for name, a in tensors.items()]
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as the safetensors package writes it
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape, chunks in tensors:
            written = 0
            for chunk in chunks():
                data = chunk.tobytes() if isinstance(chunk, np.ndarray) else bytes(chunk)
                f.write(data)
                written += len(data)
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if written != expected:
                partial.unlink()
                raise ValueError(f"{name}: wrote {written} bytes, its shape {shape} needs {expected}")
    partial.replace(path)
    return offset
