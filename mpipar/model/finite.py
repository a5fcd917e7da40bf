"""Non-finite activations: which layer first produced a NaN or an inf.

A checkpoint with NaN or inf weights makes every later activation non-finite, and the
argmax of NaN logits is token 0: without a check a run streams zeros. Each rank watches
the output [N, h] of every layer it runs (``check``: one ``isfinite().all()`` reduction,
kept on the device, so no host sync per layer); after generate() the program agrees on
the smallest bad layer over the world (``first_bad_layer``, one host read per layer
watched) and stops the run with one message naming it. Layers are numbered as in the
checkpoint (``model.layers.<i>``), so the smallest index is the first along the
pipeline; the logits (final norm and lm_head) count as layer L, after the last one.
"""

from __future__ import annotations


class FiniteWatch:
    """Per-layer "every output so far was finite" flags of this rank."""

    def __init__(self, xp):
        self.xp, self.flags = xp, {}                 # layer -> device bool

    def check(self, x, layer: int) -> None:
        ok = self.xp.isfinite(x).all()
        self.flags[layer] = ok if layer not in self.flags else self.flags[layer] & ok

    def first_bad_layer(self) -> int | None:
        bad = [layer for layer, ok in sorted(self.flags.items()) if not bool(ok)]
        return bad[0] if bad else None


def describe_layer(layer: int, num_layers: int) -> str:
    return f"layer {layer}" if layer < num_layers else "the logits (model.norm or lm_head)"
