#!/usr/bin/env bash
# Installs (scripts/setup_env.sh), then runs the prostate bundle end to end on its built-in
# synthetic multi-site demo data: Phase I, Phase II, Phase III, and the evaluation of the
# Phase I and Phase III models on every site. Extra arguments are passed to every phase
# (e.g. --epochs 2 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
run() { .venv/bin/python -m monai.bundle run --config_file "bundles/prostate/configs/$1.json" "${@:2}"; }
start=$(date +%s)
run phase1 "$@"
run phase2 "$@"
run phase3 "$@"
run evaluate --checkpoint bundles/prostate/models/phase1_model.pt "$@"
run evaluate --checkpoint bundles/prostate/models/model.pt "$@"
echo "demo finished in $(( $(date +%s) - start )) s"
.venv/bin/python -m msf_monai.report bundles/prostate/eval/phase1_model_summary.json bundles/prostate/eval/model_summary.json
