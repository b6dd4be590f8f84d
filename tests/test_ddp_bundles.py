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
from helpers import assert_close_to_update, chain_length, mean_tolerance  # noqa: E402
from test_bundles import BUNDLES, TINY, cfg, make_mhist, parser_for  # noqa: E402

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
    from tpp_monai.peft.api import target_state_dict

    init = {k: v.detach().clone() for k, v in target_state_dict(wf.parser.get_parsed_content("backbone")).items()}
    Path(work).mkdir(parents=True, exist_ok=True)
    torch.save(init, Path(work, f"init{rank}.pt"))
    wf.run()
    loader = wf.parser.get_parsed_content("tpp#dataloader")
    Path(work, f"loader{rank}.json").write_text(json.dumps({"batch": loader.batch_size, "steps": len(loader)}))
    wf.finalize()


def test_bundle_tpp_two_gloo_processes_equal_one(tmp_path):
    from tpp_monai.peft.target_checkpoint import read_target_checkpoint
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
    init = torch.load(tmp_path / "single" / "init0.pt")
    assert all(torch.equal(init[k], v) for d, r in (("ddp", 0), ("ddp", 1))
               for k, v in torch.load(tmp_path / d / f"init{r}.pt").items())  # the same start everywhere
    # one process and two sum the batch in another order (float32): a bound from the computation, not
    # an absolute 1e-5 (see tests/helpers.py); tiny ViT 2 x 192 + the MAE decoder 8 x 512, batch 4 x 17 tokens
    steps = one["meta"]["iteration"]
    assert_close_to_update(a, b, init, steps=steps, n=chain_length([192] * 2 + [512] * 8, rows=4 * 17))
    # something was trained: target parameters moved away from their initial values
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


# ----------------------------------------------------------------- fine-tuning with validation
FT = {"batch_size": 8, "num_iterations": 2, "val_interval": 1, "train_cache": "none",
      # no random augmentation or stochastic depth: each rank draws those from its own RNG stream
      "transforms#train#train": False, "network_def#drop_path": 0.0}


def _odd_validation(data: Path, n: int = 5) -> None:
    """Move test images into the validation split so it holds an odd number (uneven DDP shards)."""
    p = data / "datalist.json"
    d = json.loads(p.read_text())
    d["validation"] = (d["validation"] + d["test"])[:n]
    p.write_text(json.dumps(d))
    assert len(d["validation"]) == n and len(d["training"]) == 8  # 8 = one global batch


