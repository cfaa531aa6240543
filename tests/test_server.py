"""`phinano serve` as a real process on a loopback port, talked to by the official openai and ollama clients
and by raw HTTP: greedy output equals Model.generate, bad requests get each API's error shape, a client that
hangs up stops its generation, and concurrent clients do not disturb each other.

All traffic goes to 127.0.0.1; every request has a timeout and every loop a bound.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'phinano[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'phinano[serve]'")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

import phinano  # noqa: E402
from phinano.sampling import OptionError, check_options  # noqa: E402

NAME = "tiny"
CONTEXT = 4096  # the tiny mini-4k checkpoint's 256, raised so that a hung-up generation is still running
BODY_LIMIT = 64 * 1024  # the test server's --max-request-bytes
TIMEOUT = 60  # seconds, for any one request
PROMPTS = ["hello there", "write a short poem about the sea.", "why is the sky blue?", "the quick brown fox"]


# ------------------------------------------------------------------ fixtures: a tiny model and its server
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import add_tiny_tokenizer, make_phi3

    folder = make_phi3(tmp_path_factory.mktemp("server-model"), "mini-4k")
    add_tiny_tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = config["original_max_position_embeddings"] = CONTEXT  # default rope
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return phinano.load(model_dir, threads=1)  # one kernel thread: steady timings on a shared machine


@dataclass
class Server:
    url: str
    port: int
    log: Path
    process: subprocess.Popen

    def log_count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)

    def wait_for_log(self, text: str, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.log_count(text) < count:
            assert time.monotonic() < deadline, f"no {count}th {text!r} in the server log:\n{self.log.read_text()}"
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "phinano.cli", "serve", "--model", str(model_dir), "--name", NAME, "--host",
             "127.0.0.1", "--port", str(port), "--threads", "1", "--max-request-bytes", str(BODY_LIMIT)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start in 120 s:\n{log.read_text()}"
            try:
                if request(port, "GET", "/api/version", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield Server(f"http://127.0.0.1:{port}", port, log, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server.url, timeout=TIMEOUT)


# ------------------------------------------------------------------ helpers
def request(port: int, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
            timeout: float = TIMEOUT) -> tuple[int, dict, object]:
    """(status, headers, decoded JSON body or raw bytes) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read()
        head = {k.lower(): v for k, v in response.getheaders()}
        try:
            return response.status, head, json.loads(raw)
        except ValueError:
            return response.status, head, raw
    finally:
        conn.close()


def greedy(model, ids: list[int], max_new: int) -> tuple[str, list[int], str]:
    """Model.generate's greedy answer: (text without special tokens, new ids, finish reason)."""
    tokens = model.generate(ids, max_new)
    reason = "stop" if tokens and tokens[-1] in model.stop_token_ids else "length"
    return model.tokenizer.decode(tokens, skip_special_tokens=True), tokens, reason


def chat_ids(model, prompt: str) -> list[int]:
    return model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


