"""Peak memory of each phase's training step, each measured in a fresh process.

For the bundles' "System Configuration" tables: for Phase I (``DualDecoderIteration``),
Phase III (``MixStyleFlowIteration``, p = 1, clean and stylized passes) and inference
(segmentation only), one process per phase runs ``steps`` real MONAI trainer steps (or forward
passes) at ``size`` px and ``batch`` images and reports its peak memory: on CUDA
``torch.cuda.max_memory_allocated`` (with and without AMP), on CPU the process's peak resident
size (``ru_maxrss``, which includes Python, torch and the model: about 0.4 GB before any step).

    python scripts/memory_per_phase.py --sizes "[96,384]" --batch 20
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fire

PHASES = ("phase1", "phase3", "inference")


def _measure(phase: str, size: int, batch: int, channels: int, steps: int, amp: bool, device: str) -> float:
    """Runs in the child process: peak memory in MiB."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_speed import _batches, _fitted_bank, _peak_memory_mb, _trainer

    from msf_monai.engines import DualDecoderIteration, MixStyleFlowIteration
    from msf_monai.networks import DualDecoderNet, SegmentationOnlyNet
    from msf_monai.styles import mixstyleflow_layers

    dev = torch.device(device)
    torch.manual_seed(0)
    batches = _batches(1, batch, size, channels)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if phase == "inference":
        net = SegmentationOnlyNet(channels, 1).to(dev).eval()
        with torch.no_grad(), torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
            for _ in range(steps):
                net(batches[0]["image"].to(dev))
        return _peak_memory_mb(dev)
    if phase == "phase1":
        step = _trainer(DualDecoderNet(channels, 1).to(dev), DualDecoderIteration(), dev, amp=amp)
    else:
        bank = _fitted_bank(DualDecoderNet(channels, 1), dev)
        net = DualDecoderNet(channels, 1, image_decoder_styles=mixstyleflow_layers(bank, p=1.0)).to(dev)
        step = _trainer(net, MixStyleFlowIteration(), dev, amp=amp)
    for _ in range(steps):
        step(batches[0])
    return _peak_memory_mb(dev)


def main(sizes=(96, 384), batch: int = 20, channels: int = 1, steps: int = 2, device: str | None = None,
         output: str | None = None) -> dict:
    """Measure every phase at every size (a fresh process each) and print a markdown table.

    Args:
        sizes: image sizes (square, divisible by 16).
        batch: images per step (the bundles' default: 20).
        channels: image channels (1: prostate MRI, 3: fundus RGB).
        steps: steps per measurement (the first step allocates the optimiser state).
        device: torch device (default: CUDA if available).
        output: JSON file for the figures (``None``: don't write).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    amps = (False, True) if device.startswith("cuda") else (False,)
    rows = {}
    for size in sizes:
        for phase in PHASES:
            for amp in amps:
                code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from memory_per_phase import _measure; "
                        "print(json.dumps(_measure(sys.argv[2], *map(int, sys.argv[3:7]), sys.argv[7] == 'True', sys.argv[8])))")
                done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), phase, str(size),
                                       str(batch), str(channels), str(steps), str(amp), device],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{phase} at {size} px failed:\n{done.stderr[-3000:]}")
                rows[f"{size} {phase}{' amp' if amp else ''}"] = float(done.stdout.strip().splitlines()[-1])
                print(f"{size} px {phase}{' (AMP)' if amp else ''}: {rows[f'{size} {phase}' + (' amp' if amp else '')]:.0f} MiB", flush=True)
    kind = "peak GPU memory allocated" if device.startswith("cuda") else "peak resident memory of the process"
    print(f"\n| image size | phase | {kind} |\n|---|---|---|")
    for key, value in rows.items():
        size, rest = key.split(" ", 1)
        print(f"| {size} | {rest} | {value / 1024:.1f} GiB |")
    if output:
        Path(output).write_text(json.dumps({"device": device, "batch": batch, "mib": rows}, indent=1))
    return rows


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda rows: None)  # the table is printed; the rows are for callers
