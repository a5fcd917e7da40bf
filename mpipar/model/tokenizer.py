"""Text <-> token ids through a Hugging Face ``tokenizer.json`` (the tokenizers library)."""

from __future__ import annotations

import os

from .gguf import gguf_path
from .gguf_tokenizer import build_tokenizer


class TokenizerError(ValueError):
    pass


def load_tokenizer(model_dir: str | None):
    """The folder's tokenizer.json as a ``tokenizers.Tokenizer`` (clear error otherwise);
    a .gguf file (or a folder holding one): the tokenizer of its metadata (model/gguf.py)."""
    path = os.path.join(model_dir or "", "tokenizer.json")
    gguf_file = gguf_path(model_dir) if model_dir and not os.path.isfile(path) else None
    if gguf_file is not None:
        path = gguf_file
    elif not model_dir or not os.path.isfile(path):
        where = f"in {model_dir}" if model_dir else "(no --model folder given)"
        raise TokenizerError(f"--prompt needs a tokenizer.json {where}; "
                             "use --prompt-ids for token ids")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError("--prompt needs the tokenizers package: "
                             "pip install 'mpipar[text]'") from None
    try:
        tok = build_tokenizer(path) if gguf_file else Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises plain Exception
        raise TokenizerError(f"{path}: cannot read the tokenizer: {e}") from None

    class _Text:
        def encode(self, text: str) -> list[int]:
            return tok.encode(text).ids

        def decode(self, ids) -> str:
            return tok.decode([int(i) for i in ids])

    return _Text()
