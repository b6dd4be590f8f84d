"""The MAE-TPP step does the work the physics says and no more: its FLOPs against a fine-tuning step
match the shape estimate (encoder on the visible 25% of tokens, decoder on all; frozen layers get input
gradients only). A regression that feeds the encoder all tokens, or computes weight gradients of the
frozen decoder, moves the ratio out of the 10% band and fails here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tpp_monai.backbones.vit import build_vit
from tpp_monai.benchmark.flops import StepShape, count_flops, finetune_step_flops, mae_finetune_ratio, mae_step_flops
from tpp_monai.networks import build_vit_classifier
from tpp_monai.peft import apply_peft
from tpp_monai.pretext.mae import MAEPretext

IMG, DEPTH, BOTTLENECK, DEC_DIM, DEC_DEPTH, BATCH = 64, 4, 16, 128, 2, 2


def _vit():
    torch.manual_seed(0)
    vit = build_vit("tiny", img_size=IMG, depth=DEPTH)
    apply_peft(vit, "adapter", {"bottleneck": BOTTLENECK})
    return vit


def _shape() -> StepShape:
    return StepShape(192, DEPTH, (IMG // 16) ** 2, 16 * 16 * 3, bottleneck=BOTTLENECK, decoder_dim=DEC_DIM,
                     decoder_depth=DEC_DEPTH)


@pytest.fixture(scope="module")
def batch():
    return torch.rand(BATCH, 3, IMG, IMG), torch.zeros(BATCH, dtype=torch.long)


@pytest.fixture(scope="module")
def finetune_flops(batch):
    x, y = batch
    net = build_vit_classifier(_vit(), 2)
    return count_flops(lambda: F.cross_entropy(net(x), y).backward())


def _mae(trainable: bool) -> MAEPretext:
    task = MAEPretext(_vit(), decoder_dim=DEC_DIM, decoder_depth=DEC_DEPTH, decoder_heads=4)
    task.set_decoder_trainable(trainable)
    return task


def test_cpu_attention_is_counted():
    q = torch.rand(2, 3, 17, 8, requires_grad=True)
    fwd = 4 * 2 * 3 * 17 * 17 * 8
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == fwd
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()) == 3 * fwd


def test_finetune_step_flops_match_estimate(finetune_flops):
    est = finetune_step_flops(_shape(), BATCH)
    assert finetune_flops == pytest.approx(est, rel=0.01)


@pytest.mark.parametrize("trainable", [False, True])
def test_mae_step_flop_ratio_within_10_percent_of_estimate(batch, finetune_flops, trainable):
    task = _mae(trainable)
    flops = count_flops(lambda: task(batch[0])["loss"].backward())
    est = mae_finetune_ratio(_shape(), trainable)
    assert flops / finetune_flops == pytest.approx(est, rel=0.10)
    assert flops == pytest.approx(mae_step_flops(_shape(), trainable, BATCH), rel=0.01)


def test_encoder_on_all_tokens_falls_outside_the_band(batch, finetune_flops):
    """The check can fail: encoding every patch and dropping the masked ones afterwards (same loss
    maths for the visible tokens' positions, 4x the encoder work) is caught."""
    task = _mae(False)

    def encode_all(images, ids_keep):
        tokens = task.backbone.forward_features(images).tokens
        vis = torch.gather(tokens[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return torch.cat([tokens[:, :1], vis], dim=1)

    task.encode = encode_all
    ratio = count_flops(lambda: task(batch[0])["loss"].backward()) / finetune_flops
    assert abs(ratio / mae_finetune_ratio(_shape(), False) - 1) > 0.10


def test_frozen_weights_get_no_gradient(batch):
    task = _mae(False)
    task(batch[0])["loss"].backward()
    with_grad = {n for n, p in task.named_parameters() if p.grad is not None}
    assert with_grad and all(".peft_adapter." in n for n in with_grad), sorted(with_grad)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert with_grad == trainable


def test_benchmark_prints_time_and_flop_ratio_beside_the_estimates():
    """``benchmarks/tpp_throughput.py``'s interleaved part: counted FLOP ratios equal the shape estimate and
    the table shows time ratio, FLOP ratio, shape estimate and the issue's estimate on one row."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tpp_throughput.py"
    spec = importlib.util.spec_from_file_location("tpp_throughput_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        r = bench.interleaved_ratio("tiny", 32, 2, 1)
    finally:
        torch.set_num_threads(threads)
    for mode in ("mae_frozen", "mae_trainable"):
        assert r["flops"][mode] / r["flops"]["finetune"] == pytest.approx(r["estimate"][mode], rel=0.01)
        assert len(r["all_s"][mode]) == 1 and r["step_s"][mode] > 0
    text = bench.ratio_table(r)
    row = next(line for line in text.splitlines() if line.startswith("| mae_frozen |")).split("|")
    assert float(row[5]) == pytest.approx(r["flops"]["mae_frozen"] / r["flops"]["finetune"], abs=1e-3)
    assert r["time_ratio"]["mae_frozen"] == pytest.approx(r["all_s"]["mae_frozen"][0] / r["all_s"]["finetune"][0])
    assert float(row[4]) == pytest.approx(r["time_ratio"]["mae_frozen"], abs=1e-3)
    assert row[7].strip() == "~0.55"
