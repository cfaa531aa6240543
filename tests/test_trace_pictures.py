"""`phinano trace`: the pictures and index.html on the shipped nano models, its errors, and the page in a real
browser (headless Chromium, when installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from phinano.cli import main  # noqa: E402

PROMPT = "def add(a, b):\n    return a + b\n"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Both nano models traced once: {model: folder}. Two heads for nano-phi3 (drawing is most of the time)."""
    root = tmp_path_factory.mktemp("trace")
    made = {}
    for name, heads in (("nano-phi3", ["--heads", "0,1"]), ("nano-phimoe", [])):
        assert main(["trace", "--model", name, "--out", str(root / name), *heads, PROMPT]) == 0
        made[name] = root / name
    return made


@pytest.mark.parametrize("name", ["nano-phi3", "nano-phimoe"])
def test_trace_writes_the_pictures_and_a_page_that_links_them(pages, name, capsys):
    folder = pages[name]
    pictures = {"lens.png", "attention-layer0.png", "attention-layer3.png", "norms.png"}
    if name == "nano-phimoe":
        pictures.add("routing.png")
    assert {p.name for p in folder.iterdir()} == pictures | {"index.html"}
    for picture in pictures:
        data = (folder / picture).read_bytes()
        assert data.startswith(PNG) and 5_000 < len(data) < 200_000
    page = (folder / "index.html").read_text()
    assert set(re.findall(r'<img src="([^"]+)"', page)) == pictures
    assert "http" not in page and "//" not in page  # nothing fetched from the network
    assert "def add(a, b):" in page and "&lt;s&gt;" in page  # the prompt and its tokens, escaped


def test_chosen_layers_and_heads(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["trace", "--model", "nano-phi3", "--out", str(out), "--layers", "-2", "--heads", "0,5", "hi"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["attention-layer2.png", "index.html", "lens.png", "norms.png"]
    assert capsys.readouterr().out == f"wrote {out / 'index.html'}\n"


@pytest.mark.parametrize("flags, message, status", [
    (["--layers", "4"], "--layers: 4 is out of range; the model has layers 0..3", 1),
    (["--heads", "-7"], "--heads: -7 is out of range; the model has heads 0..5", 1),
    (["--heads", "x"], "--heads takes numbers separated by commas, e.g. 0,3; got 'x'", 2),  # before loading
    (["--layers", ","], "--layers is empty; give numbers separated by commas, e.g. 0,3", 2),
])
def test_bad_layers_or_heads_write_nothing(tmp_path, capsys, flags, message, status):
    out = tmp_path / "t"
    assert main(["trace", "--model", "nano-phi3", "--out", str(out), *flags, "hi"]) == status
    assert capsys.readouterr().err == f"phinano: error: {message}\n"
    assert list(tmp_path.iterdir()) == []  # no folder, no scratch left behind


def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path, capsys):
    """--out naming a file, or a place no folder can be made: one line (they were FileExistsError and
    FileNotFoundError tracebacks), and the file is left as it was."""
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert main(["trace", "--model", "nano-phi3", "--out", str(taken), "hi"]) == 1
    assert capsys.readouterr().err == f"phinano: error: {taken}: a file is there; phinano trace writes a folder of pictures\n"
    assert taken.read_text() == "mine"
    assert main(["trace", "--model", "nano-phi3", "--out", str(taken / "t"), "hi"]) == 1  # under a file
    assert "cannot write the trace there" in capsys.readouterr().err


def test_without_matplotlib_one_line_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["trace", "--out", str(tmp_path / "t"), "hi"]) == 1
    assert capsys.readouterr().err == ('phinano: error: phinano trace draws with matplotlib: pip install '
                                       '"phinano[pictures]" (or pip install matplotlib)\n')
    assert not (tmp_path / "t").exists()


def chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                None)


@pytest.mark.skipif(chromium() is None, reason="no headless Chromium installed (Debian: apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(pages, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    page = (pages["nano-phimoe"] / "index.html").resolve().as_uri()
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                    f"--screenshot={shot}", page], check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("L")
    assert image.size == (1200, 1600)
    histogram = image.histogram()
    white = histogram[255] / sum(histogram)
    assert white < 0.97, f"the screenshot is {white:.1%} white: the page drew nothing"
    assert sum(1 for count in histogram if count) > 50  # text and pictures: many grey levels, not a flat page
