"""Frozen, validated specs for embedding tables and the sparse features that read them.

Specs are hashable, so they can be static arguments of `jax.jit`. Every check raises a
`ValueError` naming the offending table or feature.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import jax.numpy as jnp

from pallas_kernels.dtypes import STORAGE_DTYPES
from pallas_kernels.fused_update.optimizers import OptimizerKind


def _is_dtype(value) -> bool:
    try:
        jnp.dtype(value)
    except TypeError:
        return False
    return True


class Pooling(str, enum.Enum):
    """How the ids of one bag become the feature's activation."""

    SUM = "sum"  # weighted sum of the rows: [batch, dim]
    MEAN = "mean"  # weighted sum divided by the bag length: [batch, dim]
    NONE = "none"  # no pooling, a sequence feature: [batch, max_ids, dim]


class InitKind(str, enum.Enum):
    UNIFORM = "uniform"  # U(-scale, scale); scale defaults to 1/sqrt(rows) (TorchRec's)
    NORMAL = "normal"  # N(0, scale^2); scale defaults to 1/sqrt(dim)
    ZEROS = "zeros"


def _enum(cls: type[enum.Enum], value, what: str):
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ValueError(f"{what}: {value!r} is not one of {choices}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitializerSpec:
    """How a table's rows are initialized."""

    kind: InitKind = InitKind.UNIFORM
    # Half-width (uniform) or standard deviation (normal); None picks the default above.
    scale: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", _enum(InitKind, self.kind, "initializer kind"))
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"initializer scale must be finite and > 0, got {self.scale}")


