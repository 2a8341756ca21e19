#!/usr/bin/env bash
# Nightly entry point on a Ray cluster: segment every new scene in SCENES into OUT/<date>/.
# Run on the head node (or through `ray job submit`, see jobs/README.md); RAY_ADDRESS=auto joins
# the running cluster instead of starting a local one.
set -euo pipefail
SCENES=${1:?usage: nightly.sh SCENES_DIR OUT_ROOT [CONFIG]}
OUT_ROOT=${2:?usage: nightly.sh SCENES_DIR OUT_ROOT [CONFIG]}
CONFIG=${3:-configs/default.yaml}
export RAY_ADDRESS=${RAY_ADDRESS:-auto}
exec geoseg run "$SCENES" --out "$OUT_ROOT/$(date -u +%Y-%m-%d)" --config "$CONFIG" --resume
