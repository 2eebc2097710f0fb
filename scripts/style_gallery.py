"""Stylized-image gallery: a few source images next to their stylized versions, one column per method.

Uses a trained Phase I network (``models/phase1_model.pt``) and, for MixStyleFlow, the fitted
flows (``models/style_flows.pt``). Every feature-level method is applied, with probability 1,
after image-decoder layers 2, 3, 4 of that network and the decoded image is shown (the way
MaxStyle and MixStyleFlow make their stylized images); for the encoder-level methods (MixStyle,
DSU, TriD, EFDMix) this is a visualisation of their statistics perturbation, not where they act
in training. RandConv acts on the image itself. MaxStyle's style is the adversarial one (5 Adam
steps maximising the segmentation loss); MixStyleFlow is shown at several temperatures, each
as the decoding itself (the paper's stylized image) and as the residual stylization
(``stylize_mode residual``: the input plus what the style change does to the decoding).
The network runs in eval mode here (running batch-norm statistics), so the images show the
styles, not the batch-statistics regime of a training step.

    python scripts/style_gallery.py prostate --output bundles/prostate/logs/style_gallery.png
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

FEATURE_METHODS = ("mixstyle", "dsu", "trid", "efdm")


def _source_images(parser, n_images: int):
    """``n_images`` source training slices with foreground, evenly spread over the dataset."""
    import torch

    dataset = parser.get_parsed_content("stats_dataset")
    if len(dataset) == 0:
        raise SystemExit("the source training set is empty")
    step = max(1, len(dataset) // (4 * n_images))
    picked = []
    for i in range(0, len(dataset), step):
        item = dataset[i]
        if float(torch.as_tensor(item["label"]).sum()) > 0:
            picked.append(item)
        if len(picked) == n_images:
            break
    if len(picked) < 2:
        raise SystemExit("need at least two source images with foreground for the gallery")
    images = torch.stack([torch.as_tensor(it["image"]).float() for it in picked])
    labels = torch.stack([torch.as_tensor(it["label"]).float() for it in picked])
    return images, labels


def gallery_columns(net, bank, images, labels, temperatures=(1.0, 2.0, 3.5), seed: int = 0) -> dict:
    """``{column title: images [N, C, H, W]}``: clean, reconstruction and each method's stylized version."""
    import torch
    from monai.losses import DiceCELoss

    from msf_monai.engines import MaxStyleIteration, MixStyleFlowIteration, rescale_to_reference
    from msf_monai.styles import MixStyleFlow, build_style_layer

    torch.manual_seed(seed)
    net.eval()
    columns = {"clean": images}
    with torch.no_grad():
        z = net.encode(images)
        columns["reconstruction"] = net.reconstruct(z)

    def decoded_with(layers: dict, rescale: bool = True) -> torch.Tensor:
        for k, layer in layers.items():
            net.set_style("image_decoder", k, layer.train())
        try:
            with torch.no_grad():
                decoded = net.reconstruct(z, stylize=True)
                return rescale_to_reference(decoded, images) if rescale else decoded
        finally:
            for k in layers:
                net.set_style("image_decoder", k, None)

    for name in FEATURE_METHODS:
        columns[name] = decoded_with({k: build_style_layer(name, p=1.0) for k in (2, 3, 4)})
    columns["randconv"] = build_style_layer("randconv", p=1.0).train()(images)

    class _Engine:  # what MaxStyleIteration.stylize reads
        network, loss_function = net, DiceCELoss(sigmoid=True)

    for k in (2, 3, 4):
        net.set_style("image_decoder", k, build_style_layer("maxstyle", p=1.0).train())
    try:
        columns["maxstyle (adversarial)"] = MaxStyleIteration().stylize(_Engine, z, images, labels, columns["reconstruction"])
    finally:
        for k in (2, 3, 4):
            net.set_style("image_decoder", k, None)
    if bank is not None:
        residual = MixStyleFlowIteration(stylize_mode="residual")
        for t in temperatures:
            torch.manual_seed(seed)  # the same styles for the decoded and the residual column
            layers = {k: MixStyleFlow(functools.partial(bank.sample, k, temperature=float(t)), p=1.0) for k in bank.layers}
            columns[f"MixStyleFlow T={t:g}"] = decoded_with(layers)
            torch.manual_seed(seed)
            layers = {k: MixStyleFlow(functools.partial(bank.sample, k, temperature=float(t)), p=1.0) for k in bank.layers}
            styled = decoded_with(layers, rescale=False)
            columns[f"MSF residual T={t:g}"] = residual.compose(styled, images, columns["reconstruction"])
    return columns


def save_grid(columns: dict, path: Path, title: str) -> Path:
    """One row per image, one column per entry of ``columns``, PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(columns)
    n = next(iter(columns.values())).shape[0]
    fig, axes = plt.subplots(n, len(names), figsize=(1.5 * len(names), 1.5 * n + 0.5), squeeze=False)
    for j, name in enumerate(names):
        batch = columns[name].detach().float().cpu()
        for i in range(n):
            img = batch[i]
            img = img[:3].permute(1, 2, 0) if img.shape[0] >= 3 else img[0]
            lo, hi = float(img.min()), float(img.max())
            ax = axes[i][j]
            ax.imshow(((img - lo) / max(hi - lo, 1e-6)).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_gallery(bundle: str = "prostate", output: str | None = None, ckpt_dir: str | None = None, n_images: int = 4,
                 temperatures=(1.0, 2.0, 3.5), seed: int = 0, **overrides) -> Path:
    """Write the gallery PNG and return its path.

    Args:
        bundle: ``prostate``, ``fundus`` or a bundle folder.
        output: PNG path (default ``<bundle>/logs/style_gallery.png``).
        ckpt_dir: folder with ``phase1_model.pt`` and ``style_flows.pt`` (default ``<bundle>/models``).
        n_images: rows (source training images with foreground).
        temperatures: MixStyleFlow sampling temperatures to show.
        seed: random seed of the style draws.
        overrides: other config ids (``--dataset_dir``, ``--image_size``, ...), as for the phases.
    """
    import torch
    from monai.bundle import ConfigParser

    from evaluate import as_list, bundle_dir, check_known
    from msf_monai.bundle import require_file
    from msf_monai.flows import StyleFlowBank

    root = bundle_dir(bundle)
    check_known(root, ("phase2",), overrides)
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "phase2.json"))
    parser.update({"bundle_root": str(root), **({"ckpt_dir": str(ckpt_dir)} if ckpt_dir else {}), **overrides})
    ckpt = Path(parser.get_parsed_content("ckpt_dir"))
    net = parser.get_parsed_content("network_def").cpu()
    phase1 = require_file(ckpt / "phase1_model.pt", f"python -m monai.bundle run --config_file {root / 'configs' / 'phase1.json'}")
    net.load_state_dict(torch.load(phase1, map_location="cpu", weights_only=True))
    flows = ckpt / "style_flows.pt"
    bank = StyleFlowBank.load(flows) if flows.is_file() else None
    if bank is None:
        print(f"no {flows}: MixStyleFlow columns left out (run phase2.json to fit the flows)")
    images, labels = _source_images(parser, int(n_images))
    temps = [float(t) for t in as_list(temperatures)]
    columns = gallery_columns(net, bank, images, labels, temps, seed)
    out = Path(output) if output else root / "logs" / "style_gallery.png"
    save_grid(columns, out, f"{root.name}: clean source images and their stylized versions")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    from msf_monai.cli import fire_main

    fire_main(make_gallery)
