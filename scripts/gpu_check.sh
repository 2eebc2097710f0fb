#!/usr/bin/env bash
# One prepared check of the GPU path (issue 15), sized to finish in under 8 minutes on one GPU:
#   1. the tests that take the `device` fixture, on CUDA (AMP step, float32 statistics, flows);
#   2. scripts/benchmark_speed.py at 384 px (float32 and AMP steps, Phase II fit, peak memory);
#   3. the prostate demo at 384 px, 2 epochs per phase, AMP on (the configs' CUDA default),
#      with each phase's wall time, peak GPU memory (nvidia-smi) and the evaluation's Dice.
# Everything is written to $OUT (default ./gpu_check_out): summary.md, summary.json, logs.
#
#   bash scripts/gpu_check.sh
#   PYTHON=/path/to/python OUT=/tmp/check bash scripts/gpu_check.sh
#
# Needs a Python with a CUDA build of torch and msf_monai installed (`MSF_TORCH_CONSTRAINTS=
# bash scripts/setup_env.sh` on a machine with network makes .venv so). GPU_CHECK_ALLOW_CPU=1
# with SIZE=32 runs the same steps on CPU (the test suite does, to keep this script working;
# GPU_CHECK_LIMIT_SCALE multiplies the steps' time limits there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu_check_out}
SIZE=${SIZE:-384}
EPOCHS=${EPOCHS:-2}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        echo "gpu_check: $PYTHON has no CUDA device (torch.cuda.is_available() is false); nothing checked" >&2
        exit 2
    fi
    echo "gpu_check: no CUDA device; running the steps on CPU (GPU_CHECK_ALLOW_CPU=1)"
fi
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' | tee "$OUT/device.txt"

phase_times="$OUT/phases.tsv"
: > "$phase_times"
sampler_pid=
start_sampler() {  # peak GPU memory of whatever runs meanwhile, sampled every 200 ms
    sampler_pid=
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$1.gpu_mem" 2>/dev/null &
        sampler_pid=$!
    fi
}
stop_sampler() {
    if [ -n "$sampler_pid" ]; then kill "$sampler_pid" 2>/dev/null || true; wait "$sampler_pid" 2>/dev/null || true; fi
}
step() {  # step NAME TIMEOUT_S COMMAND...: runs, logs to $OUT/NAME.log, records wall time and status
    local name=$1 limit=$(( $2 * ${GPU_CHECK_LIMIT_SCALE:-1} ))
    shift 2
    echo "== $name: $*"
    start_sampler "$name"
    local t0 rc=0
    t0=$(date +%s%N)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    stop_sampler
    printf '%s\t%s\t%s\n' "$name" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$rc" >> "$phase_times"
    tail -n 3 "$OUT/$name.log"
    [ "$rc" = 0 ] || echo "   $name exited with status $rc (log: $OUT/$name.log)"
}

bundle="$OUT/bundle"
rm -rf "$bundle"
cp -r bundles/prostate "$bundle"
rm -rf "$bundle/models" "$bundle/logs" "$bundle/eval"
common=(--bundle_root "$bundle" --image_size "$SIZE" --amp auto)

# GPU_CHECK_TESTS / GPU_CHECK_SPEED_ARGS narrow the first two steps (the CPU run of the test suite)
read -r -a tests <<< "${GPU_CHECK_TESTS:-tests/unit/test_accelerator.py tests/unit/test_flow_stack.py}"
read -r -a speed_args <<< "${GPU_CHECK_SPEED_ARGS:---repeats 5 --warmup 2}"
step tests 75 "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}"
step benchmark_speed 120 "$PYTHON" scripts/benchmark_speed.py --sizes "[$SIZE]" --flow_fit_rounds 1 \
    --output "$OUT/benchmark_speed.json" "${speed_args[@]}"
step phase1 80 "$PYTHON" -m monai.bundle run --config_file "$bundle/configs/phase1.json" "${common[@]}" --epochs "$EPOCHS" --resume false
step phase2 40 "$PYTHON" -m monai.bundle run --config_file "$bundle/configs/phase2.json" --bundle_root "$bundle" --image_size "$SIZE" --epochs 20 --resume false
step phase3 80 "$PYTHON" -m monai.bundle run --config_file "$bundle/configs/phase3.json" "${common[@]}" --epochs "$EPOCHS" --resume false
step evaluate 45 "$PYTHON" -m monai.bundle run --config_file "$bundle/configs/evaluate.json" "${common[@]}"

"$PYTHON" - "$OUT" "$bundle" <<'EOF'
import json, sys
from pathlib import Path

out, bundle = Path(sys.argv[1]), Path(sys.argv[2])
summary = {"device": (out / "device.txt").read_text().strip(), "steps": {}}
for line in (out / "phases.tsv").read_text().splitlines():
    name, ms, rc = line.split("\t")
    mem = out / f"{name}.gpu_mem"
    values = [float(v) for v in mem.read_text().split() if v.strip()] if mem.is_file() else []
    summary["steps"][name] = {"seconds": int(ms) / 1000, "exit_status": int(rc), "peak_gpu_memory_mib": max(values) if values else None}
speed = out / "benchmark_speed.json"
if speed.is_file():
    summary["benchmark_speed"] = json.loads(speed.read_text())
evals = sorted((bundle / "eval").glob("*_summary.json")) if (bundle / "eval").is_dir() else []
if evals:
    summary["evaluation"] = json.loads(evals[0].read_text())
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
lines = [f"# GPU check: {summary['device']}", "", "| step | wall time | exit status | peak GPU memory (nvidia-smi, MiB) |", "|---|---|---|---|"]
for name, s in summary["steps"].items():
    peak = "-" if s["peak_gpu_memory_mib"] is None else f"{s['peak_gpu_memory_mib']:.0f}"
    lines.append(f"| {name} | {s['seconds']:.1f} s | {s['exit_status']} | {peak} |")
if "benchmark_speed" in summary:
    lines += ["", "benchmark_speed.py:", ""]
    for size, res in summary["benchmark_speed"].get("results", {}).items():
        for name, r in res.items():
            if isinstance(r, dict) and "median_s" in r:
                lines.append(f"- {size} {name}: {r['median_s'] * 1000:.1f} ms")
            elif name == "phase2":
                lines.append(f"- {size} Phase II flow fit per 1,000 slices: {r['flow_fit_s_per_1000_slices']:.1f} s jointly, "
                             f"{r['flow_fit_sequential_s_per_1000_slices']:.1f} s one after another")
            elif name == "peak_memory_mb":
                lines.append(f"- {size} peak memory: {r:.0f} MB")
if "evaluation" in summary:
    lines += ["", "Evaluation (demo data, 2 epochs per phase; a smoke check, not a result):", "",
              "```", json.dumps({k: v for k, v in summary["evaluation"].items() if k in ("channels", "sites", "split")}, indent=1, default=str)[:3000], "```"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
failed = [n for n, s in summary["steps"].items() if s["exit_status"] != 0]
sys.exit(1 if failed else 0)
EOF