# ------------------------------------------------------------------ OpenAI, through the openai client
@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_openai_chat_greedy_equals_generate(oai, model, prompt):
    text, tokens, reason = greedy(model, chat_ids(model, prompt), 100)
    r = oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=100,
                                    temperature=0)
    assert r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(chat_ids(model, prompt))
    assert r.usage.completion_tokens == len(tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_streaming_with_usage(oai, model):
    prompt = PROMPTS[1]  # its greedy answer ends on a stop token
    text, tokens, reason = greedy(model, chat_ids(model, prompt), 100)
    chunks = list(oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                              max_completion_tokens=100, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_openai_completions_streaming_and_not(oai, model):
    ids = model.tokenizer.encode(PROMPTS[2])
    text, tokens, reason = greedy(model, ids, 30)
    r = oai.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=30, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(tokens))
    chunks = list(oai.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason


def test_openai_default_max_tokens_of_completions_is_16(oai, model):
    r = oai.completions.create(model=NAME, prompt=PROMPTS[0], temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_openai_seeded_sampling_equals_generate(oai, model):
    ids = chat_ids(model, PROMPTS[3])
    expected = model.tokenizer.decode(model.generate(ids, 40, temperature=0.9, top_p=0.95, seed=7),
                                      skip_special_tokens=True)
    for _ in range(2):
        r = oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=40,
                                        temperature=0.9, top_p=0.95, seed=7)
        assert r.choices[0].message.content == expected


def test_openai_stop_string_is_cut_and_reported(oai, model):
    text, _, _ = greedy(model, chat_ids(model, PROMPTS[0]), 60)
    stop = text[len(text) // 2:][:3]  # a piece of the answer's second half
    r = oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=60,
                                    temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_openai_logprobs(oai, model):
    ids = chat_ids(model, PROMPTS[0])
    r = oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8,
                                    temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    expected = log_softmax(model.forward(ids)[-1])
    first = content[0]
    assert first.logprob == pytest.approx(expected.max(), abs=1e-4)
    assert [t.logprob for t in first.top_logprobs] == sorted((t.logprob for t in first.top_logprobs), reverse=True)
    assert len(first.top_logprobs) == 3 and first.top_logprobs[0].token == first.token
    assert first.top_logprobs[1].logprob == pytest.approx(np.sort(expected)[-2], abs=1e-4)
    assert all(t.logprob <= 0 for t in content)
    # legacy completions shape
    r = oai.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4


def test_openai_models(oai):
    assert [m.id for m in oai.models.list().data] == [NAME]
    assert oai.models.retrieve(NAME).id == NAME


def test_openai_refusals_name_the_parameter(oai):
    messages = [{"role": "user", "content": "hi"}]
    for kwargs, param in [({"frequency_penalty": 0.5}, "frequency_penalty"),
                          ({"presence_penalty": 1}, "presence_penalty"), ({"n": 2}, "n"),
                          ({"logit_bias": {"5": 10}}, "logit_bias"), ({"top_logprobs": 2}, "top_logprobs")]:
        with pytest.raises(openai.BadRequestError) as error:
            oai.chat.completions.create(model=NAME, messages=messages, max_tokens=4, **kwargs)
        assert error.value.param == param, kwargs
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=4)
    # any integer is a seed, as in OpenAI's API
    assert oai.chat.completions.create(model=NAME, messages=messages, max_tokens=4, seed=-5).choices


# ------------------------------------------------------------------ Ollama, through the ollama client
def test_ollama_generate_greedy_equals_generate(oll, model):
    text, tokens, reason = greedy(model, chat_ids(model, PROMPTS[1]), 100)
    options = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 100}
    r = oll.generate(model=NAME, prompt=PROMPTS[1], options=options, stream=False)
    assert (r.response, r.done, r.done_reason) == (text, True, reason)
    assert (r.prompt_eval_count, r.eval_count) == (len(chat_ids(model, PROMPTS[1])), len(tokens))
    assert r.total_duration > 0 and r.eval_duration > 0 and r.prompt_eval_duration > 0
    assert list(r.context) == chat_ids(model, PROMPTS[1]) + tokens
    chunks = list(oll.generate(model=NAME, prompt=PROMPTS[1], options=options, stream=True))
    assert "".join(c.response for c in chunks) == text
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].done_reason == reason and chunks[-1].eval_count == len(tokens)


def test_ollama_chat_streaming_and_not(oll, model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPTS[0]}]
    ids = model.tokenizer.apply_chat_template(messages)
    text, tokens, reason = greedy(model, ids, 40)
    options = {"temperature": 0, "repeat_penalty": 1, "num_predict": 40}
    r = oll.chat(model=f"{NAME}:latest", messages=messages, options=options, stream=False)
    assert (r.message.role, r.message.content, r.done_reason) == ("assistant", text, reason)
    chunks = list(oll.chat(model=NAME, messages=messages, options=options, stream=True))
    assert "".join(c.message.content for c in chunks) == text
    assert chunks[-1].done and chunks[-1].done_reason == reason
    assert chunks[-1].prompt_eval_count == len(ids) and chunks[-1].eval_count == len(tokens)


