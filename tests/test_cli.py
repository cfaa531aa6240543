"""The `phinano` command on a tiny model that carries the real Phi-3 tokenizer (conftest.phi3_tokenizer_dir)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import phinano
from phinano.cli import main

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, phi3_tokenizer_dir):
    """A tiny mini-4k-shaped model with the full Phi-3 vocabulary (32064 rows) and the real tokenizer."""
    from tiny_models import make_phi3

    folder = make_phi3(tmp_path_factory.mktemp("chat") / "model", "mini-4k", vocab=32064)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(phi3_tokenizer_dir / name, folder / name)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [32000, 32001, 32007]}))
    return folder


def test_generate_streams_the_greedy_continuation(chat_model, capsys):
    model = phinano.load(chat_model, backend="numpy")
    ids = model.tokenizer.encode("def fibonacci(n):")
    new = model.generate(ids, 20)
    assert main(["generate", "--model", str(chat_model), "--backend", "numpy", "-n", "20", "def fibonacci(n):"]) == 0
    out = capsys.readouterr().out
    assert out == "def fibonacci(n):" + model.tokenizer.decode(new, skip_special_tokens=True) + "\n"


def test_chat_uses_the_template_and_stop_ids(chat_model, capsys):
    from transformers import AutoTokenizer

    model = phinano.load(chat_model, backend="numpy")
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    reference = AutoTokenizer.from_pretrained(chat_model).apply_chat_template(messages, add_generation_prompt=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference  # 5.x: a BatchEncoding
    assert ids == list(reference)
    new = model.generate(ids, 16)
    assert main(["generate", "--model", str(chat_model), "--backend", "numpy", "--chat", "-n", "16", "-v",
                 "Why is the sky blue?"]) == 0
    captured = capsys.readouterr()
    assert captured.out == model.tokenizer.decode(new, skip_special_tokens=True) + "\n"
    assert "tok/s" in captured.err and f"{len(ids)} prompt tokens" in captured.err


def test_stop_string_is_not_printed(chat_model, capsys):
    model = phinano.load(chat_model, backend="numpy")
    ids = model.tokenizer.encode("x")
    text = model.tokenizer.decode(model.generate(ids, 30, stop_token_ids=[]), skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "the tiny model's continuation is too short to pick a stop string from"
    main(["generate", "--model", str(chat_model), "--backend", "numpy", "-n", "30", "--stop", stop, "x"])
    out = capsys.readouterr().out
    assert out == "x" + text[: text.find(stop)] + "\n"


def test_sampling_flags_with_seed_are_reproducible(chat_model, capsys):
    args = ["generate", "--model", str(chat_model), "--backend", "numpy", "-n", "12", "-t", "0.8", "--top-k", "40",
            "--top-p", "0.9", "--min-p", "0.02", "--repetition-penalty", "1.1", "--seed", "7", "Hello"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_info_reports_parameters_dtype_and_memory(checkpoint_dir, capsys):
    from tiny_models import hf_reference

    for name in ("mini-4k", "4-mini"):
        folder = checkpoint_dir(name, "bfloat16", True)
        assert main(["info", "--model", str(folder)]) == 0
        out = capsys.readouterr().out
        params = hf_reference(folder).num_parameters()
        assert f"{params:,}" in out
        assert "Phi3ForCausalLM" in out and "bfloat16" in out and "memory needed" in out


def test_parameter_counts_match_transformers(checkpoint_dir):
    from tiny_models import DENSE_SPECS, hf_reference

    for name in DENSE_SPECS:
        folder = checkpoint_dir(name)
        total, active = phinano.load(folder, backend="numpy").parameter_counts()
        assert total == active == hf_reference(folder).num_parameters()


def test_generate_without_tokenizer_is_a_clear_error(checkpoint_dir, capsys):
    assert main(["generate", "--model", str(checkpoint_dir("mini-4k")), "hi"]) == 1
    assert "no tokenizer.json" in capsys.readouterr().err


def test_numpy_backend_flag(checkpoint_dir):
    model = phinano.load(checkpoint_dir("mini-4k"), backend="numpy")
    assert model.backend == "numpy" and model.ops.__name__.endswith("reference")
    assert np.isfinite(model.forward([3, 4, 5])).all()
