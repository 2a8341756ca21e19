#!/usr/bin/env bash
# Nightly entry point on a Ray cluster: segment the new or changed scenes in SCENES (and its
# sub-folders, mirrored) into OUT. OUT stays the same night after night: its run-manifest.json lets
# each run skip the scenes already done, and runs/ keeps one record per night.
# A STAC API search saved in CONFIG (its `stac_api:` section: url, collections, bbox, datetime,
# query or filter, max_items) adds every Item it finds; SCENES `-` runs that search alone:
#   nightly.sh - /data/out /data/configs/s2-search.yaml   # only the Items the search finds
# The one place the nightly command lives: the README's `ray job submit` and the KubeRay manifests
# (jobs/rayjob.yaml, jobs/raycronjob.yaml) all run `bash jobs/nightly.sh SCENES OUT`.
# RAY_ADDRESS=auto joins the running cluster instead of starting a local one (under `ray job
# submit`, Ray sets RAY_ADDRESS itself). Without CONFIG, geoseg's packaged default config and models.
set -euo pipefail
SCENES=${1:?usage: nightly.sh SCENES|- OUT [CONFIG]}
OUT=${2:?usage: nightly.sh SCENES|- OUT [CONFIG]}
CONFIG=${3:-}
export RAY_ADDRESS=${RAY_ADDRESS:-auto}
if [[ $SCENES == - ]]; then
    [[ -n $CONFIG ]] || { echo "nightly.sh: SCENES '-' needs a CONFIG with a stac_api: search" >&2; exit 2; }
    args=(--out "$OUT")
else
    args=("$SCENES" --out "$OUT" --recursive)
fi
if [[ -n $CONFIG ]]; then
    args+=(--config "$CONFIG")
fi
exec geoseg run "${args[@]}"
