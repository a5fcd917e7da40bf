"""model/gguf.py: GGUF files written here with the gguf package's own writer and quantizers
(from the qwen3 fixtures' float weights), read back through GGUFSource; the real SmolLM2
file (``$MPIPAR_SMOLLM2``, else fetched by mpipar.fetch; skipped where it cannot be had).

K-quants (Q4_K, Q6_K): gguf.quants cannot quantize them, so their blocks are random bytes
(with finite scales) compared with gguf.quants.dequantize of the same bytes."""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
from mpi4py import MPI

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

from mpipar.model import CheckpointReader, open_model  # noqa: E402
from mpipar.model.checkpoint import CheckpointError  # noqa: E402
from mpipar.model.config import ModelConfig  # noqa: E402
from mpipar.model.gguf import GGUFSource, permute_rows  # noqa: E402
from mpipar.model.gguf_tokenizer import build_tokenizer, tokenizer_meta  # noqa: E402
from mpipar.model.gguf_writer import gguf_name, write_gguf  # noqa: E402
from mpipar.model.init import RandomWeights  # noqa: E402
from mpipar.model.reference import ReferenceModel, generate  # noqa: E402
from tests.test_real_model import GGUF as SMOL  # noqa: E402  (the one lookup: env, else fetch)
from tests.test_real_model import WHY_NOT  # noqa: E402

# max |logit - transformers' logit| on qwen3-tiny (logits O(1), 4 layers): float32 as the
# safetensors reference; F16 / BF16 weights round each weight by 2^-11 / 2^-8 relative
LOGIT_TOL = {"F32": 1e-4, "F16": 1e-2, "BF16": 8e-2}
QUANTS = ("Q8_0", "Q4_0", "Q4_1")
TEXT = "Café crème brûlée à Zürich — 東京は日本の首都です。🙂👍🏽 naïve 123"


def _tiny(fixtures_dir, name="qwen3-tiny"):
    return CheckpointReader(os.path.join(fixtures_dir, name))


def _gguf_tensor(path, gname):
    return next(t for t in gguf.GGUFReader(path).tensors if t.name == gname)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_types_equal_the_weights_and_the_logits(fixtures_dir, tmp_path, qtype):
    src = _tiny(fixtures_dir)
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_gguf(path, src, qtype)
    g = GGUFSource(path)
    assert g.config == src.config.__class__(**{**src.config.to_dict(), "name": g.config.name})
    rel = {"F32": 0, "F16": 2.0 ** -11, "BF16": 2.0 ** -8}[qtype]
    for name in g.names():
        want, got = src.read(name), g.read(name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert np.all(np.abs(got - want) <= rel * np.abs(want) + 2.0 ** -25), name
    with open(os.path.join(fixtures_dir, "qwen3-tiny", "ref.json")) as f:
        prompt = json.load(f)["prompt_a"]
    want = np.load(os.path.join(fixtures_dir, "qwen3-tiny", "ref_logits.npy"))[0]
    gen = generate(ReferenceModel(g), [prompt], 1)
    assert float(np.abs(gen.prompt_logits[0] - want).max()) < LOGIT_TOL[qtype]


@pytest.mark.parametrize("qtype", QUANTS)
@pytest.mark.parametrize("fixture", ["qwen3-tiny", "qwen3-moe-tiny"])
def test_quantized_reads_equal_ggml_dequantize_and_slices(fixtures_dir, tmp_path, qtype,
                                                          fixture):
    src = _tiny(fixtures_dir, fixture)
    path = str(tmp_path / f"{fixture}-{qtype}.gguf")
    write_gguf(path, src, qtype)
    g = GGUFSource(path)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name in g.names():
        gname, e = gguf_name(name)
        t = tensors[gname]
        whole = dequantize(t.data, t.tensor_type)
        whole = whole if e is None else whole[e]
        got = g.read(name)
        np.testing.assert_array_equal(got, whole, err_msg=name)
        if got.ndim == 2:
            assert t.tensor_type.name == qtype
            for p in range(4):  # tp=4: a column-parallel (rows) and a row-parallel shard
                r = got.shape[0] // 4
                c = got.shape[1] // 4
                np.testing.assert_array_equal(g.read(name, slice(p * r, (p + 1) * r)),
                                              got[p * r:(p + 1) * r])
                np.testing.assert_array_equal(
                    g.read(name, (slice(None), slice(p * c, (p + 1) * c))),
                    got[:, p * c:(p + 1) * c])
            np.testing.assert_array_equal(g.read(name, 3), got[3])
            np.testing.assert_array_equal(g.read(name, slice(1, 8, 3)), got[1:8:3])
    assert float(np.abs(g.read("lm_head.weight") - src.read("lm_head.weight")).max()) < 0.5


@pytest.mark.parametrize("fixture,arch", [("qwen3-tiny", "QWEN3"), ("qwen3-moe-tiny", "QWEN3MOE")])
def test_names_are_llama_cpps(fixtures_dir, fixture, arch):
    """Our HF <-> GGUF names equal the gguf package's own table (TensorNameMap, the one
    convert_hf_to_gguf.py uses), so a reader/writer pair that agree on a wrong name fails."""
    src = _tiny(fixtures_dir, fixture)
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), src.config.num_layers)
    names = src.names()
    extra = [n.replace("_proj.weight", "_proj.bias") for n in names
             if re.search(r"self_attn\.[qkv]_proj\.weight$", n)]  # qwen2's biases
    for name in names + extra:
        hf = re.sub(r"\.experts\.\d+\.", ".experts.", name)  # stacked [E, out, in]
        want = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert gguf_name(name)[0] == want, name


