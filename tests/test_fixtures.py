"""The single-process reference against every repo fixture (tests/fixtures, made by
transformers through tests/fixtures/make_fixtures.py), and each fixture really has the
shape it claims (MQA, tied, bf16, sharded, mixed sparse layers, tokenizer, ...).

The same checks run on ``../shared/fixtures`` where that folder exists, as a second,
external check. Pure tests: world rank 0 runs them (``rank0``).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mpipar.model import CheckpointReader
from mpipar.model.layers import flatten_batch
from mpipar.model.reference import ReferenceModel, generate
from mpipar.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.rank0


def fixture_names(folder):
    """The reference checkpoints in ``folder`` (its subfolders with a ref.json)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, n, "ref.json")))


REPO_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REPO_NAMES = fixture_names(REPO_FIXTURES)  # none: a broken checkout, and the tests fail
SHARED = os.environ.get("MPIPAR_SHARED_FIXTURES",
                        os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))
TOL = 1e-4  # two float32 implementations agree to ~4e-6 on these shapes


def check_against_transformers(folder):
    """Prompt, layer, decode, full and long-prompt logits and greedy tokens of one folder."""
    ref = json.load(open(os.path.join(folder, "ref.json"), encoding="utf-8"))
    model = ReferenceModel(CheckpointReader(folder))

    def npy(name):
        return np.load(os.path.join(folder, name))

    def forward(ids, layer_outputs=None):
        flat, segments = flatten_batch([ids])
        return model.logits(model.hidden(flat, segments, model.new_caches(1, len(ids)),
                                         layer_outputs=layer_outputs))

    def close(got, want, what):
        assert got.shape == want.shape, (what, got.shape, want.shape)
        err = float(np.max(np.abs(got - want)))
        assert err < TOL, f"{os.path.basename(folder)} {what}: max |diff| {err:.3g}"

    outs = []
    close(forward(ref["prompt_a"], outs), npy("ref_logits.npy")[0], "prompt logits")
    for i, (got, want) in enumerate(zip(outs, npy("ref_layer_outputs.npy"), strict=True)):
        close(got, want, f"layer {i} output")
    close(forward(ref["prompt_b"]), npy("ref_logits_b.npy")[0], "prompt b logits")
    close(forward(ref["prompt_a"] + ref["greedy_generate"]), npy("ref_full_logits.npy")[0],
          "no-cache forward over prompt + generated")
    prompts = [ref["prompt_a"], ref["prompt_b"]]
    if "prompt_long" in ref:  # longer than one attention query block
        close(forward(ref["prompt_long"]), npy("ref_logits_long.npy")[0], "long prompt logits")
        prompts.append(ref["prompt_long"])
    gen = generate(model, prompts, ref["n_new"])
    assert gen.tokens[0].tolist() == ref["greedy_generate"]
    assert gen.tokens[1].tolist() == ref["greedy_generate_b"]
    if "prompt_long" in ref:
        assert gen.tokens[2].tolist() == ref["greedy_generate_long"]
    close(gen.decode_logits[0], npy("ref_decode_logits.npy"), "decode logits (KV cache)")
    return ref, model.config


def test_the_repo_fixtures_are_there():
    """The repository carries its fixtures: missing ones fail here, they never skip."""
    assert REPO_NAMES, (f"no reference checkpoints in {os.path.abspath(REPO_FIXTURES)} "
                        "(missing, or no */ref.json in it): the repository carries them; "
                        "see tests/fixtures/README.md")


@pytest.mark.parametrize("name", REPO_NAMES or ["(no fixtures)"])
def test_reference_matches_transformers(name):
    assert REPO_NAMES, f"no reference checkpoints in {os.path.abspath(REPO_FIXTURES)}"
    check_against_transformers(os.path.join(REPO_FIXTURES, name))


