"""The continuous-batching scheduler alone (no model): budgets, admission, preemption,
prefix sharing, stop rules. A fake model answers every sampled entry with token 7."""

import pytest

from mpipar.serve.request import Request, SamplingParams
from mpipar.serve.scheduler import Scheduler, Seq


def make(rid, prompt, max_tokens=4, stop=(), seq_id=None):
    req = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens))
    return Seq(req, seq_id if seq_id is not None else int(rid), 0, 0, 0, list(prompt),
               frozenset(stop))


class Harness:
    def __init__(self, **kw):
        args = dict(replicas=1, num_blocks=8, block_size=4, max_num_batched_tokens=16,
                    max_num_seqs=8, max_model_len=64)
        args.update(kw)
        self.s = Scheduler(**args)
        self.by_seq_id = {}

    def add(self, seq):
        self.by_seq_id[seq.seq_id] = seq
        self.s.add(seq)
        return seq

    def step(self, lane=0, token=7):
        entries = self.s.schedule(lane)
        tokens = [[token] * sum(e.sampling is not None for e in rep) for rep in entries]
        return entries, self.s.update(self.by_seq_id, entries, tokens)


def test_decodes_first_then_chunked_prefill_under_the_budget():
    h = Harness(max_num_batched_tokens=6, num_blocks=16)
    a = h.add(make("0", range(1, 4)))
    entries, outs = h.step()
    assert [(e.seq_id, len(e.tokens), e.sampling is not None) for e in entries[0]] == [(0, 3, True)]
    b = h.add(make("1", range(10, 24)))  # 14 tokens: chunks of the budget left
    entries, _ = h.step()
    assert [(e.seq_id, e.start, len(e.tokens)) for e in entries[0]] == [(0, 3, 1), (1, 0, 5)]
    assert entries[0][1].sampling is None and b.num_computed == 5
    entries, _ = h.step()
    assert [(e.seq_id, e.start, len(e.tokens)) for e in entries[0]] == [(0, 4, 1), (1, 5, 5)]
    a_blocks = list(a.table)
    entries, outs = h.step()
    assert [(e.seq_id, e.start, len(e.tokens)) for e in entries[0]] == [(0, 5, 1), (1, 10, 4)]
    assert entries[0][1].sampling is not None  # the prompt's last chunk samples
    assert outs[0].finished and outs[0].finish_reason == "length" and a.generated == 4
    assert a_blocks == [7, 8]  # admitted mid-pool, grew into the next block
    assert b.table == [11, 12, 13, 14]  # the middle of the longest run, after a's
    assert h.s.pools[0].ref[7:15] == [0, 0, 0, 0, 1, 1, 1, 1]  # a's blocks came back


def test_admission_waits_for_blocks_and_preemption_frees_the_newest():
    h = Harness(num_blocks=4, max_num_batched_tokens=32)
    a = h.add(make("0", range(7), max_tokens=6))  # 7 tokens: 2 blocks
    b = h.add(make("1", range(20, 27), max_tokens=6))  # 2 blocks
    c = h.add(make("2", range(40, 43)))  # does not fit: waits
    entries, _ = h.step()
    assert [e.seq_id for e in entries[0]] == [0, 1] and list(h.s.waiting[0]) == [c]
    entries, _ = h.step()  # positions 7: still in block 1 for both
    assert [e.seq_id for e in entries[0]] == [0, 1]
    entries, _ = h.step()  # position 8 needs a third block each: b is preempted
    assert [e.seq_id for e in entries[0]] == [0] and h.s.num_preemptions == 1
    assert list(h.s.waiting[0]) == [b, c] and b.num_computed == 0 and b.table == []
    assert b.tokens == list(range(20, 27)) + [7, 7]  # its tokens are kept
    while h.s.has_unfinished():
        h.step()
    assert a.generated == b.generated == 6 and c.generated == 4
    assert all(r == 0 for r in h.s.pools[0].ref)


