"""Pallas kernels (GPU and TPU), each beside the plain-jnp reference it is tested against.

Knows nothing of meshes or models. Packages:
  embedding_bag/  table-batched lookup + pooling of every feature of a stacked table
  fused_update/   backward + sparse optimizer (SGD, Adagrad, row-wise Adagrad, Adam) on
                  the touched rows in place, stochastic rounding for bf16/fp16 tables
Each has a TPU (Mosaic) and a GPU (Triton) flavour (`platform`), a `reference.py`, block
sizes in a frozen dataclass, and tests in interpret mode (`tests/test_pallas_kernels.py`).
`recsys.lookup` / `recsys.sparse_update` dispatch to them on GPU and TPU.
"""
