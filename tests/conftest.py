"""Every test runs on CPU with 8 simulated devices, set before JAX initializes.

The suite compiles many programs more than once: in both pytest workers, in the CLI runs
of several tests and in the subprocesses some tests start. A persistent compilation
cache, one per test session (the workers and subprocesses inherit its directory), compiles
each of them once.
"""

import atexit
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    # The tests' small programs are compile-bound: LLVM without optimization made the
    # sharded-update and real-data tests 23-33% faster. Results do not depend on it.
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="recsys-tests-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from recsys.lookup import init_tables, lookup  # noqa: E402
from recsys.sparse import RaggedIds, pack_batch  # noqa: E402
from recsys.sparse_update import init_slots, sparse_update  # noqa: E402
from recsys.specs import EmbeddingConfig, FeatureSpec, SparseOptimizerSpec, TableSpec  # noqa: E402


def make_config(optimizer: SparseOptimizerSpec | None = None) -> EmbeddingConfig:
    """Mixed config: a shared table, mean/weighted/sequence features, two dims."""
    opt = optimizer or SparseOptimizerSpec()
    return EmbeddingConfig(
        tables=(
            TableSpec(name="a", rows=50, dim=4, optimizer=opt),
            TableSpec(name="b", rows=30, dim=4, optimizer=opt),
            TableSpec(name="c", rows=20, dim=8, optimizer=opt),
        ),
        features=(
            FeatureSpec(name="a_sum", table="a", max_ids=3),
            FeatureSpec(name="a_mean", table="a", max_ids=3, pooling="mean"),
            FeatureSpec(name="b_weighted", table="b", max_ids=2, weighted=True),
            FeatureSpec(name="c_seq", table="c", max_ids=4, pooling="none"),
            FeatureSpec(name="c_long", table="c", max_ids=40),
        ),
    )


def random_ragged(config: EmbeddingConfig, batch: int, rng: np.random.Generator, min_len: int = 0):
    out = {}
    for spec in config.features:
        rows = config.table(spec.table).rows
        lengths = rng.integers(min_len, spec.max_ids + 1, batch)
        values = rng.integers(0, rows, int(lengths.sum()))
        weights = rng.random(int(lengths.sum())).astype(np.float32) if spec.weighted else None
        out[spec.name] = RaggedIds(values, lengths, weights)
    return out


def random_batch(config: EmbeddingConfig, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(jax.numpy.asarray, pack_batch(config, random_ragged(config, batch, rng)))


@pytest.fixture
def config():
    return make_config()


def update_steps(config: EmbeddingConfig, kernels: str, steps: int = 2):
    """(tables, slots) after `steps` sparse updates through `kernels`, from the same start,
    batches and random activation gradients every time (kernel paths against XLA)."""
    update = jax.jit(sparse_update, static_argnums=0, static_argnames=("kernels",))
    tables, slots = init_tables(config, jax.random.key(0)), init_slots(config)
    for step in range(steps):
        batch = random_batch(config, 16, seed=step)
        acts = lookup(config, tables, batch, kernels="xla")
        grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(step), a.shape), acts)
        tables, slots = update(config, tables, slots, batch, grads, jnp.int32(step), kernels=kernels)
    return tables, slots


def cli_error(capsys, argv, status: int = 2) -> str:
    """Runs `recsys-train argv`, which must fail with `status` and print one error line."""
    from recsys import train

    capsys.readouterr()
    assert train.main(argv) == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recsys-train: error: "), lines
    return lines[0]