def test_ollama_default_options_are_ollamas(oll, model):
    """No options but a seed and a length: temperature 0.8, top_k 40, top_p 0.9, repeat_penalty 1.1."""
    ids = chat_ids(model, PROMPTS[2])
    expected = model.generate(ids, 30, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=11)
    r = oll.generate(model=NAME, prompt=PROMPTS[2], options={"seed": 11, "num_predict": 30}, stream=False)
    assert r.response == model.tokenizer.decode(expected, skip_special_tokens=True)


def test_ollama_stop_raw_and_num_ctx(oll, model):
    ids = model.tokenizer.encode(PROMPTS[3])
    text, _, _ = greedy(model, ids, 40)
    stop = text[len(text) // 2:][:3]
    r = oll.generate(model=NAME, prompt=PROMPTS[3], raw=True, stream=False,
                     options={"temperature": 0, "repeat_penalty": 1, "num_predict": 40, "stop": [stop]})
    assert (r.response, r.done_reason) == (text[: text.index(stop)], "stop")
    # num_ctx caps prompt + answer
    r = oll.generate(model=NAME, prompt=PROMPTS[3], raw=True, stream=False,
                     options={"temperature": 0, "repeat_penalty": 1, "num_ctx": len(ids) + 5})
    assert r.eval_count <= 5


def test_ollama_tags_version_and_load(oll, server):
    assert [m.model for m in oll.list().models] == [f"{NAME}:latest"]
    status, _, body = request(server.port, "GET", "/api/version")
    assert status == 200 and body["version"] == phinano.__version__
    r = oll.chat(model=NAME, messages=[], stream=False)  # empty messages: Ollama's "load the model"
    assert r.done and r.done_reason == "load"
    r = oll.generate(model=NAME, prompt="", stream=False)
    assert r.done and r.done_reason == "load"


def test_ollama_logprobs(server, model):
    status, _, body = request(server.port, "POST", "/api/generate", {
        "model": NAME, "prompt": PROMPTS[0], "stream": False, "logprobs": True, "top_logprobs": 2,
        "options": {"temperature": 0, "repeat_penalty": 1, "num_predict": 5}})
    assert status == 200
    assert len(body["logprobs"]) == body["eval_count"] - (body["done_reason"] == "stop")
    assert all(len(lp["top_logprobs"]) == 2 for lp in body["logprobs"])


def test_ollama_keep_alive_0_without_a_prompt_is_answered_unload(server):
    status, _, body = request(server.port, "POST", "/api/generate", {"model": NAME, "keep_alive": 0})
    assert status == 200 and (body["done"], body["done_reason"], body["response"]) == (True, "unload", "")


def _sse_events(raw: bytes) -> list:
    """The data of each server-sent event, decoded (the last, `[DONE]`, as is)."""
    events = [part[len("data: "):] for part in raw.decode().split("\n\n") if part.startswith("data: ")]
    return [json.loads(e) for e in events[:-1]] + events[-1:]


def test_openai_raw_shapes_of_completion_logprobs_and_stream_usage(server):
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    status, _, answer = request(server.port, "POST", "/v1/completions", dict(body, logprobs=2))
    assert status == 200, answer
    lp = answer["choices"][0]["logprobs"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert top[token] == logprob == max(top.values()) and len(top) <= 3  # greedy: the chosen token is the best
    # streamed: usage only when asked for, then null in every chunk but the last
    status, _, raw = request(server.port, "POST", "/v1/completions", dict(body, stream=True))
    *chunks, done = _sse_events(raw)
    assert done == "[DONE]" and all("usage" not in c and c["object"] == "text_completion" for c in chunks)
    status, _, raw = request(server.port, "POST", "/v1/chat/completions", {
        "model": NAME, "messages": USER, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})
    *chunks, last, done = _sse_events(raw)
    assert done == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks + [last])
    assert all(c["usage"] is None for c in chunks) and last["choices"] == []
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]


