#!/usr/bin/env bash
# Installs (scripts/setup_env.sh) and runs the test suite. Extra arguments go to pytest.
# The tests run in MSF_TEST_WORKERS parallel processes (pytest-xdist; default 2, one per core of
# the CI machine; 0 runs them in this process, e.g. for --pdb or -p no:xdist). Most of a bundle
# test's time is Python importing torch and MONAI in its own process, which uses one core, so
# with workers each torch process gets one thread (OMP_NUM_THREADS=1 unless set) and the
# workers' thread pools do not compete. A `-n N` of your own overrides the worker count.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
workers=${MSF_TEST_WORKERS:-2}
args=()
if [ "$workers" != 0 ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    args=(-n "$workers")
fi
exec .venv/bin/python -m pytest -q "${args[@]}" "$@" tests
