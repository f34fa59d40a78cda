"""Fused backward + sparse optimizer: touched rows updated in place, no dense gradient.

`fused_update` runs the TPU (`kernel_tpu`) or GPU (`kernel_gpu`) Pallas flavour over the
occurrences grouped by `build_segments`; `fused_update_reference` is the plain-jnp truth.
"""

from pallas_kernels.fused_update.kernel import UpdateBlockSizes, fused_update
from pallas_kernels.fused_update.optimizers import KINDS, STATE_NAMES, OptimizerKind, RowOptimizer
from pallas_kernels.fused_update.reference import fused_update_reference
from pallas_kernels.fused_update.rounding import random_bits, round_state, stochastic_round
from pallas_kernels.fused_update.segments import Segments, build_segments

__all__ = [
    "KINDS",
    "OptimizerKind",
    "STATE_NAMES",
    "RowOptimizer",
    "Segments",
    "UpdateBlockSizes",
    "build_segments",
    "fused_update",
    "fused_update_reference",
    "random_bits",
    "round_state",
    "stochastic_round",
]
