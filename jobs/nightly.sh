#!/usr/bin/env bash
# Nightly entry point on a Ray cluster: segment the new or changed scenes in SCENES (and its
# sub-folders, mirrored) into OUT. OUT stays the same night after night: its run-manifest.json lets
# each run skip the scenes already done, and runs/ keeps one record per night.
# The one place the nightly command lives: the README's `ray job submit` and the KubeRay manifests
# (jobs/rayjob.yaml, jobs/raycronjob.yaml) all run `bash jobs/nightly.sh SCENES OUT`.
# RAY_ADDRESS=auto joins the running cluster instead of starting a local one (under `ray job
# submit`, Ray sets RAY_ADDRESS itself). Without CONFIG, geoseg's packaged default config and models.
set -euo pipefail
SCENES=${1:?usage: nightly.sh SCENES OUT [CONFIG]}
OUT=${2:?usage: nightly.sh SCENES OUT [CONFIG]}
CONFIG=${3:-}
export RAY_ADDRESS=${RAY_ADDRESS:-auto}
args=("$SCENES" --out "$OUT" --recursive)
if [[ -n $CONFIG ]]; then
    args+=(--config "$CONFIG")
fi
exec geoseg run "${args[@]}"
