"""The TPP learning report (issue 20.1): fields, definitions re-stated by hand, warnings, resume, hand-over."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tpp_monai.backbones.vit import build_vit
from tpp_monai.engines.tpp_report import REPORT_NAME, TPPLearningWarning, TPPReport, read_report, target_kind
from tpp_monai.peft import apply_peft
from tpp_monai.tpp import tpp_pretrain

SMALL_DEC = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)
FIELDS = {"format", "version", "path", "pretext", "peft", "handover", "steps", "total_steps", "first_step", "last_step",
          "complete", "warmup_steps", "window", "loss_start", "loss_end", "loss_rel_change", "loss_checked", "lr_sum",
          "lr_max", "targets", "rel_change_max", "rel_change_min", "moved", "thresholds", "learned", "warnings",
          "seconds"}


def _vit(seed: int = 0):
    torch.manual_seed(seed)
    return build_vit("tiny", depth=2, img_size=32, patch_size=8)


def test_target_kind_groups_by_method_tensor():
    assert target_kind("blocks.3.peft_adapter.down.weight") == "adapter.down.weight"
    assert target_kind("conv_blocks_context.0.blocks.1.peft_conv_adapter.alpha") == "conv_adapter.alpha"
    assert target_kind("peft_prompts") == "prompts"
    assert target_kind("blocks.0.attn.qkv.bias") == "blocks.attn.qkv.bias"  # BitFit-like: no peft_ module


def test_report_maths_restated():
    """Windows, relative changes (||w - w0|| / ||w0||, ||w|| for zero init) and lr sum, by hand on a toy model."""
    net = torch.nn.Module()
    net.peft_a = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w0|| = 5
    net.peft_b = torch.nn.Parameter(torch.zeros(3))
    from tpp_monai.peft.api import PEFT_ATTR
    from tpp_monai.peft.base import PeftMethod

    class Toy(PeftMethod):
        name = "toy"

    setattr(net, PEFT_ATTR, Toy())  # target parameters: the peft_* tensors
    rep = TPPReport(net, pretext="mae", peft="toy", total_steps=20, warmup_steps=2)
    losses = [2.0 - 0.05 * i for i in range(20)]
    for i, v in enumerate(losses):
        rep.record(v, 1e-3 * (i + 1))
    with torch.no_grad():
        net.peft_a.add_(torch.tensor([0.3, -0.4]))  # moved 0.5 -> 10%
        net.peft_b.copy_(torch.tensor([0.0, 0.06, 0.08]))  # ||w|| = 0.1
    r = rep.summary()
    assert set(r) == FIELDS
    assert r["window"] == 2 and r["loss_start"] == pytest.approx(np.mean(losses[:2]))
    assert r["loss_end"] == pytest.approx(np.mean(losses[-2:]))
    assert r["loss_rel_change"] == pytest.approx((np.mean(losses[-2:]) - np.mean(losses[:2])) / np.mean(losses[:2]))
    assert r["lr_sum"] == pytest.approx(1e-3 * 210) and r["lr_max"] == pytest.approx(0.02)
    assert r["targets"]["a"]["rel_change"] == pytest.approx(0.1) and not r["targets"]["a"]["zero_init"]
    assert r["targets"]["b"]["rel_change"] == pytest.approx(0.1) and r["targets"]["b"]["zero_init"]
    assert r["moved"] == pytest.approx(0.1) and r["learned"] and r["warnings"] == []


def test_inert_run_warns_and_writes_the_report(tmp_path, capsys):
    """One step: the loss cannot fall, the adapters' down-projection hardly moves -> a warning naming the cause."""
    with pytest.warns(TPPLearningWarning, match="too few steps"):
        ckpt = tpp_pretrain(_vit(), "adapter", "mae", torch.rand(8, 3, 32, 32), peft_config={"bottleneck": 8},
                            pretext_config=SMALL_DEC, batch_size=8, output_dir=tmp_path, tensorboard=False)
    r = read_report(ckpt.parent / REPORT_NAME)
    assert set(r) == FIELDS and r["steps"] == r["total_steps"] == 1 and r["complete"]
    assert not r["learned"] and r["moved"] < 0.01 and r["loss_rel_change"] == 0.0
    assert set(r["targets"]) == {"adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias"}
    assert r["targets"]["adapter.up.weight"]["zero_init"] and not r["targets"]["adapter.down.weight"]["zero_init"]
    assert "[tpp-monai] TPP report: loss" in capsys.readouterr().out  # the run's log line (logger + stdout)


def test_report_survives_resume(tmp_path):
    """Killed after iteration 5 (last save at 4), resumed: the report equals the uninterrupted run's."""
    from conftest import run_interrupted
    from tpp_monai.engines.optim import build_optimizer
    from tpp_monai.engines.tpp_trainer import TPPTrainer
    from tpp_monai.pretext.mae import MAEPretext

    data = torch.rand(4, 3, 32, 32)

    def run(out, stop_at=None, resume=False):
        vit = _vit()
        apply_peft(vit, "adapter", {"bottleneck": 8})
        task = MAEPretext(vit, **SMALL_DEC)
        opt = build_optimizer(task, lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        tr = TPPTrainer("cpu", 6, loader, task, opt, out, schedule={"lr": 1e-3, "warmup_epochs": 2},
                        checkpoint_every_iters=2, checkpoint_every_epochs=None, resume=resume, seed=5, tensorboard=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TPPLearningWarning)
            run_interrupted(tr, stop_at)
        return tr

    run(tmp_path / "ref")
    run(tmp_path / "run", stop_at=5)
    assert not (tmp_path / "run" / REPORT_NAME).exists()
    run(tmp_path / "run", resume=True)
    a, b = (read_report(tmp_path / d / REPORT_NAME) for d in ("ref", "run"))
    assert b["complete"] and b["steps"] == a["steps"] == 6 and b["first_step"] == 1
    for k in ("loss_start", "loss_end", "lr_sum"):
        assert b[k] == a[k], k  # the resumed run equals the uninterrupted one bit for bit
    assert b["targets"] == a["targets"]
