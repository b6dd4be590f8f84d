"""Unreadable checkpoints get the right diagnosis (issue 21, items 11 and 14): never "pass allow_pickle" for
something that is not a pickle, never "corrupt" for a crafted pickle; damaged target tensors are caught."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from tpp_monai.backbones.weights import CheckpointFormatError, load_vit_checkpoint
from tpp_monai.backbones.vit import build_vit
from tpp_monai.safe_io import CheckpointCorrupt, safe_load
from tpp_monai.peft.target_checkpoint import load_target_checkpoint, read_target_checkpoint, save_target_checkpoint
from tpp_monai.checkpoint_diagnosis import pickle_globals
from tpp_monai.peft import apply_peft


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


NOT_TORCH = {
    "random": (lambda: os.urandom(4096), "not a PyTorch checkpoint"),
    "text": (lambda: b"epoch 10 loss 0.31\nepoch 11 loss 0.29\n", "a text file"),
    "html": (lambda: b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>", "an HTML page"),
    "lfs": (lambda: b"version https://git-lfs.github.com/spec/v1\noid sha256:ab12\nsize 123\n", "Git LFS pointer"),
    "plain_pickle": (lambda: pickle.dumps({"w": [1.0, 2.0]}, protocol=4), "plain Python pickle"),
}


def _errors(path: Path) -> list[str]:
    """The messages of the two library loaders for ``path`` (safe_load and the ViT loader)."""
    out = []
    for load in (safe_load, load_vit_checkpoint):
        with pytest.raises((RuntimeError, CheckpointFormatError)) as ei:
            load(path)
        out.append(str(ei.value))
    return out


@pytest.mark.parametrize("kind", sorted(NOT_TORCH))
def test_files_that_are_not_checkpoints_are_not_called_pickles(tmp_path, kind):
    make, phrase = NOT_TORCH[kind]
    p = tmp_path / "model.pth"
    p.write_bytes(make())
    for msg in _errors(p):
        assert str(p) in msg and phrase in msg, msg
        assert "allow_pickle" not in msg and "pickled Python objects" not in msg, msg


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_malicious_pickle_is_refused_by_name_not_called_corrupt(tmp_path, legacy):
    p = tmp_path / "model.pth"
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, p, _use_new_zipfile_serialization=not legacy)
    assert any(g.replace(" ", ".").endswith(".system") for g in pickle_globals(p))  # found without unpickling
    for msg in _errors(p):
        assert "refused: it would import" in msg and "os.system" in msg and str(p) in msg, msg
        assert "corrupt" not in msg and "allow_pickle=True" not in msg, msg
    assert not marker.exists()


def test_a_method_payload_is_refused_too(tmp_path):
    """A method payload (``getattr(Path, "write_text")``, as pickle stores methods) is a call, not data."""
    class MethodPayload:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "PWNED", "x"))

    p = tmp_path / "m.pth"
    torch.save({"x": MethodPayload()}, p)
    msg = _errors(p)[0]
    assert "refused: it would import builtins.getattr" in msg and not (tmp_path / "PWNED").exists()


def test_a_legacy_pickle_of_harmless_objects_gets_the_opt_in(tmp_path):
    p = tmp_path / "medcoss.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1.0)}, p)
    for msg in _errors(p):
        assert "legacy pickle" in msg and "argparse.Namespace" in msg and "allow_pickle=True" in msg, msg
        assert "source you trust" in msg


def test_a_corrupt_archive_is_called_corrupt(tmp_path):
    good = io.BytesIO()
    torch.save({"w": torch.ones(4)}, good)
    p = tmp_path / "c.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(p, "w") as zout:  # a valid zip whose pickle is garbage
        for info in zin.infolist():
            zout.writestr(info, os.urandom(64) if info.filename.endswith("data.pkl") else zin.read(info))
    for msg in _errors(p):
        assert "archive is corrupt" in msg and "allow_pickle" not in msg, msg


def _vit():
    torch.manual_seed(0)
    vit = build_vit("tiny", depth=1, img_size=32, patch_size=8)
    apply_peft(vit, "adapter", {"bottleneck": 4})
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if "peft_" in n:
                p.add_(torch.randn_like(p))
    return vit


def test_a_one_byte_flip_in_a_target_checkpoint_is_caught(tmp_path):
    vit = _vit()
    path = save_target_checkpoint(tmp_path / "t.pt", vit)
    name, tensor = max(read_target_checkpoint(path)["state_dict"].items(), key=lambda kv: kv[1].numel())
    data = bytearray(path.read_bytes())
    at = bytes(data).find(tensor.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x01  # one bit of one float: torch loads it without any error
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    assert not torch.equal(torch.load(bad, weights_only=True)["state_dict"][name], tensor)
    with pytest.raises(CheckpointCorrupt, match=r"flipped\.pt is damaged: its target tensors do not match"):
        load_target_checkpoint(bad, _vit())


def test_a_target_checkpoint_without_digest_loads_with_a_warning(tmp_path):
    vit = _vit()
    path = save_target_checkpoint(tmp_path / "t.pt", vit)
    obj = torch.load(path, weights_only=True)
    obj.pop("state_digest")
    obj["version"] = 2
    torch.save(obj, tmp_path / "v2.pt")
    fresh = _vit()
    with pytest.warns(UserWarning, match=r"v2\.pt has no tensor digest"):
        load_target_checkpoint(tmp_path / "v2.pt", fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a current file: no warning
        load_target_checkpoint(path, fresh)


def test_vit_loader_warns_on_nan_weights_naming_them(tmp_path):
    torch.manual_seed(0)
    vit = build_vit("tiny", depth=1, img_size=32, patch_size=8)
    state = vit.state_dict()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    state["pos_embed"][0, 0, 0] = float("inf")
    p = tmp_path / "diverged.pth"
    torch.save(state, p)
    with pytest.warns(UserWarning, match=r"diverged\.pth holds NaN/Inf in 2 tensor") as rec:
        load_vit_checkpoint(p)
    msg = str(rec[0].message)
    assert "blocks.0.attn.qkv.weight" in msg and "pos_embed" in msg
