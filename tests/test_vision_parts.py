"""Phi-3-vision's parts, each against an independent reference, without the (slow) full-size tower:
the new kernel twins, the global view's bicubic interpolation (torch), preprocessing of odd images, the 2x2
merge and separators (the released code's torch reshapes), marker splitting and prompt expansion."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phinano.errors import PhinanoError
from phinano.kernels import fast, reference
from phinano.vision import clip, hd, preprocess, prompt

seeds = st.integers(0, 2**32 - 1)


# ------------------------------------------------------------------ kernel twins
@settings(deadline=None, max_examples=40)  # deadline: the first call compiles
@given(seed=seeds, T=st.integers(1, 6), F=st.integers(1, 150), xs=st.sampled_from([1e-3, 1.0, 10.0, 100.0]))
def test_quick_gelu_twins(seed, T, F, xs):
    x = (np.random.default_rng(seed).standard_normal((T, F)) * xs).astype(np.float32)
    want = x * (1 / (1 + np.exp(-1.702 * x.astype(np.float64))))
    # far in the negative tail exp(-1.702 x) is large and its float32 argument's rounding shows: rtol 1e-4 there
    np.testing.assert_allclose(reference.quick_gelu(x), want, rtol=1e-4, atol=1e-30)
    np.testing.assert_allclose(fast.quick_gelu(x), reference.quick_gelu(x), rtol=2e-6, atol=1e-30)


@settings(deadline=None, max_examples=40)
@given(seed=seeds, T=st.integers(1, 6), F=st.integers(1, 150), xs=st.sampled_from([1e-3, 1.0, 10.0]))
def test_gelu_twins_are_the_exact_erf_gelu(seed, T, F, xs):
    torch = pytest.importorskip("torch")
    x = (np.random.default_rng(seed).standard_normal((T, F)) * xs).astype(np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(x).double()).float().numpy()  # approximate="none"
    np.testing.assert_allclose(reference.gelu(x), want, rtol=1e-6, atol=1e-37)
    np.testing.assert_array_equal(fast.gelu(x), reference.gelu(x))


@settings(deadline=None, max_examples=40)
@given(seed=seeds, T=st.integers(1, 40), H=st.integers(1, 4), HD=st.sampled_from([1, 8, 64]),
       qs=st.sampled_from([0.1, 1.0, 5.0]))
def test_encoder_attention_twins_see_every_key(seed, T, H, HD, qs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    q, k, v = ((rng.standard_normal((T, H, HD)) * s).astype(np.float32) for s in (qs, qs, 1.0))
    want = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a).double().transpose(0, 1) for a in (q, k, v))).transpose(0, 1).numpy()
    # sharp softmaxes (qs 5: scores of std ~200) amplify float32 rounding of the scores: atol 1e-4 on values ~1
    np.testing.assert_allclose(reference.encoder_attention(q, k, v), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fast.encoder_attention(q, k, v), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the tower's batching
def one_layer_tower(seed: int = 0) -> clip.Tower:
    """A full-width tower with one random layer: crops are batched the same way for 1 layer as for 23."""
    rng = np.random.default_rng(seed)
    t = {}
    for name, shape in clip.tower_shapes().items():
        if ".layers." not in name or ".layers.0." in name:  # the embeddings and layer 0 only
            t[name] = (rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]) or 1)).astype(np.float32)
        else:
            t[name] = None
    tower = clip.load_tower(t)  # layers 1.. hold None: dropped next
    tower.layers = tower.layers[:1]
    return tower


@pytest.mark.parametrize("ops", [reference, fast], ids=["reference", "fast"])
def test_tower_crops_in_groups_equal_each_crop_alone(ops, monkeypatch):
    """features() runs GROUP crops side by side; attention must stay within each crop and groups must split
    anywhere: 3 crops in groups of 2 (a full group and a short one) give each crop's features alone."""
    tower = one_layer_tower()
    crops = np.random.default_rng(1).standard_normal((3, 3, clip.IMAGE_SIZE, clip.IMAGE_SIZE)).astype(np.float32)
    monkeypatch.setattr(clip, "GROUP", 2)
    together = clip.features(ops, tower, crops)  # (3, P, C)
    assert together.shape == (3, clip.GRID * clip.GRID, clip.WIDTH)
    for c in range(3):
        alone = clip.features(ops, tower, crops[c : c + 1])[0]  # (P, C)
        # BLAS may block a product of 1154 rows differently from one of 577: float32 rounding only
        np.testing.assert_allclose(together[c], alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())
    assert np.abs(together[0] - together[1]).max() > 0.1  # the crops differ, so a mix-up would show


