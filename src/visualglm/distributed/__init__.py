"""Several processes, one model: tensor-parallel inference under torchrun (see docs/distributed.md).

``env``: rank / world size / process group. ``tp``: the split plan and per-rank loading. ``lockstep``: rank 0
runs the program, the other ranks replay its model calls.
"""
