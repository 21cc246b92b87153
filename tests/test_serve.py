"""`fastchar serve`: the completions API, continuous batching, and the page in a real browser.

- Every kind of bad request is a 400 whose JSON error names the problem.
- Under concurrent load (more streams than rows, different options, joining and leaving at
  different steps, streamed and not) every choice's text equals `fastchar.generate`'s for its seed.
- A full queue answers 503; waiting requests run once a row frees up; a client that disconnects
  (streamed or not) frees its row at once.
- SIGINT and SIGTERM stop a server process cleanly (status 0), ending the open streams.
- DecodeBatch: rows added and removed between steps equal generate's texts on every backend.
- Headless Chromium loads the page, submits a prompt and sees the text arrive in pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastchar import CharTokenizer, Model, ModelConfig, generate
from fastchar.checkpoint import save
from fastchar.sampler import DecodeBatch

httpx = pytest.importorskip("httpx", reason="tests/test_serve.py needs httpx (the [dev] extra)")
pytest.importorskip("uvicorn", reason="fastchar serve needs the [serve] extra (uvicorn, starlette)")
pytest.importorskip("starlette", reason="fastchar serve needs the [serve] extra (uvicorn, starlette)")

from fastchar.serve import bound_port, make_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOK = CharTokenizer("abcdefghij \n")
LONG = 1_000_000  # max_tokens of a stream that runs until its client goes away


def make_model(position: str = "rope", ctx: int = 12, backend: str = "auto", **sizes) -> Model:
    shape = {"d_model": 24, "n_layer": 2, "n_head": 3, "mlp_hidden": 48, **sizes}
    cfg = ModelConfig(vocab_size=TOK.vocab_size, ctx=ctx, position=position, **shape)
    model = Model(cfg, backend=backend, seed=4)
    model.params.flat[:] += np.random.default_rng(0).normal(0, 0.3, model.params.flat.size).astype(np.float32)
    model.tokenizer = TOK
    return model


@contextlib.contextmanager
def running(model: Model, **kw):
    """A server for model on a free loopback port, in a thread: yields its base URL."""
    with running_server(model, **kw) as (base, _server):
        yield base


@contextlib.contextmanager
def running_server(model: Model, **kw):
    """running(), yielding the base URL and the uvicorn server (its .engine runs the decode)."""
    server = make_server(model, port=0, log_level="warning", **kw)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{bound_port(server)}", server
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def url():
    with running(make_model(), max_streams=4, max_queue=64) as base:
        yield base


def expected(model: Model, body: dict) -> list[str]:
    """Each choice's text as fastchar.generate makes it (OpenAI's defaults where body is silent)."""
    prompt, n = body.get("prompt", ""), body.get("n", 1)
    args = (body.get("max_tokens", 16), body.get("temperature", 1.0), body.get("top_k"), body.get("top_p"))
    kw = {"seed": body.get("seed"), "stop": body.get("stop")}
    if isinstance(prompt, str) and n == 1:
        return [generate(model, TOK, prompt, *args, **kw)[len(prompt) :]]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    texts = generate(model, TOK, prompts, *args, num_samples=n, **kw)
    return [t[len(p) :] for t, p in zip(texts, [p for p in prompts for _ in range(n)], strict=True)]


def sse(text: str) -> tuple[dict[int, str], dict[int, str], bool]:
    """Parse a server-sent event body: each choice's text and finish_reason, and whether [DONE] came."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    done = False
    for line in text.split("\n\n"):
        if not line.strip():
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        assert not done, "an event after [DONE]"
        if data == "[DONE]":
            done = True
            continue
        msg = json.loads(data)
        assert msg["object"] == "text_completion"
        for c in msg["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"] is not None:
                finish[c["index"]] = c["finish_reason"]
    return texts, finish, done


