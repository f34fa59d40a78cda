"""Device meshes with named axes, sharding plans and the planner, shard_map lookups and
the collectives that carry them (with compression).

Depends on `pallas_kernels` only; knows nothing of models. The single-device training
core in `recsys` runs without it; the sharded strategies land here next.
"""
