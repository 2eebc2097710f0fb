#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs msf_monai with its test extra into it.
# On a CPU-only machine requirements/cpu-constraints.txt keeps pip on the local CPU build of
# torch; set MSF_TORCH_CONSTRAINTS= (empty) to let pip choose torch itself (e.g. with CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
constraints=${MSF_TORCH_CONSTRAINTS-requirements/cpu-constraints.txt}
stamp=.venv/.msf_installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ requirements/cpu-constraints.txt -nt "$stamp" ]; then
    echo "installing msf_monai and its dependencies into .venv ..."
    if ! .venv/bin/python -m pip install --quiet ${constraints:+-c "$constraints"} -e ".[test]" > .venv/pip.log 2>&1; then
        cat .venv/pip.log
        echo "pip install failed (log above, also in .venv/pip.log)" >&2
        exit 1
    fi
    touch "$stamp"
fi