BAD = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({"prompt": 5}, "'prompt' must be a string"),
    ({"prompt": [1, 2]}, "'prompt' must be a string"),
    ({"prompt": []}, "'prompt' must be a string"),
    ({"prompt": "abz"}, 'vocabulary lacks: "z"'),
    ({"prompt": ["ab", "AB"]}, 'vocabulary lacks: "AB"'),
    ({"prompt": "a", "max_tokens": "10"}, "'max_tokens' must be an integer"),
    ({"prompt": "a", "max_tokens": -1}, "'max_tokens' must be an integer"),
    ({"prompt": "a", "max_tokens": 2.5}, "'max_tokens' must be an integer"),
    ({"prompt": "a", "max_tokens": True}, "'max_tokens' must be an integer"),
    ({"prompt": "a", "temperature": "hot"}, "'temperature' must be a number"),
    ({"prompt": "a", "temperature": -0.1}, "'temperature' must be a number in [0, 2]"),
    ({"prompt": "a", "temperature": 2.5}, "'temperature' must be a number in [0, 2]"),
    ('{"prompt": "a", "temperature": NaN}', "'temperature' must be a number"),
    ({"prompt": "a", "top_p": 0}, "'top_p' must be a number in (0, 1]"),
    ({"prompt": "a", "top_p": 1.5}, "'top_p' must be a number in (0, 1]"),
    ({"prompt": "a", "top_k": 0}, "'top_k' must be an integer >= 1"),
    ({"prompt": "a", "top_k": 2.5}, "'top_k' must be an integer >= 1"),
    ({"prompt": "a", "n": 0}, "'n' must be an integer in [1, 4]"),
    ({"prompt": "a", "n": 5}, "'n' must be an integer in [1, 4]"),
    ({"prompt": ["a", "b", "c"], "n": 2}, "6 streams"),
    ({"prompt": "a", "stop": ""}, "'stop' must be a non-empty string"),
    ({"prompt": "a", "stop": [1]}, "'stop' must be a non-empty string"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"prompt": "a", "seed": -1}, "'seed' must be an integer >= 0"),
    ({"prompt": "a", "seed": "7"}, "'seed' must be an integer >= 0"),
    ({"prompt": "a", "stream": "yes"}, "'stream' must be true or false"),
    ({"prompt": "a", "echo": True}, "'echo' is not supported"),
    ({"prompt": "a", "logprobs": 3}, "'logprobs' is not supported"),
    ({"prompt": "a", "logprobs": 0}, "'logprobs' is not supported"),  # OpenAI's 0: the drawn token's logprob
    ({"prompt": "a", "best_of": True}, "'best_of' is not supported"),
    ({"prompt": "a", "presence_penalty": 0.5}, "'presence_penalty' is not supported"),
    ({"prompt": "a", "frequency_penalty": -1}, "'frequency_penalty' is not supported"),
    ({"prompt": "a", "logit_bias": {"3": 100}}, "'logit_bias' is not supported"),
    # an int beyond float's range (math.isfinite overflowed: a 500), an int of more than 4300 digits
    # (json.loads raises a ValueError that is not a JSONDecodeError), nesting deeper than the
    # recursion limit (a RecursionError): each was a 500 with a bare "Internal Server Error"
    ('{"prompt": "a", "temperature": 1' + "0" * 400 + "}", "'temperature' must be a number in [0, 2]"),
    ('{"prompt": "a", "top_p": 1' + "0" * 400 + "}", "'top_p' must be a number in (0, 1]"),
    ('{"prompt": "a", "seed": 1' + "0" * 5000 + "}", "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),
]


@pytest.mark.parametrize(("body", "says"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_requests_get_a_400_that_says_what_is_wrong(url, body, says):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_models_health_page_and_unknown_routes(url):
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert models["data"][0]["vocabulary"] == "".join(TOK.chars)
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["max_streams"] == 4
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in page.text and "/v1/completions" in page.text
    assert httpx.get(f"{url}/nowhere").status_code == 404
    assert httpx.get(f"{url}/v1/completions").status_code == 405


def test_unsupported_options_at_their_defaults_are_accepted(url):
    body = {"prompt": "ab", "max_tokens": 3, "echo": False, "best_of": 1, "presence_penalty": 0.0,
            "frequency_penalty": 0, "logit_bias": {}, "model": "anything", "user": "u1"}  # fmt: skip
    r = httpx.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 3, r.text


def test_a_body_over_the_limit_is_a_413_before_it_is_read(url):
    from fastchar.serve import MAX_BODY_BYTES

    big = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    r = httpx.post(f"{url}/v1/completions", content=big, timeout=60)
    assert r.status_code == 413 and "larger than 16 MB" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: refused once the bytes received pass the limit
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 2**20 + 1):
            yield b"a" * 2**20
        yield b'"}'

    r = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=60)
    assert r.status_code == 413
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "a" * 100_000, "max_tokens": 1}).status_code == 200


