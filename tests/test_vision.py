"""Phi-3-vision end to end against the released model's semantics, rebuilt here from Transformers parts.

The reference is Transformers' `CLIPVisionModel` (the tower) and `Phi3ForCausalLM` (the text model), with the
released preprocessing, 2x2 merge, separators, projector and prompt expansion written as the published remote
code (image_processing_phi3_v.py, image_embedding_phi3_v.py, processing_phi3_v.py) does them, in torch.

The tower is full size (CLIP ViT-L/14-336, 300M random parameters, written once per session as bf16); the text
model is tiny. A crop through the full tower takes seconds on two cores, so every crop's features are computed
once per session on each side (the caches below) and the images are few: a landscape image whose grid is two
crops wide and a portrait one whose grid is two crops tall, alone and together.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

import phinano  # noqa: E402
from phinano.vision import clip, hd  # noqa: E402
from tiny_models import _factors, add_tiny_tokenizer, init_weights  # noqa: E402

NUM_CROPS = 2  # small, so that each test image is 2 or 3 crops (16 in Phi-3-vision-128k)
TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=160)
VOCAB = 320
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# ------------------------------------------------------------------ images
def photo(width: int, height: int, seed: int):
    """A photo-like RGB image: smooth colour gradients, a few discs, a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([np.sin(3 * x + seed) * 0.5 + 0.5, y, np.cos(2 * (x + y)) * 0.5 + 0.5], axis=-1) * 200
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


LANDSCAPE = (700, 300)  # at 2 crops: 1 x 2 grid
PORTRAIT = (300, 700)  # 2 x 1 grid


