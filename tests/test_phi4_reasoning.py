"""A reasoning model's `<think> ... </think>` section shown apart: the split rule (phinano.reasoning), the
terminal chat, and both server APIs, streamed and not, as the official clients read them: OpenAI's
`reasoning_content` (vLLM's field, on the message and on stream deltas) and Ollama's `thinking` (with the `think`
request option).

A tiny random model does not write `<think>`, so the generation is scripted: the engine's (or chat's)
`stream_text` is replaced by one that yields fixed text pieces, cut inside the markers on purpose. Everything
after it (the split, the shapes of the replies) is the real code; the Phi-4-reasoning tokenizer and template
are the tiny ones of tiny_models.py.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import phinano
from phinano.reasoning import ReasoningSplit, split_reasoning

# ------------------------------------------------------------------ the rule
CASES = [  # whole answer -> (reasoning, reply)
    ("<think>\nadd 2 and 2\n</think>\n\nIt is 4.", ("add 2 and 2", "It is 4.")),
    ("  \n<think>a\n\nb</think>c ", ("a\n\nb", "c ")),  # inner and trailing reply whitespace stays
    ("<think>cut off by the token limit\n", ("cut off by the token limit", "")),
    ("<think>", (None, "")),
    ("<think></think>just the reply", (None, "just the reply")),  # an empty thought is no reasoning
    (" Hello <think>", (None, " Hello <think>")),  # no leading <think>: all reply, untouched
    ("<thinking>not a marker</thinking>", (None, "<thinking>not a marker</thinking>")),
    ("<thi", (None, "<thi")),
    ("<think>a</think>b</think>c", ("a", "b</think>c")),  # the first </think> ends the reasoning
    ("", (None, "")),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_split_rule(text, expected):
    assert split_reasoning(text) == expected


def streamed(pieces: list[str]) -> tuple[str | None, str]:
    split, reasoning, reply = ReasoningSplit(), "", ""
    for piece in pieces:
        r, c = split.push(piece)
        reasoning, reply = reasoning + r, reply + c
    r, c = split.flush()
    return (reasoning + r) or None, reply + c


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "think", ">", "a", "b c", " ", "\n", "t"]),
                max_size=14), st.data())
def test_streamed_pieces_give_the_whole_answers_split(fragments, data):
    """However the text is cut into pieces (inside a marker, inside whitespace), the pieces add up to the split
    of the whole text."""
    text = "".join(fragments)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert streamed(pieces) == split_reasoning(text)


def test_nothing_is_held_longer_than_a_marker_could_need():
    split = ReasoningSplit()
    assert split.push("<think>step one") == ("step one", "")
    assert split.push(" and two </thi") == (" and two", "")  # " </thi" could be the end marker: held
    assert split.push("nk") == ("", "")
    assert split.push(">\nfour") == ("", "four")
    assert ReasoningSplit().push("Hello") == ("", "Hello")  # not "<think>": released at once


# ------------------------------------------------------------------ a Phi-4-reasoning-shaped model
THOUGHT = ["<th", "ink>", "\nThe user asks 2", " + 2. That is 4.", "\n</thi", "nk>\n\n", "2 + 2", " = 4."]
UNFINISHED = ["<think>", "\nStill working", " on it"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import add_phi4_tokenizer, make_phi4

    folder = make_phi4(tmp_path_factory.mktemp("phi4-reasoning"), "phi-4-reasoning")
    add_phi4_tokenizer(folder, reasoning=True)
    return phinano.load(folder, threads=1)


def scripted(pieces: list[str], finish: str = "stop"):
    """In place of stream_text: yields `pieces`, reporting a generation of one token per piece."""
    def stream_text(model, ids, max_new_tokens, *, stats=None, on_step=None, **options):
        if stats is not None:
            stats.update(prompt_tokens=len(ids), new_tokens=len(pieces), prefill_seconds=0.01, decode_seconds=0.01,
                         finish_reason=finish)
        yield from pieces
    return stream_text


def scripted_steps(pieces: list[str], finish: str = "stop"):
    """In place of the server engine's loop (generate.generate_steps): yields (token, piece) for `pieces`."""
    def generate_steps(model, ids, max_new_tokens, *, stats=None, on_step=None, **options):
        stats.update(prompt_tokens=len(ids), new_tokens=len(pieces), prefill_seconds=0.01, decode_seconds=0.01,
                     finish_reason=finish)
        token = next(t for t in range(3, model.config.vocab_size) if t not in model.stop_token_ids)
        for piece in pieces:
            on_step(token, np.zeros(model.config.vocab_size, np.float32))
            yield token, piece
    return generate_steps


# ------------------------------------------------------------------ the terminal chat
def test_chat_frames_the_thinking_and_keeps_only_the_reply(model, monkeypatch):
    from phinano import chat as chat_module

    monkeypatch.setattr(chat_module, "stream_text", scripted(THOUGHT))
    chat = chat_module.Chat(model, max_new_tokens=32)
    out = io.StringIO()
    chat_module.repl(chat, io.StringIO("what is 2 + 2?\n"), out, io.StringIO())
    assert out.getvalue() == (">>> Thinking...\nThe user asks 2 + 2. That is 4.\n...done thinking.\n\n2 + 2 = 4.\n"
                              ">>> \n")
    assert chat.turns[-1] == {"role": "assistant", "content": "2 + 2 = 4."}  # the history holds the reply only


