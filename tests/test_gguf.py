"""GGUF files (llama.cpp's and Ollama's format) against Transformers on the file's own weights.

Each tiny Phi-3 shape (sliding window, longrope crossing the original length, GQA, partial rotary with a tied
head) is written to GGUF in the test run with phinano's writer (llama.cpp's names and metadata, the `gguf`
package's reference quantizers). The reference is Transformers with the ORIGINAL config and the GGUF's weights
as the `gguf` package itself dequantizes them (an independent reader): so the only differences left are
float32 accumulation order, and the parity tolerance of the safetensors tests applies unchanged.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

import phinano  # noqa: E402
from phinano import PhinanoError  # noqa: E402
from phinano.config import load_config  # noqa: E402
from phinano.formats import read_tensors  # noqa: E402
from phinano.formats.gguf_write import gguf_names, write_gguf  # noqa: E402
from phinano.formats.safetensors import write_safetensors  # noqa: E402
from tiny_models import DENSE_SPECS, VOCAB, make_phi3  # noqa: E402

LOGIT_RTOL = 1e-4  # as tests/test_parity.py
PLAIN = ["F32", "F16", "BF16"]
BLOCK = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, VOCAB, n).tolist()


def widened(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a.astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """make(name, qtype) -> (gguf path, original checkpoint folder), built once per module."""
    root = tmp_path_factory.mktemp("gguf")
    folders, files = {}, {}

    def make(name: str, qtype: str) -> tuple[Path, Path]:
        if name not in folders:
            folders[name] = make_phi3(root / name, name)
        if (name, qtype) not in files:
            folder = folders[name]
            cfg = load_config(folder)
            tensors = {n: widened(np.asarray(t)) for n, t in read_tensors(folder).items()}
            if cfg.tie_word_embeddings:
                tensors.pop("lm_head.weight", None)
            files[name, qtype] = write_gguf(root / f"{name}-{qtype}.gguf", cfg, tensors, lambda n, a: qtype)
        return files[name, qtype], folders[name]

    return make


def reference(path: Path, folder: Path):
    """Transformers with the original config and the GGUF's weights as the `gguf` package dequantizes them: the
    dequantized tensors are saved under the checkpoint's own names beside a copy of its config.json, and
    Transformers loads that folder as it loads any checkpoint."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(folder)
    on_disk = {n: t for n, t in read_tensors(folder).items()
               if not n.endswith("rotary_emb.inv_freq") and not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    where = {}  # GGUF name -> [(checkpoint name, expert index or None)]
    for name, values in on_disk.items():
        (g,) = gguf_names(cfg, {name: values})
        expert = int(name.split(".")[5]) if ".experts." in name else None
        where.setdefault(g, []).append((name, expert))
    dequantized = {}
    for t in gguf.GGUFReader(path).tensors:
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        for name, expert in where.get(t.name, []):
            part = values if expert is None else values[expert]
            dequantized[name] = np.ascontiguousarray(part.reshape(on_disk[name].shape))
    assert set(dequantized) == set(on_disk)
    ref = path.with_suffix(".reference")
    if not ref.is_dir():
        ref.mkdir()
        shutil.copy(folder / "config.json", ref / "config.json")
        write_safetensors(ref / "model.safetensors", dequantized)
    return AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()


def hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("qtype", PLAIN + BLOCK)
@pytest.mark.parametrize("name", list(DENSE_SPECS))
def test_gguf_logits_match_transformers(tiny, name, qtype):
    path, folder = tiny(name, qtype)
    hf = reference(path, folder)
    ids = prompt(60)  # past the sliding windows and the longrope models' original length (48)
    ref = hf_logits(hf, ids)
    for backend in ("numpy", "numba"):
        got = phinano.load(path, backend=backend, tokenizer=False).forward(ids)
        diff = np.abs(got - ref).max()
        assert diff <= LOGIT_RTOL * np.abs(ref).max(), f"{backend}: {diff:.2e} of {np.abs(ref).max():.1f}"


@pytest.mark.parametrize("qtype", ["BF16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("name", ["mini-128k", "4-mini"])
def test_gguf_greedy_64_tokens_match_transformers(tiny, name, qtype):
    """30-token prompts cross the original length (48) while generating. The prompt is the first of a fixed
    list whose greedy path, in Transformers, neither repeats itself nor passes a top-1/top-2 near-tie (within
    twice the logit tolerance): rounding weights to 4 bits can make a tiny model do either."""
    path, folder = tiny(name, qtype)
    hf = reference(path, folder)
    for seed in range(30, 60):
        ids = prompt(30, seed=seed)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                              eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        expected = out.sequences[0, len(ids):].tolist()
        gaps = [float(np.diff(np.sort(s[0].numpy())[-2:])[0] / np.abs(s[0].numpy()).max()) for s in out.logits]
        if len(set(expected)) > 16 and min(gaps) > 2 * LOGIT_RTOL:
            break
    else:
        pytest.fail("no prompt in the list gives a meaningful greedy comparison")
    model = phinano.load(path, tokenizer=False)
    assert model.generate(ids, 64, stop_token_ids=[]) == expected


def test_gguf_config_equals_the_checkpoints(tiny):
    """Every number the forward pass uses comes back from the GGUF metadata (sliding window, longrope factors and
    attention factor, partial rotary, tied head)."""
    for name in DENSE_SPECS:
        path, folder = tiny(name, "F32")
        a = phinano.load(path, backend="numpy", tokenizer=False).config
        b = load_config(folder)
        skip = ("raw", "dtype", "bos_token_id", "eos_token_id", "pad_token_id")
        for field, want in vars(b).items():  # GGUF stores floats as float32, which is what the kernels use
            got = getattr(a, field)
            if field in skip or got == want:
                continue
            assert np.array_equal(np.float32(got), np.float32(want)), (name, field, got, want)


# ------------------------------------------------------------------ bad files: one clear error each
def gguf_error(path: Path, *words: str) -> None:
    with pytest.raises(PhinanoError) as e:
        phinano.load(path, backend="numpy", tokenizer=False)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_bad_gguf_files(tiny, tmp_path):
    path, _ = tiny("mini-4k", "Q8_0")
    data = path.read_bytes()

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    gguf_error(truncated, "truncated.gguf")

    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGUX" + data[4:])
    gguf_error(magic, "not a GGUF file")

    version = tmp_path / "version.gguf"
    version.write_bytes(data[:4] + struct.pack("<I", 99) + data[8:])
    gguf_error(version, "version.gguf", "version 99")

    count = tmp_path / "count.gguf"  # an absurd tensor count
    count.write_bytes(data[:8] + struct.pack("<Q", 2**40) + data[16:])
    gguf_error(count, "count.gguf")

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    gguf_error(empty, "empty.gguf")

    not_utf8 = tmp_path / "utf8.gguf"  # a damaged string value: the architecture's 4 bytes are not UTF-8
    value = data.index(b"general.architecture") + len(b"general.architecture") + 4 + 8  # after type and length
    assert data[value : value + 4] == b"phi3"
    not_utf8.write_bytes(data[:value] + b"\xff\xfe\xfd\xfc" + data[value + 4 :])
    gguf_error(not_utf8, "utf8.gguf", "general.architecture", "UnicodeDecodeError")


def with_metadata(source: Path, out: Path, name: str, value, value_type) -> Path:
    """A copy of a GGUF file with one metadata value replaced (gguf's own writer)."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or not field.types:
            continue
        if key == name:
            writer.add_array(key, value) if value_type == gguf.GGUFValueType.ARRAY else writer.add_key_value(key, value, value_type)
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("name,value,value_type,words", [
    ("phi3.block_count", 10**6, gguf.GGUFValueType.UINT32, ["1000000 layers"]),  # was: MemoryError
    ("phi3.block_count", 2**64 - 1, gguf.GGUFValueType.UINT64, ["must be an integer below 2^31"]),
    ("phi3.embedding_length", "", gguf.GGUFValueType.STRING, ["'phi3.embedding_length' must be a positive integer"]),
    ("phi3.attention.head_count", 0, gguf.GGUFValueType.UINT32, ["'phi3.attention.head_count'"]),
    ("phi3.rope.dimension_count", [1, 2], gguf.GGUFValueType.ARRAY, ["'phi3.rope.dimension_count'"]),
])
def test_damaged_gguf_metadata_is_one_clear_error(tiny, tmp_path, name, value, value_type, words):
    """Found by fuzzing the metadata of a file: these raised ZeroDivisionError, ValueError, TypeError, or
    listed 2^64 layers' tensors until memory ran out."""
    path, _ = tiny("mini-4k", "Q8_0")
    gguf_error(with_metadata(path, tmp_path / "damaged.gguf", name, value, value_type), "damaged.gguf", *words)


def test_gguf_unknown_architecture_and_missing_tensor(tiny, tmp_path):
    path, folder = tiny("mini-4k", "F32")
    cfg = load_config(folder)
    tensors = {n: widened(np.asarray(t)) for n, t in read_tensors(folder).items()}

    missing = dict(tensors)
    missing.pop("model.layers.1.mlp.down_proj.weight")
    gguf_error(write_gguf(tmp_path / "missing.gguf", cfg, missing, lambda n, a: "F32"), "missing", "down_proj")

    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gguf_error(tmp_path / "llama.gguf", "unsupported GGUF architecture 'llama'")


def test_gguf_unsupported_tensor_type_names_the_tensor(tiny, tmp_path):
    """A file whose blk.0.ffn_down holds IQ4_NL blocks (a type phinano does not read): one error naming both."""
    path, _ = tiny("mini-4k", "F32")
    reader = gguf.GGUFReader(path)
    out = tmp_path / "iq4.gguf"
    writer = gguf.GGUFWriter(out, "phi3")
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "general.architecture")) or not field.types:
            continue
        value = field.contents()
        kind = field.types[0] if field.types[0] != gguf.GGUFValueType.ARRAY else field.types[-1]
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, kind)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_down.weight":
            rows, cols = t.data.shape
            blocks = np.random.default_rng(0).integers(0, 256, (rows, cols // 32 * 18), dtype=np.uint8)
            writer.add_tensor(t.name, blocks, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gguf_error(out, "blk.0.ffn_down.weight", "IQ4_NL")


def test_nothing_half_written(tiny, tmp_path):
    """A failing write leaves no file under the target name."""
    path, folder = tiny("mini-4k", "F32")
    cfg = load_config(folder)
    tensors = {n: widened(np.asarray(t)) for n, t in read_tensors(folder).items()}
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :17]
    with pytest.raises(Exception):
        write_gguf(tmp_path / "odd.gguf", cfg, tensors, lambda n, a: "Q8_0")
    assert list(tmp_path.iterdir()) == [], "neither the file nor its .partial stays behind"


# ------------------------------------------------------------------ Ollama's store
def fake_ollama_store(root: Path, blob_source: Path, name: str = "phi3", tag: str = "latest") -> None:
    data = blob_source.read_bytes()
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 1},
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)}]}))


