"""DDP (2 gloo CPU processes) equals one process with the same global batch and seed: MAE TPP and
fine-tuning; DINO's centre is averaged over ranks; mixed precision keeps the frozen backbone bit-identical."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from tpp_monai.backbones.vit import build_vit
from tpp_monai.engines.distributed import global_batch_loader, local_batch_size, rank_rows, spawn_cpu, wrap_ddp
from tpp_monai.peft import apply_peft, get_peft, target_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import assert_close_to_update, chain_length, forward_tolerance  # noqa: E402

IMG, PATCH, N_IMAGES, GLOBAL_BATCH = 32, 8, 12, 4
SMALL_DEC = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)
STEPS = 2 * (N_IMAGES // GLOBAL_BATCH)  # 2 epochs
TOKENS = (IMG // PATCH) ** 2 + 1
# one process vs two sum the batch in another order: the bound follows from the reductions a gradient
# goes through (tiny ViT: 2 blocks of 192, MAE decoder 1 block of 32; weight gradients over batch x tokens)
MAE_CHAIN = chain_length([192, 192, 32], rows=GLOBAL_BATCH * TOKENS)
FT_CHAIN = chain_length([192, 192], rows=GLOBAL_BATCH * TOKENS)


def _images() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.rand(N_IMAGES, 3, IMG, IMG, generator=g)


def _vit(method: str = "adapter"):
    torch.manual_seed(0)
    vit = build_vit("tiny", depth=2, img_size=IMG, patch_size=PATCH)
    apply_peft(vit, method, {"bottleneck": 8} if method == "adapter" else {})
    return vit


def _frozen_hash(model: torch.nn.Module) -> str:
    m, h = get_peft(model), hashlib.sha256()
    for n, t in sorted(list(model.named_parameters()) + list(model.named_buffers()), key=lambda kv: kv[0]):
        if not m.is_target(n):
            h.update(n.encode() + t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ MAE TPP
class _StopAfterFirstEpoch:
    """Interrupts the run at the end of epoch 1, as a crash after the epoch's checkpoint would."""

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())


def _mae_run(out: Path, amp=False, resume: bool = False, handlers=None) -> tuple[dict, str, str]:
    from tpp_monai.tpp import tpp_pretrain

    vit = _vit()
    before = _frozen_hash(vit)
    tpp_pretrain(vit, None, "mae", _images(), pretext_config=SMALL_DEC, epochs=2, batch_size=GLOBAL_BATCH,
                 warmup_epochs=1, seed=0, output_dir=out, tensorboard=False, log_every=1000, amp=amp,
                 resume=resume, handlers=handlers)
    return {k: v.clone() for k, v in target_state_dict(vit).items()}, before, _frozen_hash(vit)


def _ddp_worker(rank: int, world: int, out: str) -> None:
    """Everything the tests compare, in one pair of gloo processes (starting processes is the slow part)."""
    from tpp_monai.engines.distributed import global_mean

    state, before, after = _mae_run(Path(out) / "run")
    torch.save({"state": state, "frozen": (before, after)}, Path(out) / f"rank{rank}.pt")
    from tpp_monai.safe_io import safe_load

    half, _, _ = _mae_run(Path(out) / "resumed", handlers=[_StopAfterFirstEpoch()])  # interrupted after epoch 1 ...
    stopped_at = safe_load(Path(out) / "resumed" / "tpp_resume.pt")["iteration"]
    resumed, _, _ = _mae_run(Path(out) / "resumed", resume=True)  # ... every rank resumes from rank 0's file
    torch.save({"half": half, "stopped_at": stopped_at, "resumed": resumed}, Path(out) / f"resumed{rank}.pt")
    torch.save(_ft_run(), Path(out) / f"ft{rank}.pt")
    t = torch.arange(8.0).reshape(4, 2) + 10 * rank
    torch.save(global_mean(t, dim=0), Path(out) / f"c{rank}.pt")
    torch.save(_dino_centre(rank, world), Path(out) / f"dino{rank}.pt")


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    spawn_cpu(_ddp_worker, 2, str(out))
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_mae_tpp_two_gloo_processes_equal_one(tmp_path, ddp_out):
    single, before, after = _mae_run(tmp_path / "single")
    assert before == after
    r0, r1 = (torch.load(ddp_out / f"rank{r}.pt") for r in (0, 1))
    init = target_state_dict(_vit())
    assert _max_diff(single, init) > 1e-3  # the run trained something
    assert_close_to_update(single, r0["state"], init, steps=STEPS, n=MAE_CHAIN)  # float32 noise, see helpers
    assert _max_diff(r1["state"], r0["state"]) == 0.0  # ranks stay in lock-step
    assert r0["frozen"][0] == r0["frozen"][1] == before
    # rank 0 alone wrote the checkpoint, and it holds the DDP run's values
    from tpp_monai.peft.target_checkpoint import read_target_checkpoint

    ck = read_target_checkpoint(ddp_out / "run" / "target_params.pt")
    assert _max_diff(ck["state_dict"], r0["state"]) == 0.0


