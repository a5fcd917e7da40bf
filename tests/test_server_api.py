"""The HTTP layer (serve/api.py, driver.py, detok.py, chat.py, metrics.py) in this process.

A real uvicorn on a free loopback port and the Driver loop on a second thread, over a
single-process stand-in engine (tests/serve_standin.py, the reference model), so these
tests look at HTTP alone: OpenAI response shapes with the official ``openai`` client,
server-sent events to ``data: [DONE]``, chat templates, stop strings and stop ids, the
400/401/404/503 error bodies, client disconnects that abort, and /metrics. Greedy
tokens are checked against mpipar/model/reference.py's generate of each prompt alone.
The same endpoints under mpirun with the real engine: tests/test_server.py.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.rank0

sys.path.insert(0, os.path.dirname(__file__))
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
try:  # the HTTP client the openai package brings (httpx, or its successor httpx2)
    import httpx
except ImportError:
    import httpx2 as httpx


class InProcessServer:
    def __init__(self, model_dir: str, api_key: str | None = None, ready: bool = True):
        import uvicorn
        from serve_standin import StandinEngine

        from mpipar.model.init import open_model
        from mpipar.model.tokenizer import load_tokenizer
        from mpipar.serve.api import ServedModel, create_app
        from mpipar.serve.chat import load_chat_template
        from mpipar.serve.driver import Driver
        from mpipar.serve.metrics import ServeMetrics
        from mpipar.serve.server import listen
        self.source = open_model(model_dir)
        self.engine = StandinEngine(self.source, max_model_len=128)
        has_tok = os.path.exists(os.path.join(model_dir, "tokenizer.json"))
        self.tokenizer = load_tokenizer(model_dir) if has_tok else None
        self.model = ServedModel(["tiny"], self.source.config.vocab_size, 128,
                                 self.tokenizer, load_chat_template(model_dir))
        self.metrics = ServeMetrics("tiny")
        self.driver = Driver(self.engine, self.metrics)
        self.sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(self.model, self.driver, self.metrics, api_key)
        self.http = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.threads = [threading.Thread(target=self.http.run, kwargs={"sockets": [self.sock]},
                                         daemon=True),
                        threading.Thread(target=self.driver.run, daemon=True)]
        for t in self.threads:
            t.start()
        t_end = time.monotonic() + 20
        while not self.http.started and time.monotonic() < t_end:
            time.sleep(0.02)
        if ready:
            self.driver.ready.set()

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0,
                             timeout=30)

    def close(self):
        self.driver.stop()
        self.http.should_exit = True
        for t in self.threads:
            t.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from conftest import FIXTURES
    from serve_standin import make_text_model
    if not os.path.isdir(FIXTURES):  # as the fixtures_dir fixture (function-scoped) does
        pytest.skip(f"fixtures folder not found: {FIXTURES} (set MPIPAR_FIXTURES)")
    return make_text_model(os.path.join(FIXTURES, "qwen3-tiny"),
                           str(tmp_path_factory.mktemp("text-model")))


@pytest.fixture(scope="module")
def server(text_model):
    s = InProcessServer(text_model)
    yield s
    s.close()


def reference(source, prompt, n):
    from mpipar.model.reference import ReferenceModel, generate
    return generate(ReferenceModel(source), [prompt], n, keep_logits=False).tokens[0].tolist()


def test_concurrent_greedy_token_ids_equal_reference(server):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in (3, 17, 9, 30, 1, 12)]
    lens = [5, 9, 3, 12, 7, 1]
    got = [None] * len(prompts)

    def ask(i):
        r = server.client().completions.create(
            model="tiny", prompt=prompts[i], max_tokens=lens[i], temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True})
        got[i] = r
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, r in enumerate(got):
        c = r.choices[0]
        assert c.token_ids == reference(server.source, prompts[i], lens[i]), i
        assert c.prompt_token_ids == prompts[i]
        assert c.finish_reason == "length"
        assert r.usage.prompt_tokens == len(prompts[i])
        assert r.usage.completion_tokens == lens[i]
        assert r.object == "text_completion" and r.model == "tiny"


def test_text_prompt_and_stream_agree(server):
    c = server.client()
    whole = c.completions.create(model="tiny", prompt="Hello, mpipar", max_tokens=10,
                                 temperature=0, extra_body={"return_token_ids": True})
    ids = server.tokenizer.encode("Hello, mpipar")
    ch = whole.choices[0]
    assert ch.prompt_token_ids == ids
    assert ch.token_ids == reference(server.source, ids, 10)
    assert ch.text == server.tokenizer.decode(ch.token_ids)
    pieces = list(c.completions.create(model="tiny", prompt="Hello, mpipar", max_tokens=10,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == ch.text
    assert [p.choices[0].finish_reason for p in pieces if p.choices][-1] == "length"
    assert pieces[-1].usage.completion_tokens == 10
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30, json={
            "prompt": [5, 6, 7], "max_tokens": 4, "stream": True, "temperature": 0,
            "return_token_ids": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == [5, 6, 7]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == \
        reference(server.source, [5, 6, 7], 4)


def test_batch_of_prompts(server):
    r = server.client().completions.create(model="tiny", prompt=[[1, 2], [3, 4, 5]],
                                           max_tokens=3, temperature=0,
                                           extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.token_ids for c in r.choices] == [reference(server.source, p, 3)
                                               for p in ([1, 2], [3, 4, 5])]


def test_chat_through_the_template(server):
    c = server.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                  extra_body={"return_token_ids": True})
    text = server.model.chat_template.render(msgs)
    assert text.endswith("<|im_start|>assistant\n")
    ids = server.tokenizer.encode(text)
    assert r.model_extra["prompt_token_ids"] == ids
    assert r.choices[0].model_extra["token_ids"] == reference(server.source, ids, 6)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == server.tokenizer.decode(
        r.choices[0].model_extra["token_ids"])
    deltas = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6,
                                            temperature=0, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == \
        r.choices[0].message.content


def test_stop_string_and_stop_token_id(server):
    c = server.client()
    prompt = [9, 8, 7, 6]
    full = reference(server.source, prompt, 12)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                             extra_body={"stop_token_ids": [full[4]],
                                                              "return_token_ids": True})
    ch = r.choices[0]
    assert ch.token_ids == full[:full.index(full[4]) + 1]
    assert ch.finish_reason == "stop" and ch.model_extra["stop_reason"] == full[4]
    text = server.tokenizer.decode(full)
    assert len(text) >= 5, text  # ids past the tokenizer's 99 decode to nothing
    stop = text[3:5]
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                             stop=["zzz", stop])
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=12,
                                       temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == text[:text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


BAD = [
    ({"prompt": [1, 2, 256], "max_tokens": 2}, "prompt"),  # outside the vocab of 256
    ({"prompt": [1] * 120, "max_tokens": 20}, "max_model_len"),
    ({"prompt": [1, 2], "max_tokens": -1}, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": "5"}, "max_tokens"),
    ({"prompt": [1, 2], "temperature": "hot"}, "temperature"),
    ({"prompt": [1, 2], "stream": "yes"}, "stream"),
    ({"prompt": [1.5, 2]}, "prompt"),
    ({"prompt": [1, 2], "n": 2}, "n=1"),
    ({"prompt": [1, 2], "top_p": 0}, "top_p"),
    ({"prompt": []}, "empty"),
    ({"max_tokens": 3}, "prompt"),
]


@pytest.mark.parametrize("body,word", BAD)
def test_bad_request_is_400_and_serving_goes_on(server, body, word):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    assert word in err["message"], err
    ok = httpx.post(server.url + "/v1/completions", timeout=30,
                    json={"prompt": [1, 2], "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text


def test_malformed_json_unknown_model_and_no_template(server, fixtures_dir):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": [1,', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": [1]}', timeout=30)
    assert r.status_code == 400 and "Content-Type: application/json" in r.text
    r = httpx.post(server.url + "/v1/completions", json={"model": "gpt-9", "prompt": [1]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    bare = InProcessServer(os.path.join(fixtures_dir, "qwen3-tiny"))
    try:
        r = httpx.post(bare.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
        assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
        r = httpx.post(bare.url + "/v1/completions", json={"prompt": "text"}, timeout=30)
        assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    finally:
        bare.close()


def test_api_key_and_health_before_ready(fixtures_dir):
    s = InProcessServer(os.path.join(fixtures_dir, "qwen3-tiny"), api_key="sekret",
                        ready=False)
    try:
        assert httpx.get(s.url + "/health").status_code == 503
        s.driver.ready.set()
        assert httpx.get(s.url + "/health").status_code == 200  # no key needed
        for path in ("/v1/models", "/metrics"):
            assert httpx.get(s.url + path).status_code == 401
            assert httpx.get(s.url + path, headers={
                "Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").completions.create(model="tiny", prompt=[1], max_tokens=1)
        r = s.client("sekret").completions.create(model="tiny", prompt=[1], max_tokens=1)
        assert r.usage.completion_tokens == 1
        assert s.client("sekret").models.list().data[0].id == "tiny"
    finally:
        s.close()


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts(server, stream):
    body = {"prompt": [1, 2, 3], "max_tokens": 120, "stream": stream, "ignore_eos": True}
    aborts = len(server.engine.abort_log)
    server.engine.step_delay_s = 0.05  # 120 steps: 6 s, far longer than the wait below
    try:
        if stream:
            with httpx.stream("POST", server.url + "/v1/completions", json=body,
                              timeout=30) as r:
                assert next(ln for ln in r.iter_lines() if ln).startswith("data: ")
        else:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
        t_end = time.monotonic() + 3
        while server.engine.running and time.monotonic() < t_end:
            time.sleep(0.05)
        assert not server.engine.running, "the engine still runs the abandoned request"
        assert len(server.engine.abort_log) == aborts + 1
    finally:
        server.engine.step_delay_s = 0.0


def test_metrics(server):
    server.client().completions.create(model="tiny", prompt=[4, 4], max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("mpipar:num_requests_running", "mpipar:num_requests_waiting",
                 "mpipar:kv_blocks_used", "mpipar:time_to_first_token_seconds_bucket",
                 "mpipar:time_per_output_token_seconds_count",
                 "mpipar:e2e_request_latency_seconds_sum", "mpipar:tokens_per_step_bucket"):
        assert name in text, name
    count = [ln for ln in text.splitlines()
             if ln.startswith("mpipar:e2e_request_latency_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 1
