"""The `phinano` command at its edges: flags out of range are refused by the same rules as the server, in one
line and before any model is loaded; a prompt too long for the context is refused before it is echoed; the
shipped nano models sample by default and `-t 0` makes them greedy; `info` sizes; the `-v` speed line."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import phinano
from phinano.cli import cores_available, human_size, main
from phinano.nano import nano_path
from phinano.sampling import OptionError, check_options

NANO = "nano-phi3"


class Loaded(Exception):
    """Raised instead of loading a model: the flags were accepted."""


@pytest.fixture
def no_loading(monkeypatch):
    def load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(phinano, "load", load)


def refused(argv, capsys) -> str:
    """Run the command; it must refuse its flags with exit status 2 and one line, without loading a model."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("phinano: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("flags,flag", [
    (["-t", "-1"], "--temperature"),
    (["-t", "nan"], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["-n", "-5"], "--max-new-tokens"),
    (["-n", "0"], "--max-new-tokens"),
    (["--min-p", "5"], "--min-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "0"], "--threads"),
    (["--threads", "-1"], "--threads"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_flags_are_refused_before_loading(no_loading, capsys, command, flags, flag):
    argv = [command, *flags] + (["hello"] if command == "generate" else [])
    assert refused(argv, capsys).startswith(f"phinano: error: {flag} must be ")


@pytest.mark.parametrize("flags", [["--port", "70000"], ["--port", "-1"], ["--max-queue", "0"], ["--max-batch", "0"],
                                   ["--max-request-bytes", "0"], ["--max-request-bytes", "-5"]])
def test_bad_serve_flags_are_refused_before_loading(no_loading, capsys, flags):
    """Unchecked, --max-queue 0 would answer every request 503 and --max-request-bytes 0 fall back to 4 MiB."""
    assert refused(["serve", *flags], capsys).startswith(f"phinano: error: {flags[0]} must be ")


def test_threads_up_to_the_cores_available(no_loading, capsys):
    cores = cores_available()
    message = refused(["generate", "--threads", str(cores + 1), "hi"], capsys)
    assert f"--threads must be between 1 and {cores}" in message
    refused(["serve", "--threads", "0"], capsys)  # the model flags are shared with the server command
    with pytest.raises(Loaded):
        main(["generate", "--threads", str(cores), "hi"])


@pytest.mark.parametrize("command", ["generate", "trace"])
def test_the_prompt_as_the_last_argument_or_with_prompt_once(no_loading, capsys, monkeypatch, command):
    """`--prompt TEXT` / `-p TEXT` (as `phinano diff` and llama.cpp spell it) or the last argument, exactly once.
    Flags are never read by a prefix: `--prompt` once went to --prompt-lookup, failing on "an invalid int"."""
    import phinano.cli as cli

    prompts = []  # the prompt each accepted command line ends up with
    real_check = cli.check_flags
    monkeypatch.setattr(cli, "check_flags", lambda args: real_check(args) or prompts.append(args.prompt))
    for argv in ([command, "--prompt", "hello there"], [command, "-p", "hello there"], [command, "hello there"]):
        with pytest.raises(Loaded):
            main(argv)
    assert prompts == ["hello there"] * 3
    assert "give the prompt once" in refused([command], capsys)
    assert refused([command, "--prompt", "a", "b"], capsys).endswith("not both")


def argparse_refuses(argv, capsys) -> str:
    """argparse's own refusal: exit status 2, its usage line and one error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("argv,flag", [(["generate", "--prompt-look", "3", "hi"], "--prompt-look"),
                                       (["generate", "--max-new", "3", "hi"], "--max-new"),
                                       (["chat", "--temp", "0.5"], "--temp"), (["serve", "--max-b", "2"], "--max-b")])
def test_no_flag_is_read_by_a_prefix(no_loading, capsys, argv, flag):
    assert argparse_refuses(argv, capsys).startswith(f"phinano: error: unrecognized arguments: {flag}")


def test_empty_model_name(no_loading, capsys):
    assert "the model name is empty" in refused(["info", "--model", ""], capsys)


FLAG_VALUES = {  # flag -> (option name, values to try)
    "--temperature": ("temperature", st.floats(-2, 3) | st.sampled_from([0.0, float("inf")])),
    "--top-k": ("top_k", st.integers(-5, 50)),
    "--top-p": ("top_p", st.floats(-0.5, 1.5) | st.sampled_from([0.0, 1.0])),
    "--min-p": ("min_p", st.floats(-0.5, 1.5) | st.sampled_from([0.0, 1.0])),
    "--repetition-penalty": ("repetition_penalty", st.floats(-1, 3) | st.sampled_from([0.0])),
    "--seed": ("seed", st.integers(-3, 2**40)),
    "--max-new-tokens": ("max_new_tokens", st.integers(-3, 10)),
}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_the_cli_refuses_exactly_what_the_shared_rules_refuse(data):
    """The CLI and the server validate through phinano.sampling.check_options: a flag value is refused iff
    check_options refuses it."""
    flag = data.draw(st.sampled_from(sorted(FLAG_VALUES)))
    option, values = FLAG_VALUES[flag]
    value = data.draw(values)
    try:
        check_options(**{option: value})
        allowed = True
    except OptionError:
        allowed = False
    original = phinano.load
    phinano.load = lambda *a, **k: (_ for _ in ()).throw(Loaded())
    try:
        if allowed:
            with pytest.raises(Loaded):
                main(["generate", f"{flag}={value}", "hi"])
        else:
            assert main(["generate", f"{flag}={value}", "hi"]) == 2
    finally:
        phinano.load = original


def test_prompt_longer_than_the_context_is_not_echoed(capsys):
    context = phinano.load(NANO, backend="numpy").config.max_position_embeddings
    assert main(["generate", "--backend", "numpy", "x " * (context + 10)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and f"the model's context holds {context}" in captured.err


def test_nano_models_sample_by_default_and_t0_is_greedy(capsys):
    """The nano models' generation_config.json sets do_sample (temperature 0.8, top-p 0.95): without -t the CLI
    samples with it, as Transformers' generate() would; -t 0 forces greedy."""
    model = phinano.load(NANO, backend="numpy")
    assert model.sampling_defaults == {"temperature": 0.8, "top_p": 0.95}
    prompt = "def fibonacci(n):"
    ids = model.tokenizer.encode(prompt)

    def cli(*flags) -> str:
        assert main(["generate", "--backend", "numpy", "-n", "16", *flags, prompt]) == 0
        return capsys.readouterr().out

    def text(new) -> str:
        return prompt + model.tokenizer.decode(new, skip_special_tokens=True) + "\n"

    assert cli("-t", "0") == text(model.generate(ids, 16))
    assert cli("--seed", "3") == text(model.generate(ids, 16, temperature=0.8, top_p=0.95, seed=3))
    # A flag given replaces only its own default (here top-p stays 0.95).
    assert cli("--seed", "3", "-t", "1.5") == text(model.generate(ids, 16, temperature=1.5, top_p=0.95, seed=3))


def test_bad_generation_config_is_blamed_on_the_file(tmp_path, capsys):
    folder = tmp_path / "nano"
    shutil.copytree(nano_path(NANO), folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "top_p": 2.0}))
    assert main(["generate", "--model", str(folder), "--backend", "numpy", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("phinano: error: ") and "generation_config.json: top_p must be in (0, 1]" in err


def test_human_size():
    assert [human_size(n) for n in (812, 2048, 6_344_064, 7_640_000_000)] == ["812 B", "2.0 kB", "6.3 MB", "7.64 GB"]


def test_info_on_the_nano_models(capsys):
    assert main(["info", "--model", "nano-phimoe", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^experts +16, 2 active per token$", out, re.M)
    assert re.search(r"^weights +\d+\.\d MB, memory-mapped$", out, re.M)
    assert re.search(r"^kv cache +\d+\.\d kB per token \(float32\), \d+\.\d MB at the full 2048-token context$",
                     out, re.M)
    assert main(["info", "--model", NANO, "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "experts" not in out and " 0.0" not in out


SPEED = re.compile(r"^\[(\d+) prompt tokens at ([\d.]+) tok/s, (\d+) new tokens at ([\d.]+) tok/s, finish: (\w+)\]$")


def test_verbose_speed_line_excludes_the_first_calls_cost(monkeypatch, capsys):
    """The first forward pass of a process pays for compiling the kernels. Made to take 2 s here, it must not
    land in the reported prefill rate: -v warms the model up before the timed generation."""
    import time

    from phinano.kernels import reference

    real_embed = reference.embed  # the first op of every forward pass of the numpy backend
    calls = []

    def first_call_slow(*args, **kwargs):
        if not calls:
            time.sleep(2.0)
        calls.append(1)
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(reference, "embed", first_call_slow)
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n    "
    model = phinano.load(NANO, backend="numpy")
    ids = model.tokenizer.encode(prompt)
    greedy = model.tokenizer.decode(model.generate(ids, 12), skip_special_tokens=True)
    calls.clear()

    assert main(["generate", "--backend", "numpy", "-t", "0", "-n", "12", "-v", prompt]) == 0
    captured = capsys.readouterr()
    assert captured.out == prompt + greedy + "\n"  # the warm-up printed nothing
    match = SPEED.match(captured.err.strip())
    assert match, captured.err
    prompt_tokens, prefill_rate, new_tokens, decode_rate, finish = match.groups()
    assert int(prompt_tokens) == len(ids)
    assert 1 <= int(new_tokens) <= 12 and finish in ("stop", "length")
    assert float(decode_rate) > 0
    assert float(prefill_rate) > len(ids) / 2.0, "the prefill rate includes the first call's 2 s"