# ------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("shape", [(672, 1008), (1344, 336), (336, 336), (100, 37), (700, 1000)])
def test_global_view_is_torch_bicubic(shape):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=(336, 336), mode="bicubic",
                                           align_corners=False)[0].numpy()
    got = preprocess.bicubic_resize(x, 336, 336)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("size, num_crops, grid", [
    ((500, 300), 4, (2, 2)),  # the released processor's example: 757 positions
    ((300, 500), 4, (2, 2)),
    ((1000, 200), 4, (1, 4)),
    ((200, 1000), 4, (4, 1)),
    ((336, 336), 16, (4, 4)),
    ((1600, 900), 16, (3, 5)),
    ((40, 30), 1, (1, 1)),
])
def test_grid_of_crops(size, num_crops, grid):
    from PIL import Image

    rows, columns = grid
    crops = preprocess.crops(Image.new("RGB", size, (10, 20, 30)), num_crops)
    assert (crops.rows, crops.columns) == grid
    assert crops.pixels.shape == (1 + rows * columns, 3, 336, 336) and crops.pixels.dtype == np.float32
    assert rows * columns <= num_crops
    assert preprocess.grid(*size, num_crops) == grid  # the count without making the HD image
    positions = hd.positions(rows, columns)
    assert positions == (rows * columns + 1) * 144 + 1 + (rows + 1) * 12


def test_padding_is_white_above_and_below_and_the_odd_pixel_goes_below():
    from PIL import Image

    img = Image.new("RGB", (500, 300), (0, 0, 0))  # -> 672 x 403, padded to 672 x 672: 134 above, 135 below
    hd_img = np.asarray(preprocess.hd_image(img, 4))
    assert hd_img.shape == (672, 672, 3)
    assert (hd_img[:134] == 255).all() and (hd_img[134 + 403 :] == 255).all()
    assert (hd_img[134 : 134 + 403] == 0).all()
    portrait = np.asarray(preprocess.hd_image(img.transpose(Image.Transpose.TRANSPOSE), 4))
    assert (portrait == hd_img.transpose(1, 0, 2)).all()  # portrait images are padded left and right


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "YCbCr"])
def test_any_mode_is_converted_to_rgb(mode):
    from PIL import Image

    img = Image.new("RGB", (60, 40), (200, 100, 50)).convert(mode)
    crops = preprocess.crops(img, 1)
    assert crops.pixels.shape == (2, 3, 336, 336) and np.isfinite(crops.pixels).all()


def test_normalisation_is_clip_mean_and_std():
    from PIL import Image

    crops = preprocess.crops(Image.new("RGB", (336, 336), (255, 0, 128)), 1)
    for c, value in enumerate((255, 0, 128)):
        want = (value / 255 - preprocess.CLIP_MEAN[c]) / preprocess.CLIP_STD[c]
        assert np.allclose(crops.pixels[1, c], want, atol=1e-6)


def test_unreadable_and_empty_images_are_one_clear_error(tmp_path):
    from PIL import Image

    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for path, words in [(tmp_path / "text.png", "not a readable image"),
                        (tmp_path / "empty.jpg", "not a readable image"),
                        (tmp_path / "nope.png", "no such image file"), (tmp_path, "is a directory")]:
        with pytest.raises(PhinanoError, match=words):
            preprocess.crops(path, 4)
    with pytest.raises(PhinanoError, match="zero size"):
        preprocess.crops(Image.new("RGB", (7, 0)), 4)
    with pytest.raises(PhinanoError, match="not a readable image"):
        preprocess.crops(b"\x89PNG\r\n\x1a\n broken", 4)
    # a 57-byte PNG whose header says 100000 x 100000: PIL's decompression-bomb guard (found by fuzzing)
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    with pytest.raises(PhinanoError, match="image data: image too large"):
        preprocess.crops(bomb, 4)


def test_image_bytes_and_paths_give_the_same_crops(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (90, 50), (1, 2, 3))
    img.save(tmp_path / "a.png")
    a = preprocess.crops(tmp_path / "a.png", 2).pixels
    b = preprocess.crops((tmp_path / "a.png").read_bytes(), 2).pixels
    assert np.array_equal(a, b) and np.array_equal(a, preprocess.crops(img, 2).pixels)