# ------------------------------------------------------------------ bad requests, raw HTTP
USER = [{"role": "user", "content": "hi"}]
LONG = "x" * (CONTEXT + 10)  # one byte-fallback token per "x": longer than the context
BAD_REQUESTS = [
    # OpenAI chat
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400),  # malformed JSON
    ("/v1/chat/completions", b"", 400),
    ("/v1/chat/completions", b"[1, 2, 3]", 400),  # JSON, but not an object
    ("/v1/chat/completions", b"[" * 50000, 400),  # nested too deep for the JSON parser
    ("/v1/chat/completions", {"messages": USER}, 400),  # no model
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400),  # wrong types
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "temperature": "hot"}, 400),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "max_tokens": 2.5}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "stream": "yes"}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": USER}, 404),  # unknown model
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400),  # empty messages
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": LONG}]}, 400),  # too long
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "max_tokens": 0}, 400),  # max_tokens out of range
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "max_tokens": -3}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "max_tokens": CONTEXT}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "max_completion_tokens": 10**12}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "temperature": 2.5}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "logprobs": True, "top_logprobs": 21}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": USER, "tools": [{"type": "function"}]}, 400),
    # OpenAI completions
    ("/v1/completions", {"model": NAME, "prompt": 5}, 400),
    ("/v1/completions", {"model": NAME, "prompt": ["a", "b"]}, 400),
    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 10**6]}, 400),  # token id out of range
    ("/v1/completions", {"model": NAME, "prompt": LONG}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
    # Ollama
    ("/api/generate", b"{not json", 400),
    ("/api/generate", {"prompt": "hi"}, 400),  # no model
    ("/api/generate", {"model": NAME, "prompt": 5}, 400),
    ("/api/generate", {"model": NAME, "prompt": "hi", "options": {"temperature": "hot"}}, 400),
    ("/api/generate", {"model": NAME, "prompt": "hi", "options": "fast"}, 400),
    ("/api/generate", b'{"model": "tiny", "prompt": "\\udfff"}', 400),  # a lone surrogate is not text
    ("/api/generate", {"model": NAME, "prompt": "hi", "options": {"num_predict": -3}}, 400),
    ("/api/generate", {"model": NAME, "prompt": "hi", "options": {"presence_penalty": 1.0}}, 400),
    ("/api/generate", {"model": "llama3", "prompt": "hi"}, 404),
    ("/api/generate", {"model": NAME, "prompt": LONG}, 400),
    ("/api/generate", {"model": NAME, "prompt": "hi there " * 20, "options": {"num_ctx": 8}}, 400),
    ("/api/generate", {"model": NAME, "prompt": "hi", "images": ["aGk="]}, 400),
    ("/api/generate", {"model": NAME, "prompt": "hi", "format": "json"}, 400),
    ("/api/chat", {"model": NAME, "messages": "hi"}, 400),
    ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400),
    ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": LONG}]}, 400),
    ("/api/chat", {"model": NAME, "messages": USER, "stream": "no"}, 400),
    ("/api/chat", {"model": "nope:latest", "messages": USER}, 404),
    # routes
    ("/v1/embeddings", {"model": NAME, "input": "hi"}, 404),
    ("/api/pull", {"model": NAME}, 404),
]


def assert_error_shape(path: str, status: int, headers: dict, body: object) -> None:
    assert headers["content-type"].startswith("application/json")
    if path.startswith("/v1/"):
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
        assert {"param", "code"} <= set(body["error"])
    else:
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    assert "Traceback" not in json.dumps(body)