def test_the_fixtures_cover_real_checkpoint_shapes():
    """Each case the fixtures exist for is really in them (see make_fixtures.SPECS)."""
    cfg = {n: CheckpointReader(os.path.join(REPO_FIXTURES, n)).config for n in REPO_NAMES}
    assert set(cfg) >= {"qwen3-tiny", "qwen3-moe-tiny", "qwen3-mqa-bf16-tied",
                        "qwen3-moe-mixed-sharded", "qwen3-chat", "llama-bias-llama3",
                        "qwen2-bias-linear-tied"}
    assert cfg["qwen3-tiny"].num_kv_heads < 4  # fewer kv heads than tp=4: replication
    mqa = cfg["qwen3-mqa-bf16-tied"]
    assert mqa.num_kv_heads == 1 and mqa.num_heads * mqa.head_dim != mqa.hidden_size
    assert mqa.num_layers % 2 == 1 and mqa.tie_word_embeddings and mqa.dtype == "bfloat16"
    mqa_dir = os.path.join(REPO_FIXTURES, "qwen3-mqa-bf16-tied")
    reader = CheckpointReader(mqa_dir)
    assert "lm_head.weight" not in reader.files[0].entries
    assert reader.stored_dtype("model.embed_tokens.weight").name == "bfloat16"
    with open(os.path.join(mqa_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)  # published-checkpoint key style as the main config
    assert "rope_theta" in raw and "torch_dtype" in raw and "rope_parameters" not in raw
    mixed = cfg["qwen3-moe-mixed-sharded"]
    assert not mixed.norm_topk_prob and mixed.num_layers % 2 == 1
    assert [mixed.is_moe_layer(i) for i in range(mixed.num_layers)] == \
        [False, True, False, False, False, True, False]  # sparse step 2, layer 3 dense
    sharded = CheckpointReader(os.path.join(REPO_FIXTURES, "qwen3-moe-mixed-sharded"))
    assert len(sharded.files) > 1
    assert os.path.isfile(os.path.join(REPO_FIXTURES, "qwen3-moe-mixed-sharded",
                                       "model.safetensors.index.json"))


def test_the_llama_and_qwen2_fixtures_exercise_their_switches():
    """Llama: biases on q, k, v, o, gate, up, down, no q/k norm, no head_dim in config.json,
    untied, llama3 RoPE scaling with a frequency in each of its three regimes; Qwen2:
    q/k/v biases only, linear scaling, tied, fewer kv heads than tp=4."""
    from mpipar.model.layers import rope_inv_freq
    llama = CheckpointReader(os.path.join(REPO_FIXTURES, "llama-bias-llama3"))
    names = set(llama.files[0].entries)
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"model.layers.0.{proj}.bias" in names, proj
    assert not any("q_norm" in n or "k_norm" in n for n in names)
    assert "lm_head.weight" in names
    c = llama.config
    with open(os.path.join(REPO_FIXTURES, "llama-bias-llama3", "config.json")) as f:
        assert "head_dim" not in json.load(f)
    rs = c.rope_scaling_dict
    ratio = rope_inv_freq(np, c.head_dim, c.rope_theta) / rope_inv_freq(
        np, c.head_dim, c.rope_theta, rs)
    assert ratio[0] == 1 and ratio[-1] == rs["factor"] and (
        (ratio > 1) & (ratio < rs["factor"])).any(), ratio
    qwen2 = CheckpointReader(os.path.join(REPO_FIXTURES, "qwen2-bias-linear-tied"))
    names = set(qwen2.files[0].entries)
    assert "model.layers.0.self_attn.k_proj.bias" in names
    assert not any(n.endswith(("o_proj.bias", "mlp.down_proj.bias")) or "q_norm" in n
                   for n in names)
    assert "lm_head.weight" not in names and qwen2.config.tie_word_embeddings
    assert qwen2.config.rope_scaling_dict["rope_type"] == "linear"
    assert qwen2.config.num_kv_heads < 4 and qwen2.config.num_layers % 2 == 1


def test_chat_fixture_tokenizer_and_eos():
    """Text encodes as transformers encoded it, and greedy decoding reaches EOS."""
    folder = os.path.join(REPO_FIXTURES, "qwen3-chat")
    ref = json.load(open(os.path.join(folder, "ref.json"), encoding="utf-8"))
    tok = load_tokenizer(folder)
    assert tok.encode(ref["text_a"]) == ref["prompt_a"]
    eos = ref["eos_token_ids"]
    assert ref["greedy_generate"][ref["eos_step"]] == eos[0]
    assert eos[0] not in ref["greedy_generate"][:ref["eos_step"]]
    with open(os.path.join(folder, "generation_config.json"), encoding="utf-8") as f:
        assert json.load(f)["eos_token_id"] == eos
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        assert "chat_template" in json.load(f)
    assert len(ref["chat_prompt_ids"]) > len(tok.encode(ref["chat_messages"][1]["content"]))


def shared_names():
    return fixture_names(SHARED)


@pytest.mark.skipif(not shared_names(), reason=f"no external fixtures at {SHARED} "
                    "(a second check beside the repo's own; set MPIPAR_SHARED_FIXTURES)")
@pytest.mark.parametrize("name", shared_names() or ["none"])
def test_reference_matches_external_fixtures(name):
    check_against_transformers(os.path.join(SHARED, name))