# ------------------------------------------------------------------ merge, separators, projector
def released_sequence(torch, features, rows, columns, sub_gn, glb_gn):
    """image_embedding_phi3_v.py's hd_feature_transform for one image, before the projector."""
    def merge(f, h, w):
        N, L, C = f.shape
        H = int(L**0.5)
        return (f.reshape(N, H, H, C).reshape(N, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
                .reshape(N, -1, 4 * C).reshape(N // (h * w), h, w, H // 2, H // 2, -1).permute(0, 1, 3, 2, 4, 5)
                .reshape(N // (h * w), h * H // 2, w * H // 2, 4 * C))

    def newline(g):
        n, h, w, c = g.shape
        return torch.cat([g, sub_gn.expand(n, h, -1, -1)], dim=2).reshape(n, -1, c)

    glob = newline(merge(features[:1], 1, 1))[0]
    sub = newline(merge(features[1 : 1 + rows * columns], rows, columns))[0]
    return torch.cat([sub, glb_gn.squeeze(0), glob])


@pytest.mark.parametrize("rows, columns", [(1, 1), (1, 2), (2, 1), (2, 3), (3, 2)])
def test_merge_and_separators_follow_the_released_order(rows, columns):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(rows * 10 + columns)
    C = 8  # the layout does not depend on the width
    features = rng.standard_normal((1 + rows * columns, 576, C)).astype(np.float32)
    sub_gn = rng.standard_normal((1, 1, 1, 4 * C)).astype(np.float32)
    glb_gn = rng.standard_normal((1, 1, 4 * C)).astype(np.float32)
    w = hd.Projector(sub_GN=sub_gn.reshape(-1), glb_GN=glb_gn.reshape(-1), w1=None, b1=None, w2=None, b2=None)
    got = hd.image_sequence(reference, w, features, rows, columns)
    want = released_sequence(torch, torch.from_numpy(features), rows, columns, torch.from_numpy(sub_gn),
                             torch.from_numpy(glb_gn)).numpy()
    assert got.shape == (hd.positions(rows, columns), 4 * C)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("ops", [reference, fast], ids=["numpy", "numba"])
def test_projector_is_linear_exact_gelu_linear(ops):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    D, N = 24, 30
    w = hd.Projector(None, None, *(rng.standard_normal(s).astype(np.float32) / math.sqrt(s[-1])
                                   for s in [(D, 4096), (D,), (D, D), (D,)]))
    x = rng.standard_normal((N, 4096)).astype(np.float32)
    net = torch.nn.Sequential(torch.nn.Linear(4096, D), torch.nn.GELU(), torch.nn.Linear(D, D))
    for layer, (a, b) in zip((net[0], net[2]), ((w.w1, w.b1), (w.w2, w.b2))):
        layer.weight.data, layer.bias.data = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(hd.project(ops, w, x), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ markers and expansion
def test_split_and_expand():
    assert prompt.split("<|user|>\n<|image_1|>\nHi") == ["<|user|>\n", 1, "\nHi"]
    assert prompt.split("<|image_2|><|image_1|>") == ["", 2, "", 1, ""]
    assert prompt.expand([5, -1, 6, -2, 7], [2, 3]) == [5, -1, -1, 6, -2, -2, -2, 7]
    with pytest.raises(PhinanoError, match="each once"):
        prompt.split("<|image_1|> <|image_1|>")
    with pytest.raises(PhinanoError, match="each once"):
        prompt.split("<|image_1|> <|image_3|>")
    with pytest.raises(PhinanoError, match="2 image marker"):
        prompt.expand([-1, -2], [4])


def test_encode_prompt_tokenizes_each_piece_as_the_released_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    from phinano.tokenizer import load_tokenizer
    from tiny_models import add_tiny_tokenizer

    add_tiny_tokenizer(tmp_path)
    ours = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>\n<|image_1|>\nthe sky <|image_2|>is blue<|end|>\n<|assistant|>\n"
    chunks = [theirs(c).input_ids for c in ["<|user|>\n", "\nthe sky ", "is blue<|end|>\n<|assistant|>\n"]]
    assert ours.encode_prompt(text) == chunks[0] + [-1] + chunks[1] + [-2] + chunks[2]
    assert ours.encode_prompt(text).count(1) == 3  # <s> starts every piece, so it follows every image
    assert ours.encode_prompt("no images here") == ours.encode("no images here")