def _k_quant_bytes(rng, rows, cols, kind):
    """Random blocks of ``kind`` with finite f16 scales (d, dmin)."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    n = cols // block
    b = rng.integers(0, 256, (rows, n, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    where = {"Q4_K": (0, 2), "Q6_K": (size - 2,)}[kind]
    for off in where:
        b[:, :, off:off + 2] = scale
    return b.reshape(rows, n * size)


def test_k_quants_equal_ggml_dequantize(tmp_path):
    cfg = ModelConfig(vocab_size=256, hidden_size=256, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=128, intermediate_size=512)
    rng = np.random.default_rng(0)
    raw = {"model.layers.0.mlp.gate_proj.weight": (_k_quant_bytes(rng, 512, 256, "Q4_K"),
                                                   "Q4_K"),
           "model.layers.0.mlp.down_proj.weight": (_k_quant_bytes(rng, 256, 512, "Q6_K"),
                                                   "Q6_K")}
    path = str(tmp_path / "k.gguf")
    write_gguf(path, RandomWeights(cfg), "F32", raw=raw)
    g = GGUFSource(path)
    for name, (data, kind) in raw.items():
        want = dequantize(data, gguf.GGMLQuantizationType[kind])
        got = g.read(name)
        assert g.stored_type(name) == kind and np.all(np.isfinite(got))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(g.read(name, slice(100, 200)), want[100:200])
        np.testing.assert_array_equal(g.read(name, (slice(None), slice(64, 128))),
                                      want[:, 64:128])


def test_llama_qk_permutation_is_undone(fixtures_dir, tmp_path):
    src = _tiny(fixtures_dir)
    c = src.config
    path = str(tmp_path / "llama-named.gguf")
    write_gguf(path, src, "F32", arch="llama")
    for proj, heads in (("q", c.num_heads), ("k", c.num_kv_heads)):
        name = f"model.layers.1.self_attn.{proj}_proj.weight"
        w = src.read(name)
        # the file holds llama.cpp's permutation (convert_hf_to_gguf.py LlamaModel.permute)
        stored = np.asarray(_gguf_tensor(path, f"blk.1.attn_{proj}.weight").data)
        hd = w.shape[0] // heads
        ref = w.reshape(heads, 2, hd // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(stored, ref)
        assert not np.array_equal(stored, w)
        np.testing.assert_array_equal(permute_rows(w, heads), ref)
        g = GGUFSource(path, config=c)  # llama as a model_type lands on another branch
        np.testing.assert_array_equal(g.read(name), w)
        for r0, r1 in ((0, hd), (hd // 2 + 1, 2 * hd - 3), (w.shape[0] - 5, w.shape[0])):
            np.testing.assert_array_equal(g.read(name, slice(r0, r1)), w[r0:r1])
        np.testing.assert_array_equal(g.read(name, (slice(None), slice(8, 24))), w[:, 8:24])
    other = "model.layers.1.self_attn.v_proj.weight"
    np.testing.assert_array_equal(GGUFSource(path, config=c).read(other), src.read(other))


def _byte_vocab():
    """GPT-2's 256 byte characters, the ids of bytes that never occur in UTF-8 (F5..FF)
    reused for merges and a control token."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    chars = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
    tokens = [chars[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "Ã ©"]
    for i, m in zip(range(0xF5, 0xF9), merges, strict=True):
        tokens[i] = m.replace(" ", "")
    tokens[0xFF] = "<|im_end|>"
    types = [1] * 256
    types[0xFF] = 3
    return tokens, merges, types


def test_tokenizer_and_chat_template_from_metadata(fixtures_dir, tmp_path):
    from mpipar.model.tokenizer import load_tokenizer
    from mpipar.serve.chat import load_chat_template
    from mpipar.serve.options import eos_token_ids
    tokens, merges, types = _byte_vocab()
    tpl = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    folder = tmp_path / "model"
    folder.mkdir()
    path = str(folder / "tiny.gguf")
    gt = gguf.GGUFValueType
    write_gguf(path, _tiny(fixtures_dir), "F32", tokens=tokens, merges=merges,
               token_types=types,
               meta={"tokenizer.chat_template": (tpl, gt.STRING),
                     "tokenizer.ggml.eos_token_id": (0xFF, gt.UINT32)})
    for where in (path, str(folder)):
        tok = load_tokenizer(where)
        ids = tok.encode(" the thé")
        assert ids == [0xF7, 0xF5, ord("h"), 0xF8], ids
        for s in (TEXT, " the end", "a\n\n b"):
            assert tok.decode(tok.encode(s)) == s
        assert tok.encode("x<|im_end|>")[-1] == 0xFF
        chat = load_chat_template(where)
        assert chat.render([{"role": "user", "content": "hi"}]) == "<user>hi<|im_end|>"
        assert eos_token_ids(open_model(where)) == [0xFF]  # what the server stops on
    assert tokenizer_meta(path)["add_bos"] is False


def _bad(path, *words):
    with pytest.raises(CheckpointError) as e:
        GGUFSource(path)
    msg = str(e.value)
    for w in (path, *words):
        assert w in msg, (w, msg)
    return msg


def test_bad_inputs_one_clear_error(fixtures_dir, tmp_path):
    src = _tiny(fixtures_dir)
    path = str(tmp_path / "ok.gguf")
    write_gguf(path, src, "Q8_0")
    blob = open(path, "rb").read()
    for n in (len(blob) // 2, 200, 10):  # truncated in the data, the tensor infos, the header
        cut = str(tmp_path / f"cut{n}.gguf")
        open(cut, "wb").write(blob[:n])
        _bad(cut, "truncated")
    # a tensor type id no ggml knows, patched into token_embd's tensor info
    pos = blob.index(b"token_embd.weight") + len("token_embd.weight")
    n_dims = struct.unpack_from("<I", blob, pos)[0]
    patched = bytearray(blob)
    struct.pack_into("<I", patched, pos + 4 + 8 * n_dims, 999)
    bad = str(tmp_path / "badtype.gguf")
    open(bad, "wb").write(bytes(patched))
    _bad(bad, "999")
    # a type ggml knows and mpipar does not read
    odd = next(t for t in ("MXFP4", "TQ2_0", "Q8_1") if hasattr(gguf.GGMLQuantizationType, t))
    if odd == "MXFP4":
        mx = str(tmp_path / "mxfp4.gguf")
        write_gguf(mx, src, odd)
        _bad(mx, "blk.0.attn_q.weight", odd)
    arch = str(tmp_path / "gemma.gguf")
    write_gguf(arch, src, "F32", arch="gemma3")
    _bad(arch, "'gemma3'", "architecture")
    with pytest.raises(CheckpointError, match="not found"):
        GGUFSource(str(tmp_path / "none.gguf"))
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        open(two / n, "wb").write(blob)
    with pytest.raises(CheckpointError, match="2 .gguf files"):
        open_model(str(two))


def test_open_model_takes_a_gguf(fixtures_dir, tmp_path):
    path = str(tmp_path / "t.gguf")
    write_gguf(path, _tiny(fixtures_dir), "F16")
    for where in (path, str(tmp_path)):
        m = open_model(where)
        assert isinstance(m, GGUFSource) and m.config.num_layers == 4


@pytest.mark.mpi(min_size=2)
def test_each_rank_reads_its_shard(fixtures_dir, tmp_path):
    """Every rank reads its TP shards (rows of q, columns of o) of one Q4_1 file; gathered
    they are the whole tensors."""
    comm = MPI.COMM_WORLD
    path = comm.bcast(str(tmp_path / "shard.gguf") if comm.rank == 0 else None)
    if comm.rank == 0:
        write_gguf(path, _tiny(fixtures_dir), "Q4_1")
    comm.Barrier()
    g = GGUFSource(path)
    n, r = comm.size, comm.rank
    for name, axis in (("model.layers.2.self_attn.q_proj.weight", 0),
                       ("model.layers.2.self_attn.o_proj.weight", 1)):
        dim = g.shape(name)[axis]
        lo, hi = r * dim // n, (r + 1) * dim // n
        part = g.read(name, slice(lo, hi) if axis == 0 else (slice(None), slice(lo, hi)))
        whole = np.concatenate(comm.allgather(part), axis=axis)
        np.testing.assert_array_equal(whole, g.read(name))
    comm.Barrier()


# ---- the real SmolLM2 file (skipped where it is absent) -------------------------------
def _bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _reference_bpe(text, tokens, merges):
    """Textbook byte-level BPE (lowest-rank pair first) for ASCII letters, spaces and
    punctuation: independent of the tokenizers library."""
    rank = {tuple(m.split(" ", 1)): i for i, m in enumerate(merges)}
    vocab = {t: i for i, t in enumerate(tokens)}
    b2u = _bytes_to_unicode()
    ids = []
    for piece in re.findall(r" ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+", text):
        word = [b2u[b] for b in piece.encode()]
        while len(word) > 1:
            pairs = [(rank.get((a, b), 1 << 30), k) for k, (a, b) in
                     enumerate(zip(word, word[1:], strict=False))]
            best, k = min(pairs)
            if best == 1 << 30:
                break
            word[k:k + 2] = [word[k] + word[k + 1]]
        ids += [vocab[w] for w in word]
    return ids


@pytest.mark.rank0
@pytest.mark.skipif(SMOL is None, reason=WHY_NOT)
def test_smollm2_metadata_tokenizer_and_tensors():
    from mpipar.model.gguf import hf_config_dict, metadata, open_gguf
    r = open_gguf(SMOL)
    d = hf_config_dict(r, SMOL, {t.name: tuple(t.shape) for t in r.tensors})
    assert d == {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "intermediate_size": 1536, "rms_norm_eps": 1e-5, "rope_theta": 1e5,
                 "max_position_embeddings": 8192, "tie_word_embeddings": True,
                 "torch_dtype": "float32", "hidden_act": "silu"}
    tok = build_tokenizer(SMOL)
    q = "What is the capital of France?"
    ids = tok.encode(q).ids
    tokens, merges = metadata(r, "tokenizer.ggml.tokens"), metadata(r, "tokenizer.ggml.merges")
    assert ids == _reference_bpe(q, tokens, merges) == [1780, 314, 260, 3575, 282, 4649, 47]
    assert tok.decode(tok.encode(TEXT).ids) == TEXT
    meta = tokenizer_meta(SMOL)
    assert (meta["bos_token"], meta["eos_token"], meta["add_bos"]) == (
        "<|im_start|>", "<|im_end|>", False)
    assert tok.encode("<|im_start|>user\n").ids == [1, 4093, 198]
    digits = tok.encode(" 2024").ids  # tokenizer.ggml.pre = smollm: every digit alone
    assert [tok.id_to_token(i) for i in digits] == ["Ġ", "2", "0", "2", "4"], digits
    g = GGUFSource(SMOL)  # the llama config from the metadata
    assert (g.config.model_type, g.config.qk_norm, g.config.tie_word_embeddings) == (
        "llama", False, True)
    for name, kind in (("model.embed_tokens.weight", "Q8_0"),
                       ("model.layers.0.self_attn.q_proj.weight", "Q4_1"),
                       ("model.norm.weight", "F32")):
        assert g.stored_type(name) == kind
        a = g.read(name, slice(0, 64))
        assert np.all(np.isfinite(a)) and 0 < float(a.std()) < 10
