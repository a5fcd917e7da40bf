"""The tokenizer and chat template of a GGUF file's metadata (``tokenizer.ggml.*``).

``tokenizer.ggml.model = gpt2`` (byte-level BPE: ``tokens``, ``merges``, ``token_type``,
``pre``, ``bos_token_id``, ``eos_token_id``, ``add_bos_token``) is built into a
``tokenizers.Tokenizer`` the way Hugging Face's tokenizer.json describes one: a BPE model,
the split of ``tokenizer.ggml.pre`` (llama.cpp's llama-vocab.cpp) then ByteLevel, the
ByteLevel decoder; CONTROL tokens (type 3) are special added tokens, USER_DEFINED (4)
plain added tokens; BOS prepended when ``add_bos_token`` says so. Other tokenizer models
(SentencePiece ``llama``) and unknown ``pre`` splits raise GGUFTokenizerError.
"""

from __future__ import annotations

from .gguf import metadata, open_gguf


class GGUFTokenizerError(ValueError):
    pass


# tokenizer.ggml.pre -> the split before byte-level BPE (llama.cpp's llama-vocab.cpp)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
           r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?"
          r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt
    byte = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte
    if pre == "smollm":  # every digit alone, then GPT-2's split
        return pt.Sequence([pt.Digits(individual_digits=True), byte])
    regex = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "qwen2": _QWEN2}.get(pre)
    if regex is None:
        raise GGUFTokenizerError(f"tokenizer.ggml.pre = {pre!r} is not supported "
                                 f"(supported: {', '.join(PRE_TOKENIZERS)})")
    return pt.Sequence([pt.Split(Regex(regex), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` (byte-level BPE, as Hugging Face's) from the metadata
    (tokenizer.ggml.model = gpt2: tokens, merges, token_type, pre, bos/eos, add_bos)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    r = open_gguf(path)
    kind = metadata(r, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFTokenizerError(f"{path}: tokenizer.ggml.model = {kind!r}: only 'gpt2' "
                                 "(byte-level BPE) is supported")
    tokens = metadata(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in metadata(r, "tokenizer.ggml.merges", [])]
    types = metadata(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                               ignore_merges=False))
    tok.pre_tokenizer = _pre_tokenizer(metadata(r, "tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = CONTROL (special), 4 = USER_DEFINED (added, not special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types, strict=True) if k == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types, strict=True) if k == 4])
    bos = metadata(r, "tokenizer.ggml.bos_token_id")
    if metadata(r, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_meta(path: str) -> dict:
    """chat_template, bos/eos ids and texts, add_bos from the metadata (None if absent)."""
    r = open_gguf(path)
    tokens = r.fields.get("tokenizer.ggml.tokens")
    names = tokens.contents() if tokens is not None else []
    out = {"chat_template": metadata(r, "tokenizer.chat_template"),
           "add_bos": bool(metadata(r, "tokenizer.ggml.add_bos_token", False))}
    for which in ("bos", "eos"):
        i = metadata(r, f"tokenizer.ggml.{which}_token_id")
        out[f"{which}_id"] = i
        out[f"{which}_token"] = names[i] if i is not None and i < len(names) else ""
    return out
