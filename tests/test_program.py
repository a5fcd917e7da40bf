"""programs/transformer.py as a user runs it (``mpirun -n N python programs/transformer.py``):
the files it writes (--save-logits npz, --json) against the transformers-made fixtures,
a batch of unequal prompts, text prompts through a tokenizer.json, and bad input, which
must end every rank with exit code 2 and print ONE "error:" line, not one per rank.

Launcher tests: they start mpirun themselves and run on world rank 0 only.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

from mpipar.launch import run_mpi

pytestmark = pytest.mark.launcher

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "programs",
                       "transformer.py")
TOL = 1e-4


def program(n, args, timeout=90):
    t = time.monotonic()
    out = run_mpi(n, [PROGRAM, *args], timeout=timeout)
    out.wall_s = time.monotonic() - t
    out.text = out.stdout + out.stderr
    return out


def ids(tokens):
    return ",".join(str(int(t)) for t in tokens)


def load_ref(path):
    with open(os.path.join(path, "ref.json"), encoding="utf-8") as f:
        return json.load(f)


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line.lower()]


@pytest.mark.parametrize("name", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_single_process_files(fixtures_dir, tmp_path, name):
    model = os.path.join(fixtures_dir, name)
    ref = load_ref(model)
    npz, js = tmp_path / "out.npz", tmp_path / "out.json"
    out = program(1, ["--model", model, "--prompt-ids", ids(ref["prompt_a"]),
                      "--max-new-tokens", "8", "--save-logits", str(npz), "--json", str(js)])
    assert out.returncode == 0, out.text
    assert "check: pass" in out.stdout
    with np.load(npz) as f:
        pl, dl, tok = f["prompt_logits"], f["decode_logits"], f["tokens"]
    assert pl.dtype == dl.dtype == np.float32 and tok.dtype == np.int64
    assert pl.shape == (1, 12, 256) and dl.shape == (1, 8, 256) and tok.shape == (1, 8)
    assert tok[0].tolist() == ref["greedy_generate"]
    assert np.max(np.abs(pl[0] - np.load(os.path.join(model, "ref_logits.npy"))[0])) < TOL
    assert np.max(np.abs(dl[0] - np.load(os.path.join(model, "ref_decode_logits.npy")))) < TOL
    with open(js, encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["tokens"] == [ref["greedy_generate"]]
    assert rec["check"] == "pass"
    for key in ("ttft_s", "tpot_s", "tokens_per_s"):
        assert isinstance(rec[key], float) and rec[key] > 0, key
    assert rec["layout"] == {"tp": 1, "pp": 1, "dp": 1, "ep": 1, "world": 1}
    assert isinstance(rec["ledger"], dict)
    for kind, v in rec["ledger"].items():
        assert len(v["measured_bytes"]) == len(v["predicted_bytes"]) == 1, kind


def test_batch_of_unequal_prompts(fixtures_dir, tmp_path):
    model = os.path.join(fixtures_dir, "qwen3-moe-tiny")
    ref = load_ref(model)
    npz, js = tmp_path / "out.npz", tmp_path / "out.json"
    out = program(1, ["--model", model, "--prompt-ids", ids(ref["prompt_a"]),
                      "--prompt-ids", ids(ref["prompt_b"]), "--save-logits", str(npz),
                      "--json", str(js), "--quiet"])
    assert out.returncode == 0, out.text
    with np.load(npz) as f:
        pl, tok = f["prompt_logits"], f["tokens"]
    nb = len(ref["prompt_b"])
    assert pl.shape == (2, 12, 256) and tok.tolist() == ref["greedy_generate_batch"]
    assert np.all(np.isnan(pl[1, nb:])) and not np.any(np.isnan(pl[0]))
    assert not np.any(np.isnan(pl[1, :nb]))
    assert np.max(np.abs(pl[1, :nb] - np.load(os.path.join(model, "ref_logits_b.npy"))[0])) < TOL
    with open(js, encoding="utf-8") as f:
        assert json.load(f)["check"] == "pass"


def test_text_prompt_needs_a_tokenizer(fixtures_dir):
    model = os.path.join(fixtures_dir, "qwen3-tiny")
    out = program(2, ["--model", model, "--tp", "2", "--prompt", "hello world"], timeout=60)
    assert out.returncode == 2, out.text
    errors = error_lines(out.text)
    assert len(errors) == 1 and "tokenizer.json" in errors[0], out.text
    assert "Traceback" not in out.text


def test_text_prompt_with_a_tokenizer(fixtures_dir, tmp_path):
    import tokenizers  # the test extra brings it: a missing one is a failure
    src = os.path.join(fixtures_dir, "qwen3-tiny")
    ref = load_ref(src)
    for fn in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, fn), tmp_path)
    vocab = {f"w{i}": i for i in range(255)} | {"[UNK]": 255}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    text = " ".join(f"w{i}" for i in ref["prompt_a"])
    js = tmp_path / "out.json"
    out = program(1, ["--model", str(tmp_path), "--prompt", text, "--json", str(js),
                      "--quiet"])
    assert out.returncode == 0, out.text
    with open(js, encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["tokens"] == [ref["greedy_generate"]] and rec["check"] == "pass"
    words = " ".join(f"w{i}" for i in ref["greedy_generate"])
    assert f"text[0]: {words!r}" in out.text


# (args, a word the one error line must contain); {model}: the dense fixture, {tmp}: tmp_path,
# {badtok}: a copy of the fixture with a corrupt tokenizer.json.
BAD = [
    pytest.param(["--tp", "0"], "--tp", id="tp0"),
    pytest.param(["--tp", "2", "--dp", "2", "--prompt-ids", "1,x"], "1,x", id="ids-not-int"),
    pytest.param(["--tp", "4", "--model", "{tmp}/qwen3-nowhere"], "qwen3-nowhere",
                 id="no-model-dir"),
    pytest.param(["--tp", "2", "--dp", "2", "--prompt-ids=5,256,7"], "256", id="out-of-vocab"),
    pytest.param(["--tp", "2"], "4", id="world-mismatch"),
    pytest.param(["--tp", "3", "--pp", "1", "--dp", "1"], "3", id="tp3-world"),
    pytest.param(["--tp", "4", "--prompt-ids", ""], "empty", id="empty-prompt"),
    pytest.param(["--tp", "2", "--dp", "2", "--top-p", "0"], "--top-p", id="top-p0"),
    pytest.param(["--tp", "4", "--seed", "-1", "--temperature", "1"], "--seed", id="seed-neg"),
    pytest.param(["--tp", "4", "--json", "{tmp}/no/such/dir/run.json"], "run.json",
                 id="json-dir"),
    pytest.param(["--tp", "4", "--model", "{badtok}", "--prompt", "w1 w2"], "tokenizer",
                 id="bad-tokenizer"),
    pytest.param(["--tp", "2", "--dp", "2", "--max-new-tokens", "100000"],
                 "16 tokens + --max-new-tokens 100000 = 100016 > the model's "
                 "max_position_embeddings (512)", id="too-long"),
    pytest.param(["--pp", "4", "--prompt-ids", "1,2,3,4,5", "--max-model-len", "9",
                  "--max-new-tokens", "5"],
                 "5 tokens + --max-new-tokens 5 = 10 > --max-model-len (9)", id="max-model-len"),
]


@pytest.mark.parametrize("args,word", BAD)
def test_bad_input_one_error_line(fixtures_dir, tmp_path, args, word):
    model = os.path.join(fixtures_dir, "qwen3-tiny")
    if "{badtok}" in args:
        for fn in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(model, fn), tmp_path)
        (tmp_path / "tokenizer.json").write_text("not json\n")
    if "--model" not in args:
        args = [*args, "--model", "{model}"]
    args = [a.format(model=model, tmp=tmp_path, badtok=tmp_path) for a in args]
    out = program(4, args, timeout=60)
    assert out.returncode == 2, out.text
    errors = error_lines(out.text)
    assert len(errors) == 1, out.text
    assert word in errors[0], errors[0]
    assert "Traceback" not in out.text
    assert out.wall_s < 30, f"took {out.wall_s:.1f} s"


@pytest.mark.parametrize("poison, named", [
    # NaN in layer 2 (second pipeline stage) and inf in layer 3: the first one is named
    ({"model.layers.2.mlp.down_proj.weight": np.nan,
      "model.layers.3.self_attn.o_proj.weight": np.inf}, "layer 2 is not finite"),
    ({"lm_head.weight": np.inf}, "the logits (model.norm or lm_head) is not finite"),
], ids=["layers", "lm_head"])
def test_non_finite_weights_name_the_first_bad_layer(fixtures_dir, tmp_path, poison, named):
    """NaN/inf weights: one error naming where the output first stops being finite, exit 2,
    from a 4-rank tp=2 pp=2 run, instead of a stream of token 0."""
    from safetensors.numpy import load_file, save_file
    src = os.path.join(fixtures_dir, "qwen3-tiny")
    shutil.copy(os.path.join(src, "config.json"), tmp_path)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    for name, value in poison.items():
        tensors[name][3, 5] = value
    save_file(tensors, str(tmp_path / "model.safetensors"))
    out = program(4, ["--model", str(tmp_path), "--tp", "2", "--pp", "2",
                      "--max-new-tokens", "3"], timeout=60)
    assert out.returncode == 2, out.text
    errors = error_lines(out.text)
    assert len(errors) == 1 and named in errors[0], out.text
    assert "Traceback" not in out.text


def test_llama_fixture_under_tp_and_a_tp_it_cannot_take(fixtures_dir, tmp_path):
    """A Llama checkpoint (biases, llama3 RoPE, no head_dim) gives transformers' tokens
    at tp=2; tp=4 over its 6 heads is refused with the tp sizes that would work."""
    model = os.path.join(fixtures_dir, "llama-bias-llama3")
    ref = load_ref(model)
    js = tmp_path / "out.json"
    out = program(2, ["--model", model, "--tp", "2", "--prompt-ids", ids(ref["prompt_a"]),
                      "--max-new-tokens", "8", "--json", str(js)])
    assert out.returncode == 0, out.text
    with open(js, encoding="utf-8") as f:
        rec = json.load(f)
    assert rec["tokens"] == [ref["greedy_generate"]] and rec["check"] == "pass"
    out = program(4, ["--model", model, "--tp", "4", "--max-new-tokens", "2"], timeout=60)
    assert out.returncode == 2, out.text
    errors = error_lines(out.text)
    assert len(errors) == 1, out.text
    assert "tp=4 does not divide the 6 attention heads" in errors[0], errors[0]
    assert "tp=1, tp=2 or tp=6 would" in errors[0], errors[0]