@pytest.mark.parametrize("path,body,status", BAD_REQUESTS,
                         ids=[f"{i}-{p}" for i, (p, _, _) in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_the_apis_error(server, path, body, status):
    got, headers, answer = request(server.port, "POST", path, body)
    assert got == status, answer
    assert_error_shape(path, got, headers, answer)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_body_over_the_limit_gets_413(server, path):
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}).encode()
    status, headers, answer = request(server.port, "POST", path, body)  # Content-Length says too much
    assert status == 413
    assert_error_shape(path, status, headers, answer)
    # the same without Content-Length (chunked): counted while read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        conn.request("POST", path, body=(body[i:i + 8192] for i in range(0, len(body), 8192)),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413
        assert_error_shape(path, 413, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read()))
    finally:
        conn.close()


def test_wrong_method_and_unknown_route(server):
    status, headers, body = request(server.port, "GET", "/v1/chat/completions")
    assert status == 405
    assert_error_shape("/v1/", status, headers, body)
    status, headers, body = request(server.port, "GET", "/api/nothing")
    assert status == 404
    assert_error_shape("/api/", status, headers, body)


# ------------------------------------------------------------------ one rule set for sampling, content, the port
REFUSED_BY_THE_CLI = [("temperature", -1), ("top_p", 0), ("top_p", 2), ("min_p", 5), ("repetition_penalty", 0)]


def cli_refusal(name: str, value) -> str:
    """The message of the rule set the CLI checks its flags with."""
    with pytest.raises(OptionError) as error:
        check_options(**{name: value})
    assert error.value.param == name
    return str(error.value)


@pytest.mark.parametrize("name,value", REFUSED_BY_THE_CLI + [("top_k", -3)])
def test_openai_sampling_the_cli_refuses_is_a_400_naming_it(server, name, value):
    status, headers, body = request(server.port, "POST", "/v1/chat/completions",
                                    {"model": NAME, "messages": USER, "max_tokens": 4, name: value})
    assert status == 400, body
    assert_error_shape("/v1/", status, headers, body)
    assert body["error"]["param"] == name and body["error"]["message"] == cli_refusal(name, value)


@pytest.mark.parametrize("name,value", REFUSED_BY_THE_CLI)
def test_ollama_sampling_the_cli_refuses_is_a_400_naming_it(server, name, value):
    option = "repeat_penalty" if name == "repetition_penalty" else name
    status, headers, body = request(server.port, "POST", "/api/generate",
                                    {"model": NAME, "prompt": "hi", "options": {option: value, "num_predict": 4}})
    assert status == 400, body
    assert_error_shape("/api/", status, headers, body)
    assert body["error"] == cli_refusal(name, value).replace(name, f"options.{option}", 1)


def test_each_apis_off_values_are_still_off(server):
    """OpenAI's (vLLM's) top_k -1 and Ollama's top_k <= 0 mean "no top-k"; top_p 1 means "no top-p"."""
    for path, body in [("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2, "top_k": -1}),
                       ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2, "top_k": 0, "top_p": 1}),
                       ("/api/generate", {"model": NAME, "prompt": "hi", "stream": False,
                                          "options": {"top_k": -3, "top_p": 1, "num_predict": 2}})]:
        status, _, answer = request(server.port, "POST", path, body)
        assert status == 200, (body, answer)


@pytest.mark.parametrize("messages,param", [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": None}], "messages[1].content"),
    ([{"role": "system"}, {"role": "user", "content": "hi"}], "messages[0].content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}, {"role": "user", "content": "hi"}],
     "messages[1].content"),
])
def test_openai_message_without_content_is_a_400_naming_it(server, messages, param):
    status, headers, body = request(server.port, "POST", "/v1/chat/completions",
                                    {"model": NAME, "messages": messages, "max_tokens": 4})
    assert status == 400
    assert_error_shape("/v1/", status, headers, body)
    assert body["error"]["param"] == param and body["error"]["code"] == "missing_required_parameter"


