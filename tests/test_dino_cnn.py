"""CNN DINO (tpp_monai.pretext.dino_cnn): 2D and 3D share one loss and one code path; 2D crops follow DINO's
scales; the teacher's target parameters are handed over; frozen tensors (batch-norm statistics included) never
change while every target tensor moves."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tpp_monai.backbones.stunet import STUNet
from tpp_monai.engines.optim import build_optimizer
from tpp_monai.engines.tpp_report import read_report
from tpp_monai.peft import apply_peft, target_state_dict
from tpp_monai.peft.target_checkpoint import read_target_checkpoint
from tpp_monai.pretext import PRETEXT_TASKS
from tpp_monai.pretext.dino import cosine_momentum
from tpp_monai.pretext.dino_cnn import CNNDINOPretext, DINO3DPretext, pretext_name_for
from tpp_monai.tpp import tpp_pretrain

HEAD = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}


class TinyEncoder(nn.Module):
    """Three conv-BN-ReLU stages at strides 2, 4, 8: a FlexibleUNet-style encoder (``forward`` -> feature list)."""

    out_channels = (8, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        chans = (3,) + self.out_channels
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(chans[:-1], chans[1:]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


def tiny_encoder(method: str = "norm_tuning", seed: int = 0) -> TinyEncoder:
    torch.manual_seed(seed)
    m = TinyEncoder()
    with torch.no_grad():  # non-trivial running statistics, so a batch-norm update would show
        for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    apply_peft(m, method)
    return m


def stunet(spatial_dims: int, seed: int = 0) -> STUNet:
    torch.manual_seed(seed)
    strides = [[2] * spatial_dims] * 2 + [[1] * spatial_dims] * 3
    m = STUNet(1, 2, size=None, dims=[4, 8, 8, 16, 16, 16], depth=[1] * 6, strides=strides, spatial_dims=spatial_dims)
    apply_peft(m, "conv_adapter")
    return m


def _digests(model: nn.Module) -> dict[str, str]:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {n: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest() for n, t in tensors}


def dino_loss_reference(teacher_output, student_output, center, teacher_temp, student_temp, ncrops):
    """DINO's ``DINOLoss.forward`` (main_dino.py), re-stated: student outputs of all crops concatenated."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def test_2d_and_3d_tasks_share_dino_loss_and_centre():
    """Fixed teacher/student outputs: the 2D task (EfficientNet-style encoder) and the 3D task (STU-Net) give
    DINO's loss and centre update exactly."""
    torch.manual_seed(0)
    B, K, ncrops = 3, HEAD["out_dim"], 4
    t_out, s_out = torch.randn(2 * B, K), torch.randn(ncrops * B, K)
    center = torch.randn(1, K) * 0.1
    tasks = [CNNDINOPretext(tiny_encoder(), global_size=32, local_size=16, n_local_crops=2, **HEAD),
             DINO3DPretext(stunet(3), global_size=16, local_size=8, n_local_crops=2, **HEAD)]
    assert [t.spatial_dims for t in tasks] == [2, 3] and [t.features for t in tasks] == ["encoder", "decoder"]
    losses = []
    for task in tasks:
        task.train()
        task.center.copy_(center)
        task._teacher = lambda views: t_out
        task._student = lambda views: list(s_out.chunk(ncrops))
        task.set_schedule_position(0, 10)
        temp = task.current_teacher_temp()
        loss = task.loss_from_views([torch.zeros(B, 1)] * ncrops)["loss"]
        assert loss.item() == pytest.approx(dino_loss_reference(t_out, s_out, center, temp, 0.1, ncrops).item(), rel=1e-6)
        losses.append(loss.item())
        task.update_center()  # DINO: center * 0.9 + batch mean * 0.1
        assert torch.allclose(task.center, center * 0.9 + t_out.mean(0, keepdim=True) * 0.1, atol=1e-7)
    # both start their teacher temperature at 0.04 (2D: epoch 0 of DINO's warm-up; 3D: step 0 of its 30%)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_2d_crops_follow_dino_scales():
    """Global crops cover 40-100% of the image, local ones 5-40% (DINO's RandomResizedCrop scales), at the
    requested sizes; over many crops the areas spread over both ranges."""
    task = CNNDINOPretext(tiny_encoder(), global_size=32, local_size=16, n_local_crops=4, **HEAD)
    assert (task.augment.global_scale, task.augment.local_scale) == ((0.4, 1.0), (0.05, 0.4))
    torch.manual_seed(0)
    glob, loc = [], []
    for _ in range(3):
        views = task.augment(torch.rand(8, 3, 64, 64))
        glob += task.augment.last_area_fractions["global"]
        loc += task.augment.last_area_fractions["local"]
    assert [tuple(v.shape) for v in views] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 4
    assert len(glob) == 48 and len(loc) == 96
    # integer crop sides round the sampled area: allow 2% of slack at the bounds
    assert min(glob) >= 0.4 - 0.02 and max(glob) <= 1.0
    assert min(loc) >= 0.05 - 0.02 and max(loc) <= 0.4 + 0.02
    # the areas spread over each range (RandomResizedCrop redraws boxes that do not fit at extreme aspect ratios, so
    # large areas are a little rarer than uniform: no mean is asserted)
    assert min(glob) < 0.5 and max(glob) > 0.9 and min(loc) < 0.1 and max(loc) > 0.33
    assert all(0.0 <= v.min() and v.max() <= 1.0 for v in views)  # [0, 1]: the backbone normalises itself


