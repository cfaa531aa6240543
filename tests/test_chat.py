"""`phinano chat` driven by lines of text: streaming answers from the chat template with history, /reset,
/system, /exit, Ctrl-C stopping one answer (not the session), the speed line, and old turns dropped when the
conversation outgrows the context."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import phinano
import phinano.chat
from phinano.chat import Chat, repl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import add_tiny_tokenizer, make_phi3

    folder = make_phi3(tmp_path_factory.mktemp("chat-model"), "mini-4k")  # context 256
    add_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return phinano.load(model_dir, threads=1)  # one kernel thread: steady timings on a shared machine


def answer(model, messages, n=12) -> str:
    ids = model.tokenizer.apply_chat_template(messages)
    return model.tokenizer.decode(model.generate(ids, n), skip_special_tokens=True)


def run(chat: Chat, lines: str, out=None, speed_line=None) -> tuple[int, str, str]:
    out = out or io.StringIO()
    err = io.StringIO()
    code = repl(chat, io.StringIO(lines), out, err, speed_line)
    return code, out.getvalue(), err.getvalue()


def test_answers_use_the_template_and_the_history(model):
    chat = Chat(model, max_new_tokens=12)
    code, out, _ = run(chat, "hello there\nwhy is the sky blue?\n/exit\nnever read\n")
    first = answer(model, [{"role": "user", "content": "hello there"}])
    second = answer(model, [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                            {"role": "user", "content": "why is the sky blue?"}])
    assert code == 0
    assert out == f">>> {first}\n>>> {second}\n>>> "
    assert [t["role"] for t in chat.turns] == ["user", "assistant", "user", "assistant"]
    assert chat.turns[3]["content"] == second


def test_reset_and_system(model):
    chat = Chat(model, max_new_tokens=12)
    _, out, err = run(chat, "hello there\n/reset\n/system be brief\nhello there\n")  # ends at end of input
    with_system = answer(model, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    assert out.endswith(f">>> {with_system}\n>>> \n")
    assert "conversation cleared" in err and "system message set" in err
    assert chat.system == "be brief" and len(chat.turns) == 2
    run(chat, "/system\n/help\n")
    assert chat.system is None


def test_unknown_command_is_named_before_the_help(model):
    chat = Chat(model, max_new_tokens=12)
    code, out, err = run(chat, "/foo bar\n/help\n")
    assert code == 0 and out == ">>> >>> >>> \n" and chat.turns == []
    assert err.count("unknown command") == 1 and "unknown command /foo\ncommands:" in err
    assert err.count("commands:") == 2  # /help prints the list without calling itself unknown


class InterruptingWriter(io.StringIO):
    """Raises KeyboardInterrupt (as Ctrl-C would) at the first write of an answer's text."""

    def __init__(self):
        super().__init__()
        self.armed = True

    def write(self, text):
        if self.armed and text != ">>> ":
            self.armed = False
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_while_printing_stops_the_answer_not_the_session(model, monkeypatch):
    closed = []
    real = phinano.chat.stream_text

    def tracked(*args, **kwargs):
        generation = real(*args, **kwargs)
        try:
            yield from generation
        finally:
            closed.append(True)

    monkeypatch.setattr(phinano.chat, "stream_text", tracked)
    chat = Chat(model, max_new_tokens=12)
    code, out, _ = run(chat, "hello there\nhello there\n", out=InterruptingWriter())
    assert code == 0 and closed == [True, True]
    assert out.startswith(">>>  [stopped]\n>>> ")
    assert chat.turns[1] == {"role": "assistant", "content": chat.turns[1]["content"]} and chat.turns[1]["content"]


def test_ctrl_c_during_generation_stops_the_answer_not_the_session(model, monkeypatch):
    real = phinano.chat.stream_text

    def interrupted(*args, **kwargs):
        generation = real(*args, **kwargs)
        try:
            yield next(generation)
            raise KeyboardInterrupt  # arrives while the model computes the next token
        finally:
            generation.close()

    monkeypatch.setattr(phinano.chat, "stream_text", interrupted)
    chat = Chat(model, max_new_tokens=12)
    code, out, _ = run(chat, "hello there\nwhy?\n")
    assert code == 0
    assert out.count("[stopped]") == 2 and out.endswith("[stopped]\n>>> \n")
    assert [t["role"] for t in chat.turns] == ["user", "assistant", "user", "assistant"]


def test_speed_line_after_each_answer(model):
    chat = Chat(model, max_new_tokens=12)
    _, _, err = run(chat, "hello\nhi\n", speed_line=lambda stats: f"SPEED {stats['new_tokens']}")
    assert err.count("SPEED ") == 2


def test_old_turns_are_dropped_when_the_context_fills(model):
    chat = Chat(model, max_new_tokens=12)
    filler = "the sky is blue " * 12  # tens of tokens per turn; the context is 256
    for _ in range(6):
        chat.turns += [{"role": "user", "content": filler}, {"role": "assistant", "content": filler}]
    _, out, err = run(chat, "hello there\n")
    assert "error" not in err
    assert len(model.tokenizer.apply_chat_template(chat.turns[:-1])) + 12 <= 256 + 12
    assert chat.turns[-2] == {"role": "user", "content": "hello there"} and len(chat.turns) < 14
    _, out, err = run(chat, "x" * 300 + "\nhello\n")  # a message longer than the context: an error, not an exit
    assert "error:" in err and out.count(">>> ") == 3


def test_phinano_chat_command(model_dir):
    result = subprocess.run([sys.executable, "-m", "phinano.cli", "chat", "--model", str(model_dir), "-n", "8", "-v",
                             "--threads", "1"], input="hello there\n/system be brief\nhi\n/exit\n",
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>> ") == 4
    assert result.stderr.count("new tokens at") == 2 and "system message set" in result.stderr
