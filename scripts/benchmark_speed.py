"""What MixStyleFlow costs over plain training, measured in one process on the same batches.

For each image size (default: the prostate demo's 96 px and the paper's 384 px, batch 20):

* ``phase1``: one Phase I training step (MONAI ``SupervisedTrainer`` + ``DualDecoderIteration``);
* ``phase3_mixstyleflow``: one Phase III step (``MixStyleFlowIteration``, p = 1 so every step
  samples and mixes), and ``flow_sample_mix``: the time spent inside the MixStyleFlow layers
  (flow sampling + mixing) per step;
* one step per other style method (encoder-level layers after encoder stages 1-3, RandConv on
  the input batch), p = 1;
* ``inference``: segmentation-only forward passes, slices per second;
* ``phase2``: statistics extraction (one pass, all style layers) and flow fitting, per 1,000 slices
  (the six flows fitted jointly, as Phase II does, and one after another, as before 0.4.0);
* peak memory per image size (CUDA: allocated; CPU: the process's peak resident size so far).

The training steps of all configurations are timed in rounds (one step of each per round), so
that the machine's speed drifting during the run affects every figure alike. Every step figure
is the median of ``repeats`` rounds after ``warmup`` rounds, with its ratio to the Phase I step.
On CUDA, timings use CUDA events, and AMP steps and ``channels_last`` steps (network weights
and input batches in NHWC memory format, the Phase I and Phase III steps again) are added:
``channels_last`` is not a config setting until such a measurement shows it is faster.

    python scripts/benchmark_speed.py --sizes "[96]" --repeats 5 --output benchmark_speed.json
"""

from __future__ import annotations

import functools
import json
import platform
import resource
import statistics
import sys
import time

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.losses import DiceCELoss

from msf_monai import accelerator
from msf_monai.cli import as_bool
from msf_monai.engines import DualDecoderIteration, MixStyleFlowIteration
from msf_monai.flows import StyleFlowBank
from msf_monai.handlers import StyleStatisticsIteration, StyleStatisticsRecorder
from msf_monai.networks import DualDecoderNet, SegmentationOnlyNet
from msf_monai.styles import STYLE_LAYERS, mixstyleflow_layers

ENCODER_METHODS = ("mixstyle", "dsu", "trid", "efdm")
ENCODER_STAGES = (1, 2, 3)


