"""Ollama's model store: run the model you already pulled, offline.

    phinano generate --model ollama:phi3.5 "Why is the sky blue?"

Ollama keeps every model as content-addressed blobs plus one JSON manifest per name and tag:

    $OLLAMA_MODELS (else ~/.ollama/models)/
        manifests/<registry>/<namespace>/<name>/<tag>      e.g. registry.ollama.ai/library/phi3.5/latest
        blobs/sha256-<hex>

A manifest lists layers by media type; the weights are the layer `application/vnd.ollama.image.model`, a GGUF
file. "phi3.5" means library/phi3.5:latest on Ollama's default registry; "user/model:tag" and
"host/user/model:tag" name other namespaces and registries.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import PhinanoError

PREFIX = "ollama:"
DEFAULT_REGISTRY = "registry.ollama.ai"
MODEL_LAYER = "application/vnd.ollama.image.model"


def store_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def parse_name(name: str) -> tuple[str, str, str, str]:
    """'phi3.5' -> (registry.ollama.ai, library, phi3.5, latest); 'me/tiny:q4' -> (.., me, tiny, q4)."""
    path, _, tag = name.partition(":")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 3 or not tag and ":" in name or {".", ".."} & {*parts, tag} or "/" in tag:
        raise PhinanoError(f"ollama:{name}: not a model name (NAME, NAME:TAG, NAMESPACE/NAME:TAG)")
    parts = [DEFAULT_REGISTRY, "library"][: 3 - len(parts)] + parts
    return parts[0], parts[1], parts[2], tag or "latest"


def available(root: Path) -> list[str]:
    """Every name:tag in the store, as a user would type it (library models without their namespace)."""
    base = root / "manifests"
    names = []
    for manifest in sorted(base.glob("*/*/*/*")) if base.is_dir() else []:
        registry, namespace, name, tag = manifest.relative_to(base).parts
        short = name if (registry, namespace) == (DEFAULT_REGISTRY, "library") else \
            f"{namespace}/{name}" if registry == DEFAULT_REGISTRY else f"{registry}/{namespace}/{name}"
        names.append(f"{short}:{tag}")
    return names


def resolve(name: str) -> Path:
    """The GGUF blob of `name` in the local Ollama store; one clear error if it is not there."""
    root = store_root()
    registry, namespace, model, tag = parse_name(name)
    manifest = root / "manifests" / registry / namespace / model / tag
    if not manifest.is_file():
        there = available(root)
        listing = f"models there: {', '.join(there)}" if there else "no models are there"
        raise PhinanoError(f"ollama:{name}: not in the Ollama store at {root} ({listing})")
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, StopIteration, UnicodeDecodeError):
        raise PhinanoError(f"{manifest}: not an Ollama manifest with a model layer") from None
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise PhinanoError(f"{manifest}: model layer digest {digest!r} is not sha256:<64 hex digits>")
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise PhinanoError(f"ollama:{name}: the manifest names blob {blob.name}, which is missing from {root / 'blobs'}")
    return blob
