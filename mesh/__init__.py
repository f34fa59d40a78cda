"""Device meshes with named axes, sharding plans and the planner, shard_map lookups and
the collectives that carry them (with compression).

Depends on `pallas_kernels` only; knows nothing of models. So far: `meshes` (named
device meshes from a short spec) and `plan` (sharding plans, their JSON schema and
validation); the shard_map lookups and collectives come next.
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
