"""`phinano diff`: [OK] on tiny checkpoints (safetensors, GGUF, PhiMoE), [DIFF] and exit 1 on an injected bug,
one line without torch."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from phinano.cli import main  # noqa: E402
from phinano.config import load_config  # noqa: E402
from phinano.formats import read_tensors  # noqa: E402
from phinano.formats.gguf_write import write_gguf  # noqa: E402
from phinano.kernels import fast  # noqa: E402
from tiny_models import add_tiny_tokenizer, make_phi3  # noqa: E402

LINE = re.compile(r"^\[(OK|DIFF)\]\s+(embedding|layer \d+|final norm|logits|routing)\s+")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Phi-3-mini-4k shaped, bf16, with a tokenizer: the sliding window (24) cuts the default prompt's tokens."""
    folder = make_phi3(tmp_path_factory.mktemp("diff") / "mini-4k", "mini-4k", dtype="bfloat16", layers=3)
    add_tiny_tokenizer(folder)
    return folder


def stage_lines(out: str) -> dict[str, str]:
    return {m[2]: m[1] for m in map(LINE.match, out.splitlines()) if m}


def test_diff_says_ok_for_every_stage(dense, capsys):
    text = "the quick brown fox jumps over the lazy dog. " * 3  # past the window of 24
    assert main(["diff", "--model", str(dense), "--prompt", text]) == 0
    out = capsys.readouterr().out
    assert stage_lines(out) == {"embedding": "OK", "layer 0": "OK", "layer 1": "OK", "layer 2": "OK",
                                "final norm": "OK", "logits": "OK"}
    assert "tol = 0.0001 x max|Transformers|" in out and "first difference" not in out


def test_an_injected_kernel_bug_is_a_diff_from_its_first_layer(dense, capsys, monkeypatch):
    monkeypatch.setattr(fast, "swiglu", lambda gate, up: up * gate)  # forgot the sigmoid
    assert main(["diff", "--model", str(dense)]) == 1
    out = capsys.readouterr().out
    stages = stage_lines(out)
    assert stages["embedding"] == "OK" and stages["layer 0"] == "DIFF" and stages["logits"] == "DIFF"
    assert out.rstrip().endswith("first difference: layer 0")


def test_a_tight_rtol_turns_float32_noise_into_a_diff(dense, capsys):
    assert main(["diff", "--model", str(dense), "--rtol", "1e-12"]) == 1
    assert stage_lines(capsys.readouterr().out)["logits"] == "DIFF"
    assert main(["diff", "--model", str(dense), "--rtol", "0"]) == 2
    assert "--rtol must be > 0" in capsys.readouterr().err


def test_diff_of_a_gguf_file_against_its_own_dequantized_weights(dense, tmp_path, capsys):
    cfg = load_config(dense)
    tensors = {n: np.asarray(t) for n, t in read_tensors(dense).items()}
    tensors = {n: (t.astype(np.uint32) << 16).view(np.float32) if t.dtype == np.uint16 else t for n, t in tensors.items()}
    path = write_gguf(tmp_path / "tiny-q4_0.gguf", cfg, tensors, lambda name, a: "Q4_0")
    assert main(["diff", "--model", str(path)]) == 0  # no tokenizer in this file: fixed ids
    assert set(stage_lines(capsys.readouterr().out).values()) == {"OK"}


def test_diff_of_phimoe_compares_the_routing_too(tmp_path, capsys):
    from test_moe import make_phimoe

    folder = make_phimoe(tmp_path / "moe")
    assert main(["diff", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert stage_lines(out)["routing"] == "OK" and "0 of 80 token-layers sent to other experts" in out


def test_without_torch_one_line_says_how_to_install(dense, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["diff", "--model", str(dense)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("phinano: error: phinano diff needs torch and transformers: pip install torch "
                            'transformers (or pip install "phinano[test]")\n')


def test_a_prompt_without_a_tokenizer_is_refused(tmp_path, capsys):
    folder = make_phi3(tmp_path / "bare", "medium", layers=1)
    assert main(["diff", "--model", str(folder), "--prompt", "hi"]) == 1
    assert "no tokenizer to encode --prompt with" in capsys.readouterr().err