def test_null_is_every_option_s_default(url):
    keys = ["max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream", "logprobs", "suffix"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", **dict.fromkeys(keys)})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["text"]) == 16 and r.json()["choices"][0]["finish_reason"] == "length"


def test_a_405_names_the_allowed_methods(url):
    r = httpx.put(f"{url}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"
    assert r.headers["allow"] == "POST"  # RFC 9110: a 405 must say which methods the resource allows


def test_usage_counts_each_prompt_once_whatever_n(url):
    """OpenAI's usage.prompt_tokens counts each prompt once; n multiplies the completions only."""
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "abc", "n": 3, "max_tokens": 4, "seed": 1}).json()
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ["ab", "c"], "n": 2, "max_tokens": 2, "seed": 1}).json()
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}


def test_a_long_prompt_is_encoded_once_and_only_its_last_ctx_characters_are_kept():
    """A 1 MB prompt with n = 64 encoded and kept whole once per choice blocked the event loop for
    about 10 s and took 500 MB: only the model's last ctx characters condition it."""
    from fastchar.serve import Engine, parse_request

    model = make_model()
    engine = Engine(model, max_streams=8, max_queue=0)  # not started: submit only queues
    long = "abcdefghij " * 10_000
    options = parse_request({"prompt": [long, "ab", ""], "n": 2}, TOK.stoi, 8)
    loop = asyncio.new_event_loop()
    try:
        engine.submit(options, loop)
    finally:
        loop.close()
    streams = list(engine._queue)
    assert [len(s.ids) for s in streams] == [12, 12, 2, 2, 1, 1]  # ctx 12
    assert streams[0].ids == [TOK.stoi[c] for c in long[-12:]] and streams[0].ids is streams[1].ids
    assert streams[4].ids == [TOK.stoi["\n"]]