class Decay(str, enum.Enum):
    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """A factor on the learning rate by step (updates applied before it): a linear
    warm-up from 1/warmup_steps to 1 over the first `warmup_steps`, then constant, or
    decayed to 0 at `total_steps` along a half cosine or a line."""

    warmup_steps: int = 0
    decay: Decay = Decay.CONSTANT
    total_steps: int = 0  # where a decay reaches 0; unused by constant

    def __post_init__(self):
        object.__setattr__(self, "decay", _enum(Decay, self.decay, "learning-rate decay"))
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay is not Decay.CONSTANT and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"a {self.decay.value} decay needs total_steps > warmup_steps, "
                f"got {self.total_steps} and {self.warmup_steps}"
            )

    @property
    def constant(self) -> bool:
        return self.warmup_steps == 0 and self.decay is Decay.CONSTANT

    def scale(self, step) -> jnp.ndarray:
        """float32 factor of update `step` (0 for the first)."""
        t = jnp.asarray(step, jnp.float32)
        factor = jnp.float32(1)
        if self.warmup_steps:
            factor = jnp.minimum(factor, (t + 1) / self.warmup_steps)
        if self.decay is not Decay.CONSTANT:
            done = jnp.clip((t - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0, 1)
            left = 0.5 * (1 + jnp.cos(jnp.pi * done)) if self.decay is Decay.COSINE else 1 - done
            factor = factor * left
        return factor.astype(jnp.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseOptimizerSpec:
    """The optimizer applied, in place, to the rows a batch touched."""

    kind: OptimizerKind = OptimizerKind.ROWWISE_ADAGRAD
    learning_rate: float = 0.01
    # Adagrad: added inside the square root (optax); row-wise Adagrad and Adam: outside.
    eps: float = 1e-8
    # Starting value of the Adagrad accumulators (optax.adagrad's default is 0.1).
    initial_accumulator: float = 0.0
    beta1: float = 0.9  # Adam only
    beta2: float = 0.999  # Adam only
    # L2 penalty on the rows a batch touched, added to their gradient (lazy weight decay).
    weight_decay: float = 0.0
    # Storage dtype of the optimizer's state (accumulators, moments); updates compute in
    # float32 and round narrow state stochastically. bfloat16 keeps float32's range;
    # float16 saturates at 65504 and flushes squared gradients below 2^-24 (Adam's v).
    state_dtype: str = "float32"
    # The learning rate's schedule: a runtime scalar in every update path, so it costs
    # no recompile.
    schedule: LRSchedule = LRSchedule()

    def __post_init__(self):
        object.__setattr__(self, "kind", _enum(OptimizerKind, self.kind, "optimizer kind"))
        if not isinstance(self.schedule, LRSchedule):
            raise ValueError(f"optimizer schedule must be an LRSchedule, got {self.schedule!r}")
        state_dtype = (
            jnp.dtype(self.state_dtype).name if _is_dtype(self.state_dtype) else str(self.state_dtype)
        )
        if state_dtype not in STORAGE_DTYPES:
            raise ValueError(f"optimizer state_dtype {self.state_dtype!r} is not one of {STORAGE_DTYPES}")
        object.__setattr__(self, "state_dtype", state_dtype)
        for name in ("learning_rate", "eps", "initial_accumulator", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"optimizer {name} must be finite and >= 0, got {value}")
        if self.learning_rate == 0:
            raise ValueError("optimizer learning_rate must be > 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"optimizer {name} must be in [0, 1), got {value}")

    def rate(self, step):
        """The learning rate of update `step`: a Python float without a schedule (the
        update compiles as before), else a float32 scalar."""
        if self.schedule.constant:
            return self.learning_rate
        return jnp.float32(self.learning_rate) * self.schedule.scale(step)

    def rate_scale(self, step):
        """`rate(step) / learning_rate`: what the kernels take at run time."""
        return 1.0 if self.schedule.constant else self.schedule.scale(step)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TableSpec:
    """One embedding table: `rows` x `dim` values of `dtype`."""

    name: str
    rows: int
    dim: int
    dtype: str = "float32"  # storage dtype; lookups accumulate in float32
    optimizer: SparseOptimizerSpec = SparseOptimizerSpec()
    initializer: InitializerSpec = InitializerSpec()

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"table name must be a non-empty string, got {self.name!r}")
        for field in ("rows", "dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"table {self.name!r}: {field} must be a positive int, got {value!r}")
        if self.rows >= 2**31 - 1:
            raise ValueError(f"table {self.name!r}: rows={self.rows} does not fit int32 ids")
        dtype = jnp.dtype(self.dtype).name if _is_dtype(self.dtype) else str(self.dtype)
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"table {self.name!r}: dtype {self.dtype!r} is not one of {STORAGE_DTYPES}")
        object.__setattr__(self, "dtype", dtype)
        if not isinstance(self.optimizer, SparseOptimizerSpec):
            raise ValueError(f"table {self.name!r}: optimizer must be a SparseOptimizerSpec")
        if not isinstance(self.initializer, InitializerSpec):
            raise ValueError(f"table {self.name!r}: initializer must be an InitializerSpec")

    @property
    def rounds_stochastically(self) -> bool:
        """Its values or optimizer state are stored narrower than float32: updates round
        them stochastically, from bits hashed from the stored row (`recsys.sparse_update`)."""
        return self.dtype != "float32" or self.optimizer.state_dtype != "float32"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """One sparse input feature: a bag of up to `max_ids` ids per sample into `table`."""

    name: str
    table: str
    pooling: Pooling = Pooling.SUM
    # Longest bag a sample may carry; sets the static capacity of the packed batch.
    max_ids: int = 1
    # Whether the bags carry one float weight per id (weighted pooling).
    weighted: bool = False

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"feature name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "pooling", _enum(Pooling, self.pooling, f"feature {self.name!r} pooling"))
        if not isinstance(self.max_ids, int) or isinstance(self.max_ids, bool) or self.max_ids <= 0:
            raise ValueError(f"feature {self.name!r}: max_ids must be a positive int, got {self.max_ids!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddingConfig:
    """The tables and the features that read them; features may share a table."""

    tables: tuple[TableSpec, ...]
    features: tuple[FeatureSpec, ...]

    def __post_init__(self):
        object.__setattr__(self, "tables", tuple(self.tables))
        object.__setattr__(self, "features", tuple(self.features))
        if not self.tables or not self.features:
            raise ValueError("an embedding config needs at least one table and one feature")
        _check_unique("table", [t.name for t in self.tables])
        _check_unique("feature", [f.name for f in self.features])
        names = {t.name for t in self.tables}
        for feature in self.features:
            if feature.table not in names:
                raise ValueError(
                    f"feature {feature.name!r} reads unknown table {feature.table!r}; "
                    f"tables are {sorted(names)}"
                )
        unused = names - {f.table for f in self.features}
        if unused:
            raise ValueError(f"tables {sorted(unused)} are read by no feature")

    def table(self, name: str) -> TableSpec:
        for table in self.tables:
            if table.name == name:
                return table
        raise KeyError(f"unknown table {name!r}")

    def feature(self, name: str) -> FeatureSpec:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"unknown feature {name!r}")


def _check_unique(kind: str, names: list[str]) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{kind} name {name!r} appears more than once")
        seen.add(name)
