"""Target-parameter checkpoint: round trip, refusal cases, atomic writes, safe loading."""

from __future__ import annotations

import pytest
import torch

from tpp_monai.backbones.vit import build_vit
from tpp_monai.safe_io import CheckpointMismatch, atomic_save, safe_load
from tpp_monai.peft.target_checkpoint import load_target_checkpoint, read_target_checkpoint, save_target_checkpoint
from tpp_monai.peft import apply_peft, target_state_dict
from tpp_monai.peft.api import tensors_digest


def model(seed: int = 0, bottleneck: int = 8):
    torch.manual_seed(seed)
    vit = build_vit("tiny", depth=2, img_size=32, patch_size=8)
    apply_peft(vit, "adapter", {"bottleneck": bottleneck})
    return vit


def trained(seed: int = 0):
    vit = model(seed)
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if "peft_" in n:
                p.add_(torch.randn_like(p))
    return vit


def test_round_trip_into_fresh_model(tmp_path):
    src = trained()
    path = save_target_checkpoint(tmp_path / "t.pt", src, meta={"data": "x"})
    obj = read_target_checkpoint(path)
    assert obj["peft"] == {"method": "adapter", "config": {"bottleneck": 8}}
    assert set(obj["state_dict"]) == {n for n, _ in src.named_parameters() if "peft_" in n}
    dst = model()
    assert load_target_checkpoint(path, dst) == {"data": "x"}
    a, b = target_state_dict(src), target_state_dict(dst)
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(src(x), dst(x))


def test_refusals_name_the_mismatch(tmp_path):
    path = save_target_checkpoint(tmp_path / "t.pt", trained())
    with pytest.raises(CheckpointMismatch, match="different backbone"):
        load_target_checkpoint(path, model(seed=1))
    with pytest.raises(CheckpointMismatch, match="bottleneck: checkpoint 8 vs model 4"):
        load_target_checkpoint(path, model(bottleneck=4))
    fresh = model()
    before = target_state_dict(fresh)
    obj = torch.load(path, weights_only=True)
    obj["peft"]["method"] = "lora"
    torch.save(obj, tmp_path / "m.pt")
    with pytest.raises(CheckpointMismatch, match="'lora'.*'adapter'"):
        load_target_checkpoint(tmp_path / "m.pt", fresh)
    obj = torch.load(path, weights_only=True)
    obj["state_dict"].pop(next(iter(obj["state_dict"])))
    obj["state_digest"] = tensors_digest(obj["state_dict"].items())  # consistent file, fewer tensors
    torch.save(obj, tmp_path / "s.pt")
    with pytest.raises(CheckpointMismatch, match="missing 1"):
        load_target_checkpoint(tmp_path / "s.pt", fresh)
    after = target_state_dict(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)  # never a partial load
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatch, match="not a tpp-monai target-parameter checkpoint"):
        load_target_checkpoint(tmp_path / "other.pt", fresh)


def test_backbone_refusal_names_the_tensors_that_differ(tmp_path):
    """A different backbone is refused with the differing tensors named, e.g. another pixel space."""
    path = save_target_checkpoint(tmp_path / "t.pt", trained())
    with pytest.raises(CheckpointMismatch, match=r"only in this backbone 2: input_mean, input_std"):
        load_target_checkpoint(path, model().set_input_norm("imagenet"))
    other = model()
    with torch.no_grad():
        other.blocks[1].mlp.fc2.weight.mul_(2)
    with pytest.raises(CheckpointMismatch, match=r"changed values 1: blocks\.1\.mlp\.fc2\.weight\."):
        load_target_checkpoint(path, other)
    obj = torch.load(path, weights_only=True)
    del obj["backbone_digests"]  # as written by the first release of the format
    torch.save(obj, tmp_path / "v1.pt")
    with pytest.raises(CheckpointMismatch, match="older tpp-monai.*another pixel space"):
        load_target_checkpoint(tmp_path / "v1.pt", model().set_input_norm("imagenet"))
    assert load_target_checkpoint(tmp_path / "v1.pt", model()) == {}  # same backbone: still accepted


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"a": Boom()}, path)
    assert torch.equal(safe_load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        safe_load(tmp_path / "missing.pt")
