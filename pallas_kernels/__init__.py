"""Pallas kernels (GPU and TPU), each beside the plain-jnp reference it is tested against.

Knows nothing of meshes or models. On CPU the training step uses the XLA path in
`recsys.lookup` / `recsys.sparse_update`; fused kernels land here next.
"""