def test_openai_assistant_message_with_tool_calls_needs_no_content(oai):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}
    messages = [{"role": "user", "content": "add 1"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "2"}]
    r = oai.chat.completions.create(model=NAME, messages=messages, max_tokens=2, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1


def test_serving_is_announced_with_the_bound_port(server):
    assert f"phinano: serving {NAME} on http://127.0.0.1:{server.port} " in server.log.read_text()


def test_served_name_is_what_clients_would_call_the_model(tmp_path):
    from phinano.serve import served_name

    (tmp_path / "my-phi3").mkdir()
    (tmp_path / "phi3-mini-q4_0.gguf").touch()
    assert served_name(str(tmp_path / "my-phi3")) == "my-phi3"
    assert served_name(str(tmp_path / "phi3-mini-q4_0.gguf")) == "phi3-mini-q4_0"
    assert served_name("ollama:phi3.5") == "phi3.5" and served_name("ollama:phi3:3.8b") == "phi3:3.8b"
    assert served_name("microsoft/Phi-3-mini-4k-instruct") == "microsoft/Phi-3-mini-4k-instruct"


def test_serve_on_a_port_in_use_says_so_in_one_line(model_dir, capsys):
    from phinano.cli import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--port", str(port)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured
    assert f"port {port}" in captured.err and "in use" in captured.err and "serving" not in captured.err


@contextmanager
def in_process(model, **engine_args):
    """A TestClient on the app over an Engine of its own, in this process (no port); its worker stops after."""
    from fastapi.testclient import TestClient

    from phinano.serve.app import create_app
    from phinano.serve.engine import Engine

    engine = Engine(model, NAME, **engine_args)
    try:
        with TestClient(create_app(engine)) as client:
            yield client
    finally:
        engine.close()


def broken_generation(*args, **kwargs):
    """In place of the engine's generate_steps: a generation that fails at once, as a bug would."""
    raise RuntimeError("a bug")
    yield  # a generator, like generate_steps


def test_close_waits_for_the_worker_and_its_warm_up(model):
    """A closed engine leaves nothing running: its warm-up generation (and any queued job) is over when
    close() returns, so nothing it does can be seen by what runs next."""
    from phinano.serve.engine import Engine

    engine = Engine(model, NAME)
    engine.close()  # straight away: the worker is still warming up
    assert engine.ready.is_set() and not engine._worker.is_alive()


def test_a_full_queue_is_a_503_in_each_apis_shape(model):
    with in_process(model, max_queue=0) as client:  # every request finds the queue full
        r = client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "server_busy"
        r = client.post("/api/chat", json={"model": NAME, "messages": USER})
        assert r.status_code == 503 and "busy" in r.json()["error"]


def test_a_failed_generation_is_a_500_and_the_next_request_is_served(model, monkeypatch):
    from phinano.serve import engine as engine_module

    with in_process(model) as client:
        with monkeypatch.context() as patch:
            patch.setattr(engine_module, "generate_steps", broken_generation)
            r = client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert "RuntimeError: a bug" in r.json()["error"]["message"]
            r = client.post("/api/generate", json={"model": NAME, "prompt": "hi", "options": {"num_predict": 2}})
            assert r.status_code == 200  # streaming had begun: the error is the last line
            assert "RuntimeError: a bug" in json.loads(r.text.splitlines()[-1])["error"]
        r = client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_a_failed_streamed_generation_ends_in_an_error_event(model, monkeypatch):
    from phinano.serve import engine as engine_module

    monkeypatch.setattr(engine_module, "generate_steps", broken_generation)
    with in_process(model) as client:
        r = client.post("/v1/chat/completions", json={"model": NAME, "messages": USER, "stream": True})
        assert r.status_code == 200  # streaming had begun: the error is the last event
        *_, error, done = _sse_events(r.content)
        assert done == "[DONE]" and error["error"]["type"] == "server_error"
        assert "RuntimeError: a bug" in error["error"]["message"]


# ------------------------------------------------------------------ clients that hang up, and many clients
def _send(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % (path.encode(), len(data)) + data)
    return s


def _read_until(s: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    got = b""
    while marker not in got:
        chunk = s.recv(4096)
        assert chunk and len(got) < limit, got
        got += chunk
    return got


LONG_RUN = {"model": NAME, "prompt": "hello", "max_tokens": CONTEXT - 16, "temperature": 0, "ignore_eos": True}
STOPPED = "stopped a generation after"
SKIPPED = "skipped a queued request"


def _check_still_serving(oai, model):
    text, _, _ = greedy(model, chat_ids(model, PROMPTS[0]), 40)
    r = oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=40,
                                    temperature=0)
    assert r.choices[0].message.content == text


def test_client_hanging_up_mid_stream_stops_its_generation(server, oai, model):
    before = server.log_count(STOPPED)
    s = _send(server.port, "/v1/completions", dict(LONG_RUN, stream=True))
    head = _read_until(s, b"data: ")
    s.close()
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    server.wait_for_log(STOPPED, before + 1)
    stopped_after = int(server.log.read_text().split(STOPPED)[-1].split()[0])
    assert stopped_after < CONTEXT - 16  # it did not run to the end
    _check_still_serving(oai, model)

    # the same on Ollama's NDJSON stream
    s = _send(server.port, "/api/chat", {"model": NAME, "messages": USER, "options": {"num_predict": 3000}})
    _read_until(s, b"\n{")  # headers, then a chunk line
    s.close()
    _check_still_serving(oai, model)


def test_client_hanging_up_while_waiting_stops_its_generation(server, oai, model):
    gone = server.log_count(STOPPED) + server.log_count(SKIPPED)
    s = _send(server.port, "/v1/completions", LONG_RUN)  # not streaming: the server polls for the hang-up
    time.sleep(0.2)
    s.close()
    deadline = time.monotonic() + 20
    while server.log_count(STOPPED) + server.log_count(SKIPPED) <= gone:
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.05)
    _check_still_serving(oai, model)


