#!/usr/bin/env bash
# The GPU node runbook (examples/runbook.py): installs the project with JAX for CUDA 12,
# then verifies the devices, the Pallas kernels compiled for Triton, which path each
# table takes, bitwise-repeatable training, the kernel benchmark and the MLPerf
# DLRM-DCNv2 command (its run too, with DATA set). Results: OUT_DIR/results.json.
#   bash examples/gpu/run.sh OUT_DIR                   # from the repository root
#   DATA=/data/mlperf DEVICES=16 HOSTS=2 HOST_ID=0 COORDINATOR=host0:1234 bash examples/gpu/run.sh OUT_DIR
#   DRY_RUN=1 bash examples/gpu/run.sh OUT_DIR         # the same steps on a CPU, nothing installed
exec bash "$(dirname "$0")/../runbook.sh" gpu "$@"
