"""The library's one warm-up + cosine schedule equals the DINO / MAE formulas at chosen iterations, and every
user (2D TPP trainer, DINO teacher momentum, nnU-Net 3D DINO stage) goes through it."""

import math

import pytest

from tpp_monai.engines.schedules import WarmupCosineSchedule, build_schedule, cosine_value, warmup_cosine_value


def paper_lr(i: int, total: int, peak: float, warm: int, final: float = 0.0) -> float:
    """Re-statement of DINO's cosine_scheduler per iteration (warm-up reaching the peak on its last step)."""
    if i < warm:
        return peak * (i + 1) / warm
    n = total - warm
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(i - warm, n) / n))


def paper_wd(i: int, total: int, start: float = 0.04, end: float = 0.4) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(i, total) / total))


@pytest.mark.parametrize("i", [0, 1, 249, 2499, 2500, 2501, 7000, 14999, 24999, 25000, 30000])
def test_dino_recipe_values(i):
    # DINO recipe: batch 64 -> lr 1e-4 * 64 / 256, 10 warm-up epochs of 250 iterations, 100 epochs
    peak, warm, total = 1e-4 * 64 / 256, 2500, 25000
    s = build_schedule(peak, epochs=100, iters_per_epoch=250, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4)
    assert (s.total_steps, s.warmup_steps) == (total, warm)
    assert s.lr_at(i) == pytest.approx(paper_lr(i, total, peak, warm), rel=1e-12, abs=1e-18)
    assert s.wd_at(i) == pytest.approx(paper_wd(i, total), rel=1e-12)


def test_landmarks():
    assert warmup_cosine_value(0, 100, 2.0, 10) == pytest.approx(0.2)
    assert warmup_cosine_value(9, 100, 2.0, 10) == pytest.approx(2.0)  # peak on the last warm-up step
    assert warmup_cosine_value(55, 100, 2.0, 10) == pytest.approx(1.0)  # half-way through the cosine
    assert warmup_cosine_value(100, 100, 2.0, 10, final=0.5) == pytest.approx(0.5)
    assert cosine_value(0, 10, 0.04, 0.4) == pytest.approx(0.04) and cosine_value(10, 10, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine_value(5, 10, 0.04, 0.4) == pytest.approx(0.22)
    s = WarmupCosineSchedule(lr=1.0, total_steps=10, weight_decay=0.05)
    assert s.wd_at(7) == 0.05  # constant weight decay (MAE)


def test_one_implementation_everywhere():
    """2D DINO's teacher momentum, the Python TPP trainer and the nnU-Net trainer import the shared functions."""
    import tpp_monai.engines.optim as optim
    import tpp_monai.engines.tpp_trainer as tt
    import tpp_monai.pretext.dino as dino

    assert optim.WarmupCosineSchedule is WarmupCosineSchedule and tt.WarmupCosineSchedule is WarmupCosineSchedule
    assert dino.cosine_momentum(3, 10) == cosine_value(3, 10, 0.996, 1.0)
    pytest.importorskip("nnunetv2")
    import tpp_monai.nnunet.trainers as tr

    assert "math.cos" not in open(tr.__file__).read()  # no private copy of the cosine left in the nnU-Net stage