def test_a_client_hanging_up_stops_only_its_own_generation(server, oai, model):
    """Both long generations decode together in one batch; the one whose client hangs up stops, the other runs on.
    (A hang-up while still queued is skipped: tests/test_batching.py, where the batch can be kept full.)"""
    stopped = server.log_count(STOPPED)
    leaving = _send(server.port, "/v1/completions", dict(LONG_RUN, stream=True))
    staying = _send(server.port, "/v1/completions", dict(LONG_RUN, prompt="hi", stream=True))
    _read_until(leaving, b"data: ")
    _read_until(staying, b"data: ")
    leaving.close()
    server.wait_for_log(STOPPED, stopped + 1)
    got = _read_until(staying, b"data: ")  # still streaming after the other one stopped
    for _ in range(20):
        got += staying.recv(4096)
    assert server.log_count(STOPPED) == stopped + 1 and got.count(b"data: ") > 10 and b"[DONE]" not in got
    staying.close()
    server.wait_for_log(STOPPED, stopped + 2)
    _check_still_serving(oai, model)


def test_concurrent_clients_each_get_their_own_answer(server, model):
    expected = {p: greedy(model, chat_ids(model, p), 50)[0] for p in PROMPTS}
    results: dict = {}

    def stream_one(prompt):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)
        chunks = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=50, temperature=0, stream=True)
        results[prompt] = "".join(c.choices[0].delta.content or "" for c in chunks)

    def pester():  # a bad client at the same time
        for body in (b"{oops", b'{"model": 5}', json.dumps({"model": NAME, "messages": []}).encode()):
            results.setdefault("bad", []).append(request(server.port, "POST", "/v1/chat/completions", body)[0])

    threads = [threading.Thread(target=stream_one, args=(p,)) for p in PROMPTS] + [threading.Thread(target=pester)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert {p: results.get(p) for p in PROMPTS} == expected
    assert results["bad"] == [400, 400, 400]
