"""The nnU-Net TPP stage (``_TPPStage.run_tpp_stage``) on a stand-in trainer: what it hands over (issue 23.5)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nnunetv2")

from test_ddp_nnunet import _trainer  # noqa: E402  (the stand-in trainer: tiny STU-Net, random patches)


def test_3d_stage_hands_over_the_ema_teacher(tmp_path):
    """As 2D DINO-TPP (and DINO itself): the saved target tensors, and those fine-tuning starts from, are the EMA
    teacher's, not the student's; after two steps at lr 0.016 and momentum 0.996 the two differ."""
    from tpp_monai.peft.target_checkpoint import read_target_checkpoint
    from tpp_monai.engines.tpp_report import read_report
    from tpp_monai.peft import target_state_dict

    t = _trainer(str(tmp_path), 0, batch_size=2)
    t.run_tpp_stage()
    saved = read_target_checkpoint(tmp_path / "tpp_target_params.pt")
    final = torch.load(tmp_path / "tpp_resume.pt", weights_only=True)  # the stage's state after its last step
    assert final["iteration"] == 2
    teacher = {k[len("teacher_backbone."):]: v for k, v in final["head_state"].items() if k.startswith("teacher_backbone.")}
    student = final["target_state"]
    sd = saved["state_dict"]
    assert sd.keys() == teacher.keys() == student.keys()
    assert all(torch.equal(sd[k], teacher[k]) for k in sd)
    assert max(float((student[k] - teacher[k]).abs().max()) for k in sd) > 1e-4  # they really differ
    net = target_state_dict(t.network)  # the network that fine-tuning goes on training
    assert all(torch.equal(net[k], teacher[k]) for k in sd)
    assert saved["meta"]["handover"] == "teacher" and read_report(tmp_path / "tpp_report.json")["handover"] == "teacher"
