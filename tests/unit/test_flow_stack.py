"""Fitting the style flows jointly (msf_monai.flow_stack) against fitting them one by one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nflows.transforms import ActNorm

from msf_monai.flow_stack import FlowStack, fit_flows_jointly
from msf_monai.flow_fit import FlowFitError
from msf_monai.flow_model import build_style_flow
from msf_monai.flows import StyleFlowBank


def _stats(n=60, seed=0, layers=None):
    g = torch.Generator().manual_seed(seed)
    layers = layers or {2: 8, 3: 5, 4: 4}
    return {k: {"mean": torch.randn(n, c, generator=g) * torch.linspace(0.2, 2.0, c) + torch.randn(c, generator=g),
                "var": torch.rand(n, c, generator=g) ** 2 + 0.05} for k, c in layers.items()}


def _random_flow(features, seed, base="standard", num_blocks=3):
    torch.manual_seed(seed)
    flow = build_style_flow(features, num_blocks=num_blocks, base=base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight away from zero (and from the identity map)
        for p in flow.parameters():
            p.copy_((0.5 + torch.rand(p.shape, generator=g)) * torch.where(torch.rand(p.shape, generator=g) < 0.5, -0.3, 0.3))
    for m in flow.modules():
        if isinstance(m, ActNorm):
            m.initialized.fill_(True)
    return flow


@pytest.mark.parametrize("base", ["standard", "diagonal"])
def test_stack_log_prob_equals_each_flow_and_padding_gets_no_gradient(base, device):
    flows = [_random_flow(c, seed, base).to(device) for seed, c in enumerate((7, 4, 5))]
    stack = FlowStack(flows)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(9, f._distribution._shape[0], generator=g).to(device) for f in flows]
    joint = stack.log_prob(stack.pad_rows(rows))
    for k, (flow, x) in enumerate(zip(flows, rows)):
        torch.testing.assert_close(joint[k], flow.log_prob(x), rtol=1e-5, atol=1e-5)
    # the entries of the stacked parameter that belong to no flow weight are the padding: they
    # must get exactly zero gradient (so AdamW leaves them at zero)
    padding = stack.flat.detach() == 0
    assert padding.any()
    (-joint.mean(1)).sum().backward()
    assert torch.count_nonzero(stack.flat.grad[padding]) == 0
    # and writing the weights back reproduces the flows
    copies = [copy.deepcopy(f) for f in flows]
    with torch.no_grad():
        for f in flows:
            for p in f.parameters():
                p.zero_()
    stack.write_back()
    for a, b in zip(flows, copies):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(p, q, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["standard", "diagonal"])
def test_joint_fit_takes_the_same_steps_as_separate_fits(base, device):
    """Same batches, per-flow clipping, per-flow early stopping: the joint fit must give the
    separate fits' histories and weights, up to float rounding, also when the flows stop at
    different epochs."""
    stats = _stats()
    torch.manual_seed(3)
    separate = StyleFlowBank({2: 8, 3: 5, 4: 4}, num_blocks=3, base=base).to(device)
    joint = copy.deepcopy(separate)
    kw = dict(epochs=25, lr=5e-3, batch_size=8, grad_clip=0.5, val_fraction=0.3, seed=4, log_every=0)
    h_sep = separate.fit(stats, joint=False, **kw)
    h_joint = joint.fit(stats, joint=True, **kw)
    assert h_sep.keys() == h_joint.keys()
    for key in h_sep:
        for a, b in zip(h_sep[key], h_joint[key], strict=True):
            assert a["epoch"] == b["epoch"]
            np.testing.assert_allclose([a["train_nll"], a["val_nll"]], [b["train_nll"], b["val_nll"]], rtol=1e-4, atol=1e-4)
    best = {key: min(h, key=lambda r: r["val_nll"])["epoch"] for key, h in h_sep.items()}
    assert len(set(best.values())) > 1 and min(best.values()) < kw["epochs"], best  # early stopping differs per flow
    for (name, p), q in zip(separate.state_dict().items(), joint.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)
    assert joint.is_fitted and not joint.training


@pytest.mark.slow
def test_joint_fit_resumes_with_the_same_result():
    stats = _stats(n=40)
    kw = dict(epochs=8, lr=3e-3, batch_size=8, val_fraction=0.25, seed=1, log_every=0)
    torch.manual_seed(0)
    whole = StyleFlowBank({2: 8, 3: 5, 4: 4}, num_blocks=2)
    fresh = copy.deepcopy(whole)
    history = whole.fit(stats, **kw)
    states = []

    class Killed(Exception):
        pass

    def crash_at_6(state):
        states.append(state)
        if state["joint"]["epoch"] == 6:
            raise Killed

    with pytest.raises(Killed):
        copy.deepcopy(fresh).fit(stats, checkpoint_every=3, on_checkpoint=crash_at_6, **kw)
    assert [s["joint"]["epoch"] for s in states] == [3, 6] and not states[-1]["joint"]["finished"]
    resumed = StyleFlowBank({2: 8, 3: 5, 4: 4}, num_blocks=2)  # other initial weights: all comes from the state
    assert resumed.fit(stats, resume_state=states[-1], **kw) == history
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    # a state saved by an earlier version also held the forward pass's masks: still resumed alike
    earlier = copy.deepcopy(states[-1])
    for part in (earlier["joint"]["stack"], earlier["joint"]["best_state"]):
        part.update(feature_mask=torch.ones(6, 8), identity_masks=torch.ones(2, 6, 8), transform_masks=torch.ones(2, 6, 8))
    assert StyleFlowBank({2: 8, 3: 5, 4: 4}, num_blocks=2).fit(stats, resume_state=earlier, **kw) == history
    # a finished state only restores the final weights
    final = []
    copy.deepcopy(fresh).fit(stats, on_checkpoint=final.append, **kw)
    restored = StyleFlowBank({2: 8, 3: 5, 4: 4}, num_blocks=2)
    assert final[-1]["joint"]["finished"] and restored.fit(stats, resume_state=final[-1], **kw) == history
    assert all(torch.equal(p, q) for p, q in zip(whole.state_dict().values(), restored.state_dict().values()))


def test_joint_fit_names_the_diverging_flow_and_checks_its_inputs():
    with pytest.raises(FlowFitError, match=r"^(mean|spread) flow of style layer [23]: flow fit diverged: non-finite"):
        StyleFlowBank({2: 4, 3: 4}, num_blocks=2).fit(_stats(layers={2: 4, 3: 4}), epochs=20, lr=1e6, val_fraction=0.0, log_every=0)
    flows = [build_style_flow(4), build_style_flow(4)]
    with pytest.raises(ValueError, match="same number of rows"):
        fit_flows_jointly(flows, [torch.randn(10, 4), torch.randn(11, 4)], ["a", "b"], [0, 1], epochs=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):  # as fit_flow says it, not a range() error
        fit_flows_jointly(flows, [torch.randn(10, 4), torch.randn(10, 4)], ["a", "b"], [0, 1], epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="share their structure"):
        FlowStack([build_style_flow(4, num_blocks=2), build_style_flow(4, num_blocks=3)])


@pytest.mark.slow
def test_a_state_saved_by_separate_fits_is_continued_separately(monkeypatch):
    """Phase II states written before the joint fit (one entry per flow) still resume, the way
    they were saved, to the result of an uninterrupted separate fit."""
    stats = _stats(n=40)
    kw = dict(epochs=6, lr=3e-3, batch_size=8, val_fraction=0.25, seed=1, log_every=0)
    torch.manual_seed(0)
    fresh = StyleFlowBank({2: 8, 3: 5, 4: 4}, num_blocks=2)
    whole = copy.deepcopy(fresh)
    history = whole.fit(stats, joint=False, **kw)
    states = []

    class Killed(Exception):
        pass

    def crash(state):
        states.append(state)
        if "mean_3" in state:  # the first layer's flows are done, the second layer's has started
            raise Killed

    with pytest.raises(Killed):
        copy.deepcopy(fresh).fit(stats, joint=False, checkpoint_every=3, on_checkpoint=crash, **kw)
    assert "joint" not in states[-1] and states[-1]["mean_2"]["finished"]
    from msf_monai import flows as flows_module

    given = []
    original = flows_module.fit_flow
    monkeypatch.setattr(flows_module, "fit_flow", lambda *a, **k: given.append(k.get("resume_state")) or original(*a, **k))
    resumed = copy.deepcopy(fresh)  # flows not started yet begin from the bank's own weights, as in Phase II
    assert resumed.fit(stats, resume_state=states[-1], **kw) == history  # joint=True by default: ignored for this state
    # the finished flows were restored from the state, the interrupted one continued, the rest fitted
    assert [None if g is None else (g["finished"], g["epoch"]) for g in given] == [
        (True, 6), (True, 6), (False, states[-1]["mean_3"]["epoch"]), None, None, None]
    assert all(torch.equal(p, q) for p, q in zip(whole.state_dict().values(), resumed.state_dict().values()))
