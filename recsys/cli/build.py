"""What a run trains with, from its `RunConfig`: the devices, the model and its optimizers,
the mesh and the plan (the planning adapter), and the trainer."""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax
import numpy as np
import optax
from flax import nnx

from mesh import ShardingPlan, make_mesh, mesh_spec, plan_for_strategy, validate_plan
from mesh.meshes import simulate_cpu_devices
from mesh.planner import PlanningError
from mesh.planner_cli import calibrate
from mesh.topology import Topology, parse_bytes
from pallas_kernels.dtypes import SHORT_NAMES
from recsys.cache import CacheConfig, CachedTrainer, ShardedCachedTrainer, parse_load_factors
from recsys.cache.estimate import HitRateEstimate
from recsys.cli.config import RunConfig
from recsys.cli.data import LoadedData
from recsys.cli.errors import UsageError
from recsys.data import Dataset, train_batches
from recsys.models import DIN, DLRM, DCNv2, DeepFM, FactorizationMachine, LogisticRegression, WideDeep
from recsys.models.baselines import baseline_tables
from recsys.models.mlp import DENSE_DTYPE_NAMES
from recsys.planning import plan_model
from recsys.specs import EmbeddingConfig, InitializerSpec, LRSchedule, SparseOptimizerSpec
from recsys.training import ShardedTrainer, Trainer
from recsys.training.optimizers import dense_optimizer

# The models of `recsys.models.baselines`, whose tables take their own shapes.
BASELINES = {"lr": LogisticRegression, "fm": FactorizationMachine, "deepfm": DeepFM, "wide_deep": WideDeep}

# XLA:GPU's scatter-adds and some reductions use atomics (run-to-run differences) unless
# this is set; XLA reads it when the GPU backend starts.
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops"

# Batches whose ids estimate cache hit rates for --device-memory (half warm the cache up).
HIT_RATE_SAMPLE = 32


def xla_deterministic(deterministic: bool, flags: str) -> str:
    """`flags` (an XLA_FLAGS value) with XLA:GPU's deterministic ops turned on when asked
    for, unless the user set them; other backends read no such flag and need none."""
    if not deterministic or DETERMINISTIC_FLAG in flags:
        return flags
    return f"{flags} {DETERMINISTIC_FLAG}=true".strip()


