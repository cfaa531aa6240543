"""Where a model comes from: a local folder, a GGUF file, Ollama's store, a shipped nano model, or the Hub.

From the Hub only the files phinano reads are fetched (configs, tokenizer files, safetensors), into the
standard huggingface_hub cache, so a second load is offline. Every failure (no network, unknown repo, a
gated repo without permission) becomes one PhinanoError line.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PhinanoError
from . import ollama
from .gguf import is_gguf

# The files a checkpoint folder needs; everything else in a repo (PyTorch .bin, ONNX, GGUF...) is skipped.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "cl100k_base.tiktoken",  # Phi-3-small's vocabulary (tiktoken ranks)
    "model.safetensors.index.json",
    "*.safetensors",
]


def _nano_path(name: str) -> Path | None:
    try:
        from ..nano import nano_path
    except ImportError:
        return None
    return nano_path(name)


def resolve(path_or_repo_id: str | Path, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local folder holding config.json and the weights (downloading from the Hub if needed), or a GGUF file
    (a path, or `ollama:NAME[:TAG]` from Ollama's store)."""
    if str(path_or_repo_id).startswith(ollama.PREFIX):  # a model in the local Ollama store: its GGUF blob
        return ollama.resolve(str(path_or_repo_id)[len(ollama.PREFIX):])
    if not str(path_or_repo_id).strip():
        raise PhinanoError("the model name is empty: give a folder, a .gguf file, ollama:NAME, a nano model or a Hub id")
    local = Path(path_or_repo_id).expanduser()
    try:
        is_dir, is_file = local.is_dir(), local.is_file()
    except OSError as e:  # a name longer than the file system allows, and the like
        raise PhinanoError(f"{str(path_or_repo_id)[:80]}: not a usable path ({e.strerror or e})") from None
    if is_dir:
        return local
    if is_file:
        if not is_gguf(local):
            raise PhinanoError(f"{local}: not a GGUF file (no GGUF magic) and not a model folder")
        return local
    nano = _nano_path(str(path_or_repo_id))
    if nano is not None:
        return nano
    repo_id = str(path_or_repo_id)
    if repo_id.lower().endswith(".gguf"):
        raise PhinanoError(f"{repo_id}: no such GGUF file")
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise PhinanoError(f"{repo_id}: no such folder, and not a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise PhinanoError("huggingface_hub is not installed; pass a local model folder instead") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES)
    except GatedRepoError:
        raise PhinanoError(f"{repo_id}: gated repo; accept its license on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise PhinanoError(f"{repo_id}: no such repo on the Hugging Face Hub (or no permission to read it)") from None
    except RevisionNotFoundError:
        raise PhinanoError(f"{repo_id}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError:
        raise PhinanoError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached (offline?); "
            "download it on a connected machine or pass a local folder"
        ) from None
    except Exception as e:  # network stack errors differ between huggingface_hub versions
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PhinanoError(f"{repo_id}: could not fetch from the Hugging Face Hub ({reason})") from None
    return Path(folder)
