#!/usr/bin/env bash
# Installs (scripts/setup_env.sh), then runs a bundle end to end on its built-in synthetic
# multi-site demo data: Phase I, Phase II, Phase III, and the evaluation of the Phase I and
# Phase III models on every site, followed by a per-site Dice table.
#
#   bash scripts/demo.sh                   # the prostate MRI bundle
#   bash scripts/demo.sh fundus            # the fundus optic disc/cup bundle
#   bash scripts/demo.sh prostate --epochs 2   # extra settings go to every config that has them
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=prostate
if [ $# -gt 0 ] && [ -d "bundles/$1" ]; then
    bundle=$1
    shift
fi
case "$bundle" in
    prostate) source_site=SiteA ;;
    fundus) source_site=Domain1 ;;
    *) echo "unknown bundle: $bundle" >&2; exit 2 ;;
esac
bash scripts/setup_env.sh
configs="bundles/$bundle/configs"
# the extra settings go to the configs that have them (--epochs to the phases, not to evaluate);
# a setting that no config has stops the demo before any work
for_config() {
    .venv/bin/python -c 'import sys; from msf_monai.bundle import arguments_for
c = sys.argv[1]; d = c.rsplit("/", 1)[0]
sys.stdout.write("".join(a + "\0" for a in arguments_for(c, sys.argv[2:], [f"{d}/{p}.json" for p in ("phase1", "phase2", "phase3", "evaluate")])))' "$@"
}
run() {
    local args=()
    mapfile -d '' args < <(for_config "$configs/$1.json" "${@:2}")
    .venv/bin/python -m monai.bundle run --config_file "$configs/$1.json" "${args[@]}"
}
for_config "$configs/phase1.json" "$@" >/dev/null || exit 1
start=$(date +%s)
# the demo trains every phase afresh (--resume false), also when it ran before; a phase run by
# hand continues an interrupted run instead (see "Interruptions" in README.md)
run phase1 --resume false "$@"
run phase2 --resume false "$@"
run phase3 --resume false "$@"
echo "phases I-III finished in $(( $(date +%s) - start )) s"
run evaluate --checkpoint "bundles/$bundle/models/phase1_model.pt" "$@"
run evaluate --checkpoint "bundles/$bundle/models/model.pt" "$@"
echo "demo finished in $(( $(date +%s) - start )) s"
.venv/bin/python -m msf_monai.report "bundles/$bundle/eval/phase1_model_summary.json" \
    "bundles/$bundle/eval/model_summary.json" --source_site "$source_site"