def test_one_completion_has_the_openai_shape(url):
    body = {"prompt": "abc", "max_tokens": 30, "seed": 3, "top_p": 0.9}
    r = httpx.post(f"{url}/v1/completions", json=body).json()
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert r["choices"] == [{"text": expected(MODEL, body)[0], "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 30, "total_tokens": 33}
    stopped = httpx.post(f"{url}/v1/completions", json={**body, "stop": ["e", "f"]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == expected(MODEL, {**body, "stop": ["e", "f"]})[0]
    none = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 0}).json()["choices"][0]
    assert none["text"] == "" and none["finish_reason"] == "length"


MODEL = make_model()  # the url fixture's weights (make_model is deterministic)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_texts_equal_generate_under_concurrent_load(position):
    """20 requests (31 streams) at once on 4 rows: streams join and leave at different steps."""
    model = make_model(position)
    rng = np.random.default_rng(1)
    bodies = []
    for i in range(20):
        body = {"prompt": "".join(rng.choice(list("abcdefghij "), int(rng.integers(0, 20)))),
                "max_tokens": int(rng.integers(1, 60)), "seed": 100 + i, "stream": bool(i % 2)}  # fmt: skip
        if i % 3 == 0:
            body["n"] = 2
        if i % 4 == 1:
            body["prompt"] = [body["prompt"], "ab"]
        if i % 5 == 2:
            body["top_k"] = 3
        if i % 5 == 3:
            body["top_p"] = 0.8
        if i % 7 == 4:
            body["temperature"] = 0.0
        if i % 6 == 5:
            body["stop"] = ["ji", "\n"]
        if i % 8 == 6:
            body["temperature"] = 1.7
        bodies.append(body)

    async def ask(client: httpx.AsyncClient, base: str, body: dict) -> tuple[list[str], list[str]]:
        r = await client.post(f"{base}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        if body["stream"]:
            texts, finish, done = sse(r.text)
            assert done
        else:
            choices = r.json()["choices"]
            texts = {c["index"]: c["text"] for c in choices}
            finish = {c["index"]: c["finish_reason"] for c in choices}
        return [texts.get(i, "") for i in range(len(finish))], [finish[i] for i in range(len(finish))]

    async def all_at_once(base: str) -> list:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(ask(client, base, b) for b in bodies))

    with running(model, max_streams=4, max_queue=64) as base:
        answers = asyncio.run(all_at_once(base))
    for body, (texts, finish) in zip(bodies, answers, strict=True):
        want = expected(model, body)
        assert texts == want, body
        for text, end in zip(want, finish, strict=True):
            assert end == ("length" if len(text) == body["max_tokens"] else "stop"), body


def _first_event(client: httpx.Client, base: str, body: dict):
    """Open a streamed request and read until its first event; returns the open response and its
    lines (dropping that iterator would close the response)."""
    r = client.send(client.build_request("POST", f"{base}/v1/completions", json=body), stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    return r, lines


def _wait_health(base: str, running: int, queued: int, within: float) -> float:
    start = time.monotonic()
    while True:
        h = httpx.get(f"{base}/health").json()
        if h["running"] == running and h["queued"] == queued:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"health stayed at {h}"
        time.sleep(0.01)


def test_a_full_queue_answers_503_and_waiting_requests_run_when_a_row_frees():
    model = make_model()
    with running(model, max_streams=1, max_queue=1) as base, httpx.Client(timeout=30) as client:
        long, _lines = _first_event(client, base, {"prompt": "ab", "max_tokens": LONG, "stream": True})
        waiting_body = {"prompt": "c", "max_tokens": 25, "seed": 9}
        answer = {}
        url = f"{base}/v1/completions"
        waiter = threading.Thread(target=lambda: answer.update(r=httpx.post(url, json=waiting_body, timeout=30)))
        waiter.start()
        _wait_health(base, 1, 1, within=5)
        busy = httpx.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": 5})
        assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
        assert busy.headers["retry-after"] == "1"
        time.sleep(0.2)
        assert "r" not in answer  # still waiting for the row
        long.close()
        waiter.join(10)
        assert answer["r"].status_code == 200
        assert answer["r"].json()["choices"][0]["text"] == expected(model, waiting_body)[0]


@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_disconnects_frees_its_row_at_once(streamed):
    with running(make_model(), max_streams=1, max_queue=0) as base:
        body = {"prompt": "ab", "max_tokens": LONG, "stream": streamed}
        if streamed:
            with httpx.Client(timeout=30) as client:
                _r, _lines = _first_event(client, base, body)
                _wait_health(base, 1, 0, within=5)
            # the with block closed the connection mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{base}/v1/completions", json=body, timeout=0.5)
        freed = _wait_health(base, 0, 0, within=2)
        assert freed < 1.0
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": 5, "seed": 1})
        assert r.status_code == 200


def _events(text: str) -> list[dict]:
    return [json.loads(e[len("data: ") :]) for e in text.split("\n\n") if e.startswith("data: {")]


def test_streamed_text_is_coalesced_and_an_end_is_sent_at_once(monkeypatch):
    """With a 30 s gap between two events of a response, 3 streams of 300 characters each still end
    within seconds (an ending choice wakes its response at once) in few events (text made during the
    gap is sent together), and the events reassemble to generate's texts."""
    from fastchar import serve

    monkeypatch.setattr(serve, "EVENT_GAP", 30.0)
    model = make_model()
    body = {"prompt": "ab", "n": 3, "max_tokens": 300, "seed": 5, "stream": True}
    with running(model, max_streams=4) as base:
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        took = time.monotonic() - t0
    assert r.status_code == 200
    texts, finish, done = sse(r.text)
    assert done and texts == dict(enumerate(expected(model, body)))
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert took < 15, f"the ends waited for the event gap ({took:.1f} s)"
    per_choice = [sum(c["index"] == i for e in _events(r.text) for c in e["choices"]) for i in range(3)]
    assert max(per_choice) <= 3, per_choice  # the first text, and the rest with the end (one more if both raced)


def test_64_streamed_clients_reassemble_to_generate():
    """The benchmark's shape in small: 64 streamed clients at once on 64 rows (a full batch runs
    several characters per call, events carry what gathered), each text equal to generate's."""
    model = make_model()
    bodies = [{"prompt": "ab"[: i % 3], "max_tokens": 150 + 7 * i, "seed": i, "top_p": 0.9, "stream": True}
              for i in range(64)]  # fmt: skip

    async def ask_all(base: str) -> list:
        limits = httpx.Limits(max_connections=70, max_keepalive_connections=70)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(client.post(f"{base}/v1/completions", json=b) for b in bodies))

    with running(model, max_streams=64) as base:
        answers = asyncio.run(ask_all(base))
        health = httpx.get(f"{base}/health").json()
    events = 0
    for body, r in zip(bodies, answers, strict=True):
        texts, finish, done = sse(r.text)
        assert done and texts == {0: expected(model, body)[0]} and finish == {0: "length"}, body
        events += len(_events(r.text))
    assert health["characters"] == sum(b["max_tokens"] for b in bodies)
    assert events < health["characters"] / 2  # coalesced: far fewer events than characters


def test_event_text_is_the_json_of_the_event():
    from fastchar.serve import _EventText

    head = {"id": "cmpl-x", "object": "text_completion", "created": 7, "model": 'm"\\'}
    event = _EventText(head)
    for i, text, finish in [(0, 'a"b\\c\n\u00e9\u2028', None), (3, "", "stop"), (1, "xyz", "length")]:
        choice = {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
        assert event(i, text, finish) == f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"


def test_a_slow_client_does_not_hold_up_the_others():
    """A streamed response whose client reads nothing (a small receive buffer, soon full) keeps its
    row and gathers its text in the server (its response waits to send), while other requests run to
    the end with generate's texts."""
    import socket

    model = make_model()
    with running_server(model, max_streams=3, max_queue=8) as (base, server):
        port = int(base.rsplit(":", 1)[1])
        slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", port))
        try:
            payload = json.dumps({"prompt": "ab", "max_tokens": 10_000_000 // 10, "stream": True}).encode()
            head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
            slow.sendall(head.encode() + payload)
            _wait_health(base, 1, 0, within=5)
            for connection in server.server_state.connections:  # a slow link: no room to send ahead
                connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            bodies = [{"prompt": "c", "max_tokens": 400, "seed": i, "stream": bool(i % 2)} for i in range(6)]

            async def others() -> list:
                async with httpx.AsyncClient(timeout=20) as client:
                    return await asyncio.gather(*(client.post(f"{base}/v1/completions", json=b) for b in bodies))

            t0 = time.monotonic()
            answers = asyncio.run(others())
            took = time.monotonic() - t0
            for body, r in zip(bodies, answers, strict=True):
                assert r.status_code == 200
                got = sse(r.text)[0][0] if body["stream"] else r.json()["choices"][0]["text"]
                assert got == expected(model, body)[0]
            assert took < 15
            assert httpx.get(f"{base}/health").json()["running"] == 1  # the slow stream runs on
            (job,) = [s.job for s in server.engine._row_stream if s is not None]
            # Once the buffers on the way are full its response cannot send: what the decode makes
            # gathers in the job, to go out in one event later (a response that sends takes it every
            # 20 ms or so: a few hundred characters here).
            held = [0]
            deadline = time.monotonic() + 30
            while held[-1] < 5_000:
                assert time.monotonic() < deadline, held
                time.sleep(0.1)
                held.append(sum(len(p) for p in job.pieces[0]))
        finally:
            slow.close()
        _wait_health(base, 0, 0, within=5)  # and leaves once its client is gone


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_process_cleanly(tmp_path, sig):
    model = make_model()
    save(model, tmp_path / "ck", TOK)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fastchar", "serve", str(tmp_path / "ck"), "--port", "0", "--max-streams", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        port = None
        for line in proc.stderr:
            if m := re.search(r"on http://127\.0\.0\.1:(\d+)/", line):
                port = int(m.group(1))
                break
        assert port, "the server did not say where it listens"
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=30) as client:
            r, lines = _first_event(client, base, {"prompt": "ab", "max_tokens": LONG, "stream": True})
            proc.send_signal(sig)
            rest = "\n".join(lines)  # the open stream ends: an error event, then the connection closes
            assert "shutting down" in rest
        code = proc.wait(15)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert f"stopped by {sig.name}" in err


def test_a_body_cut_short_by_its_client_logs_no_traceback(url):
    """A client that goes away before its whole body came: starlette's ClientDisconnect escaped the
    handler and uvicorn logged 'Exception in ASGI application' with a traceback."""
    import logging
    import socket

    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        host, port = url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt"')
            time.sleep(0.2)
        time.sleep(0.3)
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "Exception" in m], seen


def test_more_streams_than_memory_holds_is_an_error_with_a_hint(tmp_path, capsys, monkeypatch):
    """--max-streams 100,000,000 allocated the caches row by row until the machine gave out (now a bound,
    above); within the bound, caches beyond the memory available are refused at once, with how many fit."""
    from fastchar import runfolder
    from fastchar.cli import main

    save(make_model(), tmp_path / "ck", TOK)
    monkeypatch.setattr(runfolder, "available_bytes", lambda: runfolder.MIB)
    t0 = time.perf_counter()
    assert main(["serve", str(tmp_path / "ck"), "--max-streams", "10000", "--port", "0"]) == 1
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert "error: 10,000 streams together need about" in err and "hint: lower --max-streams to" in err


def test_a_body_that_stops_arriving_is_a_408(url, monkeypatch):
    """A client that sent part of its body and then nothing held its connection for as long as it
    liked (uvicorn has no timeout for reading a body)."""
    import socket

    from fastchar import serve

    monkeypatch.setattr(serve, "BODY_SECONDS", 0.5)
    host, port = url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt"')
        t0, answer = time.monotonic(), b""
        while b"did not arrive" not in answer and time.monotonic() - t0 < 5:  # the head and body may come apart
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        assert time.monotonic() - t0 < 5
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer


def test_a_port_in_use_is_an_error_with_a_hint(tmp_path, capsys):
    """uvicorn exits with status 3 when it cannot listen: the command said nothing of its own."""
    import socket

    from fastchar.cli import main

    save(make_model(), tmp_path / "ck", TOK)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path / "ck"), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"error: could not listen on 127.0.0.1:{port}" in err and "hint: the port may be in use" in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--max-streams", "0"], "--max-streams must be >= 1"),
        (["--max-queue", "-1"], "--max-queue must be >= 0"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-streams", "100000000"], "--max-streams must be at most 10,000"),  # not 6 GB of caches, then more
    ],
)
def test_serve_command_line_errors(tmp_path, capsys, args, says):
    from fastchar.cli import main

    save(make_model(), tmp_path / "ck", TOK)
    assert main(["serve", str(tmp_path / "ck"), *args]) == 1
    err = capsys.readouterr().err
    assert f"error: {says}" in err and "hint:" in err


def test_decode_batch_rows_joining_and_leaving_equal_generate(backend):
    """Rows join at different steps, steps make 1 to 5 characters, rows leave at their length."""
    model = make_model("learned", ctx=8, backend=backend)
    batch = DecodeBatch(model, 3)
    opts = [(0.8, None, 0.9, 30), (1.0, 3, None, 17), (0.0, None, None, 12), (1.3, None, 0.5, 40), (0.7, 2, 0.8, 25)]
    prompts = ["abc", "j", "\n", "ffff ggg", "gi"]
    want = [generate(model, TOK, p, n, t, k, tp, seed=10 + i)[len(p) :]
            for i, (p, (t, k, tp, n)) in enumerate(zip(prompts, opts, strict=True))]  # fmt: skip
    got, row_of, pending, step = [""] * len(prompts), {}, list(range(len(prompts))), 0
    while pending or row_of:
        if pending and batch.free_rows and step % 3 == 0:  # join at different steps
            i = pending.pop(0)
            t, k, tp, _ = opts[i]
            row = batch.add_row([TOK.stoi[c] for c in prompts[i]], t, k, tp, np.random.default_rng(10 + i))
            row_of[row] = i
        n = min([opts[i][3] - len(got[i]) for i in row_of.values()] + [1 + step % 5])  # 1 to 5 characters a call
        rows, tokens = batch.step(n)
        step += 1
        for row, toks in zip(rows, tokens.reshape(rows.size, n), strict=True):
            i = row_of[row]
            got[i] += "".join(TOK.chars[t] for t in toks)
            if len(got[i]) == opts[i][3]:
                batch.remove_row(row)
                del row_of[row]
    assert got == want


def test_bench_serve_quick():
    pytest.importorskip("fastchar._cydecode", reason="the Cython extension is part of the product: build it")
    from benchmarks import bench_serve

    res = bench_serve.main(["--quick"])  # 8 clients: a server process, its texts checked against generate
    assert res["chars/s"] > 0 and res["generate_num_samples_chars/s"] > 0
    assert 0 < res["first_char_ms"]["p50"] <= res["first_char_ms"]["p99"]
    assert res["decode_thread"]["steps"] > 0


# -- the page in a real browser ------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                  "--disable-dev-shm-usage", "--window-size=900,700"]  # fmt: skip


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe (NUL-terminated JSON on fds 3 and 4):
    no websocket client needed. One page target, attached in flat mode."""

    def __init__(self, user_dir: str) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", "--remote-debugging-pipe", "about:blank"]

        def fds() -> None:  # chromium reads commands on fd 3 and writes answers on fd 4
            r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)  # above 4, so neither dup2 clobbers the other
            os.dup2(r, 3)
            os.dup2(w, 4)
            os.closerange(5, 1 << 16)  # nothing else of this process leaks into the browser

        self.proc = subprocess.Popen(cmd, close_fds=False, preexec_fn=fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.session = None

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                assert time.monotonic() < deadline, f"no answer to {method}"
                chunk = os.read(self._r, 1 << 16)
                assert chunk, "chromium closed the pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                assert "error" not in answer, answer
                return answer["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def eval(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._r)
        os.close(self._w)


def drive_page(base: str, prompt: str, seed: int, length: int, screenshot: Path | None = None) -> dict:
    """Load the page in headless Chromium, type a prompt, press Generate, watch the text arrive."""
    with tempfile.TemporaryDirectory() as user_dir:
        tools = DevTools(user_dir)
        try:
            tools.open(base + "/")
            deadline = time.monotonic() + 30
            while tools.eval("document.readyState + !!document.getElementById('go')") != "completetrue":
                assert time.monotonic() < deadline, "the page did not load"
                time.sleep(0.05)
            fill = {
                "prompt": prompt,
                "temperature": "0.8",
                "top_p": "0.9",
                "max_tokens": str(length),
                "seed": str(seed),
            }
            for key, value in fill.items():
                tools.eval(f"document.getElementById({json.dumps(key)}).value = {json.dumps(value)}")
            tools.eval("document.getElementById('go').click()")
            seen = []
            while True:
                state, n = tools.eval(
                    "[document.body.dataset.state, document.getElementById('text').textContent.length]"
                )
                seen.append(n)
                if state not in ("running", "idle"):
                    break
                assert time.monotonic() < deadline, f"the page stayed {state} ({n} characters)"
                time.sleep(0.01)
            result = tools.eval(
                "({state: document.body.dataset.state, events: Number(document.body.dataset.events),"
                " text: document.getElementById('text').textContent,"
                " status: document.getElementById('status').textContent})"
            )
            result["seen"] = seen
            if screenshot is not None:
                import base64

                clip = {"x": 0, "y": 0, "width": 900, "height": 560, "scale": 1}
                shot = tools.call("Page.captureScreenshot", format="png", clip=clip)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            return result
        finally:
            tools.close()


def test_the_page_streams_text_in_a_headless_browser():
    if CHROMIUM is None:
        if os.environ.get("FASTCHAR_REQUIRE_CHROMIUM") == "1":
            pytest.fail("FASTCHAR_REQUIRE_CHROMIUM=1 but there is no chromium on PATH")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); CI installs it")
    # a base-size model so that 1500 characters take long enough to arrive in several events
    model = make_model("rope", ctx=64, d_model=128, n_layer=4, n_head=8, mlp_hidden=512)
    with running(model, max_streams=4) as base:
        result = drive_page(base, "a big head ", seed=5, length=1500)
    assert result["state"] == "done", result["status"]
    assert result["text"] == generate(model, TOK, "a big head ", 1500, 0.8, None, 0.9, seed=5)[len("a big head ") :]
    assert result["events"] > 1
    assert any(0 < n < 1500 for n in result["seen"]), "the text never showed partly made"
    assert "characters/s" in result["status"]


if __name__ == "__main__":  # python tests/test_serve.py CHECKPOINT docs/serve.png: the README's screenshot
    from fastchar import load

    trained = load(sys.argv[1], backend="auto")
    with running(trained, max_streams=4, model_id=Path(sys.argv[1]).resolve().name) as base:
        print(drive_page(base, "ROMEO:", seed=1, length=400, screenshot=Path(sys.argv[2]))["status"])