class Clock:
    """Wall-clock (CPU) or CUDA-event timing, in seconds: ``start()`` then ``stop()``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._start = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize()
            return self._start.elapsed_time(end) / 1000.0
        return time.perf_counter() - self._start


def _batches(n: int, batch: int, size: int, channels: int, seed: int = 0) -> list[dict]:
    """``n`` synthetic batches: a bright square on noise, each image with its own contrast and
    brightness (so that per-image feature statistics differ, as on real data)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        label = torch.zeros(batch, 1, size, size)
        label[:, :, size // 4 : size // 2, size // 3 : 2 * size // 3] = 1
        contrast = torch.rand(batch, 1, 1, 1, generator=g) * 0.8 + 0.2
        brightness = torch.rand(batch, 1, 1, 1, generator=g) * 0.3
        noise = torch.rand(batch, channels, size, size, generator=g)
        data.append({"image": (brightness + contrast * (0.5 * noise + 0.4 * label)).clamp(0, 1), "label": label})
    return data


def _fitted_bank(net: DualDecoderNet, device: torch.device, seed: int = 0) -> StyleFlowBank:
    """A flow bank fitted (few epochs) on the statistics of random images: the cost of sampling
    does not depend on how well the flows fit."""
    channels = {k: net.image_decoder_channels[k] for k in (2, 3, 4)}
    bank = StyleFlowBank(channels).to(device)
    g = torch.Generator().manual_seed(seed)
    stats = {k: {"mean": torch.randn(200, c, generator=g), "var": torch.rand(200, c, generator=g) + 0.1} for k, c in channels.items()}
    bank.fit(stats, epochs=2, lr=1e-3, batch_size=50, log_every=0)
    return bank


def _channels_last_batch(batchdata, device=None, non_blocking=False, **kwargs):
    """MONAI's default batch preparation with the images in ``channels_last`` memory format."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    return image.contiguous(memory_format=torch.channels_last), batchdata["label"].to(device=device, non_blocking=non_blocking)


def _trainer(net, iteration, device, amp=False, prepare_batch=None, channels_last=False):
    """One training step of a real MONAI trainer for ``net``: ``step(batch)``, run one by one
    by :func:`_interleaved`. ``channels_last``: the network's weights and the input batches
    in NHWC memory format (``prepare_batch`` is then ours)."""
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        prepare_batch = _channels_last_batch
    kwargs = {"prepare_batch": prepare_batch} if prepare_batch is not None else {}
    trainer = SupervisedTrainer(
        device=device, max_epochs=1, train_data_loader=[], network=net,
        optimizer=torch.optim.AdamW(net.parameters(), 1e-4), loss_function=DiceCELoss(sigmoid=True),
        iteration_update=iteration, amp=amp, amp_kwargs=accelerator.amp_kwargs(device) if amp else None,
        decollate=False, **kwargs,
    )
    return functools.partial(iteration, trainer)


def _interleaved(steps: dict, batches, clock: Clock, warmup: int, repeats: int, before_step=None) -> dict[str, list[float]]:
    """Step times of every configuration, measured in rounds (one step of each per round), so
    that drift of the machine's speed during the run affects every figure alike. The first
    ``warmup`` rounds are not timed."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(warmup + repeats):
        batch = batches[r % len(batches)]
        for name, step in steps.items():
            if before_step is not None:
                before_step(name)
            clock.start()
            step(batch)
            elapsed = clock.stop()
            if r >= warmup:
                times[name].append(elapsed)
    return times


def _time_layers(layers: dict, device: torch.device) -> tuple[list, callable]:
    """Forward pre/post hooks that record the time spent inside each call of ``layers``."""
    per_call: list[float] = []
    clocks = {id(layer): Clock(device) for layer in layers.values()}
    handles = []
    for layer in layers.values():
        handles.append(layer.register_forward_pre_hook(lambda m, a: clocks[id(m)].start()))
        handles.append(layer.register_forward_hook(lambda m, a, o: per_call.append(clocks[id(m)].stop())))
    return per_call, lambda: [h.remove() for h in handles]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kb / 1024 if sys.platform != "darwin" else peak_kb / 2**20


def benchmark_size(size, batch, channels, device, warmup, repeats, phase2_slices, flow_epochs, methods, amp,
                   flow_fit_rounds=3, channels_last=False) -> dict:
    clock = Clock(device)
    batches = _batches(2, batch, size, channels)
    results: dict[str, dict] = {}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def record(name, times, **extra):
        results[name] = {"median_s": statistics.median(times), "times_s": times, **extra}
        print(f"  {name:<24} {results[name]['median_s'] * 1000:9.1f} ms", flush=True)

    torch.manual_seed(0)
    net = DualDecoderNet(channels, 1).to(device)
    steps = {"phase1": _trainer(net, DualDecoderIteration(), device)}
    if amp:
        steps["phase1_amp"] = _trainer(DualDecoderNet(channels, 1).to(device), DualDecoderIteration(), device, amp=True)
    bank = _fitted_bank(net, device)
    styles = mixstyleflow_layers(bank, p=1.0)
    net3 = DualDecoderNet(channels, 1, image_decoder_styles=styles).to(device)
    steps["phase3_mixstyleflow"] = _trainer(net3, MixStyleFlowIteration(), device)
    if amp:
        styles_amp = mixstyleflow_layers(bank, p=1.0)
        net3_amp = DualDecoderNet(channels, 1, image_decoder_styles=styles_amp).to(device)
        steps["phase3_mixstyleflow_amp"] = _trainer(net3_amp, MixStyleFlowIteration(), device, amp=True)
    if channels_last:  # the same steps, NHWC: the measurement that decides the format (issue 15)
        for suffix, use_amp in [("", False)] + ([("_amp", True)] if amp else []):
            steps[f"phase1_channels_last{suffix}"] = _trainer(
                DualDecoderNet(channels, 1).to(device), DualDecoderIteration(), device, amp=use_amp, channels_last=True)
            net3_cl = DualDecoderNet(channels, 1, image_decoder_styles=mixstyleflow_layers(bank, p=1.0)).to(device)
            steps[f"phase3_mixstyleflow_channels_last{suffix}"] = _trainer(
                net3_cl, MixStyleFlowIteration(), device, amp=use_amp, channels_last=True)
    for method in methods:
        layer_cls = STYLE_LAYERS[method]
        if method == "randconv":
            randconv = layer_cls(p=1.0).train()

            def prepare(batchdata, dev=None, non_blocking=False, **kw):
                return randconv(batchdata["image"].to(dev)), batchdata["label"].to(dev)

            steps[f"step_{method}"] = _trainer(DualDecoderNet(channels, 1).to(device), DualDecoderIteration(), device, prepare_batch=prepare)
        else:
            netm = DualDecoderNet(channels, 1, encoder_styles={s: layer_cls(p=1.0) for s in ENCODER_STAGES}).to(device)
            steps[f"step_{method}"] = _trainer(netm, DualDecoderIteration(), device)

    # time spent inside the MixStyleFlow layers (flow sampling + mixing), per Phase III step
    inside, remove = _time_layers(styles, device)
    marks: list[int] = []
    all_times = _interleaved(steps, batches, clock, warmup, repeats,
                             before_step=lambda name: marks.append(len(inside)) if name == "phase3_mixstyleflow" else None)
    remove()
    per_step = [sum(inside[a : a + len(styles)]) for a in marks][warmup:]
    for name, times in all_times.items():
        record(name, times)
        if name == "phase3_mixstyleflow":
            results["flow_sample_mix"] = {"median_s": statistics.median(per_step), "times_s": per_step}
            print(f"  {'flow_sample_mix':<24} {results['flow_sample_mix']['median_s'] * 1000:9.1f} ms", flush=True)

    seg = SegmentationOnlyNet(channels, 1).to(device).eval()
    inf_times = []
    with torch.no_grad():
        x = batches[0]["image"].to(device)
        for i in range(warmup + repeats):
            clock.start()
            seg(x)
            elapsed = clock.stop()
            if i >= warmup:
                inf_times.append(elapsed)
    record("inference", inf_times, slices_per_s=batch / statistics.median(inf_times))

    # Phase II: one statistics pass over phase2_slices slices, and the flow fit on them
    n_batches = max(1, phase2_slices // batch)
    loader = _batches(n_batches, batch, size, channels, seed=1)
    recorder = StyleStatisticsRecorder(layers=(2, 3, 4))
    evaluator = SupervisedEvaluator(device=device, val_data_loader=loader, network=net, iteration_update=StyleStatisticsIteration(), val_handlers=[recorder], decollate=False)
    t0 = time.perf_counter()
    evaluator.run()
    extract_s = time.perf_counter() - t0
    channels_of = {k: net.image_decoder_channels[k] for k in (2, 3, 4)}

    def fit_seconds(joint: bool, epochs: int) -> float:
        bank = StyleFlowBank(channels_of).to(device)
        t0 = time.perf_counter()
        bank.fit(recorder.stats, epochs=epochs, lr=1e-4, batch_size=20, log_every=0, joint=joint)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    # the six flows fitted jointly (the default) and one after another (before 0.4.0), in
    # alternating rounds after a short warm-up of each, so drift affects both alike
    fit_seconds(True, 2)
    fit_seconds(False, 2)
    joint_s, sequential_s = [], []
    for _ in range(max(1, int(flow_fit_rounds))):
        joint_s.append(fit_seconds(True, flow_epochs))
        sequential_s.append(fit_seconds(False, flow_epochs))
    fit_s, seq_s = statistics.median(joint_s), statistics.median(sequential_s)
    results["peak_memory_mb"] = _peak_memory_mb(device)
    scale = 1000.0 / (n_batches * batch)
    results["phase2"] = {
        "slices": n_batches * batch,
        "extract_s_per_1000_slices": extract_s * scale,
        "flow_fit_s_per_1000_slices": fit_s * scale,
        "flow_fit_sequential_s_per_1000_slices": seq_s * scale,
        "flow_fit_rounds": [{"joint_s": j, "sequential_s": q} for j, q in zip(joint_s, sequential_s)],
        "flow_epochs": flow_epochs,
    }
    print(f"  phase2 per 1000 slices: extraction {extract_s * scale:.1f} s, flow fit ({flow_epochs} epochs) {fit_s * scale:.1f} s "
          f"(six flows jointly; one after another: {seq_s * scale:.1f} s, {seq_s / fit_s:.1f} x)", flush=True)
    return results


def table(all_results: dict) -> str:
    lines = ["| size | measurement | median | ratio to Phase I step |", "|---|---|---|---|"]
    for size, res in all_results.items():
        base = res["phase1"]["median_s"]
        for name, r in res.items():
            if name == "peak_memory_mb":
                lines.append(f"| {size} | peak memory of the whole measurement | {r:.0f} MB | |")
                continue
            if name == "phase2":
                lines.append(f"| {size} | Phase II statistics extraction per 1,000 slices | {r['extract_s_per_1000_slices']:.1f} s | |")
                lines.append(f"| {size} | Phase II flow fitting per 1,000 slices ({r['flow_epochs']} epochs, six flows jointly) | {r['flow_fit_s_per_1000_slices']:.1f} s | |")
                lines.append(f"| {size} | ... the same flows fitted one after another (before 0.4.0) | {r['flow_fit_sequential_s_per_1000_slices']:.1f} s | |")
                continue
            extra = f" ({r['slices_per_s']:.0f} slices/s)" if "slices_per_s" in r else ""
            lines.append(f"| {size} | {name}{extra} | {r['median_s'] * 1000:.1f} ms | {r['median_s'] / base:.3f} |")
    return "\n".join(lines)


def main(
    sizes=(96, 384),
    batch_size: int = 20,
    channels: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    phase2_slices: int = 200,
    flow_epochs: int = 100,
    flow_fit_rounds: int = 3,
    methods=("mixstyle", "dsu", "trid", "efdm", "randconv"),
    device: str | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    output: str | None = "benchmark_speed.json",
):
    """Run the benchmark and print a markdown table.

    Args:
        sizes: image sizes (square); each must be divisible by 16.
        batch_size: images per step (paper: 20).
        channels: image channels (1: MRI, 3: fundus RGB).
        warmup, repeats: steps discarded, then timed (the median is reported).
        phase2_slices: slices for the Phase II measurement (scaled to 1,000).
        flow_epochs: flow-fitting epochs in the Phase II measurement (paper: 100).
        flow_fit_rounds: rounds of the Phase II fit, each fitting the six flows jointly (the
            default) and one after another; the medians are reported.
        methods: other style methods to time (names of ``msf_monai.styles.STYLE_LAYERS``).
        device: torch device (default: CUDA if available).
        amp: also time AMP steps (default: on CUDA only).
        channels_last: also time the Phase I and III steps (and their AMP steps) with the
            network and batches in ``channels_last`` memory format (default: on CUDA only).
        output: JSON file for every measurement (``None``: don't write).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = (dev.type == "cuda") if amp is None else as_bool(amp, "--amp")
    channels_last = (dev.type == "cuda") if channels_last is None else as_bool(channels_last, "--channels_last")
    unknown = [m for m in methods if m not in STYLE_LAYERS or m == "mixstyleflow"]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(set(STYLE_LAYERS) - {'mixstyleflow'})}")
    info = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
    }
    print(f"device {info['device']}, torch {info['torch']}, {info['threads']} threads, batch {batch_size}", flush=True)
    all_results = {}
    for size in sizes:
        print(f"size {size}x{size}:", flush=True)
        all_results[f"{size}x{size}"] = benchmark_size(int(size), batch_size, channels, dev, warmup, repeats, phase2_slices, flow_epochs, list(methods), amp, flow_fit_rounds, channels_last)
    text = table(all_results)
    print(text)
    for size, res in all_results.items():
        share = res["flow_sample_mix"]["median_s"] / res["phase3_mixstyleflow"]["median_s"]
        ratio = res["phase3_mixstyleflow"]["median_s"] / res["phase1"]["median_s"]
        print(f"{size}: flow sampling + mixing = {100 * share:.2f} % of a Phase III step (target <= 3 %); "
              f"Phase III step = {ratio:.2f} x Phase I (target <= 2.3 x)")
        for name in ("phase1", "phase3_mixstyleflow", "phase1_amp", "phase3_mixstyleflow_amp"):
            if f"{name}_channels_last" in res:
                speedup = res[name]["median_s"] / res[f"{name}_channels_last"]["median_s"]
                print(f"{size}: {name} with channels_last: {speedup:.2f} x the speed of the default memory format")
    if output:
        with open(output, "w") as f:
            json.dump({"info": info, "results": all_results}, f, indent=1, default=float)
        print(f"wrote {output}")
    return None


if __name__ == "__main__":
    from msf_monai.cli import fire_main

    fire_main(main)
