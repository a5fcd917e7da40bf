"""Generated token ids -> text deltas, with stop strings, for one choice of a response.

The text of ids[0:n] is not the concatenation of per-token texts (byte-level BPE splits
a UTF-8 character over tokens; a tokenizer may merge spaces), so every delta is cut
from the decode of all ids so far: ``delta = decode(ids)[sent:safe]``, where ``safe``
holds back

- a trailing U+FFFD (a character whose bytes have not all arrived), and
- the last ``max(len(stop)) - 1`` characters, which may be the start of a stop string.

When a stop string appears (searched from where the previous search could not yet
see a whole one) the text ends just before it, and the request is aborted in the
engine; the finish reason is "stop" with ``stop_reason`` = that string, as in vLLM.
Without a tokenizer the text stays empty (clients read ``token_ids``).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the text sent so far
        self.stopped_by: str | None = None

    def add(self, new_ids, final: bool = False) -> str:
        """Append ids; the text delta that is now safe to send ('' if none)."""
        self.ids.extend(int(t) for t in new_ids)
        if self.tokenizer is None or self.stopped_by is not None:
            return ""
        full = self.tokenizer.decode(self.ids)
        sent = len(self.text)
        if self.stop:
            start = max(0, sent - self.hold)
            hits = [(full.find(s, start), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                at, self.stopped_by = min(hits)
                delta = full[sent:at]
                self.text += delta
                return delta
        safe = len(full)
        if not final:
            while safe > sent and full[safe - 1] == "\ufffd":
                safe -= 1
            safe = max(sent, safe - self.hold)
        delta = full[sent:safe]
        self.text += delta
        return delta
