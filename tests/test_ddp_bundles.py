"""The bundles' torchrun overlay for the TPP stage (multi_gpu_tpp_pretrain.json): present for every 2D
bundle, parses, and a 2-process gloo run of MHIST's TPP stage writes the same target parameters as a
single-process run with the same global batch and seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_bundles import BUNDLES, TINY, cfg, make_mhist, parser_for, run_stage  # noqa: E402

TPP_FILES = ("tpp_pretrain.json", "multi_gpu_tpp_pretrain.json")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # bundle_root resolves to bundles/<name> from the repository root


@pytest.mark.parametrize("bundle", BUNDLES)
def test_tpp_overlay_parses(bundle, tmp_path):
    raw = json.loads((ROOT / cfg(bundle, "multi_gpu_tpp_pretrain.json")).read_text())
    common = json.loads((ROOT / "bundles/common/multi_gpu_tpp.json").read_text())
    assert raw == {k: common[k] for k in ("device", "initialize", "finalize")}
    p = parser_for(bundle, "train.json", *TPP_FILES, bundle_root=str(tmp_path))
    p.parse()
    assert any("init_process_group" in str(x) for x in p["initialize"])
    assert p.get_parsed_content("tpp_cache") in ("memory", "disk")
    loader = p["tpp#dataloader"]
    assert loader["_target_"] == "tpp_monai.engines.distributed.global_batch_loader"
    assert loader["global_batch"] == "@tpp_batch_size"


def _bundle_tpp(rank: int, world: int, data: str, work: str) -> None:
    """The TPP stage through MONAI's bundle workflow (the overlay joins DDP only under torchrun/spawn)."""
    from monai.bundle import ConfigWorkflow

    extras = TPP_FILES if world > 1 else TPP_FILES[:1]
    # tpp_augment off: the random crops are drawn by each process's own transform state, so with them on
    # one process and two see differently cropped images and the target parameters cannot match
    over = {**TINY, "dataset_dir": data, "bundle_root": work, "tpp_epochs": 2, "tpp_epoch_length": None,
            "tpp_batch_size": 4, "tpp_warmup_epochs": 1, "tpp_augment": False}
    wf = ConfigWorkflow(config_file=[cfg("mhist", "train.json")] + [cfg("mhist", e) for e in extras],
                        meta_file=cfg("mhist", "metadata.json"), workflow_type="train", **over)
    wf.initialize()
    wf.run()
    loader = wf.parser.get_parsed_content("tpp#dataloader")
    Path(work, f"loader{rank}.json").write_text(json.dumps({"batch": loader.batch_size, "steps": len(loader)}))
    wf.finalize()


def test_bundle_tpp_two_gloo_processes_equal_one(tmp_path):
    from tpp_monai.checkpoint import read_target_checkpoint
    from tpp_monai.engines.distributed import spawn_cpu

    data = str(make_mhist(tmp_path))
    _bundle_tpp(0, 1, data, str(tmp_path / "single"))
    spawn_cpu(_bundle_tpp, 2, data, str(tmp_path / "ddp"))
    one = read_target_checkpoint(tmp_path / "single" / "models" / "tpp_target_params.pt")
    two = read_target_checkpoint(tmp_path / "ddp" / "models" / "tpp_target_params.pt")
    assert one["meta"]["iteration"] == two["meta"]["iteration"] >= 2
    # the global batch (4) is split over the two ranks; one process loads all of it
    loaded = [json.loads((tmp_path / d / f"loader{r}.json").read_text()) for d, r in (("single", 0), ("ddp", 0), ("ddp", 1))]
    assert [x["batch"] for x in loaded] == [4, 2, 2] and len({x["steps"] for x in loaded}) == 1
    a, b = one["state_dict"], two["state_dict"]
    assert set(a) == set(b) and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # something was trained: target parameters moved away from their initial values
    p = parser_for("mhist", "train.json", "tpp_pretrain.json", bundle_root=str(tmp_path / "x"), dataset_dir=data)
    from tpp_monai.peft.api import target_state_dict

    init = target_state_dict(p.get_parsed_content("backbone"))
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-4


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_cached_dataset_decodes_once_and_augments_every_epoch(cache, tmp_path):
    from monai.transforms import Compose, Lambdad, RandFlipd

    from tpp_monai.data.cache import cached_dataset

    calls = []

    def decode(x):
        calls.append(1)
        return torch.arange(16.0).reshape(1, 4, 4) + x

    tr = Compose([Lambdad("image", decode), RandFlipd("image", prob=0.5, spatial_axis=0)]).set_random_state(seed=0)
    ds = cached_dataset([{"image": float(i)} for i in range(4)], tr, cache=cache, cache_dir=tmp_path / "c")
    epochs = [[ds[i]["image"].clone() for i in range(4)] for _ in range(6)]
    assert len(calls) == (4 if cache != "none" else 24)  # the deterministic part ran once per image
    flips = {bool(torch.equal(e[0], epochs[0][0])) for e in epochs}
    assert flips == {True, False}  # the random flip still differs between epochs
    with pytest.raises(ValueError, match="cache must be one of"):
        cached_dataset([], tr, cache="ram")
