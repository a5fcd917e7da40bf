"""Chat messages -> prompt text through the model folder's Jinja chat template.

The template is the one transformers' ``apply_chat_template`` renders: the
``chat_template`` of tokenizer_config.json (a string, or a list of {name, template}
where "default" is used), or a chat_template.jinja file beside it, or a file given
with ``--chat-template``. It is rendered the same way (jinja2 sandbox, trim_blocks,
lstrip_blocks, loop controls, ``raise_exception``, a ``tojson`` that keeps non-ASCII)
with ``messages``, ``add_generation_prompt=True``, ``bos_token``/``eos_token`` and the
request's ``chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking``). The rendered text
already holds the special tokens, so it is tokenized as it is.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

from ..model.gguf import gguf_path
from ..model.gguf_tokenizer import tokenizer_meta


class ChatTemplateError(ValueError):
    pass


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<|im_end|>", "lstrip": ...}
        return str(value.get("content", ""))
    return "" if value is None else str(value)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatTemplateError(f"the chat template refused the messages: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"cannot parse the chat template: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], **kwargs) -> str:
        import jinja2
        context = {"add_generation_prompt": True, **kwargs, "messages": messages,
                   "bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            return self.template.render(**context)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: "
                                    f"{type(e).__name__}: {e}") from None


def load_chat_template(folder: str | None, override: str | None = None):
    """The ChatTemplate of a tokenizer folder (or of the ``override`` file), or None."""
    config = {}
    gguf_file = gguf_path(folder) if folder else None
    if gguf_file is not None:  # the template and bos/eos texts of the GGUF metadata
        meta = tokenizer_meta(gguf_file)
        config = {"chat_template": meta["chat_template"], "bos_token": meta["bos_token"],
                  "eos_token": meta["eos_token"]}
    cfg_path = os.path.join(folder or "", "tokenizer_config.json")
    if folder and os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    source = None
    if override:
        with open(override, encoding="utf-8") as f:
            source = f.read()
    elif folder and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            source = f.read()
    else:
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source}
            source = named.get("default") or next(iter(named.values()), None)
    if not source:
        return None
    return ChatTemplate(source, _token_text(config.get("bos_token")),
                        _token_text(config.get("eos_token")))