def test_resume_under_ddp_equals_the_uninterrupted_run(ddp_out):
    full = torch.load(ddp_out / "rank0.pt")["state"]
    for r in (0, 1):
        res = torch.load(ddp_out / f"resumed{r}.pt")
        assert res["stopped_at"] == N_IMAGES // GLOBAL_BATCH  # the first run really stopped after one epoch
        assert _max_diff(res["half"], full) > 1e-4
        with pytest.raises(AssertionError):  # the bound catches the skipped epoch (half the steps)
            assert_close_to_update(full, res["half"], target_state_dict(_vit()), steps=STEPS, n=MAE_CHAIN)
        # the same 2 processes and threads redo the same arithmetic in the same order: bit for bit
        assert _max_diff(res["resumed"], full) == 0.0
    from tpp_monai.safe_io import safe_load

    assert safe_load(ddp_out / "resumed" / "tpp_resume.pt")["iteration"] == 2 * (N_IMAGES // GLOBAL_BATCH)


def test_rank_rows_matches_the_sampler_positions():
    """Rank r's local sample j sits at global position r + W j (DistributedSampler's stride)."""
    import torch.utils.data as tud

    ds = tud.TensorDataset(torch.arange(8))
    order1 = [int(i) for i in tud.DistributedSampler(ds, num_replicas=1, rank=0, seed=3)]
    ranks = [[int(i) for i in tud.DistributedSampler(ds, num_replicas=2, rank=r, seed=3)] for r in (0, 1)]
    assert [ranks[r][j] for j in range(4) for r in (0, 1)] == order1
    torch.manual_seed(5)
    full = torch.rand(4, 3)
    torch.manual_seed(5)
    assert torch.equal(rank_rows(lambda n: torch.rand(n, 3), 4), full)
    with pytest.raises(ValueError, match="divisible"):
        local_batch_size(6, 4)


# ------------------------------------------------------------------ fine-tuning
def _ft_init() -> torch.nn.Module:
    from tpp_monai.bundle.networks import build_classifier

    return build_classifier(_vit(), num_classes=3)


def _trainable(net: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def _ft_run() -> dict:
    from monai.engines import SupervisedTrainer

    from tpp_monai.engines.optim import build_optimizer

    net = _ft_init()
    labels = torch.arange(N_IMAGES) % 3
    data = [{"image": x, "label": y} for x, y in zip(_images(), labels)]
    loader = global_batch_loader(data, GLOBAL_BATCH, seed=0)
    ddp = wrap_ddp(net, torch.device("cpu"), find_unused_parameters=True)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=loader, network=ddp,
        optimizer=build_optimizer(net, lr=1e-3), loss_function=torch.nn.CrossEntropyLoss(),
    )
    trainer.run()
    return _trainable(net)


def test_finetuning_two_gloo_processes_equal_one(ddp_out):
    single = _ft_run()
    r0, r1 = (torch.load(ddp_out / f"ft{r}.pt") for r in (0, 1))
    assert any("head" in k or "fc" in k for k in single) and len(single) > 2
    assert_close_to_update(single, r0, _trainable(_ft_init()), steps=STEPS, n=FT_CHAIN)  # see helpers
    assert _max_diff(r1, r0) == 0.0


# ------------------------------------------------------------------ DINO centre
def _dino_centre(rank: int = 0, world: int = 1) -> torch.Tensor:
    """DINO's pending centre after one training forward on this rank's rows of fixed views."""
    from tpp_monai.pretext.dino import DINOPretext

    task = DINOPretext(_vit(), out_dim=16, hidden_dim=16, bottleneck_dim=8, n_local_crops=1, local_crop_size=16)
    g = torch.Generator().manual_seed(7)
    views = [torch.rand(4, 3, IMG, IMG, generator=g) for _ in range(2)] + [torch.rand(4, 3, 16, 16, generator=g)]
    task.train()
    task.loss_from_views([v[rank::world] for v in views])
    return task._pending_center.clone()


def test_dino_centre_is_the_mean_over_all_ranks(ddp_out):
    single = _dino_centre()
    # the teacher's outputs come from a weight-normalised layer on an L2-normalised input (|x| <= 1); one
    # forward of batch 4 vs two of batch 2 (another GEMM blocking) + the mean over ranks round differently
    atol = forward_tolerance(chain_length([192, 192, 16]), 1.0)
    for r in (0, 1):  # each rank saw half of the batch; the centre update uses the whole batch's mean
        assert torch.allclose(torch.load(ddp_out / f"dino{r}.pt"), single, atol=atol, rtol=0)

    everything = torch.cat([torch.arange(8.0).reshape(4, 2) + 10 * r for r in (0, 1)])
    for r in (0, 1):
        assert torch.allclose(torch.load(ddp_out / f"c{r}.pt"), everything.mean(0, keepdim=True))


# ------------------------------------------------------------------ mixed precision
def test_bf16_autocast_tpp_keeps_frozen_backbone_and_trains(tmp_path):
    state, before, after = _mae_run(tmp_path, amp="bf16")
    assert before == after
    assert _max_diff(state, target_state_dict(_vit())) > 1e-3


def test_amp_resolution():
    from tpp_monai.engines.amp import grad_scaler, resolve_amp

    assert resolve_amp(None, "cpu") is None and resolve_amp(True, "cpu") is None
    assert resolve_amp("bf16", "cpu") is torch.bfloat16
    assert resolve_amp(False, "cuda") is None
    assert grad_scaler("cpu", torch.float16) is not None and grad_scaler("cpu", torch.bfloat16) is None
    with pytest.raises(ValueError, match="amp must be"):
        resolve_amp("int8", "cpu")


def _threads_worker(rank: int, world: int, out: str) -> None:
    """A few DDP steps (intra-op parallel matmuls and gloo all-reduces), then the rank's thread count."""
    net = wrap_ddp(torch.nn.Linear(256, 256))
    for _ in range(3):
        net(torch.randn(64, 256)).sum().backward()
    Path(out, f"threads{rank}.txt").write_text(str(torch.get_num_threads()))


def test_threads_per_rank_under_fork_is_one_with_a_warning(tmp_path, monkeypatch):
    """TPP_THREADS_PER_RANK=2 with forked ranks after the parent computed on 2 threads used to hang in OpenMP
    (reproduced: both ranks stuck until the 60 s timeout); now the ranks use 1 thread and say why."""
    from tpp_monai.engines.distributed import threads_per_rank

    monkeypatch.setenv("TPP_THREADS_PER_RANK", "2")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(512, 512)
        (a @ a).sum()  # the parent's OpenMP pool is up
        with pytest.warns(RuntimeWarning, match="TPP_THREADS_PER_RANK=2 with fork-started processes"):
            spawn_cpu(_threads_worker, 2, str(tmp_path), timeout=90)
    finally:
        torch.set_num_threads(before)
    assert [Path(tmp_path, f"threads{r}.txt").read_text() for r in range(2)] == ["1", "1"]
    assert threads_per_rank("spawn") == 2


@pytest.mark.slow
def test_threads_per_rank_under_spawn_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("TPP_THREADS_PER_RANK", "2")
    spawn_cpu(_threads_worker, 2, str(tmp_path), start_method="spawn", timeout=180)
    assert [Path(tmp_path, f"threads{r}.txt").read_text() for r in range(2)] == ["2", "2"]
