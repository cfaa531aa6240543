"""Shared fixtures: tiny checkpoints are made once per test session, in a temp folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared"
PHI3_TOKENIZER = SHARED / "phi3-tokenizer"


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
