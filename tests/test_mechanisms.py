"""One implementation per mechanism (issue 22 items 3 and 5): the shared TPP step, the run state that every resume
restores, pretext recipes owned by their classes, the atomic writer, the backbone file read and the frozen-backbone
hashes once, registries that the builders use, and the methods that the bundles refuse."""

from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch
from torch import nn

from tpp_monai.backbones.vit import build_vit
from tpp_monai.engines.optim import build_optimizer
from tpp_monai.engines.run_state import restore_rank_rng, rng_state, set_rng_state, settings_diff
from tpp_monai.engines.tpp_step import tpp_step
from tpp_monai.engines.tpp_trainer import TPPTrainer
from tpp_monai.peft import apply_peft, backbone_fingerprint
from tpp_monai.pretext import PretextTask, pretext_recipe
from tpp_monai.pretext.mae import MAEPretext
from tpp_monai.safe_io import atomic_file, atomic_write, safe_load

IMG, PATCH = 32, 8
SMALL_DEC = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def adapter_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vit = build_vit("tiny", depth=2, img_size=IMG, patch_size=PATCH)
    apply_peft(vit, "adapter", {"bottleneck": 8})
    return vit


class _Quadratic(PretextTask):
    """A pretext task without an optimiser recipe: loss = mean((W x - 1)^2) over a Linear 'backbone'."""

    name = "quadratic"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.steps: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.backbone(images) - 1.0) ** 2).mean()}

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps.append((step, total_steps))


def _mae_trainer(out, data, epochs: int, resume) -> TPPTrainer:
    task = MAEPretext(adapter_vit(), **SMALL_DEC)
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    return TPPTrainer("cpu", epochs, loader, task, build_optimizer(task, lr=1e-3), out,
                      schedule={"lr": 1e-3, "warmup_epochs": 0}, checkpoint_every_epochs=1, resume=resume, seed=3,
                      tensorboard=False)


# ------------------------------------------------------------------ one resume / run-state module
def test_tpp_resume_restores_numpy_and_python_rng(tmp_path):
    """The TPP resume file holds every RNG state and resuming restores numpy's and Python's too (it kept torch's
    only): after the resume the next draws are those the killed process would have made."""
    data = torch.rand(4, 3, IMG, IMG)
    _mae_trainer(tmp_path, data, 2, False).run()
    saved = safe_load(tmp_path / "tpp_resume.pt")["rng"]
    assert {"torch", "numpy", "python", "cuda", "monai"} <= set(saved)
    set_rng_state(saved)
    expected = (np.random.rand(3).tolist(), [random.random() for _ in range(3)], torch.rand(3).tolist())
    np.random.seed(12345)
    random.seed(12345)
    torch.manual_seed(12345)
    resumed = _mae_trainer(tmp_path, data, 2, True)  # loads the resume state in __init__
    try:
        assert resumed.state.iteration == 2
        got = (np.random.rand(3).tolist(), [random.random() for _ in range(3)], torch.rand(3).tolist())
        assert got == expected
    finally:
        resumed.lock.release()


def test_fine_tuning_and_tpp_share_the_run_state_functions():
    """Fine-tuning's resume handler restores through the same module (each rank its own state) and names changed
    settings with the same diff as TPP."""
    import tpp_monai.bundle.resume as ft
    import tpp_monai.engines.tpp_trainer as tpp

    assert ft.restore_rank_rng is restore_rank_rng and ft.settings_diff is settings_diff
    assert tpp.settings_diff is settings_diff and tpp.rng_state is rng_state
    np.random.seed(7)
    random.seed(7)
    obj = {"rng": rng_state(), "rng_ranks": [rng_state()]}
    expected = (np.random.rand(), random.random())
    np.random.seed(0)
    random.seed(0)
    restore_rank_rng(obj, "finetune_resume.pt")
    assert (np.random.rand(), random.random()) == expected
    assert settings_diff({"lr": 0.1, "seed": 0}, {"lr": 0.2, "seed": 0}) == "lr: saved 0.1 vs now 0.2"
    assert settings_diff({"lr": 0.1}, {"lr": 0.1}) == ""


