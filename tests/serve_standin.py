"""A single-process stand-in for ServeEngine (serve/engine.py), over the reference model.

Same contract as the real engine on world rank 0 (add_request, abort, has_unfinished,
step, stats, shutdown) but no MPI, no paged cache and no scheduler: every step prefills
each new request whole and decodes one token for every running one. The in-process HTTP
tests (tests/test_server_api.py) drive serve/api.py through it, so they test the HTTP
layer alone and fast; the launcher tests (tests/test_server.py) use the real engine.
"""

from __future__ import annotations

import numpy as np

from mpipar.model.layers import flatten_batch
from mpipar.model.reference import ReferenceModel
from mpipar.model.sampling import Sampler
from mpipar.serve.request import RequestError, RequestOutput, check_request


class StandinEngine:
    def __init__(self, source, max_model_len: int | None = None, eos_token_ids=()):
        self.model = ReferenceModel(source)
        self.config = source.config
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.eos = set(eos_token_ids)
        self.running: dict[str, dict] = {}
        self.aborted: set[str] = set()
        self.abort_log: list[str] = []  # every abort() of a running request
        self.steps = 0
        self.step_delay_s = 0.0  # a slower engine, for tests that need one

    def add_request(self, req) -> None:
        check_request(req, self.config.vocab_size, self.max_model_len)  # the engine's rules
        p = req.params
        if req.request_id in self.running:
            raise RequestError(f"request id {req.request_id} is in use")
        caches = self.model.new_caches(1, len(req.prompt_ids) + p.max_tokens)
        self.running[req.request_id] = {"req": req, "caches": caches, "out": [],
                                        "next": list(req.prompt_ids)}

    def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.add(request_id)
            self.abort_log.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        import time
        time.sleep(self.step_delay_s)
        self.steps += 1
        outs = []
        for rid in [r for r in self.running if r in self.aborted]:
            s = self.running.pop(rid)
            outs.append(RequestOutput(rid, [], True, "abort", len(s["req"].prompt_ids),
                                      len(s["out"])))
        self.aborted.clear()
        seqs = list(self.running.values())
        if not seqs:
            return outs
        ids, segments = flatten_batch([s["next"] for s in seqs])
        caches = [[s["caches"][layer][0] for s in seqs]
                  for layer in range(self.config.num_layers)]
        logits = self.model.logits(self.model.hidden(ids, segments, caches))
        self.last_step_tokens = len(ids)
        for s, (_, start, rows) in zip(seqs, segments, strict=True):
            req, p = s["req"], s["req"].params
            sampler = Sampler(p.temperature, p.top_p, p.seed or 0)
            tok = int(sampler.sample(np.asarray(logits[start + rows - 1:start + rows]), [0],
                                     len(s["out"]))[0])
            s["out"].append(tok)
            s["next"] = [tok]
            reason = None
            if (not p.ignore_eos and tok in self.eos) or tok in p.stop_token_ids:
                reason = "stop"
            elif len(s["out"]) >= p.max_tokens:
                reason = "length"
            outs.append(RequestOutput(req.request_id, [tok], reason is not None, reason,
                                      len(req.prompt_ids), len(s["out"])))
            if reason:
                del self.running[req.request_id]
        return outs

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": 0, "kv_blocks_used": 0,
                "kv_blocks_total": 0, "num_preemptions": 0, "prefix_cache_hit_tokens": 0,
                "last_step_tokens": getattr(self, "last_step_tokens", 0)}

    def shutdown(self) -> None:
        self.running.clear()


# ---- a model folder with a tokenizer and a chat template, for the text endpoints -------
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_text_model(model_dir: str, out_dir: str) -> str:
    """``out_dir``: links to model_dir's files plus a byte-level tokenizer.json of
    printable ASCII (ids below 100, inside any fixture's vocab) and a tokenizer_config.json
    with a Qwen-style chat template. Returns out_dir."""
    import json
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(model_dir):
        if name.endswith((".json", ".safetensors")) and not name.startswith("tokenizer"):
            dst = os.path.join(out_dir, name)
            if not os.path.exists(dst):
                os.symlink(os.path.join(model_dir, name), dst)
    alphabet = {}  # byte -> the ByteLevel character that stands for it
    for b, ch in zip(range(256), _byte_chars(), strict=True):
        alphabet[b] = ch
    chars = [alphabet[b] for b in [10, *range(32, 127)]]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>",
                   "bos_token": None}, f)
    return out_dir


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]
