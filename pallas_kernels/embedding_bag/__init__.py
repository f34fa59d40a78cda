"""Table-batched embedding bag: all features of a stacked table looked up in one call.

`embedding_bag` runs the TPU (`kernel_tpu`) or GPU (`kernel_gpu`) Pallas flavour;
`embedding_bag_reference` is the plain-jnp truth both are tested against.
"""

from pallas_kernels.embedding_bag.kernel import TABLE_DTYPES, BagBlockSizes, bag_lengths, embedding_bag
from pallas_kernels.embedding_bag.reference import bag_coefficients, embedding_bag_reference, stack_tables

__all__ = [
    "TABLE_DTYPES",
    "BagBlockSizes",
    "bag_coefficients",
    "bag_lengths",
    "embedding_bag",
    "embedding_bag_reference",
    "stack_tables",
]
