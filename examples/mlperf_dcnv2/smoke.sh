#!/usr/bin/env bash
# The MLPerf DLRM-DCNv2 pipeline scaled down, on 8 simulated CPU devices: the Criteo
# Kaggle sample materialized into the multi-hot form with tables capped at 2,000 rows,
# then the benchmark's training command with a small model and batch (`mlperf.py train
# --smoke`), the planner choosing the sharding. Writes recsys-train's metrics to $1.
#   bash examples/mlperf_dcnv2/smoke.sh /tmp/mlperf_smoke.json
set -euo pipefail
metrics=${1:?usage: smoke.sh METRICS.json}
here=$(cd "$(dirname "$0")" && pwd)
sample=${RECSYS_SHARED_DATA:-$here/../../../shared/data}/criteo/kaggle_train_10k.tsv
if [[ ! -f $sample ]]; then
  echo "smoke.sh: $sample is absent (the research data is not redistributed)" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# MLPerf trains on days 0-22 and evaluates on day 23: here the first 8,000 lines and the rest.
head -n 8000 "$sample" >"$work/day_0"
tail -n +8001 "$sample" >"$work/day_23"
python "$here/mlperf.py" materialize --row-cap 2000 --out "$work/data/train" "$work/day_0"
python "$here/mlperf.py" materialize --row-cap 2000 --out "$work/data/eval" "$work/day_23"
python "$here/mlperf.py" train --data "$work/data" --devices 8 --smoke -- --no-progress --metrics-out "$metrics"
