"""`RunConfig`: everything a `recsys-train` run is told, as one frozen, validated value.

`recsys.cli.flags` builds it from the command line; the run reads only it. The settings
that change what a run computes (`computed()`) are stored in every checkpoint, and
`--resume` refuses a checkpoint whose run differed in any of them. The devices, mesh,
plan and route may change on resume: checkpoints are plan-independent, and a run resumed
on another layout differs from the original only by float summation order.
"""

from __future__ import annotations

import dataclasses

from mesh.collectives import CommConfig
from mesh.meshes import MeshSpec
from mesh.routing import RoutingOptions
from mesh.topology import parse_bytes
from recsys.specs import OptimizerKind

# A field's metadata marks the settings that change what a run computes.
COMPUTED = {"computed": True}
# Settings added after checkpoints were first written: an older checkpoint's run used these.
ADDED_DEFAULTS = {
    "table_dtype": "fp32",
    "state_dtype": "fp32",
    "dense_dtype": "fp32",
    "validation": 0.1,
    "eval_every": None,
    "early_stop": None,
    "validation_data": None,
    "target_auc": None,
    "lr_schedule": "constant",
    "lr_warmup": 0,
    "sequence": [],
}


def _computed(default):
    return dataclasses.field(default=default, metadata=COMPUTED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run of `recsys-train`; field names are the flags' (`--dense-lr` -> dense_lr)."""

    # Data.
    data: str = _computed("synthetic")
    eval_data: str | None = _computed(None)
    holdout: float = _computed(0.2)
    label: str = _computed("label")
    dense: tuple[str, ...] = _computed(())
    sparse: tuple[str, ...] | None = _computed(None)
    ignore: tuple[str, ...] = _computed(())
    multi_hot_sep: str | None = _computed(None)
    sequence: tuple[str, ...] = _computed(())  # sparse columns read as histories (unpooled)
    delimiter: str | None = _computed(None)
    libfm_fields: str | None = _computed(None)
    encoding: str | None = _computed(None)
    rows: int | None = _computed(None)
    max_rows: int | None = _computed(None)
    min_count: int = _computed(1)
    max_ids: int | None = _computed(None)
    on_error: str = _computed("raise")
    train_samples: int = _computed(200_000)
    eval_samples: int = _computed(20_000)
    num_tables: int = _computed(8)
    # Model and optimization.
    model: str = _computed("dlrm")
    embedding_dim: int = _computed(16)
    bottom_mlp: tuple[int, ...] | None = _computed(None)  # None: 64, embedding_dim
    top_mlp: tuple[int, ...] = _computed((64, 32, 1))
    cross_layers: int = _computed(2)
    cross_rank: int = _computed(32)
    batch_size: int = _computed(256)
    steps: int | None = None  # None: --epochs over the data; the total is checked on resume
    epochs: int = 1
    # Validation: the training data's last `validation` fraction, evaluated every
    # `eval_every` steps (default with early stopping: every epoch); only split off when
    # either is set.
    validation: float = _computed(0.1)
    validation_data: str | None = _computed(None)  # instead of the training data's tail
    eval_every: int | None = _computed(None)
    early_stop: int | None = _computed(None)  # patience, in evaluations without a better log-loss
    target_auc: float | None = _computed(None)  # stop once a validation reaches it (MLPerf)
    lr: float = _computed(0.1)
    optimizer: str = _computed(OptimizerKind.ROWWISE_ADAGRAD.value)
    lr_schedule: str = _computed("constant")  # the tables' rate: constant, cosine or linear decay to 0
    lr_warmup: int = _computed(0)  # steps of the tables' linear warm-up
    weight_decay: float = _computed(1e-3)
    init: str = _computed("normal")
    dense_optimizer: str = _computed("adamw")
    dense_lr: float = _computed(1e-2)
    dense_lr_schedule: str = _computed("cosine")
    dense_weight_decay: float = _computed(1.0)
    seed: int = _computed(0)
    table_dtype: str = _computed("fp32")
    state_dtype: str = _computed("fp32")
    dense_dtype: str = _computed("fp32")
    kernels: str = "auto"
    # Bitwise-repeatable steps: on CPU and TPU always; on GPU XLA's scatter-adds are atomic
    # unless told otherwise (--xla_gpu_deterministic_ops), which this turns on.
    deterministic: bool = True
    # Sharding and processes.
    devices: int = 1
    mesh: str | None = None
    sharding: str | None = None
    plan: str | None = None
    plan_topology: str | None = None
    device_memory: str | None = None
    route: str = "auto"
    route_capacity: float = 2.0
    comm: CommConfig = CommConfig()
    # What of the next batch a step starts changes no result, so it is not computed.
    pipeline: str = "sparse_dist"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # Cache: which rows stay on the device changes no result, so none of it is computed.
    cache_load_factor: str | None = None
    cache_policy: str = "lookahead"
    prefetch_depth: int = 32
    # Checkpoints, output and supervision.
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    resume: bool = False
    metrics_out: str | None = None
    log_dir: str | None = None
    profile: int = 0
    profile_dir: str = "profile"
    no_progress: bool = False
    step_timeout: float = 300.0
    debug: bool = False

    def __post_init__(self):
        if self.bottom_mlp is None:
            object.__setattr__(self, "bottom_mlp", (64, self.embedding_dim))
        for problem in self._problems():
            raise ValueError(problem)

    def _problems(self):
        if not 0 < self.validation < 1:
            yield f"--validation takes a fraction in (0, 1), got {self.validation}"
        if self.target_auc is not None and not 0.5 < self.target_auc <= 1:
            yield f"--target-auc takes an AUC in (0.5, 1], got {self.target_auc}"
        if self.validation_data is not None and self.data == "synthetic":
            yield "--validation-data needs real --data; synthetic data holds its validation samples apart"
        if self.lr_warmup < 0:
            yield f"--lr-warmup takes a number of steps >= 0, got {self.lr_warmup}"
        if self.profile < 0:
            yield f"--profile takes a number of steps >= 0, got {self.profile}"
        if self.step_timeout < 0:
            yield f"--step-timeout must be >= 0, got {self.step_timeout:g}"
        for flag in ("lr", "dense_lr"):
            if getattr(self, flag) <= 0:
                yield f"--{flag.replace('_', '-')} must be > 0, got {getattr(self, flag)}"
        for flag in ("weight_decay", "dense_weight_decay"):
            if getattr(self, flag) < 0:
                yield f"--{flag.replace('_', '-')} must be >= 0, got {getattr(self, flag)}"
        if self.bottom_mlp[-1] != self.embedding_dim:
            yield f"--bottom-mlp must end in --embedding-dim {self.embedding_dim}, got {self.bottom_mlp}"
        if self.top_mlp[-1] != 1:
            yield f"--top-mlp must end in 1, got {self.top_mlp}"
        if self.resume and self.checkpoint_dir is None:
            yield "--resume needs --checkpoint-dir"
        if self.plan and self.sharding:
            yield "give --plan or --sharding, not both"
        if self.mesh:
            MeshSpec.parse(self.mesh)  # a ValueError naming the problem
        if self.coordinator and (self.num_processes is None or self.process_id is None):
            yield "--coordinator needs --num-processes and --process-id"
        if self.route_capacity <= 0:
            yield f"--route-capacity must be > 0, got {self.route_capacity}"
        if self.comm != CommConfig() and not self.sharded:
            yield "--comm compresses the collectives of a sharded run: add --devices, --mesh or --sharding"
        if (self.cache_load_factor is not None or self.device_memory) and self.coordinator:
            yield "cached tables train in one process: drop --coordinator, or --cache-load-factor and --device-memory"
        if self.pipeline == "semi_sync" and (self.cache_load_factor is not None or self.device_memory):
            yield "--pipeline semi_sync looks batches up ahead of the cache's admission: drop it or the cache"
        if self.device_memory:
            if self.sharding != "auto":
                yield "--device-memory plans the tables for that memory: add --sharding auto"
            if self.cache_load_factor is not None:
                yield "--device-memory lets the planner choose the cached tables: drop --cache-load-factor"
            try:
                parse_bytes(self.device_memory)
            except ValueError as e:
                yield f"--device-memory: {e}"
        if self.sequence and not self.data.startswith(("csv:", "parquet:")):
            yield "--sequence names csv or parquet columns"
        if self.eval_data is not None and self.data == "synthetic":
            yield "--eval-data needs real --data; synthetic data makes its own"

    @property
    def sharded(self) -> bool:
        """Tables sharded over a mesh (rather than on one device)."""
        return self.devices > 1 or bool(self.mesh or self.sharding or self.plan)

    @property
    def validates(self) -> bool:
        """Training evaluates on a validation split as it goes."""
        return self.eval_every is not None or self.early_stop is not None or self.target_auc is not None

    @property
    def validation_fraction(self) -> float:
        """The fraction of the training data held apart for validation (0: none, or
        --validation-data)."""
        return self.validation if self.validates and self.validation_data is None else 0.0

    @property
    def mesh_spec(self) -> MeshSpec:
        return MeshSpec.parse(self.mesh) if self.mesh else MeshSpec.flat(self.devices)

    @property
    def routing(self) -> RoutingOptions:
        return RoutingOptions(self.route, self.route_capacity, comm=self.comm)

    def computed(self) -> dict:
        """The settings that change what the run computes, as JSON (checkpoints store them)."""
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.metadata.get("computed")
        }


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value
