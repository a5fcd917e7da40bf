"""The parallel model: what each rank holds (shard.py), the TP block (tp.py), the MoE
layer (moe.py) and expert placement (eplb.py), the pipeline (pp.py), one step's forward
of this rank's part (engine.py). The bytes each rank should send: mpipar.cost.traffic."""