def test_chat_says_when_the_thinking_was_cut_off(model, monkeypatch):
    from phinano import chat as chat_module

    monkeypatch.setattr(chat_module, "stream_text", scripted(UNFINISHED, "length"))
    chat = chat_module.Chat(model, max_new_tokens=3)
    shown = "".join(chat.answer("hm?"))
    assert shown == "Thinking...\nStill working on it" + chat_module.NO_REPLY
    assert chat.turns[-1] == {"role": "assistant", "content": ""}


def test_chat_of_a_model_that_does_not_think_is_unchanged(model, monkeypatch):
    from phinano import chat as chat_module

    monkeypatch.setattr(chat_module, "stream_text", scripted([" Hello", " there <think>"]))
    chat = chat_module.Chat(model, max_new_tokens=3)
    assert "".join(chat.answer("hi")) == " Hello there <think>"


def test_generate_chat_frames_the_thinking_too(model, monkeypatch, capsys):
    from phinano import cli
    from phinano import generate as generate_module

    monkeypatch.setattr(generate_module, "stream_text", scripted(THOUGHT))
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    assert cli.main(["generate", "--chat", "what is 2 + 2?", "-n", "8"]) == 0
    assert capsys.readouterr().out == "Thinking...\nThe user asks 2 + 2. That is 4.\n...done thinking.\n\n2 + 2 = 4.\n"


# ------------------------------------------------------------------ the server, both APIs
@pytest.fixture
def serve(model, monkeypatch):
    """serve(pieces, finish) -> a TestClient on an in-process server whose generations are `pieces`."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from phinano.serve import engine as engine_module
    from phinano.serve.app import create_app
    from phinano.serve.engine import Engine

    started = []

    def start(pieces: list[str], finish: str = "stop"):
        monkeypatch.setattr(engine_module, "generate_steps", scripted_steps(pieces, finish))
        engine = Engine(model, "phi4r")
        client = TestClient(create_app(engine))
        started.append((engine, client))
        return client.__enter__()

    yield start
    for engine, client in started:
        client.__exit__(None, None, None)
        engine.close()


ASK = [{"role": "user", "content": "what is 2 + 2?"}]


def sse(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("pieces,finish,reasoning,content", [
    (THOUGHT, "stop", "The user asks 2 + 2. That is 4.", "2 + 2 = 4."),
    (UNFINISHED, "length", "Still working on it", ""),
    ([" plain", " answer"], "stop", None, " plain answer"),
])
def test_openai_chat_reasoning_content(serve, pieces, finish, reasoning, content):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    client = serve(pieces, finish)
    r = client.post("/v1/chat/completions", json={"model": "phi4r", "messages": ASK, "max_tokens": 8})
    assert r.status_code == 200, r.text
    message = ChatCompletion.model_validate(r.json()).choices[0].message
    assert message.content == content and getattr(message, "reasoning_content", None) == reasoning
    assert ("reasoning_content" in r.json()["choices"][0]["message"]) == (reasoning is not None)
    assert r.json()["choices"][0]["finish_reason"] == finish

    r = client.post("/v1/chat/completions", json={"model": "phi4r", "messages": ASK, "max_tokens": 8,
                                                  "stream": True})
    chunks = [ChatCompletionChunk.model_validate(c) for c in sse(r.text)]
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == (reasoning or "")
    assert "".join(d.content or "" for d in deltas) == content
    assert all(not (getattr(d, "reasoning_content", None) and d.content) for d in deltas)  # never both in one
    assert chunks[-1].choices[0].finish_reason == finish


def test_openai_completions_are_left_as_written(serve):
    client = serve(THOUGHT)
    r = client.post("/v1/completions", json={"model": "phi4r", "prompt": "2 + 2?", "max_tokens": 8})
    assert r.json()["choices"][0]["text"] == "".join(THOUGHT)


@pytest.mark.parametrize("think", [None, True, False])
@pytest.mark.parametrize("pieces,finish,reasoning,content", [
    (THOUGHT, "stop", "The user asks 2 + 2. That is 4.", "2 + 2 = 4."),
    (UNFINISHED, "length", "Still working on it", ""),
])
def test_ollama_thinking(serve, think, pieces, finish, reasoning, content):
    import ollama

    if think is False:  # think false: the text as the model wrote it
        reasoning, content = None, "".join(pieces)
    client = serve(pieces, finish)
    body = {"model": "phi4r", "messages": ASK, "stream": False, **({} if think is None else {"think": think})}
    r = client.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    reply = ollama.ChatResponse.model_validate(r.json())
    assert (reply.message.thinking, reply.message.content, reply.done_reason) == (reasoning, content, finish)

    lines = [ollama.ChatResponse.model_validate(json.loads(line)) for line in
             client.post("/api/chat", json={**body, "stream": True}).text.splitlines()]
    assert "".join(x.message.thinking or "" for x in lines) == (reasoning or "")
    assert "".join(x.message.content for x in lines) == content and lines[-1].done

    r = client.post("/api/generate", json={"model": "phi4r", "prompt": "2 + 2?", "stream": False,
                                           **({} if think is None else {"think": think})})
    generated = ollama.GenerateResponse.model_validate(r.json())
    assert (generated.thinking, generated.response) == (reasoning, content)


def test_ollama_think_must_be_true_or_false(serve):
    client = serve(THOUGHT)
    r = client.post("/api/chat", json={"model": "phi4r", "messages": ASK, "think": "high"})
    assert r.status_code == 400 and "think" in r.json()["error"]
