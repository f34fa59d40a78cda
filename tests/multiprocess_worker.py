"""One of two processes x 4 CPU devices training DLRM with sharded tables (run by
tests/test_multiprocess.py; each process reads only its half of every batch)."""

import sys

import jax

PROCESS, PORT, OUT = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}", num_processes=2, process_id=PROCESS)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from mesh import make_mesh, mesh_spec  # noqa: E402
from recsys.sharded_trainer import ShardedTrainer  # noqa: E402
from tests.test_sharded_training import BATCH, batches, mixed_plan, model  # noqa: E402

mesh = make_mesh("host=2,device=4")
assert [d.process_index for d in mesh.devices[PROCESS]] == [PROCESS] * 4
trainer = ShardedTrainer(
    model(), optax.adam(0.01), mixed_plan(mesh_spec(mesh), "grid", 6, "table_row_wise"), mesh
)
state, losses = trainer.init_state(), []
half = BATCH // 2
for batch in batches():
    mine = jax.tree.map(lambda x: np.asarray(x)[PROCESS * half : (PROCESS + 1) * half], batch)
    state, loss = trainer.train_step(state, trainer.shard_local_batch(mine))
    losses.append(float(loss))
tables = trainer.logical_tables(state)
# Dense parameters are replicated: every process holds a full copy.
params = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state.params))
params = {"param_" + jax.tree_util.keystr(path): np.asarray(x.addressable_data(0)) for path, x in params}
if PROCESS == 0:
    np.savez(OUT, losses=np.asarray(losses), **{f"table_{k}": v for k, v in tables.items()}, **params)
jax.distributed.shutdown()
