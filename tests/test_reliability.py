"""Reliability (issue 7): resume after a kill, clear errors on bad data and bad settings before
any work, flow-fitting safeguards, and reproducible Phase I losses on CPU.

The bundle runs use a tiny data set written here (4 volumes of 32 x 32 x 6 voxels in the
``images/`` + ``labels/`` layout), so a Phase I epoch takes about a second."""

from __future__ import annotations

import gzip
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from bundle_utils import check, copy_bundle, run_bundle
from msf_monai.bundle import ConfigValueError, PhaseError, check_settings
from msf_monai.data import DataValidationError
from msf_monai.tasks.fundus import check_fundus_images
from msf_monai.tasks.prostate import check_volumes, prostate_datalist
from msf_monai.flow_fit import FlowFitError, fit_flow
from msf_monai.flow_model import build_style_flow
from msf_monai.flows import StyleFlowBank
from msf_monai.networks import DualDecoderNet
from msf_monai.files import atomic_save
from msf_monai.resume import PhaseFinishedError, ResumeError, check_resume

TINY = ("--image_size", "32", "--batch_size", "8", "--val_interval", "1")


# ---------------------------------------------------------------------------------------------
# tiny data
# ---------------------------------------------------------------------------------------------
def _volume(rng, shape=(32, 32, 6), foreground=True):
    image = rng.normal(100, 20, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    if foreground:
        label[10:22, 12:24, 1:5] = 1
        image[label > 0] += 80
    return image, label


def write_case(root: Path, name: str, image, label, affine=None, label_affine=None):
    affine = np.eye(4) if affine is None else affine
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    if image is not None:
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"{name}.nii.gz")
    if label is not None:
        nib.save(nib.Nifti1Image(label, affine if label_affine is None else label_affine), root / "labels" / f"{name}.nii.gz")


