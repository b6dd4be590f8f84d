"""3D DINO TPP reaches every Conv-Adapter (encoder and decoder) and nothing else; gradient accumulation centres
like one large batch."""

import hashlib

import pytest
import torch

from tpp_monai.backbones.stunet import STUNet
from tpp_monai.engines.optim import build_optimizer
from tpp_monai.peft import apply_peft
from tpp_monai.pretext import PRETEXT_TASKS

STRIDES = [[2, 2, 2]] * 2 + [[1, 1, 1]] * 3  # total stride 4: 16^3 global, 8^3 local crops
HEAD = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}


def _digest(t):
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def net(method):
    torch.manual_seed(0)
    m = STUNet(1, 3, size=None, dims=[4, 8, 8, 16, 16, 16], depth=[1] * 6, strides=STRIDES)
    apply_peft(m, method)
    return m


@pytest.mark.parametrize("method", ["conv_adapter", "conv_adapter_residual"])
def test_every_target_tensor_moves_and_nothing_else(method):
    m = net(method)
    before = {n: _digest(t) for n, t in m.state_dict().items()}
    targets = {n for n, _ in m.named_parameters() if "peft_" in n}
    assert any(n.startswith("conv_blocks_localization") for n in targets)  # decoder adapters exist
    task = PRETEXT_TASKS.get("dino3d")(m, global_size=16, local_size=8, n_local_crops=1, **HEAD)
    opt = build_optimizer(task, lr=1e-2, weight_decay=0.0)  # no weight decay: only gradients move tensors
    torch.manual_seed(1)
    for i in range(3):  # zero-init up-projections need one step before the rest gets a gradient
        out = task(torch.randn(2, 1, 16, 16, 16))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.after_step(i, 3)
    after = m.state_dict()
    moved = {n for n in after if _digest(after[n]) != before[n]}
    assert sorted(targets - moved) == []  # every target tensor, encoder and decoder, changed
    assert sorted(moved - targets) == []  # every other tensor (backbone, seg_outputs) is bit-identical


def test_encoder_features_leave_decoder_adapters_untouched():
    """The earlier encoder-only representation (kept as features='encoder') is the defect issue 12 names."""
    m = net("conv_adapter")
    before = {n: _digest(p) for n, p in m.named_parameters()}
    task = PRETEXT_TASKS.get("dino3d")(m, global_size=16, local_size=8, n_local_crops=1, features="encoder", **HEAD)
    opt = build_optimizer(task, lr=1e-2, weight_decay=0.0)
    out = task(torch.randn(2, 1, 16, 16, 16))
    out["loss"].backward()
    opt.step()
    moved = {n for n, p in m.named_parameters() if _digest(p) != before[n]}
    assert moved and all(n.startswith("conv_blocks_context") for n in moved)


def test_crop_sizes_must_pass_the_decoder():
    with pytest.raises(ValueError, match="local_size \\[6, 6, 6\\] must be a multiple of the network's total stride"):
        PRETEXT_TASKS.get("dino3d")(net("conv_adapter"), global_size=16, local_size=6, **HEAD)


def test_accumulated_centre_equals_one_batch():
    """Two micro-batches of 2 then one optimiser step centre exactly like one batch of 4."""
    m = net("conv_adapter")
    task = PRETEXT_TASKS.get("dino3d")(m, global_size=16, local_size=8, n_local_crops=1, **HEAD).train()
    torch.manual_seed(3)
    views = [torch.randn(4, 1, 16, 16, 16), torch.randn(4, 1, 16, 16, 16), torch.randn(4, 1, 8, 8, 8)]
    with torch.no_grad():
        t_out = task._teacher(views)  # (2 x 4, K): both global views
    task.loss_from_views([v[:2] for v in views])
    task.loss_from_views([v[2:] for v in views])
    task.center.fill_(0.5)
    task.update_center()
    assert torch.allclose(task.center, 0.9 * 0.5 + 0.1 * t_out.mean(0, keepdim=True), atol=1e-6)
    assert task._pending_n == 0 and task._pending_center is None
