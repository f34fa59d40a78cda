"""Device meshes with named axes, sharding plans and the planner, shard_map lookups and
the collectives that carry them (with compression).

Depends on `pallas_kernels` only; knows nothing of models. Modules: `meshes` (named
device meshes from a short spec), `plan` (sharding plans, every strategy's geometry,
their JSON schema and validation), `sharded` (stacked group layouts), `routing` and
`bucketed` (moving ids and results between batch owners and row owners),
`sharded_lookup` (the forward) and `sharded_update` (the backward's routing, the owner's
update handed in), `relayout` (layout <-> logical tables on the devices, for checkpoints
and initialization), `collectives`, and the planner: `topology`, `cost`, `planner`,
`planner_cli` (`python -m mesh.plan`).
"""

from mesh.meshes import MeshSpec, make_mesh, mesh_spec
from mesh.plan import Shard, ShardingPlan, Strategy, TablePlan, plan_for_strategy, validate_plan

__all__ = [
    "MeshSpec",
    "Shard",
    "ShardingPlan",
    "Strategy",
    "TablePlan",
    "make_mesh",
    "mesh_spec",
    "plan_for_strategy",
    "validate_plan",
]
