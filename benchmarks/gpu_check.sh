#!/usr/bin/env bash
# GPU check of the Pallas kernels: on a machine with one NVIDIA GPU and JAX with
# CUDA installed (pip install -U "jax[cuda12]"), from the repository root:
#   bash benchmarks/gpu_check.sh
# 1. the kernel tests with the GPU flavour compiled (not interpreted); the TPU flavour is
#    covered by CI in interpret mode and skipped here;
# 2. achieved bandwidth of the forward lookup against the device's, next to XLA, and the
#    fused update against XLA (`python -m benchmarks.gpu`, JSON lines);
# 3. the cached step (20% of the rows on the GPU, the rest in host memory) against all
#    tables on the GPU, the transfers overlapped and not (`python -m benchmarks.cache`);
# 4. with two GPUs or more: the train pipelines (`python -m benchmarks.sharded --pipeline`)
#    and which collectives compile to async pairs beside compute (`python -m benchmarks.overlap`).
# About 3-5 minutes on an H100; the whole script is bounded at 8.
set -euo pipefail
export JAX_PLATFORMS=cuda
python -c 'import jax; assert jax.default_backend() == "gpu", jax.default_backend(); print(jax.devices()[0].device_kind)'
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_pallas_kernels.py tests/test_kernel_dispatch.py \
    -k "not tpu and not lower"
timeout 140 python -m benchmarks.gpu "$@"
timeout 90 python -m benchmarks.cache --only step --warmup 40 --steps 20 --rounds 5
if [ "$(python -c 'import jax; print(jax.device_count())')" -ge 2 ]; then
    devices=$(python -c 'import jax; print(jax.device_count())')
    timeout 60 python -m benchmarks.overlap --gpu --strategies table_wise row_wise
    timeout 90 python -m benchmarks.sharded --mesh "device=$devices" --strategies table_wise row_wise \
        --pipeline none sparse_dist semi_sync --steps 20 --rounds 5
fi