def test_ollama_store(tiny, tmp_path, monkeypatch):
    path, _ = tiny("mini-4k", "Q8_0")
    store = tmp_path / "ollama"
    fake_ollama_store(store, path)
    fake_ollama_store(store, path, "phi3.5", "q8")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    ids = prompt(20)
    direct = phinano.load(path, tokenizer=False).forward(ids)
    for name in ("ollama:phi3", "ollama:phi3:latest", "ollama:library/phi3", "ollama:phi3.5:q8"):
        np.testing.assert_array_equal(phinano.load(name, tokenizer=False).forward(ids), direct)
    with pytest.raises(PhinanoError) as e:
        phinano.load("ollama:phi4", tokenizer=False)
    assert "phi3:latest" in str(e.value) and "phi3.5:q8" in str(e.value)
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "phi3" / "latest"
    good = manifest.read_text()
    for layers, words in (([1, 2], "not an Ollama manifest"),  # layers that are not objects
                          ([{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:../../x"}], "64 hex"),
                          ([{"mediaType": "application/vnd.ollama.image.model", "digest": 7}], "is not sha256")):
        manifest.write_text(json.dumps({"layers": layers}))
        with pytest.raises(PhinanoError, match=words):
            phinano.load("ollama:phi3", tokenizer=False)
    manifest.write_text(good)
    for name in ("ollama:../phi3", "ollama:phi3:..", "ollama:a/../phi3"):  # no way out of the store
        with pytest.raises(PhinanoError, match="not a model name"):
            phinano.load(name, tokenizer=False)
    shutil.rmtree(store / "blobs")
    with pytest.raises(PhinanoError, match="missing"):
        phinano.load("ollama:phi3", tokenizer=False)


# ------------------------------------------------------------------ Phi-3.5-MoE as llama.cpp stores it
@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """make(qtype) -> (gguf path, checkpoint folder) of the tiny PhiMoE of tests/test_moe.py."""
    from test_moe import make_phimoe

    root = tmp_path_factory.mktemp("gguf-moe")
    folder = make_phimoe(root / "moe")
    made = {}

    def make(qtype: str) -> tuple[Path, Path]:
        if qtype not in made:
            cfg = load_config(folder)
            tensors = {n: widened(np.asarray(t)) for n, t in read_tensors(folder).items()}
            made[qtype] = write_gguf(root / f"moe-{qtype}.gguf", cfg, tensors, lambda n, a: qtype)
        return made[qtype], folder

    return make


@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0", "Q4_0"])
def test_phimoe_gguf_matches_transformers_with_exact_routing(tiny_moe, qtype):
    """Stacked expert tensors (E, out, in) become per-expert views; routing is phinano's sparsemixer (which
    llama.cpp itself does not use); the release's short/long mscale travel in phinano's own metadata keys."""
    from test_moe import ORIGINAL, assert_same_routing, clear_prompt, hf_forward

    path, folder = tiny_moe(qtype)
    model = phinano.load(path, backend="numpy", tokenizer=False)
    assert model.config.rope_short_mscale == pytest.approx(1.1) and model.config.rope_long_mscale == pytest.approx(1.3)
    hf = reference(path, folder)
    ids = clear_prompt(model, ORIGINAL)
    ref, ref_routing = hf_forward(hf, ids)
    got, routing = model.forward(ids, return_routing=True)
    assert np.abs(got - ref).max() <= LOGIT_RTOL * np.abs(ref).max()
    assert_same_routing(routing, ref_routing)


# ------------------------------------------------------------------ phinano quantize: the tokenizer goes along
@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_quantized_nano_model_carries_its_tokenizer(qtype, tmp_path):
    """`phinano quantize` writes the checkpoint's tokenizer into the GGUF file (gguf_vocab.vocab_metadata, value
    types as llama.cpp's converter writes them). Loaded back, the file's tokenizer encodes, decodes and renders the
    chat template as the checkpoint's tokenizer.json, the stop ids are generation_config.json's, and with f16/bf16
    weights greedy decoding gives the checkpoint's tokens (q8_0 rounds the weights: tokenizer and stop ids only).
    nano-phi3's tokenizer_config.json has add_bos_token true, so the <s> difference of Phi-3 files
    (docs/gguf-tokenizer.md) does not arise: encode() adds <s> in both."""
    from phinano.cli import main
    from phinano.nano import nano_path

    if nano_path("nano-phi3") is None:
        pytest.skip("the nano-phi3 files are not installed")
    out = tmp_path / "n.gguf"
    assert main(["quantize", "--model", "nano-phi3", "--type", qtype, "--out", str(out)]) == 0

    fields = gguf.GGUFReader(out).fields
    kinds = {name: [t.name for t in fields[name].types] for name in fields if name.startswith("tokenizer.")}
    assert kinds == {
        "tokenizer.ggml.model": ["STRING"],
        "tokenizer.ggml.pre": ["STRING"],
        "tokenizer.ggml.tokens": ["ARRAY", "STRING"],
        "tokenizer.ggml.scores": ["ARRAY", "FLOAT32"],
        "tokenizer.ggml.token_type": ["ARRAY", "INT32"],
        **{f"tokenizer.ggml.{name}_token_id": ["UINT32"] for name in ("bos", "eos", "unknown", "padding")},
        "tokenizer.ggml.add_bos_token": ["BOOL"],
        "tokenizer.ggml.add_eos_token": ["BOOL"],
        "tokenizer.chat_template": ["STRING"],
    }
    assert fields["general.name"].contents() == "nano-phi3"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == 4160  # the embedding rows, padded with [PADi]

    reference, model = phinano.load("nano-phi3"), phinano.load(out)
    assert model.stop_token_ids == reference.stop_token_ids == (4096, 4097, 4103)
    texts = ["Hello world", "  two  spaces\n\tand a tab", "def f(x):\n    return x * 2\n", "<|user|>\nHi<|end|>\n",
             "emoji 🦙 and 中文"]
    for text in texts:
        ids = reference.tokenizer.encode(text)
        assert model.tokenizer.encode(text) == ids, text
        assert model.tokenizer.decode(ids) == reference.tokenizer.decode(ids), text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a function that adds."}]
    prompt_text = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt_text
    ids = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert model.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == ids
    if qtype in ("f16", "bf16"):
        expected = reference.generate(ids, 16, stop_token_ids=[])
        assert model.generate(ids, 16, stop_token_ids=[]) == expected
        assert len(set(expected)) > 4  # not stuck on one token: the comparison means something


# ------------------------------------------------------------------ K-quant files as llama.cpp's Q4_K_M makes them
K_SHAPE = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=256, intermediate_size=512,
               sliding_window=40, max_position_embeddings=512, original_max_position_embeddings=512)


@pytest.fixture(scope="module")
def tiny_k(tmp_path_factory):
    """A tiny Phi-3 with rows of 256 (K-quant super-blocks) and a window, written as q4_k_m / q5_k_m / q6_k by
    `write_quantized` (llama.cpp's type mix: Q4_K, Q6_K for attn_qkv/ffn_down in some layers and for the head)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from phinano.quantize import write_quantized
    from tiny_models import init_weights, save_checkpoint

    root = tmp_path_factory.mktemp("gguf-k")
    config = Phi3Config(vocab_size=VOCAB, num_hidden_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        rope_theta=10000.0, rms_norm_eps=1e-5, **K_SHAPE)
    model = Phi3ForCausalLM(config).eval()
    init_weights(model, seed=1)
    folder = save_checkpoint(model, root / "k")
    made = {}

    def make(mix: str) -> tuple[Path, Path]:
        if mix not in made:
            made[mix] = write_quantized(folder, load_config(folder), read_tensors(folder), mix,
                                        root / f"k-{mix}.gguf", None)
        return made[mix], folder

    return make


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k"])
def test_k_quant_gguf_matches_transformers(tiny_k, mix):
    path, folder = tiny_k(mix)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert kinds & {"Q4_K", "Q5_K", "Q6_K"}, kinds
    hf = reference(path, folder)
    ids = prompt(60)  # past the window of 40
    ref = hf_logits(hf, ids)
    for backend in ("numpy", "numba"):
        got = phinano.load(path, backend=backend, tokenizer=False).forward(ids)
        assert np.abs(got - ref).max() <= LOGIT_RTOL * np.abs(ref).max(), backend


@pytest.mark.parametrize("kind", ["q4_k_m", "q4_0"])
def test_load_quantize_equals_the_written_file(tiny_k, kind):
    """load(folder, quantize=KIND) holds exactly the blocks `phinano quantize` writes, with the same type per
    tensor (q4_0: llama.cpp's Q6_K head, which the rows of 256 here allow)."""
    path, folder = tiny_k(kind)
    ids = prompt(30)
    loaded = phinano.load(folder, quantize=kind, tokenizer=False)
    if kind == "q4_0":
        assert loaded.weights.lm_head.qtype == "Q6_K" and loaded.weights.layers[0].down.qtype == "Q4_0"
    np.testing.assert_array_equal(loaded.forward(ids), phinano.load(path, tokenizer=False).forward(ids))


def test_model_names_that_cannot_be_loaded(tiny, tmp_path, monkeypatch):
    """Each wrong name is one line saying what is wrong with it, before anything is read."""
    path, folder = tiny("mini-4k", "F32")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty-store"))
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    for name, words in [("", "model name is empty"),
                        ("ollama:a/b/c/d", "not a model name"),
                        ("ollama:phi3", "no models are there"),
                        (str(not_gguf), "not a GGUF file"),
                        (str(tmp_path / "absent.gguf"), "no such GGUF file")]:
        with pytest.raises(PhinanoError) as e:
            phinano.load(name, tokenizer=False)
        assert words in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    with pytest.raises(PhinanoError, match="quantize applies to safetensors"):
        phinano.load(path, quantize="q8_0")
    with pytest.raises(PhinanoError, match="unknown quantization type 'q3'"):
        phinano.load(folder, quantize="q3")


def test_load_quantize_refuses_a_broken_checkpoint_before_rounding(tiny, tmp_path, monkeypatch):
    """A checkpoint that does not match its config is refused before any matrix is rounded."""
    import phinano.quantize

    _, folder = tiny("mini-4k", "F32")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 32
    (broken / "config.json").write_text(json.dumps(config))
    rounded = []
    monkeypatch.setattr(phinano.quantize, "encode_tensor", lambda values, kind: rounded.append(kind))
    with pytest.raises(PhinanoError, match="does not match config.json"):
        phinano.load(broken, quantize="q8_0", tokenizer=False)
    assert rounded == []


def test_ollama_tags_describe_a_gguf_model(tiny):
    """/api/tags says what the served file is: format gguf and its block type, as Ollama reports its own."""
    import types

    from phinano.serve.ollama_api import tags

    path, _ = tiny("mini-4k", "Q8_0")
    model = phinano.load(path, tokenizer=False)
    details = tags(types.SimpleNamespace(model=model, name="tiny", created=0))["models"][0]["details"]
    assert details["format"] == "gguf" and details["quantization_level"] == "Q8_0"


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_metadata_arrays_read_whole_equal_the_packages_reader(tmp_path, endianess):
    """read_gguf reads metadata arrays in one pass (the stock reader takes ~a minute on a 200k vocabulary);
    every value must equal what the `gguf` package's own reader gives, in either byte order."""
    path = tmp_path / "arrays.gguf"
    writer = gguf.GGUFWriter(path, "phi3", endianess=endianess)
    writer.add_array("t.strings", ["", "a", "\u2581hello", "<|end|>", "\u00e9\u4e2d" * 40])
    writer.add_array("t.floats", [0.5, -1.25, 3e-38])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.bools", [True, False])
    writer.add_array("t.empty", [])
    writer.add_string("t.string", "plain")
    writer.add_uint32("t.number", 7)
    writer.add_tensor("token_embd.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    from phinano.formats.gguf import read_gguf

    ours = read_gguf(path).metadata
    stock = gguf.GGUFReader(path).fields
    for name in ["t.strings", "t.floats", "t.ints", "t.bools", "t.string", "t.number"]:
        assert ours[name] == stock[name].contents(), name
    assert ours["t.strings"][2] == "\u2581hello"

    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"  # the file ends inside the string array
    cut.write_bytes(data[: data.index("hello".encode()) + 2])
    gguf_error(cut, "cut.gguf")
