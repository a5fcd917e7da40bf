"""The cost model: one home per formula, pure functions of a config, a layout and a dtype.

    memory.py    parameters, weights and KV-cache bytes per rank
    traffic.py   bytes between ranks: the seed's formulas and the exact per-rank
                 prediction the ledger is checked against
    work.py      FLOPs and bytes read of one forward
    machine.py   machine descriptions (machines/*.json)
    time.py      seconds of a forward, TTFT, TPOT, throughput
    plan.py      the deployment planner: python -m mpipar.cost.plan

Imports point down only: cost reads parallel/ (what a rank holds), layout, model and
comm; nothing below imports cost. The planner without ``--machine`` starts no MPI.
"""
