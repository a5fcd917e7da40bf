"""Every MPI message tag of mpipar, once.

Point-to-point messages match on (communicator, source, tag), so two kinds of traffic
that could meet between the same pair of ranks on the same communicator need different
tags. The collectives run on the TP/PP/EP groups, the serving control plane on the world
(or a disaggregated job's link); tags keep them apart even where groups coincide.
"""

P2P_DEFAULT = 0           # comm/p2p.py when a caller names none
ACTIVATION = 11           # parallel/pp.py: a stage's activation to the next stage
STEP = 31                 # serving: a step (or an end / KV-handoff order) from world rank 0
RESULT = 32               # serving: a step's sampled tokens back to world rank 0
KV_PIECE = 33             # serve/handoff.py: a piece of a prompt's K/V, prefill -> decode
KV_ACK = 34               # serve/handoff.py: "every piece of transfer X is in", -> rank 0
RING = 0x5A11             # comm/ring.py: every ring step
# comm/recursive_doubling.py: fold in, exchange, unfold
RECURSIVE_DOUBLING = (RING + 1, RING + 2, RING + 3)