def test_dino_on_a_cnn_is_the_cnn_task_and_vit_keeps_its_own():
    from tpp_monai.backbones.vit import build_vit

    assert pretext_name_for("dino", tiny_encoder()) == "dino_cnn"
    assert pretext_name_for("dino", build_vit("tiny", depth=1, img_size=32, patch_size=8)) == "dino"
    assert pretext_name_for("mae", tiny_encoder()) == "mae"
    assert PRETEXT_TASKS.get("dino3d") is DINO3DPretext and PRETEXT_TASKS.get("dino_cnn") is CNNDINOPretext


def _train(task, opt, steps: int, batch) -> None:
    """``steps`` plain optimiser steps of ``task`` on ``batch()`` images (seed 1), with its ``after_step`` hook."""
    torch.manual_seed(1)
    for i in range(steps):
        task.train()
        out = task(batch())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        task.after_step(i, steps)


def test_frozen_backbone_and_bn_statistics_unchanged_targets_moved():
    """norm_tuning on a batch-norm encoder: BN weights/biases move; convolutions and the running statistics
    (frozen backbone tensors) stay bit-identical, in the student and in the teacher."""
    m = tiny_encoder("norm_tuning")
    before = _digests(m)
    targets = set(target_state_dict(m))
    assert targets and all(".1." in n for n in targets)  # the BN layers' weight / bias
    task = CNNDINOPretext(m, global_size=32, local_size=16, n_local_crops=2, **HEAD)
    opt = build_optimizer(task, lr=1e-2, weight_decay=0.0)
    _train(task, opt, 3, lambda: torch.rand(4, 3, 48, 48))
    assert all(not bn.training for bn in m.modules() if isinstance(bn, nn.BatchNorm2d))
    moved = {n for n, d in _digests(m).items() if d != before[n]}
    assert moved == targets
    teacher = _digests(task.teacher_backbone)
    assert {n for n, d in teacher.items() if d != before[n]} == targets  # EMA moved the teacher's targets only


def test_decoder_rule_reaches_2d_decoder_targets():
    """A 2D network with a decoder (STU-Net 2D): pooled decoder stages put every Conv-Adapter under the loss."""
    m = stunet(2)
    before = _digests(m)
    targets = set(target_state_dict(m))
    assert any(n.startswith("conv_blocks_localization") for n in targets)
    task = CNNDINOPretext(m, global_size=16, local_size=8, n_local_crops=1, multicrop="volume", **HEAD)
    assert task.features == "decoder" and task.spatial_dims == 2
    opt = build_optimizer(task, lr=1e-2, weight_decay=0.0)
    _train(task, opt, 3, lambda: torch.randn(2, 1, 16, 16))  # zero-init up-projections need one step first
    moved = {n for n, d in _digests(m).items() if d != before[n]}
    assert moved == targets