def tiny_dataset(root: Path, n: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_case(root, f"case{i}", *_volume(rng))
    return root


def _assert_clean_failure(proc, *names):
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    for name in names:
        assert str(name) in proc.stdout, (name, proc.stdout[-3000:])


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------
def _signal_phase1_after(tmp_path, args, marker: str, sig) -> tuple[subprocess.Popen, list[str]]:
    """Run Phase I in a subprocess, send ``sig`` when a line contains ``marker``; returns the
    finished process and every line it printed."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/prostate/configs/phase1.json", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                proc.send_signal(sig)
                break
        lines += proc.stdout.readlines()
        proc.wait(timeout=300)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    return proc, lines


@pytest.mark.slow
def test_phase1_killed_after_a_checkpoint_resumes_with_the_same_command(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    data = tiny_dataset(tmp_path / "data")
    models = bundle / "models"
    args = ("--dataset_dir", str(data), *TINY, "--epochs", "6", "--checkpoint_interval", "1")
    proc, first = _signal_phase1_after(tmp_path, args, "epoch 2: saved the training state", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "".join(first[-40:])
    state = torch.load(models / "phase1_model_resume.pt", weights_only=True)
    assert not state["finished"] and state["epoch"] >= 2

    out = check(run_bundle(tmp_path, "phase1", *args))
    assert f"Resuming from {models / 'phase1_model_resume.pt'} at epoch {state['epoch']} of 6" in out
    assert f"Epoch[{state['epoch'] + 1}] Complete" in out and "Epoch[6] Complete" in out
    assert "Epoch[1] Complete" not in out  # the numbering goes on, nothing is trained twice
    final = torch.load(models / "phase1_model_resume.pt", weights_only=True)
    assert final["finished"] and final["epoch"] == 6 and final["iteration"] == 6 * (state["iteration"] // state["epoch"])
    DualDecoderNet().load_state_dict(torch.load(models / "phase1_model_final.pt", weights_only=True), strict=True)
    DualDecoderNet().load_state_dict(torch.load(models / "phase1_model.pt", weights_only=True), strict=True)
    leftovers = [p.name for p in models.iterdir() if p.name.startswith((".tmp", "tmp"))]
    assert leftovers == []

    # a finished phase is not retrained silently
    again = run_bundle(tmp_path, "phase1", *args)
    # a finished phase is "up to date": exit 0 with the message, nothing retrained or overwritten
    assert again.returncode == 0 and "Traceback" not in again.stdout, again.stdout[-3000:]
    assert "has already finished" in again.stdout and "--resume false" in again.stdout
    assert "Epoch[1] Complete" not in again.stdout


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    data = tiny_dataset(tmp_path / "data")
    models = bundle / "models"
    args = ("--dataset_dir", str(data), *TINY, "--epochs", "50", "--checkpoint_interval", "1")
    proc, lines = _signal_phase1_after(tmp_path, args, "epoch 1: saved the training state", signal.SIGINT)
    out = "".join(lines)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "Ctrl-C: stopping after the current iteration" in out
    state = torch.load(models / "phase1_model_resume.pt", weights_only=True)
    assert f"the training state of epoch {state['epoch']} is in {models / 'phase1_model_resume.pt'}: run the same command to resume" in out
    assert not state["finished"] and not (models / "phase1_model_final.pt").exists()  # no "final" model of a stopped run


def test_check_resume_decisions(tmp_path):
    path = tmp_path / "state.pt"
    assert check_resume(path, resume=True, max_epochs=5) is None  # nothing saved yet
    atomic_save({"format": "msf_monai.resume", "finished": False, "epoch": 3, "settings": {"image_size": 32}}, path)
    assert check_resume(path, resume=True, max_epochs=5, settings={"image_size": 32})["epoch"] == 3
    assert check_resume(path, resume=False, max_epochs=5, settings={"image_size": 64}) is None
    with pytest.raises(ResumeError, match="image_size: saved 32, now 64"):
        check_resume(path, resume=True, max_epochs=5, settings={"image_size": 64})
    assert check_resume(path, resume=True, settings={"image_size": 64}, on_mismatch="restart") is None
    with pytest.raises(ResumeError, match="beyond --epochs 2"):
        check_resume(path, resume=True, max_epochs=2, settings={"image_size": 32})
    atomic_save({"format": "msf_monai.resume", "finished": True, "epoch": 5, "settings": {}}, path)
    with pytest.raises(PhaseFinishedError, match="already finished"):
        check_resume(path, resume=True, max_epochs=5)
    assert check_resume(path, resume=True, max_epochs=8)["epoch"] == 5  # train longer
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match=str(path)):
        check_resume(path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary files


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------
def _tensorboard_losses(folder: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [e.value for e in acc.Scalars("train_loss")]


@pytest.mark.slow
def test_same_seed_gives_bit_identical_phase1_losses_on_cpu(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    runs = []
    for name in ("a", "b"):
        bundle = copy_bundle("prostate", tmp_path / name)
        check(run_bundle(tmp_path / name, "phase1", "--dataset_dir", str(data), "--image_size", "32", "--batch_size", "4",
                         "--val_interval", "1", "--epochs", "1", "--device", "cpu"))
        runs.append((_tensorboard_losses(bundle / "logs" / "phase1"), torch.load(bundle / "models" / "phase1_model_final.pt", weights_only=True)))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert len(losses_a) == 3 and losses_a == losses_b  # every iteration's loss, bit for bit
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# ---------------------------------------------------------------------------------------------
# bad data, found before any work
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_missing_and_empty_dataset_dir_fail_cleanly(tmp_path):
    copy_bundle("prostate", tmp_path)
    missing = tmp_path / "nowhere"
    _assert_clean_failure(run_bundle(tmp_path, "phase1", "--dataset_dir", str(missing), *TINY), missing, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataValidationError, match="empty") as err:
        prostate_datalist(empty)
    assert str(empty) in str(err.value)


@pytest.mark.slow
def test_every_problem_of_a_data_set_is_reported_at_once_before_training(tmp_path):
    bundle = copy_bundle("prostate", tmp_path)
    data = tiny_dataset(tmp_path / "data", n=3)
    rng = np.random.default_rng(1)
    write_case(data, "nolabel", _volume(rng)[0], None)
    write_case(data, "noimage", None, _volume(rng)[1])
    image, label = _volume(rng)
    image[0, 0, 0] = np.nan
    write_case(data, "nan", image, label)
    out = run_bundle(tmp_path, "phase1", "--dataset_dir", str(data), *TINY, "--epochs", "1")
    _assert_clean_failure(out, data / "images" / "nolabel.nii.gz", data / "labels" / "noimage.nii.gz")
    # pairing problems come from the list builder, before the voxels are read; every one is named
    assert "image without label" in out.stdout and "label without image" in out.stdout
    assert not (bundle / "models").exists() or not list((bundle / "models").iterdir())
    # once the pairing is fixed, the voxel check names the NaN volume
    (data / "images" / "nolabel.nii.gz").unlink()
    (data / "labels" / "noimage.nii.gz").unlink()
    out = run_bundle(tmp_path, "phase1", "--dataset_dir", str(data), *TINY, "--epochs", "1")
    _assert_clean_failure(out, data / "images" / "nan.nii.gz", "non-finite")


def test_broken_symbolic_links_are_named_as_such(tmp_path):
    from msf_monai.tasks.fundus import fundus_datalist
    from msf_monai.tasks.prostate import prostate_datalist
    from msf_monai.data.validation import DataValidationError

    data = tiny_dataset(tmp_path / "data", n=3)
    (data / "images" / "case1.nii.gz").unlink()
    (data / "images" / "case1.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # dangling
    (data / "labels" / "case2.nii.gz").unlink()
    (data / "labels" / "case2.nii.gz").symlink_to("case2.nii.gz")  # loops on itself
    with pytest.raises(DataValidationError) as err:
        prostate_datalist(str(data))
    text = "\n".join(err.value.problems)
    assert f"broken symbolic link: {data / 'images' / 'case1.nii.gz'} -> {tmp_path / 'gone.nii.gz'}" in text
    assert f"broken symbolic link: {data / 'labels' / 'case2.nii.gz'} -> case2.nii.gz" in text
    assert "without image" not in text and "without label" not in text  # the partners are not blamed

    fundus = tmp_path / "fundus"
    for folder in ("images", "masks"):
        (fundus / folder).mkdir(parents=True)
    (fundus / "images" / "a.png").symlink_to(tmp_path / "gone.png")
    (fundus / "masks" / "a.png").write_bytes(b"")
    with pytest.raises(DataValidationError) as err:
        fundus_datalist(str(fundus), layout="folder")
    assert f"broken symbolic link: {fundus / 'images' / 'a.png'}" in "\n".join(err.value.problems)


def _one_case(tmp_path, image, label, **kw):
    write_case(tmp_path, "bad", image, label, **kw)
    return [{"image": str(tmp_path / "images" / "bad.nii.gz"), "label": str(tmp_path / "labels" / "bad.nii.gz"), "site": "x", "case": "bad"}]


def _problem(items, **kw) -> str:
    with pytest.raises(DataValidationError) as err:
        check_volumes(items, **kw)
    assert len(err.value.problems) == 1, err.value.problems
    return err.value.problems[0]


def test_shape_mismatch_names_the_label(tmp_path):
    rng = np.random.default_rng(0)
    items = _one_case(tmp_path, _volume(rng)[0], _volume(rng, shape=(32, 30, 6))[1])
    assert _problem(items).startswith(items[0]["label"]) and "shape" in _problem(items)


def test_affine_mismatch_names_the_label(tmp_path):
    moved = np.eye(4)
    moved[0, 3] = 5.0
    items = _one_case(tmp_path, *_volume(np.random.default_rng(0)), label_affine=moved)
    assert _problem(items).startswith(items[0]["label"]) and "affine" in _problem(items)


def test_truncated_nifti_names_the_file(tmp_path):
    items = _one_case(tmp_path, *_volume(np.random.default_rng(0)))
    path = Path(items[0]["image"])
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    text = _problem(items)
    assert text.startswith(str(path)) and "cannot read" in text


def test_non_finite_voxels_name_the_image(tmp_path):
    image, label = _volume(np.random.default_rng(0))
    image[3, 4, 2] = np.inf
    items = _one_case(tmp_path, image, label)
    assert _problem(items).startswith(items[0]["image"]) and "1 non-finite" in _problem(items)


def test_blank_image_is_named_before_preprocessing_divides_by_zero(tmp_path):
    image, label = _volume(np.random.default_rng(0))
    items = _one_case(tmp_path, np.zeros_like(image), label)
    problem = _problem(items)
    assert problem.startswith(items[0]["image"]) and "every voxel has the value 0" in problem


def test_label_values_outside_the_set_name_the_label(tmp_path):
    image, label = _volume(np.random.default_rng(0))
    label[label > 0] = 255
    items = _one_case(tmp_path, image, label)
    assert _problem(items).startswith(items[0]["label"]) and "255" in _problem(items)
    assert check_volumes(items, label_values=[0, 255]).no_foreground == []


def test_too_small_image_names_the_file(tmp_path):
    items = _one_case(tmp_path, *_volume(np.random.default_rng(0), shape=(12, 32, 4)))
    assert _problem(items).startswith(items[0]["image"]) and "minimum 16 x 16" in _problem(items)


def test_volume_without_foreground_is_skipped_for_training_kept_for_evaluation(tmp_path, caplog):
    rng = np.random.default_rng(0)
    data = tiny_dataset(tmp_path, n=2)
    write_case(data, "empty", *_volume(rng, foreground=False))
    items = prostate_datalist(data)
    with caplog.at_level(logging.WARNING, logger="msf_monai.data"):
        report = check_volumes(items)
    empty = str(data / "images" / "empty.nii.gz")
    assert report.no_foreground == [empty] and empty in caplog.text
    assert [it["case"] for it in report.for_training(items)] == ["case0", "case1"]
    assert len(report.items) == 3  # evaluation keeps it


def test_fundus_truncated_png_and_mask_problems_name_the_files(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for name, mask_size, mask_values in (("ok", 40, (255, 128, 0)), ("small", 24, (255, 128, 0)), ("pal", 40, (0, 1, 7))):
        image_path, mask_path = tmp_path / f"{name}.png", tmp_path / f"{name}_mask.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image_path)
        mask = np.full((mask_size, mask_size), mask_values[0], np.uint8)
        mask[8:20, 8:20] = mask_values[1]
        mask[12:16, 12:16] = mask_values[2]
        Image.fromarray(mask).save(mask_path)
        items.append({"image": str(image_path), "label": str(mask_path), "label_format": "palette" if name == "pal" else "grey"})
    truncated = tmp_path / "ok.png"
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(DataValidationError) as err:
        check_fundus_images(items)
    problems = err.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(str(truncated)) and "cannot read" in problems[0]
    assert problems[1].startswith(str(tmp_path / "small_mask.png")) and "differs" in problems[1]
    assert problems[2].startswith(str(tmp_path / "pal_mask.png")) and "7" in problems[2]


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigValueError, match="divisible|multiple of 16"):
        check_settings(image_size=100)
    with pytest.raises(ConfigValueError, match="2 value.*has 3"):
        check_settings(image_size=32, style_layers=[2, 3, 4], temperatures=[3.5, 2.5])
    assert check_settings(image_size=96, style_layers=[2, 3, 4], temperatures=[3.5, 2.5, 1.5])
    bundle = copy_bundle("prostate", tmp_path)
    _assert_clean_failure(run_bundle(tmp_path, "phase1", "--image_size", "100", "--epochs", "1"), "--image_size 100")
    assert not (bundle / "demo_data").exists()  # nothing was generated or trained
    (bundle / "models").mkdir()
    torch.save(DualDecoderNet().state_dict(), bundle / "models" / "phase1_model.pt")
    _assert_clean_failure(run_bundle(tmp_path, "phase2", "--temperatures", "[3.5,2.5]"), "--temperatures", "one temperature per style layer")


# ---------------------------------------------------------------------------------------------
# flows
# ---------------------------------------------------------------------------------------------
def _flow(seed=0):
    torch.manual_seed(seed)
    return build_style_flow(4, num_blocks=2)


@pytest.mark.slow
def test_flow_fit_resumed_from_a_checkpoint_equals_an_uninterrupted_fit():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=gen) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 1
    val = torch.randn(20, 4, generator=gen)
    kw = dict(epochs=6, lr=1e-3, val_data=val, seed=3, log_every=0)
    whole = _flow()
    history = fit_flow(whole, x, **kw)
    states = []

    class Killed(Exception):
        pass

    def crash_at_4(state):
        states.append(state)
        if state["epoch"] == 4:
            raise Killed

    with pytest.raises(Killed):
        fit_flow(_flow(), x, checkpoint_every=2, on_checkpoint=crash_at_4, **kw)
    resumed = _flow(seed=1)  # other initial weights: everything comes from the state
    assert fit_flow(resumed, x, resume_state=states[-1], **kw) == history
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_flow_problems_name_the_layer_and_the_guard_count_is_reported(caplog, tmp_path):
    bank = StyleFlowBank({2: 4}, temperatures={2: 1.0})
    good = np.abs(np.random.default_rng(0).normal(1, 0.2, (30, 4))).astype(np.float32)
    bad = good.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="layer 2 statistic 'mean'.*non-finite"):
        bank.fit({2: {"mean": bad, "var": good}}, epochs=1)
    with pytest.raises(FlowFitError, match="mean flow of style layer 2: flow fit diverged"):
        noise = np.random.default_rng(1).normal(size=(200, 4)).astype(np.float32)
        bank.fit({2: {"mean": noise, "var": noise**2}}, epochs=20, lr=1e6, val_fraction=0.0)
    # in the Phase II handler both stop the phase with a message, not a traceback
    from msf_monai.handlers import StyleFlowFitter, StyleStatisticsRecorder

    recorder = StyleStatisticsRecorder(layers=[2])
    recorder.stats = {2: {"mean": bad, "var": good}}
    fitter = StyleFlowFitter(recorder, StyleFlowBank({2: 4}), tmp_path / "flows.pt", epochs=1)
    with pytest.raises(PhaseError, match="layer 2"):
        fitter(None)
    # the sampling guard: replaced samples are counted and logged. An input ActNorm with scale
    # e^-8 makes the inverse map blow most draws at T = 3.5 beyond the guard's |x| <= 1e4
    bank = StyleFlowBank({2: 4}, temperatures={2: 3.5})
    with torch.no_grad():
        for flows in (bank.mean_flows, bank.spread_flows):
            flows["2"]._transform._transforms[0].log_scale.fill_(-8.0)
    with caplog.at_level(logging.WARNING, logger="msf_monai.flows"):
        bank.sample(2, 300, generator=torch.Generator().manual_seed(0))
    n_mean, n_spread = bank.last_replaced["mean"], bank.last_replaced["spread"]
    assert n_mean > 30 and n_spread > 30
    assert f"replaced {n_mean} mean and {n_spread} spread sample(s)" in caplog.text
    assert bank.guard_counts[2] == {"drawn": 600, "replaced": n_mean + n_spread}


def test_phase2_fitter_resumes_finished_flows_without_refitting(tmp_path, monkeypatch):
    from msf_monai import flows
    from msf_monai.handlers import StyleFlowFitter, StyleStatisticsRecorder

    rng = np.random.default_rng(0)
    recorder = StyleStatisticsRecorder(layers=[2])
    recorder.stats = {2: {"mean": rng.normal(0, 1, (40, 4)).astype(np.float32), "var": rng.uniform(0.5, 2, (40, 4)).astype(np.float32)}}

    def fitter():
        torch.manual_seed(0)
        return StyleFlowFitter(recorder, StyleFlowBank({2: 4}, num_blocks=2), tmp_path / "flows.pt", epochs=4,
                               lr=1e-3, resume_path=tmp_path / "resume.pt", checkpoint_every=2, settings={"a": 1})

    first = fitter()
    first(None)
    calls = []
    original = flows.fit_flows_jointly
    monkeypatch.setattr(flows, "fit_flows_jointly", lambda *a, **k: calls.append(k.get("resume_state")) or original(*a, **k))
    second = fitter()
    second(None)
    assert len(calls) == 1 and calls[0] is not None and calls[0]["finished"]  # restored, not refitted
    assert second.history == first.history
    for a, b in zip(first.bank.state_dict().values(), second.bank.state_dict().values()):
        assert torch.equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flows.pt", "resume.pt"]


def test_saved_files_get_the_usual_mode(tmp_path):
    """Files written through a private temporary file (training states, models, flows) get the
    mode a plain ``open()`` would give them, not mkstemp's owner-only 0600."""
    from msf_monai.flows import StyleFlowBank
    from msf_monai.files import atomic_save, new_file_mode

    old = os.umask(0o022)
    try:
        assert new_file_mode() == 0o644
        atomic_save({"x": torch.zeros(1)}, tmp_path / "state.pt")
        bank = StyleFlowBank({2: 4})
        bank.save(tmp_path / "style_flows.pt")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        for name in ("state.pt", "style_flows.pt"):
            assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(old)
