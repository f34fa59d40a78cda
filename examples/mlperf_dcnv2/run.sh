#!/usr/bin/env bash
# MLPerf DLRM-DCNv2 on this host's accelerators, or on several hosts: trains on the
# materialized data in $DATA (train/ and eval/, see README.md), evaluates on MLPerf's
# cadence and stops at the target AUC.
#   DATA=/data/mlperf DEVICES=8 bash examples/mlperf_dcnv2/run.sh
#   DATA=/data/mlperf DEVICES=64 HOSTS=8 HOST_ID=$i COORDINATOR=host0:1234 bash examples/mlperf_dcnv2/run.sh
# Extra arguments go to recsys-train (e.g. --checkpoint-dir ckpt --resume).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${DATA:?set DATA to the directory holding the materialized train/ and eval/}"
: "${DEVICES:?set DEVICES to the number of accelerators over all hosts}"
metrics=${METRICS:-mlperf_metrics.json}
hosts=()
if [[ -n ${HOSTS:-} && ${HOSTS} -gt 1 ]]; then
  hosts=(--coordinator "${COORDINATOR:?set COORDINATOR=HOST:PORT of host 0}" --num-processes "$HOSTS"
    --process-id "${HOST_ID:?set HOST_ID to this host's index}")
fi
python "$here/mlperf.py" train --data "$DATA" --devices "$DEVICES" -- "${hosts[@]}" --metrics-out "$metrics" "$@"