def test_requests_with_a_common_prefix_share_its_blocks():
    h = Harness(num_blocks=12)
    prefix = list(range(50, 58))  # two full blocks of 4
    a = h.add(make("0", prefix + [1, 2]))
    h.step()
    b = h.add(make("1", prefix + [3]))
    entries, _ = h.step()
    eb = [e for e in entries[0] if e.seq_id == 1][0]
    assert eb.start == 8 and eb.tokens == [3]  # only the new token is computed
    assert b.table[:2] == a.table[:2] and h.s.pools[0].ref[a.table[0]] == 2
    assert h.s.prefix_hit_tokens == 8
    shared = a.table[:2]
    c = h.add(make("2", prefix))  # all cached: the last block is recomputed
    entries, _ = h.step()
    ec = [e for e in entries[0] if e.seq_id == 2][0]
    assert ec.start == 4 and c.table[0] == a.table[0] and c.table[1] != a.table[1]
    while h.s.has_unfinished():
        h.step()
    assert all(r == 0 for r in h.s.pools[0].ref)
    d = h.add(make("3", prefix + [9]))  # after everyone left, the prefix is still cached
    entries, _ = h.step()
    assert entries[0][0].start == 8 and d.table[:2] == shared


def test_stop_ids_abort_and_placement():
    h = Harness(replicas=2)
    a = h.add(make("0", [1, 2], stop=(7,)))
    b = h.add(make("1", [1, 2, 3]))
    c = h.add(make("2", [4]))
    assert (a.replica, b.replica, c.replica) == (0, 1, 0)  # fewest unfinished first
    h.s.abort("2")
    entries, outs = h.step()
    assert [len(r) for r in entries] == [1, 1]
    by_id = {o.request_id: o for o in outs}
    assert by_id["0"].finish_reason == "stop" and by_id["0"].new_token_ids == [7]
    assert by_id["2"].finish_reason == "abort" and not by_id["1"].finished
    assert set(h.s.seqs) == {"1"}


def test_lanes_hold_disjoint_requests():
    h = Harness(lanes=2, max_num_seqs=4)
    for i in range(4):
        h.add(make(str(i), [i + 1, 2, 3]))
    e0 = h.s.schedule(0)[0]  # lane 0 takes half of max_num_seqs, then waits for tokens
    e1 = h.s.schedule(1)[0]
    assert [e.seq_id for e in e0] == [0, 1] and [e.seq_id for e in e1] == [2, 3]
    assert h.s.schedule(0) == [[]]  # lane 0's requests await their token
    h.s.update(h.by_seq_id, [e0], [[7, 7]])
    assert [e.seq_id for e in h.s.schedule(0)[0]] == [0, 1]


@pytest.mark.parametrize("budget", [1, 3])
def test_every_request_finishes_under_tiny_budgets(budget):
    h = Harness(num_blocks=6, max_num_batched_tokens=budget, max_num_seqs=3)
    seqs = [h.add(make(str(i), range(i, i + 3 + 2 * i), max_tokens=3 + i)) for i in range(5)]
    for _ in range(500):
        if not h.s.has_unfinished():
            break
        h.step()
    assert all(s.generated == s.request.params.max_tokens for s in seqs)
    assert all(r == 0 for r in h.s.pools[0].ref)


def test_reserve_admits_with_the_whole_length():
    h = Harness(reserve=True, num_blocks=5, max_num_batched_tokens=4)
    a = h.add(make("0", range(6), max_tokens=3))  # 6 + 3 - 1 = 8 positions: 2 blocks
    b = h.add(make("1", range(20, 29), max_tokens=4))  # 12 positions: 3 blocks
    c = h.add(make("2", range(40, 43)))  # does not fit beside them
    h.step()
    assert a.table == [1, 2] and b.table == [] and list(h.s.waiting[0]) == [b, c]
    h.step()
    assert b.table == [0, 3, 4] and a.table == [1, 2]  # no run of 3 left: LRU blocks
    while h.s.has_unfinished():
        h.step()
    assert h.s.num_preemptions == 0 and c.generated == 4
