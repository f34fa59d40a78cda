#!/usr/bin/env bash
# The TPU VM runbook (examples/runbook.py), for v5e, v5p and v6e, one host or each host
# of a slice: installs the project with JAX for TPU, then verifies the devices, the Pallas
# kernels compiled by Mosaic, which path each table takes, bitwise-repeatable training,
# the benchmark and the MLPerf DLRM-DCNv2 command (its run too, with DATA set). Results:
# OUT_DIR/results.json.
#   bash examples/tpu/run.sh OUT_DIR                   # from the repository root
#   DATA=/data/mlperf DEVICES=64 HOSTS=16 HOST_ID=$i COORDINATOR=host0:1234 bash examples/tpu/run.sh OUT_DIR
#   DRY_RUN=1 bash examples/tpu/run.sh OUT_DIR         # the same steps on a CPU, nothing installed
exec bash "$(dirname "$0")/../runbook.sh" tpu "$@"
