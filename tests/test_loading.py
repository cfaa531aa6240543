"""Config spellings, checkpoint loading, and the clear errors bad input must get."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import phinano
from phinano import PhinanoError
from phinano.config import config_from_dict, load_config
from phinano.formats.safetensors import read_safetensors

# The released Phi-3.5-mini-instruct config.json (rope factor lists shortened to their real length, 48,
# with the release's first and last values; the loader only checks their length).
RELEASED_PHI35_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] + [1.5] * 46 + [2.84],
                     "long_factor": [1.08] + [10.0] * 46 + [49.0]},
}
RELEASED_PHI3_MINI_4K = {
    "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
    "sliding_window": 2047, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "eos_token_id": 32000,
}


def test_released_configs():
    c = config_from_dict(RELEASED_PHI3_MINI_4K)
    assert (c.head_dim, c.rotary_dim, c.rope_type, c.sliding_window, c.dtype) == (96, 96, "default", 2047, "bfloat16")
    c = config_from_dict(RELEASED_PHI35_MINI)
    assert c.rope_type == "longrope" and len(c.rope_long_factor) == 48
    assert c.rope_attention_factor == pytest.approx(1.1902380714238083, rel=1e-12)
    su = json.loads(json.dumps(RELEASED_PHI35_MINI))
    su["rope_scaling"]["type"] = "su"  # early revisions' name for longrope
    assert config_from_dict(su) == c
    phi4 = {**RELEASED_PHI35_MINI, "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
            "partial_rotary_factor": 0.75, "tie_word_embeddings": True}
    moe = {**RELEASED_PHI35_MINI, "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe",
           "hidden_size": 4096, "num_key_value_heads": 8, "intermediate_size": 6400, "num_local_experts": 16,
           "rope_scaling": {**RELEASED_PHI35_MINI["rope_scaling"], "short_factor": [1.0] * 64,
                            "long_factor": [1.0] * 64, "short_mscale": 1.243163121016122,
                            "long_mscale": 1.243163121016122, "original_max_position_embeddings": 4096}}
    cm = config_from_dict(moe)  # the release spells the class PhiMoEForCausalLM
    assert cm.is_moe and cm.rope_short_mscale == pytest.approx(1.243163121016122) and cm.head_dim == 128
    c4 = config_from_dict(phi4)
    assert (c4.head_dim, c4.rotary_dim, c4.num_key_value_heads, c4.tie_word_embeddings) == (128, 96, 8, True)


def test_both_spellings_give_one_config(checkpoint_dir, tmp_path):
    """Transformers 5 writes rope_parameters; the release writes rope_scaling + rope_theta at top level."""
    folder = checkpoint_dir("4-mini")
    raw = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in raw
    rope = raw.pop("rope_parameters")
    released = {**raw, "rope_theta": rope["rope_theta"], "partial_rotary_factor": rope["partial_rotary_factor"],
                "original_max_position_embeddings": rope["original_max_position_embeddings"],
                "rope_scaling": {"type": "longrope", "short_factor": rope["short_factor"],
                                 "long_factor": rope["long_factor"]},
                "torch_dtype": raw.pop("dtype", "float32")}
    new = tmp_path / "released"
    shutil.copytree(folder, new)
    (new / "config.json").write_text(json.dumps(released))
    a, b = load_config(folder), load_config(new)
    assert {k: v for k, v in vars(a).items() if k != "raw"} == {k: v for k, v in vars(b).items() if k != "raw"}
    ids = [5, 17, 99, 3]
    np.testing.assert_array_equal(phinano.load(folder, backend="numpy").forward(ids),
                                  phinano.load(new, backend="numpy").forward(ids))


def test_weights_are_memory_mapped(checkpoint_dir):
    model = phinano.load(checkpoint_dir("mini-4k", "bfloat16", True), backend="numpy")
    q = model.weights.layers[0].attn.q
    assert q.dtype == np.uint16  # bf16 kept as its raw bits, 2 bytes a parameter
    assert isinstance(q.base, np.memmap) or isinstance(getattr(q.base, "base", None), np.memmap) or not q.flags.owndata
    assert not q.flags.writeable


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def expect_error(folder, *words):
    with pytest.raises(PhinanoError) as e:
        phinano.load(folder, backend="numpy")
    for w in words:
        assert w in str(e.value), str(e.value)
    return str(e.value)


def test_missing_shard(checkpoint_dir, tmp_path):
    folder = copy_of(checkpoint_dir("mini-4k", "bfloat16", True), tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(folder, "missing shard", shard.name)


def test_truncated_file(checkpoint_dir, tmp_path):
    folder = copy_of(checkpoint_dir("mini-4k"), tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    expect_error(folder, "truncated", "model.safetensors")
    path.write_bytes(data[:5])
    expect_error(folder, "truncated")
    path.write_bytes(struct.pack("<Q", 40) + b"{not json" + b" " * 31)
    expect_error(folder, "malformed")


def test_wrong_shape_and_missing_tensor(checkpoint_dir, tmp_path):
    folder = copy_of(checkpoint_dir("medium"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] += 2
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_error(folder, "wrong shape", "mlp.gate_up_proj.weight", "mlp.down_proj.weight")
    cfg["intermediate_size"] -= 2
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_error(folder, "missing", "model.layers.2.")
    cfg["num_hidden_layers"] = 10**6  # more layers than tensors: refused before any list of names is made
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_error(folder, "1000000 layers")


def test_unknown_architecture_and_missing_key(checkpoint_dir, tmp_path):
    folder = copy_of(checkpoint_dir("mini-4k"), tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    expect_error(folder, "unsupported architecture", "LlamaForCausalLM")
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_error(folder, "hidden_size")


def test_prompt_longer_than_context(checkpoint_dir):
    model = phinano.load(checkpoint_dir("mini-4k"), backend="numpy")
    too_long = [5] * (model.config.max_position_embeddings + 1)
    with pytest.raises(PhinanoError, match="longer than the model's context"):
        model.generate(too_long, 4)
    with pytest.raises(PhinanoError, match="out of range"):
        model.forward([model.config.vocab_size])


def test_generation_stops_at_the_context_end(checkpoint_dir):
    model = phinano.load(checkpoint_dir("mini-4k"), backend="numpy")
    n = model.config.max_position_embeddings
    assert len(model.generate([5] * (n - 3), 10, stop_token_ids=[])) == 3


def test_offline_hub_id_is_one_clear_line():
    with pytest.raises(PhinanoError, match="microsoft/Phi-3-mini-4k-instruct"):
        phinano.load("microsoft/Phi-3-mini-4k-instruct")
    with pytest.raises(PhinanoError, match="no such folder"):
        phinano.load("./no/such/folder")
    with pytest.raises(PhinanoError, match="not a usable path"):  # was: OSError "File name too long"
        phinano.load("a" * 5000)
    with pytest.raises(PhinanoError, match="unknown quantization type"):  # was: TypeError "unhashable"
        phinano.load("nano-phi3", quantize=["q8_0"])
    r = subprocess.run([sys.executable, "-m", "phinano.cli", "info", "--model", "microsoft/Phi-3-mini-4k-instruct"],
                       capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("phinano: error: microsoft/Phi-3-mini-4k-instruct")


def test_cli_errors_are_one_line(checkpoint_dir, tmp_path):
    folder = copy_of(checkpoint_dir("mini-4k", "bfloat16", True), tmp_path)
    sorted(folder.glob("model-*.safetensors"))[0].unlink()
    r = subprocess.run([sys.executable, "-m", "phinano.cli", "info", "--model", str(folder)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "missing shard" in r.stderr


def test_read_safetensors_rejects_bad_offsets(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(PhinanoError, match="do not fit shape"):
        read_safetensors(path)
    header = json.dumps({"w": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(PhinanoError, match="dtype I64"):
        read_safetensors(path)
    # found by fuzzing the header: a dtype that is not a string, offsets that are not integers
    for entry, message in (({"dtype": {}, "shape": [2], "data_offsets": [0, 8]}, "has dtype {}"),
                           ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "has dtype"),
                           ({"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}, "malformed header entry"),
                           ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}, "malformed header entry")):
        header = json.dumps({"w": entry}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
        with pytest.raises(PhinanoError, match=message.replace("[", r"\[").replace("{", r"\{")):
            read_safetensors(path)


def vm_flags_of(path: Path) -> list[set[str]]:
    """The VmFlags of every memory map of `path` in this process (Linux /proc/self/smaps)."""
    flags, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5:
            current = parts[-1] if len(parts) >= 6 else None
        elif parts and parts[0] == "VmFlags:" and current == str(path):
            flags.append(set(parts[1:]))
    return flags


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(),
                    reason="no transparent huge pages (Linux only)")
def test_weight_files_ask_for_huge_pages(checkpoint_dir, tmp_path):
    """safetensors and GGUF maps carry MADV_HUGEPAGE ("hg" in VmFlags): pages read from disk afterwards come
    in 2 MiB folios (phinano/formats/mapping.py)."""
    import gguf

    from phinano.formats.gguf import read_gguf

    shard = sorted(checkpoint_dir("mini-4k", "bfloat16", True).glob("*.safetensors"))[0].resolve()
    tensors = read_safetensors(shard)
    assert vm_flags_of(shard) and all("hg" in f for f in vm_flags_of(shard))
    path = (tmp_path / "one.gguf").resolve()
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_tensor("w", np.ones((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = read_gguf(path)
    assert vm_flags_of(path) and all("hg" in flags for flags in vm_flags_of(path))
    del tensors, f