def start_devices(config: RunConfig) -> None:
    """Before anything uses JAX: joins a multi-process run, or on CPU asks for the mesh's
    simulated devices. On CPU each process simulates its share of the devices and the
    processes talk over gloo; on GPU/TPU each uses its local devices."""
    if not config.coordinator:
        if config.sharded:
            simulate_cpu_devices(config.mesh_spec.size)
        return
    total = config.mesh_spec.size
    if total % config.num_processes:
        raise UsageError(f"{total} devices do not split over {config.num_processes} processes")
    simulate_cpu_devices(total // config.num_processes)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # a JAX without CPU collectives options: GPU/TPU runs do not need them
        pass
    jax.distributed.initialize(
        coordinator_address=config.coordinator,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )


def sparse_optimizer(config: RunConfig, steps: int | None = None) -> SparseOptimizerSpec:
    """The tables' optimizer from --optimizer, --lr, --weight-decay and --state-dtype, and
    with `steps` (the run's), its --lr-schedule and --lr-warmup."""
    schedule = LRSchedule()
    if steps is not None:
        schedule = LRSchedule(warmup_steps=config.lr_warmup, decay=config.lr_schedule, total_steps=steps)
    return SparseOptimizerSpec(
        kind=config.optimizer,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        state_dtype=SHORT_NAMES[config.state_dtype],
        schedule=schedule,
    )


def embedding_config(config: RunConfig, data: LoadedData, steps: int) -> EmbeddingConfig:
    """The data's tables, with --init and --table-dtype. Normal init at 1/sqrt(dim) starts
    the dot-product interactions off zero; a small uniform init left DLRM on Frappe
    stalled for epochs."""
    init, dtype = InitializerSpec(kind=config.init), SHORT_NAMES[config.table_dtype]
    optimizer = sparse_optimizer(config, steps)
    tables = tuple(
        dataclasses.replace(t, initializer=init, dtype=dtype, optimizer=optimizer) for t in data.config.tables
    )
    out = dataclasses.replace(data.config, tables=tables)
    return baseline_tables(config.model, out, config.embedding_dim) if config.model in BASELINES else out


def run_dense_optimizer(config: RunConfig, steps: int) -> optax.GradientTransformation:
    """The dense layers' optimizer from the --dense-* flags, for a run of `steps` steps."""
    return dense_optimizer(
        config.dense_optimizer,
        config.dense_lr,
        config.dense_weight_decay,
        schedule=config.dense_lr_schedule,
        steps=steps,
    )


def build_model(config: RunConfig, tables: EmbeddingConfig, dense_features: int) -> nnx.Module:
    rngs, dense_dtype = nnx.Rngs(config.seed), DENSE_DTYPE_NAMES[config.dense_dtype]
    if config.model in ("lr", "fm"):
        return BASELINES[config.model](tables, dense_features=dense_features, rngs=rngs)
    if config.model in BASELINES:  # a deep MLP of --top-mlp beside the weights and factors
        deep = BASELINES[config.model]
        return deep(
            tables, dense_features=dense_features, top=config.top_mlp, rngs=rngs, dense_dtype=dense_dtype
        )
    common = dict(
        dense_features=dense_features,
        bottom=config.bottom_mlp,
        top=config.top_mlp,
        rngs=rngs,
        dense_dtype=dense_dtype,
    )
    if config.model == "dlrm":
        return DLRM(tables, **common)
    if config.model == "din":
        return DIN(tables, **common)
    return DCNv2(tables, cross_layers=config.cross_layers, cross_rank=config.cross_rank, **common)


def make_trainer(config: RunConfig, tables: EmbeddingConfig, data: LoadedData, steps: int):
    """The run's trainer: one device, or the tables sharded by the run's plan; cached
    tables (--cache-load-factor, or the planner's for --device-memory) over host memory."""
    dense_opt = run_dense_optimizer(config, steps)
    # A builder, not a module: the trainers create the tables where they live (sharded,
    # or the cached ones in host memory), never whole on one device.
    build = lambda: build_model(config, tables, data.num_dense)  # noqa: E731
    cache = run_cache(config, tables) if config.cache_load_factor is not None else None
    if not config.sharded:
        if cache is not None:
            return CachedTrainer(build, dense_opt, cache, kernels=config.kernels)
        return Trainer(build(), dense_opt, kernels=config.kernels, pipeline=config.pipeline)
    mesh = run_mesh(config)
    if config.batch_size % mesh.devices.size:
        raise UsageError(
            f"--batch-size {config.batch_size} must be a multiple of the {mesh.devices.size} devices"
        )
    plan, planned_cache = choose_plan(config, tables, mesh, data.train)
    cache = cache or planned_cache
    options = dict(routing=config.routing, kernels=config.kernels)
    if cache is not None:
        return ShardedCachedTrainer(build, dense_opt, cache, plan, mesh, **options)
    return ShardedTrainer(build, dense_opt, plan, mesh, pipeline=config.pipeline, **options)


def run_cache(config: RunConfig, tables: EmbeddingConfig) -> CacheConfig:
    try:
        factors = parse_load_factors(config.cache_load_factor, [t.name for t in tables.tables])
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cache_config(config, factors)


def cache_config(config: RunConfig, factors: dict[str, float]) -> CacheConfig:
    """The cache of `factors` ({table: load factor}) with the run's policy and depth."""
    return CacheConfig(factors, policy=config.cache_policy, prefetch_depth=config.prefetch_depth)


def run_mesh(config: RunConfig) -> jax.sharding.Mesh:
    spec = config.mesh_spec
    if config.devices > 1 and config.devices != spec.size:
        raise UsageError(f"--devices {config.devices} but --mesh {config.mesh} has {spec.size} devices")
    available = jax.devices()
    if len(available) < spec.size:
        hint = (
            " (on CPU, pass --devices N before anything else uses JAX)"
            if available[0].platform == "cpu"
            else ""
        )
        raise UsageError(f"the mesh needs {spec.size} devices, {len(available)} are available{hint}")
    return make_mesh(spec, available[: spec.size])


def choose_plan(
    config: RunConfig, tables: EmbeddingConfig, mesh, train: Dataset
) -> tuple[ShardingPlan, CacheConfig | None]:
    """(--plan's file, the planner's plan (--sharding auto), or one strategy for every
    table; the tables the planner caches, if any)."""
    if config.plan:
        return load_plan(config.plan, tables, mesh), None
    if config.sharding == "auto":
        return auto_plan(config, tables, mesh, train)
    return plan_for_strategy(tables.tables, mesh_spec(mesh), config.sharding or "table_wise"), None


def load_plan(path: str, tables: EmbeddingConfig, mesh) -> ShardingPlan:
    """The ShardingPlan in a JSON file, checked against the tables and the mesh."""
    with open(path) as f:
        text = f.read()
    try:
        plan = ShardingPlan.from_json(text)
        validate_plan(plan, tables.tables, mesh_spec(mesh))
    except json.JSONDecodeError as e:
        raise UsageError(f"--plan {path} is not JSON: {e}") from None
    except ValueError as e:
        raise UsageError(f"--plan {path}: {e}") from None
    return plan


def auto_plan(
    config: RunConfig, tables: EmbeddingConfig, mesh, train: Dataset
) -> tuple[ShardingPlan, CacheConfig | None]:
    """The planner's plan for this model on this mesh, and with --device-memory the tables
    it caches. Average ids per sample come from the first training batch, cache hit rates
    from the first `HIT_RATE_SAMPLE` batches; memory from what the devices report, or
    --plan-topology, or --device-memory."""
    count = HIT_RATE_SAMPLE if config.device_memory else 1  # hit rates matter only then
    examples = [
        e for e, _ in itertools.islice(train_batches(train, config.batch_size, seed=config.seed), count)
    ]
    mean_ids = {f.name: float(np.mean(examples[0].sparse[f.name].lengths)) for f in tables.features}
    measured = None
    if config.plan_topology == "calibrate":
        if jax.process_count() > 1:  # each process would measure its own figures and plan apart
            raise UsageError(
                "--plan-topology calibrate plans from one process's measurements; with several "
                "processes pass the spec `python -m mesh.plan --calibrate` prints"
            )
        measured = calibrate(rows=1 << 18, dim=64, batch=1 << 14, repeats=3)
    elif config.plan_topology:
        measured = Topology.parse(config.plan_topology)
    planning = dict(mean_ids=mean_ids, topology=measured, routing=config.routing)
    if config.device_memory:
        planning["device_memory"] = parse_bytes(config.device_memory)
        planning["hit_rate"] = HitRateEstimate(tables, examples, config.cache_policy, config.prefetch_depth)
    try:
        result = plan_model(tables, mesh, config.batch_size, **planning)
    except PlanningError as e:
        raise UsageError(f"--sharding auto: {e}") from None
    if jax.process_index() == 0 and not config.no_progress:
        print(f"planned for {result.topology}:\n{result}", flush=True)
    if not result.cache:
        return result.plan, None
    return result.plan, cache_config(config, {t: c["load_factor"] for t, c in result.cache.items()})


def run_description(config: RunConfig) -> str:
    """What a stalled step's error says of the run: its strategy and mesh."""
    if not config.sharded:
        return "one device"
    strategy = f"plan {config.plan}" if config.plan else f"strategy {config.sharding or 'table_wise'}"
    return f"{strategy}, route {config.route}, mesh {config.mesh_spec}"