# ------------------------------------------------------------------ the full-size random tower, once per session
def random_tower(seed: int = 0) -> dict:
    """Every tower tensor of a released checkpoint, random (matrices at std 1/sqrt(fan-in), norms near 1)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in clip.tower_shapes().items():
        if "norm" in name and name.endswith("weight"):
            a = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif name.endswith("bias") or "class_embedding" in name or "position_embedding" in name:
            a = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            a = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))
        tensors[name] = torch.from_numpy(a).to(torch.bfloat16)
    return tensors


@pytest.fixture(scope="session")
def tower_file(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("clip") / "tower.safetensors"
    save_file(random_tower(), str(path))
    return path


@pytest.fixture(scope="session")
def reference_tower(tower_file):
    """Transformers' CLIPVisionModel, configured as the released code configures it, on the same weights."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_act="quick_gelu", hidden_size=1024, image_size=336, intermediate_size=4096,
                              layer_norm_eps=1e-5, num_attention_heads=16, num_hidden_layers=24, patch_size=14,
                              projection_dim=768)
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    # Transformers 5 names CLIPVisionModel's tensors without the `vision_model.` level the release stores
    state = {k.removeprefix(clip.PREFIX): v.float() for k, v in load_file(str(tower_file)).items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.embeddings.position_ids = torch.arange(577)[None]
    return model.eval()


_REFERENCE_FEATURES: dict = {}


def reference_features(tower, pixels: torch.Tensor) -> torch.Tensor:
    """hidden_states[-2] without the class token, as get_img_features takes it; cached by the pixels."""
    key = hashlib.sha1(pixels.numpy().tobytes()).hexdigest()
    if key not in _REFERENCE_FEATURES:
        with torch.no_grad():
            _REFERENCE_FEATURES[key] = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    return _REFERENCE_FEATURES[key]


@pytest.fixture(scope="session", autouse=True)
def cached_tower_features():
    """phinano's tower runs once per distinct crop in this session (forward and generate share the crops)."""
    original, seen = clip.features, {}

    def cached(ops, tower, crop):
        key = (id(ops), hashlib.sha1(np.ascontiguousarray(crop).tobytes()).hexdigest())
        if key not in seen:
            seen[key] = original(ops, tower, crop)
        return seen[key]

    clip.features = cached
    yield
    clip.features = original


# ------------------------------------------------------------------ a tiny Phi-3-vision checkpoint
def make_phi3v(folder: Path, tower_file: Path, original_max: int, seed: int = 0):
    """A Phi-3-vision checkpoint in the released layout: tiny text model, full-size tower (a link to the session's
    file, as the second shard), random projector and separators, a duplicated wte, config in the released form.
    Returns the Transformers text model (float32)."""
    from safetensors.torch import save_file
    from transformers import Phi3Config, Phi3ForCausalLM

    rotary = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    config = Phi3Config(vocab_size=VOCAB, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        max_position_embeddings=4096, original_max_position_embeddings=original_max,
                        sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5, **TEXT,
                        rope_scaling={"type": "longrope", "short_factor": _factors(rotary // 2, 1.0, 1.6),
                                      "long_factor": _factors(rotary // 2, 1.0, 9.0)})
    text = Phi3ForCausalLM(config).eval()
    init_weights(text, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in text.state_dict().items()}
    tensors["model.vision_embed_tokens.wte.weight"] = tensors["model.embed_tokens.weight"].clone()
    g = torch.Generator().manual_seed(seed + 1)
    D = TEXT["hidden_size"]
    for name, shape in hd.projector_shapes(D).items():
        fan_in = shape[-1] if name.endswith("weight") else 1
        tensors[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in) * (1.0 if "GN" not in name else 0.5)
    save_file(tensors, str(folder / "model-00001-of-00002.safetensors"))
    (folder / "model-00002-of-00002.safetensors").symlink_to(tower_file)
    weight_map = {name: "model-00001-of-00002.safetensors" for name in tensors}
    weight_map.update({name: "model-00002-of-00002.safetensors" for name in clip.tower_shapes()})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    raw = json.loads(config.to_json_string())
    raw.update(architectures=["Phi3VForCausalLM"], model_type="phi3_v", torch_dtype="float32",
               rope_scaling={"type": "su", "short_factor": _factors(rotary // 2, 1.0, 1.6),
                             "long_factor": _factors(rotary // 2, 1.0, 9.0)},
               img_processor={"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                              "name": "clip_vision_model", "num_img_tokens": 144},
               embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                           "use_hd_transform": True, "with_learnable_separator": True})
    raw.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "preprocessor_config.json").write_text(json.dumps({"num_crops": NUM_CROPS, "image_processor_type":
                                                                 "Phi3VImageProcessor"}))
    add_tiny_tokenizer(folder, VOCAB)
    return text


# ------------------------------------------------------------------ the released pipeline, written as published
def released_pixels(img, num_crops: int):
    """image_processing_phi3_v.py: RGB, HD transform, ToTensor + Normalize, global view by torch bicubic, crops
    row by row after it. Returns ((1 + h*w, 3, 336, 336), (height, width) of the HD image)."""
    img = img.convert("RGB")
    width, height = img.size
    transposed = width < height
    if transposed:
        img = img.transpose(Image.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    img = img.resize([new_w, new_h], Image.BILINEAR)  # torchvision's resize of a PIL image
    target = int(np.ceil(new_h / 336) * 336)
    top = int((target - new_h) / 2)
    padded = Image.new("RGB", (new_w, target), (255, 255, 255))
    padded.paste(img, (0, top))
    if transposed:
        padded = padded.transpose(Image.TRANSPOSE)
    x = torch.from_numpy(np.array(padded)).permute(2, 0, 1).float().div(255)  # ToTensor
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]  # Normalize
    global_view = torch.nn.functional.interpolate(x[None].float(), size=(336, 336), mode="bicubic")
    H, W = x.shape[1:]
    grid = x.reshape(1, 3, H // 336, 336, W // 336, 336).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 336, 336)
    return torch.cat([global_view, grid]), (H, W)


def released_hd_merge(features: torch.Tensor, h_crop: int, w_crop: int) -> torch.Tensor:
    """reshape_hd_patches_2x2merge: (n * h * w, 576, C) -> (n, 12h, 12w, 4C)."""
    N, L, C = features.shape
    H = int(L**0.5)
    n = N // (h_crop * w_crop)
    return (features.reshape(N, H, H, C).reshape(N, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
            .reshape(N, -1, 4 * C).reshape(n, h_crop, w_crop, H // 2, H // 2, -1).permute(0, 1, 3, 2, 4, 5)
            .reshape(n, h_crop * H // 2, w_crop * H // 2, 4 * C))


def released_newline(grid: torch.Tensor, sub_gn: torch.Tensor) -> torch.Tensor:
    """add_image_newline: (n, h, w, 4C) -> (n, h * (w + 1), 4C)."""
    n, h, w, c = grid.shape
    return torch.cat([grid, sub_gn.expand(n, h, -1, -1)], dim=2).reshape(n, -1, c)


def released_image_vectors(tower, tensors: dict, img, num_crops: int) -> tuple[torch.Tensor, int]:
    """hd_feature_transform for one image: (N, D) projected vectors, and N as the processor counts it."""
    pixels, (H, W) = released_pixels(img, num_crops)
    h_crop, w_crop = H // 336, W // 336
    features = reference_features(tower, pixels)  # (1 + h*w, 576, 1024)
    sub_gn, glb_gn = tensors["sub_GN"], tensors["glb_GN"]
    global_part = released_newline(released_hd_merge(features[:1], 1, 1), sub_gn)[0]
    crops_part = released_newline(released_hd_merge(features[1 : 1 + h_crop * w_crop], h_crop, w_crop), sub_gn)[0]
    sequence = torch.cat([crops_part, glb_gn.squeeze(0), global_part])
    projection = torch.nn.Sequential(torch.nn.Linear(4096, TEXT["hidden_size"]), torch.nn.GELU(),
                                     torch.nn.Linear(TEXT["hidden_size"], TEXT["hidden_size"]))
    for i in (0, 2):
        projection[i].weight.data = tensors[f"img_projection.{i}.weight"]
        projection[i].bias.data = tensors[f"img_projection.{i}.bias"]
    with torch.no_grad():
        vectors = projection(sequence)
    count = int((H // 336 * W // 336 + 1) * 144 + 1 + (H // 336 + 1) * 12)
    return vectors, count


def released_input_ids(tokenizer, text: str, counts: list[int]) -> list[int]:
    """processing_phi3_v.py: each chunk tokenized on its own, marker N -> counts[N-1] copies of -N."""
    pattern = r"<\|image_\d+\|>"
    chunks = [tokenizer(chunk).input_ids for chunk in re.split(pattern, text)]
    image_ids = [int(s.split("|")[1].split("_")[-1]) for s in re.findall(pattern, text)]
    pads = [[-i] * counts[i - 1] for i in image_ids]
    if len(chunks) > len(pads):
        pads.append([])
    return [t for chunk, pad in zip(chunks, pads) for t in chunk + pad]


class Released:
    """The released model on one checkpoint: Transformers parts plus the published glue above."""

    def __init__(self, folder: Path, text_model, tower):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        self.text, self.tower = text_model, tower
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        raw = load_file(str(folder / "model-00001-of-00002.safetensors"))
        self.tensors = {k.removeprefix(hd.PREFIX): v.float() for k, v in raw.items() if k.startswith(hd.PREFIX)}

    def prepare(self, text: str, images: list) -> tuple[list[int], torch.Tensor]:
        vectors, counts = zip(*(released_image_vectors(self.tower, self.tensors, img, NUM_CROPS) for img in images))
        ids = released_input_ids(self.tokenizer, text, list(counts))
        ids_t = torch.tensor(ids)[None]
        positions = torch.nonzero(ids_t < 0, as_tuple=True)
        with torch.no_grad():
            embeds = self.text.model.embed_tokens(ids_t.clamp(0, VOCAB))
            embeds = embeds.index_put(positions, torch.cat(vectors), accumulate=False)
        return ids, embeds

    def logits(self, embeds) -> np.ndarray:
        with torch.no_grad():
            return self.text(inputs_embeds=embeds).logits[0].numpy()

    def greedy(self, embeds, n: int) -> list[int]:
        """Greedy tokens as the released generate() makes them: when the sequence first grows past longrope's
        original length, its prepare_inputs_for_generation drops the cache and runs the whole sequence again,
        image positions included (pixel_values stay in the inputs)."""
        original = self.text.config.original_max_position_embeddings
        tokens = []
        with torch.no_grad():
            out = self.text(inputs_embeds=embeds, use_cache=True)
            for _ in range(n):
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
                if embeds.shape[1] + len(tokens) == original + 1:  # the switch: recompute everything
                    new = self.text.model.embed_tokens(torch.tensor([tokens]))
                    out = self.text(inputs_embeds=torch.cat([embeds, new], dim=1), use_cache=True)
                else:
                    out = self.text(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                                    use_cache=True)
        return tokens


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def phi3v(tmp_path_factory, tower_file, reference_tower):
    """(phinano model, the released model rebuilt) on one tiny Phi-3-vision checkpoint."""
    folder = tmp_path_factory.mktemp("phi3v")
    # Longrope's original length falls inside the two-image generation below, so the switch (the cache dropped,
    # the prompt's image positions fed again) happens there, as in Transformers.
    text_model = make_phi3v(folder, tower_file, original_max=TWO_IMAGE_SWITCH)
    return phinano.load(folder), Released(folder, text_model, reference_tower)


TWO_IMAGE_SWITCH = 990  # the two-image prompt below is 961 positions, so its 64 new tokens cross 990
PROMPTS = {
    "landscape": ("<|user|>\n<|image_1|>\nWhat is in this picture?<|end|>\n<|assistant|>\n", [LANDSCAPE]),
    "portrait": ("<|image_1|> describe it", [PORTRAIT]),
    "two images": ("<|user|>\nfirst <|image_1|> and then <|image_2|>\nwhich is brighter?<|end|>\n<|assistant|>\n",
                   [LANDSCAPE, PORTRAIT]),
}


def images_of(sizes):
    """One photo per size, the same one every time (the tower caches then serve every test that uses it)."""
    return [photo(w, h, seed=w * 1000 + h) for w, h in sizes]


# ------------------------------------------------------------------ the tests
def test_tower_matches_transformers_clip(phi3v, reference_tower):
    """The tower alone: hidden_states[-2] of Transformers' CLIPVisionModel on the same weights and crops."""
    model, _ = phi3v
    from phinano.vision import preprocess

    crops = preprocess.crops(images_of([LANDSCAPE])[0], NUM_CROPS).pixels[:2]  # the global view and one tile
    want = reference_features(reference_tower, torch.from_numpy(crops)).numpy()
    got = clip.features(model.ops, model.weights.vision.tower, crops)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-4 * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_image_positions_and_logits_match_the_released_model(phi3v, name):
    model, released = phi3v
    text, sizes = PROMPTS[name]
    ids_ref, embeds = released.prepare(text, images_of(sizes))
    prompt_ids = model.tokenizer.encode_prompt(text)
    expanded, vectors = model.with_images(prompt_ids, images_of(sizes))
    assert expanded == ids_ref  # the same positions, the same text ids around them (<s> after every image)
    want = released.logits(embeds)
    got = model.forward(prompt_ids, images=images_of(sizes))
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-3 * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize("name", ["landscape", "two images"])
def test_64_greedy_tokens_match_the_released_model(phi3v, name):
    model, released = phi3v
    text, sizes = PROMPTS[name]
    ids_ref, embeds = released.prepare(text, images_of(sizes))
    if name == "two images":  # the longrope switch happens during this generation
        assert len(ids_ref) < TWO_IMAGE_SWITCH < len(ids_ref) + 64, len(ids_ref)
    want = released.greedy(embeds, 64)
    got = model.generate(model.tokenizer.encode_prompt(text), 64, images=images_of(sizes), stop_token_ids=[])
    assert got == want
    assert len(set(got)) > 3  # not one token repeated: the comparison means something


def test_released_position_count_500x300_at_4_crops():
    """The example of the released processor: a 500x300 image at num_crops 4 is a 2x2 grid, 757 positions."""
    from phinano.vision import preprocess

    crops = preprocess.crops(photo(500, 300, seed=3), 4)
    assert (crops.rows, crops.columns) == (2, 2) and crops.pixels.shape == (5, 3, 336, 336)
    assert hd.positions(crops.rows, crops.columns) == 757


def test_checkpoint_and_preprocessor_settings_are_read(phi3v):
    model, _ = phi3v
    assert model.config.has_vision and model.weights.vision.num_crops == NUM_CROPS
    assert len(model.weights.vision.tower.layers) == 23  # the last layer is stored but its output unused


def test_images_on_a_text_model_or_wrong_markers_are_one_clear_error(phi3v, tmp_path):
    model, _ = phi3v
    ids = model.tokenizer.encode_prompt("<|image_1|> hi")
    with pytest.raises(phinano.PhinanoError, match="1 image marker.*for 2 image"):
        model.generate(ids, 2, images=[photo(40, 40, 0), photo(40, 40, 1)])
    with pytest.raises(phinano.PhinanoError, match="each once"):
        model.tokenizer.encode_prompt("<|image_2|> hi")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(phinano.PhinanoError, match="bad.jpg: not a readable image"):
        model.generate(ids, 2, images=[bad])
    with pytest.raises(phinano.PhinanoError, match="zero size"):
        model.generate(ids, 2, images=[Image.new("RGB", (0, 5))])
    with pytest.raises(phinano.PhinanoError, match="no such image file"):
        model.generate(ids, 2, images=[tmp_path / "missing.png"])


# ------------------------------------------------------------------ the doors: CLI, chat, server
# These check what each door sends the model; the tower's numbers are the tests above, so here each image's
# vectors are stand-ins of the right length (the full tower would take a minute per image).
@pytest.fixture
def quick_vision(phi3v, monkeypatch):
    model, released = phi3v
    calls = []

    def embed(self, ops, image):
        calls.append(image)
        rng = np.random.default_rng(len(calls))
        return rng.standard_normal((self.positions(image), model.config.hidden_size)).astype(np.float32)

    monkeypatch.setattr(type(model.weights.vision), "embed", embed)
    return model, released, calls


def test_cli_generate_with_images_uses_the_released_user_turn(quick_vision, tmp_path, monkeypatch, capsys):
    from phinano import cli

    model, released, calls = quick_vision
    monkeypatch.setattr(phinano, "load", lambda *a, **k: model)
    seen = {}
    import phinano.generate as generate

    original = generate.stream_text

    def spy(m, ids, n, **options):
        seen["ids"], seen["images"] = list(ids), options.get("images")
        return original(m, ids, n, **options)

    monkeypatch.setattr(generate, "stream_text", spy)
    for i, size in enumerate([LANDSCAPE, PORTRAIT]):
        photo(*size, seed=i).save(tmp_path / f"{i}.png")
    argv = ["generate", "--model", "x", "--image", str(tmp_path / "0.png"), "--image", str(tmp_path / "1.png"),
            "--chat", "What is in these pictures?", "-n", "5", "-v"]
    assert cli.main(argv) == 0
    text = "<|user|>\n<|image_1|>\n<|image_2|>\nWhat is in these pictures?<|end|>\n<|assistant|>\n"
    counts = [hd.positions(1, 2), hd.positions(2, 1)]
    assert seen["ids"] == released_input_ids(released.tokenizer, text, counts)
    assert [len(v) for v in seen["images"]] == counts and len(calls) == 2
    assert f"[{len(seen['ids'])} prompt tokens" in capsys.readouterr().err  # -v counts the expanded prompt


def test_cli_image_errors_are_one_line(phi3v, tmp_path, monkeypatch, capsys):
    from phinano import cli

    model, _ = phi3v
    monkeypatch.setattr(phinano, "load", lambda *a, **k: model)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 not really")
    for path, words in [(tmp_path / "missing.png", "no such image file"), (tmp_path / "x.jpg", "not a readable image")]:
        assert cli.main(["generate", "--model", "x", "--image", str(path), "--chat", "hi"]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and words in captured.err


def test_chat_image_command_attaches_to_the_next_message(quick_vision, tmp_path):
    import io

    from phinano.chat import Chat, repl

    model, released, calls = quick_vision
    photo(*LANDSCAPE, seed=0).save(tmp_path / "a.png")
    chat = Chat(model, max_new_tokens=3)
    err = io.StringIO()
    repl(chat, io.StringIO(f"/image {tmp_path / 'a.png'}\nwhat is it?\nand now?\n/image {tmp_path / 'nope.png'}\n"),
         io.StringIO(), err)
    assert f"{hd.positions(1, 2)} positions" in err.getvalue() and "no such image file" in err.getvalue()
    assert chat.turns[0]["content"] == "<|image_1|>\nwhat is it?" and chat.turns[2]["content"] == "and now?"
    assert len(chat.images) == 1 and chat.attached == []


def png_base64(size) -> str:
    """A photo of `size` as a base64 PNG, as the server APIs carry images."""
    import base64
    import io

    buffer = io.BytesIO()
    photo(*size, seed=0).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_server_takes_openai_image_url_parts_and_ollama_images(quick_vision, tmp_path):
    import base64

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from phinano.serve.app import create_app
    from phinano.serve.engine import Engine

    model, released, calls = quick_vision
    data = png_base64(LANDSCAPE)
    engine = Engine(model, "phi3v")
    try:
        with TestClient(create_app(engine)) as client:
            image_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
            r = client.post("/v1/chat/completions", json={"model": "phi3v", "max_tokens": 3, "messages": [
                {"role": "user", "content": [image_part, {"type": "text", "text": "what is it?"}]}]})
            assert r.status_code == 200, r.text
            want = released_input_ids(released.tokenizer, "<|user|>\n<|image_1|>\nwhat is it?<|end|>\n<|assistant|>\n",
                                      [hd.positions(1, 2)])
            assert r.json()["usage"]["prompt_tokens"] == len(want)
            message = {"role": "user", "content": "what is it?", "images": [data]}
            r = client.post("/api/chat", json={"model": "phi3v", "stream": False, "options": {"num_predict": 3},
                                               "messages": [message]})
            assert r.status_code == 200, r.text
            assert r.json()["prompt_eval_count"] == len(want)
            assert len(calls) == 2
            web_part = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
            r = client.post("/v1/chat/completions", json={"model": "phi3v", "messages": [
                {"role": "user", "content": [web_part]}]})
            assert r.status_code == 400 and "data: URLs" in r.json()["error"]["message"]
            r = client.post("/api/chat", json={"model": "phi3v", "messages": [
                {"role": "user", "content": "hi", "images": [base64.b64encode(b"not an image").decode()]}]})
            assert r.status_code == 400 and "not a readable image" in r.text
    finally:
        engine.close()


def test_ollama_generate_takes_images_and_a_text_model_refuses_them(quick_vision, checkpoint_dir):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from phinano.serve.app import create_app
    from phinano.serve.engine import Engine

    model, released, calls = quick_vision
    data = png_base64(PORTRAIT)
    text_model = phinano.load(checkpoint_dir("mini-4k"))
    text_model.tokenizer = model.tokenizer  # the same tiny vocabulary
    for served, ok in [(model, True), (text_model, False)]:
        engine = Engine(served, "m")
        try:
            with TestClient(create_app(engine)) as client:
                r = client.post("/api/generate", json={"model": "m", "stream": False, "prompt": "what is it?",
                                                       "images": [data], "options": {"num_predict": 2}})
                if ok:
                    assert r.status_code == 200, r.text
                    want = released_input_ids(released.tokenizer, "<|user|>\n<|image_1|>\nwhat is it?<|end|>\n"
                                              "<|assistant|>\n", [hd.positions(2, 1)])
                    assert r.json()["prompt_eval_count"] == len(want)
                else:
                    assert r.status_code == 400 and "images" in r.text
        finally:
            engine.close()


def test_repetition_penalty_sees_only_text_tokens(quick_vision, monkeypatch):
    import phinano.generate as generate

    model, _, _ = quick_vision
    seen_lists = []
    original = generate.apply_repetition_penalty

    def spy(logits, seen, penalty):
        seen_lists.append(list(seen))
        return original(logits, seen, penalty)

    monkeypatch.setattr(generate, "apply_repetition_penalty", spy)
    ids = model.tokenizer.encode_prompt("<|image_1|> what is it?")
    model.generate(ids, 3, images=[photo(*LANDSCAPE, seed=0)], repetition_penalty=1.3, stop_token_ids=[])
    text_ids = [i for i in ids if i >= 0]
    assert seen_lists and all(min(s) >= 0 for s in seen_lists) and seen_lists[0] == text_ids