def test_tpp_hands_over_the_teacher_and_writes_the_report(tmp_path):
    """tpp_pretrain(pretext='dino') on a CNN: the checkpoint holds the EMA teacher's target parameters (not the
    student's), equal to the re-stated EMA after one step, and tpp_report.json says so."""
    m = tiny_encoder("norm_tuning")
    w0 = target_state_dict(m)
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    cfg = dict(global_size=32, local_size=16, n_local_crops=2, **HEAD)
    seen = {}

    class Grab:
        def attach(self, engine):
            from ignite.engine import Events

            engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.update(
                student=target_state_dict(engine.task.backbone), teacher=target_state_dict(engine.task.teacher_backbone)))

    path = tpp_pretrain(m, None, "dino", images, pretext_config=cfg, batch_size=4, epochs=1, lr=1e-2,
                        output_dir=tmp_path, tensorboard=False, handlers=[Grab()])
    ck = read_target_checkpoint(path)
    assert ck["meta"]["pretext"] == "dino_cnn"
    mom = cosine_momentum(0, 1)
    for n, w in ck["state_dict"].items():
        assert torch.allclose(w, mom * w0[n] + (1 - mom) * seen["student"][n], atol=1e-7)
        assert torch.equal(w, seen["teacher"][n])
    assert any(not torch.equal(seen["student"][n], ck["state_dict"][n]) for n in w0)
    rep = read_report(tmp_path / "tpp_report.json")
    assert rep["pretext"] == "dino_cnn" and rep["handover"] == "teacher" and rep["total_steps"] == 1


def test_flexible_unet_decoder_rule_pools_every_decoder_stage():
    """FlexUNetSegmenter (MONAI FlexibleUNet around the EfficientNet encoder): forward_decoder's last stage is what
    FlexibleUNet's own forward segments, and with target parameters in the decoder too (norm_tuning on the whole
    network) DINO's 'auto' feature pools the bottleneck and all 5 decoder stages, reaching every target tensor."""
    from tpp_monai.backbones.efficientnet import EfficientNetLite0Encoder
    from tpp_monai.networks import FlexUNetSegmenter

    torch.manual_seed(0)
    net = FlexUNetSegmenter(EfficientNetLite0Encoder(input_norm="none"), 2, decoder_channels=(16, 16, 8, 8, 8)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        dec = net.forward_decoder(net.forward_encoder(x))
        assert [tuple(d.shape[1:]) for d in dec] == [(16, 2, 2), (16, 4, 4), (8, 8, 8), (8, 16, 16), (8, 32, 32)]
        assert torch.equal(net.segmentation_head(dec[-1]), net(x))
    assert net.backbone is net.encoder and net.backbone_name == "tpp-efficientnet-lite0"
    apply_peft(net, "norm_tuning")
    before = _digests(net)
    targets = set(target_state_dict(net))
    assert any(n.startswith("decoder.") for n in targets) and any(n.startswith("encoder.") for n in targets)
    task = CNNDINOPretext(net, global_size=32, local_size=32, n_local_crops=1, **HEAD)
    assert task.features == "decoder" and task.head.mlp[0].in_features == 320 + 16 + 16 + 8 + 8 + 8
    opt = build_optimizer(task, lr=1e-2, weight_decay=0.0)
    _train(task, opt, 2, lambda: torch.rand(2, 3, 32, 32))
    moved = {n for n, d in _digests(net).items() if d != before[n]}
    assert moved == targets  # decoder BN weights included; no running statistic, no convolution moved


def test_cnn_classifier_is_global_pool_and_linear():
    from tpp_monai.networks import build_cnn_classifier

    enc = tiny_encoder("norm_tuning")
    clf = build_cnn_classifier(enc, 3).eval()
    with torch.no_grad():
        clf.head.head.weight.normal_()
        x = torch.rand(2, 3, 32, 32)
        pooled = enc(x)[-1].mean(dim=(2, 3))
        assert torch.allclose(clf(x), pooled @ clf.head.head.weight.T + clf.head.head.bias, atol=1e-6)
    clf.train()
    assert clf.head.training and not any(m.training for m in enc.modules() if isinstance(m, nn.BatchNorm2d))