def _bundle_finetune(rank: int, world: int, data: str, work: str, shared: bool = False, kill_at: int = 0,
                     kill_rank: int | None = None, **over) -> None:
    """Stage-3 fine-tuning through the bundle (train.json [+ multi_gpu_train.json]); each rank its own
    bundle_root (unless ``shared``) so that what rank 1 writes can be checked to be nothing; ``kill_at``:
    rank ``kill_rank`` (None: every rank) dies after that iteration."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    from tpp_monai.engines.distributed import unwrap

    extras = ["multi_gpu_train.json"] if world > 1 else []
    root = Path(work, "shared" if shared else f"rank{rank}")
    wf = ConfigWorkflow(config_file=[cfg("mhist", "train.json")] + [cfg("mhist", e) for e in extras],
                        meta_file=cfg("mhist", "metadata.json"), workflow_type="train",
                        **{**TINY, **FT, "dataset_dir": data, "bundle_root": str(root), **over})
    wf.initialize()
    net = unwrap(wf.parser.get_parsed_content("network"))
    Path(work).mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad}, Path(work, f"init{rank}.pt"))
    if kill_at and kill_rank in (None, rank):
        def die(_):
            raise RuntimeError(f"killed after iteration {kill_at}")

        wf.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_COMPLETED(once=kill_at), die)
    wf.run()
    net = unwrap(wf.parser.get_parsed_content("network"))
    torch.save({k: v.detach().cpu() for k, v in net.named_parameters() if v.requires_grad}, Path(work, f"params{rank}.pt"))
    ev = wf.parser.get_parsed_content("validate#evaluator")
    Path(work, f"metrics{rank}.json").write_text(json.dumps({"metrics": ev.state.metrics,
                                                            "seen": len(ev.data_loader.sampler)}))
    wf.finalize()


def _val_log(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "logs" / "val_log.jsonl").read_text().splitlines() if x.strip()]


def test_bundle_finetune_two_gloo_processes_with_validation_equal_one(tmp_path):
    from tpp_monai.engines.distributed import spawn_cpu

    data = make_mhist(tmp_path)
    _odd_validation(data)
    one, two = tmp_path / "single", tmp_path / "ddp"
    _bundle_finetune(0, 1, str(data), str(one))
    # the old overlay ran validation on rank 0 only and its metric gather waited forever: fail, not hang
    spawn_cpu(_bundle_finetune, 2, str(data), str(two), timeout=120)
    # rank 0 writes the model, logs and resume file; rank 1 writes none of them
    assert (two / "rank0" / "models" / "model.pt").is_file()
    assert (two / "rank0" / "models" / "finetune_resume.pt").is_file()
    assert not (two / "rank1" / "models" / "model.pt").exists()
    assert not list((two / "rank1").rglob("*.jsonl")) and not list((two / "rank1").rglob("finetune_resume.pt"))
    # same trainable parameters as one process with the same global batch and seed
    a, b = torch.load(one / "params0.pt"), torch.load(two / "params0.pt")
    c = torch.load(two / "params1.pt")
    assert set(a) == set(b) == set(c) and a
    # float32 noise of another batch split (see tests/helpers.py): tiny ViT 2 x 192, batch 8 x 17 tokens
    w0 = torch.load(one / "init0.pt")
    assert_close_to_update(a, b, w0, steps=FT["num_iterations"], n=chain_length([192] * 2, rows=8 * 17))
    assert max(float((b[k] - c[k]).abs().max()) for k in b) == 0.0
    # the 5 validation images are split 3 + 2 and every rank's metrics are those of all 5
    m1 = json.loads((one / "metrics0.json").read_text())
    r0, r1 = (json.loads((two / f"metrics{r}.json").read_text()) for r in (0, 1))
    assert (m1["seen"], r0["seen"], r1["seen"]) == (5, 3, 2)
    assert set(m1["metrics"]) == set(r0["metrics"]) == {"acc_auc_f1", "acc", "auc", "f1"}
    # acc, AUC and F1 are piecewise constant in the scores (counts and ranks, computed in float64): the
    # models' float32 noise (~1e-6 of a score) changes them only if two scores tie that closely
    for k, v in m1["metrics"].items():
        assert abs(r0["metrics"][k] - v) < 1e-6 and abs(r1["metrics"][k] - v) < 1e-6, k
    # and the logged validation metric (rank 0's val_log.jsonl) equals the single-process one, epoch by epoch
    log1, log2 = _val_log(one / "rank0"), _val_log(two / "rank0")
    assert len(log1) == len(log2) == 2
    for x, y in zip(log1, log2):
        for k in m1["metrics"]:
            assert abs(x[k] - y[k]) < 1e-6, (k, x, y)


def _metrics_on_shard(rank: int, world: int, out: str) -> None:
    """Each rank feeds its DistributedSampler(even_divisible=False) shard of 7 samples (4 + 3) to the metrics."""
    from monai.data import DistributedSampler

    from tpp_monai.bundle import SegmentationMetric
    from tpp_monai.metrics.classification import EpochClassificationMetric

    g = torch.Generator().manual_seed(0)
    score = torch.softmax(torch.randn(7, 3, generator=g), 1)
    label = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    seg_pred = (torch.rand(7, 1, 12, 12, generator=g) > 0.5).long()
    seg_label = (torch.rand(7, 1, 12, 12, generator=g) > 0.4).long()
    seg_label[3] = 0  # one empty ground truth: the 500 px HD95 case
    idx = list(DistributedSampler(range(7), shuffle=False, even_divisible=False)) if world > 1 else list(range(7))
    res = {}
    for name in ("acc", "auc", "f1", "acc_auc_f1"):
        m = EpochClassificationMetric(name)
        m.reset()
        for i in idx:  # one sample per update, like a batch size 1 evaluator
            m.update((score[i:i + 1], label[i:i + 1]))
        res[name] = m.compute()
    for name in ("dice", "hd95"):
        m = SegmentationMetric(name)
        m.reset()
        for i in idx:
            m.update((seg_pred[i:i + 1], seg_label[i:i + 1]))
        res[name] = m.compute()
    Path(out, f"m{world}_{rank}.json").write_text(json.dumps({"n": len(idx), **res}))


def test_epoch_metrics_gather_uneven_shards(tmp_path):
    from tpp_monai.engines.distributed import spawn_cpu

    _metrics_on_shard(0, 1, str(tmp_path))
    spawn_cpu(_metrics_on_shard, 2, str(tmp_path), timeout=60)
    one = json.loads((tmp_path / "m1_0.json").read_text())
    ranks = [json.loads((tmp_path / f"m2_{r}.json").read_text()) for r in (0, 1)]
    assert (one["n"], ranks[0]["n"], ranks[1]["n"]) == (7, 4, 3)  # uneven, nothing padded or repeated
    assert 0 < one["acc"] < 1 and one["hd95"] > 0  # not a degenerate case
    # the same per-image scores, gathered in rank order: classification metrics are computed from counts
    # and ranks in float64; Dice (<= 1) and HD95 (<= the 500 px empty-mask value) are float32 means of 7
    # values summed in another order (mean_tolerance: 2 (n - 1) u max|x|)
    tol = {"dice": mean_tolerance(7, 1.0), "hd95": mean_tolerance(7, 500.0)}
    for r in ranks:
        for k in ("acc", "auc", "f1", "acc_auc_f1", "dice", "hd95"):
            assert abs(r[k] - one[k]) <= tol.get(k, 1e-9), (k, r[k], one[k])


@pytest.mark.parametrize("kill_rank", [1, 0])
def test_bundle_finetune_two_processes_killed_then_resumed_equals_uninterrupted(tmp_path, kill_rank):
    """2-process fine-tuning with stochastic depth and augmentation (each rank draws its own masks) whose rank
    ``kill_rank`` dies after iteration 3 (last save at 2) continues with ``resume`` True and ends with the
    trainable parameters of the uninterrupted 2-process run, bit for bit: every rank's RNG state is saved and
    restored (before, only rank 0's: 5e-4 / 1e-3 apart)."""
    from tpp_monai.engines.distributed import spawn_cpu

    data = str(make_mhist(tmp_path))
    over = {"num_iterations": 4, "save_interval": 2, "transforms#train#train": True, "network_def#drop_path": 0.2}
    ref, run = tmp_path / "ref", tmp_path / "run"
    spawn_cpu(lambda r, w: _bundle_finetune(r, w, data, str(ref), True, **over), 2, timeout=120)
    with pytest.raises(Exception, match="killed after iteration 3"):
        spawn_cpu(lambda r, w: _bundle_finetune(r, w, data, str(run), True, 3, kill_rank, **over), 2, timeout=120)
    assert not (run / "params0.pt").exists()
    saved = torch.load(run / "shared" / "models" / "finetune_resume.pt", weights_only=False)
    assert saved["iteration"] == 2  # what the resumed run starts from (iteration 3 is redone)
    first = torch.load(ref / "params0.pt")
    assert max(float((first[k] - saved["model"][k]).abs().max()) for k in first) > 1e-6  # not yet the end point
    spawn_cpu(lambda r, w: _bundle_finetune(r, w, data, str(run), True, resume=True, **over), 2, timeout=120)
    a, b = torch.load(ref / "params0.pt"), torch.load(run / "params0.pt")
    assert set(a) == set(b) and a
    # the same 2 processes and threads redo the same arithmetic in the same order: bit for bit
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert len(saved["rng_ranks"]) == 2 and not torch.equal(saved["rng_ranks"][0]["torch"], saved["rng_ranks"][1]["torch"])
    assert max(float((b[k] - torch.load(run / "params1.pt")[k]).abs().max()) for k in b) == 0.0