# ------------------------------------------------------------------ one TPP step
def test_tpp_step_accumulates_clips_and_calls_after_step():
    """Accumulation over micro-batches equals one step on the mean loss; clipping bounds the update's gradient
    norm; after_step gets the step index. SGD makes the expected update exact: w - lr * clip(grad)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    task = _Quadratic(lin)
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    ref = _Quadratic(nn.Linear(4, 3))
    ref.load_state_dict(task.state_dict())
    loss = (ref(x1)["loss"] + ref(x2)["loss"]) / 2
    grads = torch.autograd.grad(loss, list(ref.backbone.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    clip = float(norm) / 2  # the clip is active
    lr = 0.1
    expected = [p.detach() - lr * g * (clip / (float(norm) + 1e-6)) for p, g in zip(ref.backbone.parameters(), grads)]
    out = tpp_step(task, task, torch.optim.SGD(task.parameters(), lr=lr), [x1, x2], step=4, total_steps=9,
                   device="cpu", clip_grad=clip, accumulation=2)
    assert float(out) == pytest.approx(float(loss.detach()), rel=1e-6)
    for p, e in zip(task.backbone.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)
    assert task.steps == [(4, 9)]


def test_tpp_step_refuses_a_non_finite_loss_before_changing_anything():
    task = _Quadratic(nn.Linear(4, 3))
    before = {k: v.clone() for k, v in task.state_dict().items()}
    x = torch.randn(2, 4)
    x[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="TPP loss is nan at iteration 1"):
        tpp_step(task, task, torch.optim.SGD(task.parameters(), lr=0.1), [x], step=0, total_steps=1, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items()) and task.steps == []


def test_the_nnunet_stage_and_the_trainer_run_the_same_step():
    pytest.importorskip("nnunetv2")
    import tpp_monai.engines.tpp_trainer as tpp
    import tpp_monai.nnunet.trainers as nnunet

    assert tpp.tpp_step is tpp_step and nnunet.tpp_step is tpp_step
    assert not hasattr(nnunet, "rng_states")  # its own RNG code is gone: the run-state module saves every state


# ------------------------------------------------------------------ pretext recipes owned by the classes
def test_a_pretext_without_defaults_is_an_error_naming_it():
    """Not MAE's recipe silently: the TPP optimiser of a pretext without ``defaults`` is refused, naming it."""
    from tpp_monai.bundle.tpp_stage import build_tpp_optimizer

    task = _Quadratic(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="pretext 'quadratic' .*has no default optimiser recipe"):
        build_tpp_optimizer(task)
    with pytest.raises(ValueError, match="quadratic"):
        pretext_recipe(task, 64, lr=1e-3)
    given = pretext_recipe(task, 64, lr=1e-3, weight_decay=0.1, warmup_epochs=2, betas=[0.9, 0.99])
    assert given == {"lr": 1e-3, "weight_decay": 0.1, "weight_decay_end": None, "warmup_epochs": 2,
                     "betas": (0.9, 0.99), "min_lr": 0.0}


def test_pretext_recipes_are_the_classes_own():
    from tpp_monai.bundle.tpp_stage import build_tpp_optimizer
    from tpp_monai.pretext.dino import DINOPretext
    from tpp_monai.pretext.dino_cnn import DINO3DPretext

    mae = pretext_recipe("mae", 64)
    assert (mae["lr"], mae["weight_decay"], mae["warmup_epochs"], mae["betas"]) == (1.5e-3, 1.5e-2, 40, (0.9, 0.95))
    dino = pretext_recipe(DINOPretext, 512)
    assert dino["lr"] == pytest.approx(1e-4 * 512 / 256) and dino["weight_decay_end"] == 0.4
    assert DINO3DPretext.defaults == DINOPretext.defaults
    opt = build_tpp_optimizer(MAEPretext(adapter_vit(), **SMALL_DEC), batch_size=64)
    assert opt.param_groups[0]["lr"] == 1.5e-3 and opt.param_groups[0]["betas"] == (0.9, 0.95)
    # a value given wins, the rest stays the class's
    assert pretext_recipe("dino", 64, weight_decay=0.1)["weight_decay_end"] == 0.4


