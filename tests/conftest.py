"""Shared fixtures: tiny checkpoints are made once per test session, in a temp folder; the real Phi-3 tokenizer
is found (or fetched) once per session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

# Tests never reach for the network, with one exception: the real Phi-3 tokenizer files (phi3_tokenizer_dir).
_OFFLINE_BY_USER = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Test data kept beside the checkout, in ../shared (PHINANO_SHARED_DIR points elsewhere; a folder that does not
# exist simulates a fresh clone): the real Phi-3 tokenizer and llama.cpp's reference tokenizations for it.
SHARED = Path(os.environ.get("PHINANO_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
PHI3_REFERENCE = SHARED / "phi3-tokenizer" / "reference"
PHI3_REPO = "microsoft/Phi-3-mini-4k-instruct"
PHI3_FILES = ("tokenizer.json", "tokenizer_config.json")

_DOWNLOAD = """import sys
from huggingface_hub import hf_hub_download
print(*(hf_hub_download(sys.argv[1], name) for name in sys.argv[2:]), sep="\\n")
"""


def _hub_reachable(timeout: float = 5.0) -> bool:
    """A quick TCP check, so that a machine without network skips at once instead of after the Hub client's
    retries (about 25 s). Behind a proxy, the download itself is the only honest check."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def find_phi3_tokenizer(shared: Path = SHARED / "phi3-tokenizer", cache_dir: str | None = None,
                        offline: bool = _OFFLINE_BY_USER) -> tuple[Path | None, str]:
    """(folder holding the released Phi-3 tokenizer.json and tokenizer_config.json, or None; why not).

    Looked for in ../shared/phi3-tokenizer, then in the Hugging Face cache (microsoft/Phi-3-mini-4k-instruct),
    then downloaded from the Hub (those two files only) unless HF_HUB_OFFLINE was set before the tests started.
    """
    if all((shared / name).is_file() for name in PHI3_FILES):
        return shared, ""
    missing = f"no {shared}"
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None, f"{missing}, and huggingface_hub is not installed"
    try:
        paths = [Path(hf_hub_download(PHI3_REPO, name, cache_dir=cache_dir, local_files_only=True))
                 for name in PHI3_FILES]
        return paths[0].parent, ""
    except (LocalEntryNotFoundError, OSError):
        pass
    missing += f", {PHI3_REPO} not in the Hugging Face cache"
    if offline:
        return None, f"{missing}, and HF_HUB_OFFLINE is set"
    if not _hub_reachable():
        return None, f"{missing}, and the Hugging Face Hub cannot be reached"
    try:  # in a child process: this one keeps HF_HUB_OFFLINE=1 for everything else
        done = subprocess.run([sys.executable, "-c", _DOWNLOAD, PHI3_REPO, *PHI3_FILES], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "0"})
    except subprocess.TimeoutExpired:
        return None, f"{missing}, and downloading it took over 5 minutes"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        return None, f"{missing}, and downloading it failed: {last[:200]}"
    return Path(done.stdout.strip().splitlines()[0]).parent, ""


@pytest.fixture(scope="session")
def phi3_tokenizer_dir() -> Path:
    """The released Phi-3 tokenizer's folder; the test is skipped, saying why, when it cannot be had."""
    folder, why = find_phi3_tokenizer()
    if folder is None:
        pytest.skip(f"needs the real Phi-3 tokenizer: {why}")
    return folder


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """make(name, dtype, shard) -> folder of a tiny Phi3ForCausalLM checkpoint, built once per session."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import make_phi3

    root = tmp_path_factory.mktemp("ckpt")
    made: dict = {}

    def make(name: str, dtype: str = "float32", shard: bool = False) -> Path:
        key = (name, dtype, shard)
        if key not in made:
            made[key] = make_phi3(root / f"{name}-{dtype}-{'sharded' if shard else 'single'}", name, dtype, shard)
        return made[key]

    return make
