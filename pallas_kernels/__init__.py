"""The project's kernels, each beside the plain-jnp reference it is tested against.

Knows nothing of meshes or models. Packages:
  embedding_bag/  Pallas: table-batched lookup + pooling of every feature of a stacked table
  fused_update/   Pallas: backward + sparse optimizer (SGD, Adagrad, row-wise Adagrad, Adam)
                  on the touched rows in place, stochastic rounding for bf16/fp16 tables
  cpu/            C++ through the XLA FFI, for CPU: the pooled lookup, the fused row-wise
                  Adagrad update, sgemm (OpenBLAS) and pairwise dot products
The Pallas kernels have a TPU (Mosaic) and a GPU (Triton) flavour (`platform`), block
sizes in a frozen dataclass, and tests in interpret mode (`tests/test_pallas_kernels.py`);
the CPU kernels are built by `pip install` (`setup.py`) and tested against
`cpu/reference.py` (`tests/test_cpu_kernels.py`). Which of them a step runs is decided
in one place above this package (`recsys.kernels`).
"""