def test_nnunet_tpp_settings_come_from_the_pretext_class():
    pytest.importorskip("nnunetv2")
    from tpp_monai.nnunet.trainers import _TPPStage
    from tpp_monai.pretext.dino_cnn import DINO3DPretext

    d = DINO3DPretext.defaults
    assert (_TPPStage.tpp_lr_per_256, _TPPStage.tpp_weight_decay, _TPPStage.tpp_weight_decay_end,
            _TPPStage.tpp_warmup_epochs, _TPPStage.tpp_clip_grad) == (
        d["lr_per_256"], d["weight_decay"], d["weight_decay_end"], d["warmup_epochs"], DINO3DPretext.default_clip_grad)


# ------------------------------------------------------------------ one atomic writer
def test_atomic_file_keeps_the_old_file_on_error_and_sets_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert path.read_text() == "old" and sorted(os.listdir(path.parent)) == ["result.json"]
    with atomic_file(path) as tmp:  # a writer that takes a file name
        torch.save({"x": torch.ones(2)}, tmp)
    assert torch.equal(safe_load(path)["x"], torch.ones(2)) and sorted(os.listdir(path.parent)) == ["result.json"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


# ------------------------------------------------------------------ backbone read and hashed once
def test_the_backbone_file_is_read_and_hashed_once_per_process(tmp_path, monkeypatch):
    """The per-run path reads the backbone checkpoint for the backbone and again for the MAE decoder: one read and
    one SHA-256 (cached by path, inode, times and size); a rewritten file is read again."""
    import tpp_monai.backbones.weights as weights
    from tpp_monai.bundle import build_backbone, build_pretext

    torch.manual_seed(0)
    vit = build_vit("tiny", depth=2, img_size=IMG, patch_size=PATCH)
    ckpt = tmp_path / "backbone.pth"
    torch.save({"model": vit.state_dict()}, ckpt)
    calls = {"read": 0, "sha": 0}
    read, sha = weights._read_file, weights._sha256

    def counted_read(*a, **k):
        calls["read"] += 1
        return read(*a, **k)

    def counted_sha(*a, **k):
        calls["sha"] += 1
        return sha(*a, **k)

    monkeypatch.setattr(weights, "_read_file", counted_read)
    monkeypatch.setattr(weights, "_sha256", counted_sha)
    weights.clear_checkpoint_cache()
    backbone = build_backbone(str(ckpt), img_size=IMG)
    apply_peft(backbone, "adapter", {"bottleneck": 8})
    build_pretext(backbone, "mae", "inherit_frozen", str(ckpt), pretext_config=SMALL_DEC)  # no decoder: a new one
    assert calls == {"read": 1, "sha": 1}
    torch.save({"model": {k: v + 1 if v.is_floating_point() else v for k, v in vit.state_dict().items()}}, ckpt)
    os.utime(ckpt, ns=(1, 1))  # another file at the same path, even with an old modification time
    loaded = weights.load_vit_checkpoint(ckpt, allow_partial=True)
    assert calls == {"read": 2, "sha": 2} and loaded.sha256 == sha(ckpt)
    weights.clear_checkpoint_cache()


def test_the_frozen_backbone_is_hashed_once_per_tpp_run(tmp_path, monkeypatch):
    """Three epochs, a target checkpoint and a resume file each: one hash of the frozen backbone (it was two per
    save, ~344 MB each for ViT-B), and the files still record its true fingerprint."""
    import tpp_monai.engines.tpp_trainer as tpp
    import tpp_monai.peft.target_checkpoint as tc

    calls = []
    real = tpp.backbone_hashes

    def counted(module):
        calls.append(module)
        return real(module)

    monkeypatch.setattr(tpp, "backbone_hashes", counted)
    monkeypatch.setattr(tc, "backbone_hashes", counted)
    trainer = _mae_trainer(tmp_path, torch.rand(2, 3, IMG, IMG), 3, False)
    trainer.run()
    assert len(calls) == 1
    fp = backbone_fingerprint(trainer.task.backbone)
    assert tc.read_target_checkpoint(tmp_path / "target_params.pt")["backbone_fingerprint"] == fp
    assert safe_load(tmp_path / "tpp_resume.pt")["backbone_fingerprint"] == fp


# ------------------------------------------------------------------ registries used, refusals in bundles
def test_builders_look_heads_up_in_the_registry():
    from tpp_monai.bundle import build_classifier
    from tpp_monai.heads import HEADS
    from tpp_monai.heads.classification import LinearClsHead

    @HEADS.register("test_zero_head")
    class ZeroHead(nn.Module):
        def __init__(self, embed_dim: int, num_classes: int, pool: str = "mean", fc_norm: bool = True) -> None:
            super().__init__()
            self.fc = nn.Linear(embed_dim, num_classes)
            nn.init.zeros_(self.fc.weight)
            nn.init.constant_(self.fc.bias, 2.0)

        def forward(self, tokens: torch.Tensor, n_patches: int) -> torch.Tensor:
            return self.fc(tokens[:, -n_patches:].mean(1))

    try:
        net = build_classifier(build_vit("tiny", depth=1, img_size=IMG, patch_size=PATCH), 3, head="test_zero_head")
        assert isinstance(net.head, ZeroHead)
        assert torch.equal(net(torch.rand(2, 3, IMG, IMG)), torch.full((2, 3), 2.0))
        assert isinstance(build_classifier(build_vit("tiny", depth=1, img_size=IMG, patch_size=PATCH), 3).head,
                          LinearClsHead)
    finally:
        HEADS._items.pop("test_zero_head", None)


@pytest.mark.parametrize("method, route", [("fpt_plus", "FPTPlusClassifier"), ("sh_peft", "build_sh_optimizer")])
def test_bundles_refuse_fpt_plus_and_sh_peft_naming_the_route(method, route):
    """``--peft_method fpt_plus`` used to train only the head silently (the side network is never called): the
    bundle's network builder refuses it, and SH-PEFT, saying why and where they do train."""
    from tpp_monai.bundle import build_peft_backbone

    with pytest.raises(ValueError, match=rf"--peft_method {method} is not supported in the bundles: .*{route}"):
        build_peft_backbone("", size="tiny", img_size=IMG, peft_method=method)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_the_refusal_lists_the_methods_of_the_bundles_backbone_kind(kind):
    """A CNN bundle's refusal names the CNN methods (Conv-Adapter, TSA, ...), not the ViT ones it cannot train."""
    from tpp_monai.bundle.networks import refuse_in_bundles
    from tpp_monai.peft.registry import PEFT_METHODS

    with pytest.raises(ValueError) as e:
        refuse_in_bundles("sh_peft", kind)
    listed = set(str(e.value).split("Bundles train: ")[1].rstrip(".").split(", "))
    expected = {n for n in PEFT_METHODS.names()
                if kind in PEFT_METHODS.get(n).applies_to and not PEFT_METHODS.get(n).bundle_refusal}
    assert listed == expected
    assert ("conv_adapter" in listed) == (kind == "cnn") and ("lora" in listed) == (kind == "vit")


def test_a_bundle_config_with_fpt_plus_is_refused():
    """Through MONAI's own ConfigParser on a generated bundle (what ``monai.bundle run`` does first)."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    cfg = Path(__file__).resolve().parents[1] / "bundles" / "mhist_adapter_tpp" / "configs" / "train.json"
    parser = ConfigParser()
    parser.read_config(str(cfg))
    parser["peft_method"] = "fpt_plus"
    parser["backbone_ckpt"] = ""
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("network_def")
    chain, err = [], e.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("--peft_method fpt_plus is not supported in the bundles" in m for m in chain)
