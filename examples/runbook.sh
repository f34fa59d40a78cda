#!/usr/bin/env bash
# runbook.sh gpu|tpu OUT_DIR: installs the project with JAX for the platform, then runs
# examples/runbook.py there (DRY_RUN=1: nothing installed, the steps on this CPU).
set -euo pipefail
platform=${1:?usage: runbook.sh gpu|tpu OUT_DIR}
out=${2:-runbook_$platform}
cd "$(dirname "$0")/.."
if [[ ${DRY_RUN:-0} == 1 ]]; then
  exec python examples/runbook.py --platform "$platform" --dry-run --out "$out"
fi
declare -A jax_extra=([gpu]="jax[cuda12]" [tpu]="jax[tpu]")
python -m pip install -q -e ".[test]" "${jax_extra[$platform]:?platform must be gpu or tpu}"
exec python examples/runbook.py --platform "$platform" --out "$out"
